"""Rectified flow (SD3): x_t = (1 - t) x0 + t eps, velocity target eps - x0, t = 1 is pure noise.

Conventions follow diffusers' FlowMatchEulerDiscreteScheduler, so that the sampler can use it as
is: its sigma is our t, and its timesteps are sigma * num_train_timesteps (1000). Logit-normal t
(m = 0, s = 1) is SD3's default training distribution.

References: Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3), Sec. 2 and 3.1;
diffusers/schedulers/scheduling_flow_match_euler_discrete.py (scale_noise, step).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000  # the scheduler's default: timestep = sigma * 1000


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SD3 eq. (2) with a = 1 - t, b = t: x_t = (1 - t) x0 + t eps. t: (B,), x0: (B, C, h, w)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = eps - x0: what the model predicts (the scheduler's `model_output`)."""
    return noise - x0


def to_timestep(t: torch.Tensor) -> torch.Tensor:
    """Our t in [0, 1] -> the scheduler's timestep in [0, 1000] (what the embedder sees)."""
    return t * NUM_TRAIN_TIMESTEPS


def sample_t(n: int, scheme: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """n training times in (0, 1): SD3 Sec. 3.1 logit-normal (m = 0, s = 1), or uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"timestep sampling {scheme!r}: must be 'logit_normal' or 'uniform'")
