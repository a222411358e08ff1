"""Patchify / unpatchify, the timestep embedder and the zero-initialised output layer."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from xfusion.model.image_io import ImageIO, TimestepEmbedder, patchify, unpatchify


def make_io(C: int = 4, D: int = 16) -> ImageIO:
    torch.manual_seed(0)
    return ImageIO(D, C, 2, torch.randn(2, D), LlamaRMSNorm(D))


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


def test_timestep_sinusoid_is_cos_then_sin_of_geometric_frequencies():
    emb = TimestepEmbedder.sinusoid(torch.tensor([0.0, 500.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(500.0)))  # frequency 1 first
