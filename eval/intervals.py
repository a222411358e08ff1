"""95 % intervals over training seeds: of a run's mean (Student t) and of a contrast (Welch).

A run measured with n training seeds (xfusion.config.seed_replicates) has the mean of its n values
and the 95 % Student t-interval mean ± t(0.975, n-1)·s/√n, s the seeds' sample standard
deviation; with one seed there is no interval (NaN, an empty CSV cell). The tables write it as
`<metric>_t95_low`, `<metric>_t95_high` beside `<metric>` (the mean) and `n_seeds`.

A contrast of independent runs, effect = Σ c_i·mean_i (a difference of two runs, or a
difference of two differences), has the standard error √(Σ c_i²·se_i²) and the
Welch–Satterthwaite degrees of freedom (Σ c_i²·se_i²)² / Σ (c_i²·se_i²)² / (n_i - 1); its 95 % interval is
effect ± t(0.975, df)·se. Each run's se is read back from its table row: (high - mean) / t(0.975,
n-1). References: B. L. Welch, Biometrika 34 (1947); F. E. Satterthwaite, Biometrics 2 (1946).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from scipy import stats

LEVEL = 0.95
NAN = float("nan")


def interval_columns(column: str) -> tuple[str, str]:
    """The CSV columns of a column's 95 % t-interval over seeds: `<column>_t95_low`, `_high`."""
    return f"{column}_t95_low", f"{column}_t95_high"


def t_quantile(df: float) -> float:
    return float(stats.t.ppf(0.5 + LEVEL / 2, df))


def finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_interval(values: Iterable) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the measured values (NaN and None left out); no interval below
    two values."""
    x = finite(values)
    if not x:
        return NAN, NAN, NAN, 0
    mean = statistics.fmean(x)
    if len(x) < 2:
        return mean, NAN, NAN, len(x)
    half = t_quantile(len(x) - 1) * statistics.stdev(x) / math.sqrt(len(x))
    return mean, mean - half, mean + half, len(x)


@dataclass(frozen=True)
class Estimate:
    """A run's mean over its seeds, its standard error and its number of seeds."""

    mean: float
    se: float
    n: int

    @classmethod
    def from_interval(cls, mean: float, high: float, n: int) -> "Estimate":
        """Read back from a table row (mean, `_t95_high`, n_seeds)."""
        se = (high - mean) / t_quantile(n - 1) if n >= 2 else NAN
        return cls(float(mean), float(se), int(n))


def contrast(terms: Sequence[tuple[float, Estimate]]) -> tuple[float, float, float]:
    """(effect, low, high) of Σ c·mean over independent runs `(c, estimate)`, Welch's interval;
    NaN bounds where a run has fewer than two seeds."""
    effect = sum(c * e.mean for c, e in terms)
    if any(e.n < 2 or math.isnan(e.se) for _, e in terms):
        return effect, NAN, NAN
    parts = [(c * e.se) ** 2 for c, e in terms]
    var = sum(parts)
    if var == 0:  # every seed measured the same (e.g. a frozen text tower's MMLU)
        return effect, effect, effect
    df = var ** 2 / sum(p ** 2 / (e.n - 1) for p, (_, e) in zip(parts, terms))
    half = t_quantile(df) * math.sqrt(var)
    return effect, effect - half, effect + half
