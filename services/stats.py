"""Small statistics shared by `dipo eval` and `dipo experiment` (numpy only: no torch, no models)."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2_000
BOOTSTRAP_SEED = 0


def bootstrap_ci(
    values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values``, resampled with replacement (fixed RNG: reproducible).

    Pass one value per independent unit, e.g. per-item accuracies rather than single samples: the K samples of one
    item are correlated, so an interval over samples would be too narrow.
    """
    if values.size == 0:
        raise ValueError("a confidence interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)
