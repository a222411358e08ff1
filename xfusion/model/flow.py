"""Rectified flow (SD3): x_t = (1 - t) x0 + t eps, velocity target eps - x0, t = 1 is pure noise.

Conventions follow diffusers' FlowMatchEulerDiscreteScheduler, so that the sampler can use it as
is: its sigma is our t, and its timesteps are sigma * num_train_timesteps (1000). Logit-normal t
(m = 0, s = 1) is SD3's default training distribution; its location m and scale s are config keys (SD3 Sec. 3.1 compares several: a
pixel-space model predicting x0 learns its layout at high noise, which JiT shifts its
logit-normal toward; see config/tiny.yaml). I2T images draw t from the same
distribution truncated to [0, `training.i2t_noise_max`] (X-Fusion Sec. 6.1: a noise limit of
100 % is the generation setting, 0 % a clean image), by inverse-CDF sampling.

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


def _check_scheme(scheme: str) -> None:
    if scheme not in ("logit_normal", "uniform"):
        raise ValueError(f"timestep sampling {scheme!r}: must be 'logit_normal' or 'uniform'")


def t_cdf(t: torch.Tensor, scheme: str, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """F(t) of a training distribution: logit-normal Phi((logit t - m) / s), uniform t."""
    _check_scheme(scheme)
    return torch.special.ndtr((torch.logit(t) - m) / s) if scheme == "logit_normal" else t


def t_quantile(u: torch.Tensor, scheme: str, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """F^-1(u), the inverse of `t_cdf`: logit-normal sigmoid(m + s Phi^-1(u)), uniform u."""
    _check_scheme(scheme)
    return torch.sigmoid(m + s * torch.special.ndtri(u)) if scheme == "logit_normal" else u


def sample_t(n: int, scheme: str, generator: torch.Generator | None = None,
             t_max: float | None = None, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """n training times: SD3 Sec. 3.1 logit-normal with location m and scale s (SD3's default
    m = 0, s = 1: median t = 0.5; m > 0 moves mass toward noise), or uniform (m, s unused).

    t_max None: the distribution itself, in (0, 1). t_max in [0, 1]: the distribution truncated
    to [0, t_max], drawn as t = F^-1(u F(t_max)) with u ~ U(0, 1) (exact, no rejection loop);
    t_max = 0 gives exactly 0 (F(0) = 0, F^-1(0) = 0), t_max = 1 the whole distribution."""
    _check_scheme(scheme)
    if t_max is None:
        if scheme == "logit_normal":
            return torch.sigmoid(m + s * torch.randn(n, generator=generator))
        return torch.rand(n, generator=generator)
    if not 0.0 <= t_max <= 1.0:
        raise ValueError(f"t_max = {t_max}: must be in [0, 1]")
    u = torch.rand(n, generator=generator).double()  # float32 draws: the stream's other draws
    # stay where they were; the transform runs in float64, as Phi^-1 is steep near 0 and 1
    f_max = t_cdf(torch.tensor(t_max, dtype=torch.float64), scheme, m, s)
    return t_quantile(u * f_max, scheme, m, s).clamp(max=t_max).float()
