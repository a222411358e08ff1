"""Image tokens in and velocities out: 2x2 linear patchify + timestep embedding on the way in,
the vision side's final RMSNorm + linear unpatchify on the way out.

`pos_embed: sincos_2d` adds DiT's fixed 2D sin-cos embedding of each token's grid cell
(diffusers' `get_2d_sincos_pos_embed`) to the patch tokens; `none` leaves position to the LLM's
1D RoPE over the flattened grid, as the paper does (`model.image_pos_embed`).

References: X-Fusion Sec. 4 ("a trainable linear patchify layer with a patch size of 2x2");
DiT (Peebles & Xie 2023) models.py: TimestepEmbedder, FinalLayer, initialize_weights,
get_2d_sincos_pos_embed.
"""

from __future__ import annotations

import functools
import math

import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from xfusion.model.flow import to_timestep


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/p * w/p, C*p*p), patches in row-major order."""
    B, C, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"latents of size {h}x{w} are not divisible by the patch size {p}")
    x = x.reshape(B, C, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (h // p) * (w // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, C: int, h: int, w: int) -> torch.Tensor:
    """(B, h/p * w/p, C*p*p) -> (B, C, h, w); the inverse of `patchify`."""
    B = x.shape[0]
    x = x.reshape(B, h // p, w // p, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


@functools.lru_cache(maxsize=8)
def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) DiT 2D sin-cos embedding, row-major like `patchify`; fixed, so
    computed once per grid shape, not at every forward pass (training and sampling steps)."""
    return get_2d_sincos_pos_embed(dim, (grid_h, grid_w), base_size=grid_h, output_type="pt")


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: sinusoidal features of t * 1000, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim): [cos(t f_k), sin(t f_k)], f_k geometric from 1 to 1/max_period."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device,
                                                               dtype=torch.float32) / half)
        args = timesteps.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(timesteps, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)  # (B, D)


class ImageIO(nn.Module):
    """Latents <-> image tokens, plus the learned embeddings of the begin/end-of-image tokens.

    The BOI/EOI embeddings live here, not in the LLM's embedding table, so that the frozen text
    weights (and their hash) never change; they start as the table's rows for those ids.
    """

    def __init__(self, hidden_size: int, latent_channels: int, patch_size: int,
                 boi_eoi_init: torch.Tensor, text_final_norm: LlamaRMSNorm,
                 pos_embed: str = "none"):
        super().__init__()
        self.p, self.C, self.pos_embed = patch_size, latent_channels, pos_embed
        patch_dim = latent_channels * patch_size * patch_size
        self.patch_embed = nn.Linear(patch_dim, hidden_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        self.boi_eoi = nn.Parameter(boi_eoi_init.detach().clone())  # (2, D)
        self.norm = LlamaRMSNorm(hidden_size, eps=text_final_norm.variance_epsilon)
        self.unpatch = nn.Linear(hidden_size, patch_dim)
        self.initialize_weights(text_final_norm)

    @torch.no_grad()
    def initialize_weights(self, text_final_norm: LlamaRMSNorm) -> None:
        # Patchify like a conv layer (DiT: xavier on the flattened kernel), bias 0.
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        # Timestep MLP: N(0, 0.02) as in DiT.
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        # The vision-side final norm starts as the text tower's final norm (the towers are copies).
        self.norm.weight.copy_(text_final_norm.weight)
        # Zero unpatchify (DiT's FinalLayer): the model starts by predicting velocity 0, so the
        # first DM gradients flow into the new output layer instead of pushing large random
        # errors back through the freshly copied vision tower.
        nn.init.zeros_(self.unpatch.weight)
        nn.init.zeros_(self.unpatch.bias)

    def encode(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) noisy latents and (B,) t in [0, 1] -> (B, P, D) image tokens."""
        dtype = self.patch_embed.weight.dtype  # latents arrive in float32, the model may be bf16
        tokens = self.patch_embed(patchify(latents.to(dtype), self.p))  # (B, P, D)
        if self.pos_embed == "sincos_2d":  # fixed: no parameter, nothing saved
            pos = sincos_2d(tokens.shape[-1], latents.shape[-2] // self.p,
                            latents.shape[-1] // self.p)
            tokens = tokens + pos.to(tokens)[None]
        return tokens + self.t_embed(to_timestep(t))[:, None, :]

    def decode(self, hidden: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, P, D) last hidden states of the image tokens -> (B, C, h, w) velocity."""
        return unpatchify(self.unpatch(self.norm(hidden)), self.p, self.C, h, w)
