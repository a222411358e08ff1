"""REPA alignment: image-token hidden states after layer `model.repa.layer` -> trainable
projector -> 1 - cos against a frozen encoder's features of the same image (supplied in the batch).

Targets are either per token, (B, P, F) with one feature per image token, or pooled, (B, F),
compared with the mean of the projected tokens.

Projector (`model.repa.projector`): "linear", X-Fusion Supp. A's "trainable linear W" (loss
1 - cos(W h_img, h_clip)), the default; "mlp", REPA's 3-layer SiLU MLP.

References: X-Fusion Supplementary A (layer 8 vs CLIP penultimate features, a linear W); REPA
(Yu et al. 2025) Sec. 3.3: a 3-layer SiLU MLP projector and a negative cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xfusion.config import ConfigError, RepaConfig


def linear_projector(hidden_size: int, feature_dim: int) -> nn.Module:
    return nn.Linear(hidden_size, feature_dim)


def mlp_projector(hidden_size: int, feature_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                         nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                         nn.Linear(hidden_size, feature_dim))


# model.repa.projector -> builder; the names are xfusion.config.REPA_PROJECTORS (config checks).
PROJECTORS = {"linear": linear_projector, "mlp": mlp_projector}


class RepaHead(nn.Module):
    def __init__(self, cfg: RepaConfig, hidden_size: int, num_layers: int):
        super().__init__()
        if not 1 <= cfg.layer <= num_layers:
            raise ConfigError(f"config.model.repa.layer = {cfg.layer}: the base LLM has "
                              f"{num_layers} layers; choose a layer in [1, {num_layers}]")
        self.layer = cfg.layer
        self.proj = PROJECTORS[cfg.projector](hidden_size, cfg.feature_dim)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """hidden (B, P, D) after layer `self.layer`, target (B, P, F) or (B, F) -> mean 1 - cos."""
        z = self.proj(hidden)  # (B, P, F)
        if target.dim() == 2:
            z = z.mean(dim=1)  # (B, F): pooled targets
        elif target.shape[1] != z.shape[1]:
            raise ValueError(f"REPA targets have {target.shape[1]} tokens, the image has "
                             f"{z.shape[1]}: give one feature per image token, or pooled (B, F)")
        return (1.0 - F.cosine_similarity(z, target.to(z.dtype), dim=-1)).mean()
