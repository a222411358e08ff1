"""Patchify / unpatchify, the timestep embedder and the zero-initialised output layer."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from xfusion.model.image_io import ImageIO, TimestepEmbedder, patchify, unpatchify


def make_io(C: int = 4, D: int = 16, pos_embed: str = "none") -> ImageIO:
    torch.manual_seed(0)
    return ImageIO(D, C, 2, torch.randn(2, D), LlamaRMSNorm(D), pos_embed)


def test_unpatchify_inverts_patchify_and_patches_are_2x2_blocks():
    x = torch.randn(3, 4, 6, 8)
    tokens = patchify(x, 2)  # (3, 12, 16)
    assert tokens.shape == (3, 12, 16)
    assert torch.equal(tokens[0, 1].view(4, 2, 2), x[0, :, 0:2, 2:4])  # row-major patches
    assert torch.equal(unpatchify(tokens, 2, 4, 6, 8), x)


def test_output_layer_is_zero_at_init_so_the_first_velocity_is_zero():
    io = make_io()
    assert torch.equal(io.decode(torch.randn(2, 4, 16), 4, 4), torch.zeros(2, 4, 4, 4))


def test_image_tokens_depend_on_t_through_the_timestep_embedding():
    io = make_io()
    x = torch.randn(2, 4, 4, 4)
    a, b = io.encode(x, torch.tensor([0.1, 0.1])), io.encode(x, torch.tensor([0.9, 0.9]))
    assert a.shape == (2, 4, 16)
    assert not torch.allclose(a, b)
    shift = (a - b)[:, :1].expand_as(a - b)
    assert torch.allclose(a - b, shift, atol=1e-5)  # one shift for every patch


def test_sincos_2d_tells_every_grid_cell_apart_and_none_tells_none():
    """Equal latent patches in every cell of a 3x4 grid: without a position embedding the
    tokens are equal (position is left to RoPE), with sincos_2d each cell's token is its own,
    and the embedding is fixed (no parameter, nothing saved)."""
    x = torch.ones(1, 4, 6, 8)  # 2x2 patches -> a 3x4 grid of identical patches
    t = torch.tensor([0.5])
    plain, placed = make_io().encode(x, t)[0], make_io(pos_embed="sincos_2d").encode(x, t)[0]
    assert plain.shape == placed.shape == (12, 16)
    assert torch.allclose(plain, plain[:1].expand_as(plain))
    assert len({tuple(row.tolist()) for row in placed.round(decimals=5)}) == 12
    # same row, neighbouring columns differ less than cells far apart: a smooth 2D code
    near, far = (placed[0] - placed[1]).norm(), (placed[0] - placed[11]).norm()
    assert near < far
    assert make_io(pos_embed="sincos_2d").state_dict().keys() == make_io().state_dict().keys()


def test_timestep_sinusoid_is_cos_then_sin_of_geometric_frequencies():
    emb = TimestepEmbedder.sinusoid(torch.tensor([0.0, 500.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(500.0)))  # frequency 1 first
