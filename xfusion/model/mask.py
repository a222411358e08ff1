"""Attention mask of a mixed text-image sequence: causal over text, bidirectional inside each
image span, padding masked.

References: Transfusion (Zhou et al. 2024), Sec. 3.2 (causal + intra-image bidirectional);
torch.nn.functional.scaled_dot_product_attention (a boolean mask: True = may attend).
"""

from __future__ import annotations

import torch


def position_ids(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions counted over real tokens only, so left padding does not shift them.

    valid: (B, L) bool -> (B, L) long; padding gets position 0 (it is masked anyway)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


def attention_mask(span_ids: torch.Tensor, valid: torch.Tensor, q_start: int = 0) -> torch.Tensor:
    """Boolean SDPA mask (True = attend) for the query rows `q_start:` of the sequence.

    span_ids: (B, L) long, 0 for text tokens, k > 0 for the tokens of the k-th image span of the
    row; valid: (B, L) bool, False at padding. Returns (B, 1, L - q_start, L).
    A query attends to a real key that is not later than itself, or that lies in the query's own
    image span. Every query also attends to itself, so that a padding row is never fully masked
    (SDPA would return NaN there, and NaN would leak into gradients through the weights).
    """
    B, L = span_ids.shape
    q = torch.arange(q_start, L, device=span_ids.device)  # (Lq,)
    k = torch.arange(L, device=span_ids.device)  # (L,)
    causal = k[None, :] <= q[:, None]  # (Lq, L)
    q_span = span_ids[:, q_start:, None]  # (B, Lq, 1)
    same_image = (q_span == span_ids[:, None, :]) & (q_span > 0)  # (B, Lq, L)
    allowed = (causal[None] | same_image) & valid[:, None, :]
    allowed = allowed | (k[None, :] == q[:, None])[None]  # the diagonal, for padding rows
    return allowed[:, None]  # (B, 1, Lq, L)
