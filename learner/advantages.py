"""Group-relative advantages for DAPO and DiPO (DIPO_SPEC.md §5), numpy in, numpy out, no torch."""

from __future__ import annotations

import numpy as np

STD_EPS = 1e-6
"""Added to the group std before dividing, as in the spec's norm(x) = (x - mean) / (std + 1e-6)."""


def normalise_group(x: np.ndarray, std_ddof: int = 1, norm_by_std: bool = True) -> np.ndarray:
    """Return (x - mean(x)) / (std(x) + 1e-6) within one group, or x - mean(x) when norm_by_std is False.

    A group with no more members than ``std_ddof`` (a single response with ddof=1) has no defined sample std; its
    std is taken as 0 instead of NaN. Its centred values are all 0 anyway, so the advantages are 0: one response
    carries no group-relative signal, and a NaN must never reach the loss.
    """
    v: np.ndarray = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"a group's rewards must be 1-D, got shape {v.shape}")
    if v.size == 0:
        raise ValueError("a group needs at least one response")
    if not np.all(np.isfinite(v)):
        raise ValueError("rewards must be finite: map verifier failures to a status, not to NaN")
    if std_ddof < 0:
        raise ValueError(f"std_ddof must be >= 0, got {std_ddof}")
    centred: np.ndarray = v - v.mean()
    if not norm_by_std:
        return centred
    std = float(v.std(ddof=std_ddof)) if v.size > std_ddof else 0.0
    scaled: np.ndarray = centred / (std + STD_EPS)
    return scaled


def group_advantages(
    rewards: np.ndarray,
    realloc_rewards: np.ndarray,
    alpha: float,
    std_ddof: int = 1,
    norm_by_std: bool = True,
) -> np.ndarray:
    """Return A = norm(R) + alpha * norm(Rr) for one group; alpha = 0 returns plain DAPO's norm(R) bit for bit."""
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    base = normalise_group(rewards, std_ddof, norm_by_std)
    rr = np.asarray(realloc_rewards, dtype=np.float64)
    if rr.shape != base.shape:
        raise ValueError(f"realloc_rewards must have the rewards' shape {base.shape}, got {rr.shape}")
    if alpha == 0.0:
        if not np.all(np.isfinite(rr)):
            raise ValueError("realloc_rewards must be finite")
        return base  # skip the sum so that DAPO is reproduced exactly, with no -0.0/+0.0 or rounding surprises
    return base + alpha * normalise_group(rr, std_ddof, norm_by_std)
