"""Bootstrap confidence intervals for per-sample scores (seeded, so reports are reproducible)."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap 95% interval over ``n`` samples."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}] (n={self.n})"


def bootstrap(values: Sequence[float], *, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean of ``values`` and the 2.5th-97.5th percentiles of resampled means.

    Raises:
        ValueError: no values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(float(x.mean()), float(lo), float(hi), int(x.size))


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOT, seed: int = 0
) -> Interval:
    """``mean(a - b)`` over paired samples (same prompts) with its bootstrap interval.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in count: {len(a)} vs {len(b)}")
    return bootstrap([x - y for x, y in zip(a, b)], n_boot=n_boot, seed=seed)
