"""Our rectified-flow formulas against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import pytest
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
    with pytest.raises(ValueError, match="logit_normal"):
        sample_t(3, "cosine")


@pytest.mark.parametrize("scheme,t_max", [("logit_normal", 0.5), ("logit_normal", 0.25),
                                          ("uniform", 0.3)])
def test_truncated_sample_t_has_the_quantiles_of_the_truncated_distribution(scheme, t_max):
    """I2T times: the training distribution truncated to [0, t_max]. Its analytic quantiles
    from scipy: logit-normal t = sigmoid(z), z a standard normal truncated at logit(t_max)."""
    from scipy import stats

    t = sample_t(40000, scheme, torch.Generator().manual_seed(0), t_max=t_max)
    assert (t >= 0).all() and (t <= torch.tensor(t_max)).all()
    t = t.double()
    if scheme == "logit_normal":
        z = stats.truncnorm(-float("inf"), float(torch.logit(torch.tensor(t_max))))
        ppf, cdf = (lambda p: torch.sigmoid(torch.tensor(z.ppf(p)))), (
            lambda x: z.cdf(torch.logit(torch.as_tensor(x)).numpy()))
    else:
        ppf, cdf = (lambda p: torch.tensor(p) * t_max), (lambda x: x / t_max)
    p = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)
    assert torch.allclose(t.quantile(p), ppf(p.numpy()), atol=0.01 * t_max)
    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform"])
def test_truncation_at_zero_is_exactly_clean_and_at_one_is_the_whole_distribution(scheme):
    from scipy import stats

    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_t(1000, scheme, g, t_max=0.0), torch.zeros(1000))
    full, untruncated = sample_t(40000, scheme, g, t_max=1.0), sample_t(40000, scheme, g)
    assert stats.ks_2samp(full.numpy(), untruncated.numpy()).pvalue > 1e-3
    p = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert torch.allclose(full.quantile(p), untruncated.quantile(p), atol=0.01)


@pytest.mark.parametrize("m,s,t_max", [(0.8, 0.8, None), (-0.5, 1.5, None), (0.8, 0.8, 0.5)])
def test_logit_normal_location_and_scale_give_the_shifted_quantiles(m, s, t_max):
    """training.timestep_logit_mean/std: logit t ~ N(m, s^2) (SD3 Sec. 3.1), truncated to
    [0, t_max] for I2T; quantiles and a KS test against scipy's (truncated) normal."""
    from scipy import stats

    t = sample_t(40000, "logit_normal", torch.Generator().manual_seed(2), t_max=t_max, m=m, s=s)
    hi = float("inf") if t_max is None else (float(torch.logit(torch.tensor(t_max))) - m) / s
    z = stats.truncnorm(-float("inf"), hi, loc=m, scale=s)
    logit = torch.logit(t.double()).numpy()
    p = [0.05, 0.25, 0.5, 0.75, 0.95]
    assert torch.allclose(torch.tensor(logit).quantile(torch.tensor(p, dtype=torch.float64)),
                          torch.tensor(z.ppf(p)), atol=0.03 * s)
    assert stats.kstest(logit, z.cdf).pvalue > 1e-3


def test_a_positive_logit_mean_draws_more_high_noise_times_and_the_default_is_unchanged():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    default, explicit = sample_t(5000, "logit_normal", g()), sample_t(5000, "logit_normal", g(),
                                                                      m=0.0, s=1.0)
    assert torch.equal(default, explicit)  # SD3's m = 0, s = 1: the draws of the old recipe
    shifted = sample_t(5000, "logit_normal", g(), m=0.8, s=0.8)
    assert (shifted > 0.8).float().mean() > 2 * (default > 0.8).float().mean()
