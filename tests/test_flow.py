"""Our rectified-flow formulas against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from xfusion.model.flow import add_noise, sample_t, to_timestep, velocity_target


def test_scale_noise_equals_add_noise_with_sigma_equal_t():
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    for i in (0, 3, 9):
        t = sched.sigmas[i:i + 1]
        ours = add_noise(x0, eps, t)
        theirs = sched.scale_noise(x0, sched.timesteps[i:i + 1], eps)
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert torch.allclose(to_timestep(t), sched.timesteps[i:i + 1])


def test_euler_step_with_the_true_velocity_lands_on_the_straight_path():
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    x = add_noise(x0, eps, sched.sigmas[0].expand(2))
    for i, ts in enumerate(sched.timesteps):
        x = sched.step(velocity_target(x0, eps), ts, x).prev_sample
        assert torch.allclose(x, add_noise(x0, eps, sched.sigmas[i + 1].expand(2)), atol=1e-5)
    assert torch.allclose(x, x0, atol=1e-5)


def test_sample_t_schemes_lie_in_the_unit_interval_and_logit_normal_is_centred():
    g = torch.Generator().manual_seed(0)
    ln, un = sample_t(20000, "logit_normal", g), sample_t(20000, "uniform", g)
    assert ((ln > 0) & (ln < 1)).all() and ((un >= 0) & (un < 1)).all()
    assert abs(ln.median().item() - 0.5) < 0.02
    assert ln.std() < un.std()  # logit-normal concentrates mass near t = 0.5


def test_sample_t_rejects_an_unknown_scheme():
    import pytest

    with pytest.raises(ValueError, match="logit_normal"):
        sample_t(3, "cosine")
