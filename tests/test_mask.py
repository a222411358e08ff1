"""The vectorised attention mask against a token-by-token reference on random layouts."""

from __future__ import annotations

import random

import torch

from xfusion.model.mask import attention_mask, position_ids


def random_layout(rng: random.Random, L: int):
    """One row: text runs and image spans in random order, then right or left padding."""
    span, k = [], 0
    n_real = rng.randint(1, L)
    while len(span) < n_real:
        if rng.random() < 0.3:
            k += 1
            span += [k] * rng.randint(1, 5)
        else:
            span += [0] * rng.randint(1, 4)
    span = span[:n_real]
    pad = L - n_real
    if rng.random() < 0.5:
        return [0] * pad + span, [False] * pad + [True] * n_real
    return span + [0] * pad, [True] * n_real + [False] * pad


def slow_mask(span: list[int], valid: list[bool]) -> torch.Tensor:
    L = len(span)
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            same_image = span[i] > 0 and span[i] == span[j]
            m[i, j] = (i == j) or (valid[j] and (j <= i or same_image))
    return m


def test_mask_matches_token_by_token_reference_on_random_layouts():
    rng = random.Random(0)
    for _ in range(30):
        B, L = rng.randint(1, 4), rng.randint(1, 24)
        rows = [random_layout(rng, L) for _ in range(B)]
        span = torch.tensor([r[0] for r in rows])
        valid = torch.tensor([r[1] for r in rows])
        expected = torch.stack([slow_mask(*r) for r in rows])[:, None]
        assert torch.equal(attention_mask(span, valid), expected)
        q = rng.randint(0, L - 1)
        assert torch.equal(attention_mask(span, valid, q_start=q), expected[:, :, q:])


def test_mask_is_causal_over_text_and_bidirectional_inside_an_image():
    span = torch.tensor([[0, 0, 1, 1, 1, 0]])
    m = attention_mask(span, torch.ones_like(span, dtype=torch.bool))[0, 0]
    assert not m[0, 1] and m[1, 0]  # text: causal
    assert m[2, 4] and m[4, 2]  # image: both ways
    assert not m[4, 5] and m[5, 4]  # text after the image sees it, not the reverse


def test_mask_lets_no_real_query_see_padding_and_never_empties_a_row():
    span = torch.tensor([[0, 0, 1, 1, 0, 0]])
    valid = torch.tensor([[False, True, True, True, True, False]])
    m = attention_mask(span, valid)[0, 0]
    assert not m[1:5, 0].any() and not m[1:5, 5].any()
    assert m.any(dim=-1).all()


def test_position_ids_skip_left_padding():
    valid = torch.tensor([[False, False, True, True], [True, True, True, False]])
    assert position_ids(valid).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
