"""The pure DiPO core: perplexity, the PSD threshold fit and bidirectional reward reallocation (DIPO_SPEC.md §1-4, §7).

Numpy in, numpy out, no I/O: the reward service feeds it from the shared PPL window and the learner never imports it.

Conventions that the spec leaves implicit and that every caller relies on:

- **Items exactly at τ*.** The fitted rule predicts "correct" for ``p < τ*`` and "wrong" for ``p ≥ τ*`` (that is
  how ``err`` counts). The two spaces are therefore the two sides of that rule: EiS = {p < τ*} and
  ErS = {p ≥ τ*}, a partition with no gap. A window item can only sit exactly on τ* when the midpoint of two
  adjacent floats rounds onto one of them; ``fit_threshold`` then picks the upper neighbour, so the tie lands in
  ErS exactly as ``err`` counted it. A fresh response scored later may also equal τ* and is treated the same way.
- **Empty spaces.** A share over an empty space (or an empty window) is reported as 0.0; the gate is closed then,
  so the share never decides anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Membership = Literal["max", "mean", "all"]
GroupKind = Literal["easy", "normal", "hard"]
ReallocAction = Literal["none", "reward", "penalty"]

MEMBERSHIPS: tuple[str, ...] = ("max", "mean", "all")


@dataclass(frozen=True)
class ThresholdFit:
    """Result of perplexity space disentangling on one window (DIPO_SPEC.md §3)."""

    tau: float
    """τ*: EiS = {p < tau}, ErS = {p ≥ tau}; ``-inf`` or ``+inf`` when one space is empty."""
    error_rate: float
    """err(τ*) / window size."""
    exploit_correct_share: float
    """Share of correct responses in EiS (0.0 when EiS is empty)."""
    explore_wrong_share: float
    """Share of wrong responses in ErS (0.0 when ErS is empty)."""
    gate_open: bool
    """The paper's advantage judgment: reallocation is allowed only when this is true."""
    window_size: int = 0
    """Number of (p, c) pairs the fit saw."""


@dataclass(frozen=True)
class Reallocation:
    """BRR outcome for one group (DIPO_SPEC.md §4)."""

    rewards: np.ndarray
    """Rr, the reallocated reward vector (float64, same length as the group)."""
    kind: GroupKind
    action: ReallocAction


def sequence_perplexity(logprobs: np.ndarray) -> float:
    """Return exp(-mean log-prob) over the response tokens of one sequence.

    NaN policy: a NaN or ``-inf`` log-prob raises ``ValueError`` instead of yielding a NaN/inf perplexity, because
    either means the backend recorded something other than the sampled token's probability, and a silently poisoned
    value would shift τ* for every replica sharing the window. The caller excludes such a response from the window
    (as it does an empty one) and counts it.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1:
        raise ValueError(f"logprobs must be 1-D (one value per response token), got shape {lp.shape}")
    if lp.size == 0:
        raise ValueError("an empty response has no perplexity: exclude it from the PPL window")
    if not np.all(np.isfinite(lp)):
        raise ValueError(
            "logprobs contain NaN or ±inf: check the backend returns the sampled tokens' log-probs; "
            "exclude this response from the PPL window"
        )
    ppl = float(np.exp(-lp.mean()))
    if not np.isfinite(ppl):
        raise ValueError(f"perplexity overflows float64 (mean NLL {-lp.mean():.1f}): the log-probs are implausible")
    return ppl


def _window_arrays(ppl: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (ppl, correct) pair of equal-length 1-D arrays and return (float64, bool) copies."""
    p = np.asarray(ppl, dtype=np.float64)
    c = np.asarray(correct)
    if p.ndim != 1 or c.ndim != 1:
        raise ValueError(f"ppl and correct must be 1-D, got shapes {p.shape} and {c.shape}")
    if p.shape != c.shape:
        raise ValueError(f"ppl and correct must have the same length, got {p.shape[0]} and {c.shape[0]}")
    if not np.all(np.isfinite(p)):
        raise ValueError("ppl must be finite: drop responses whose perplexity is NaN/inf before fitting")
    if c.dtype != np.bool_:
        if not np.all((c == 0) | (c == 1)):
            raise ValueError("correct must hold only 0/1 or booleans (correctness, not the shaped reward)")
        c = c.astype(np.bool_)
    return p, c


def _midpoint(lo: float, hi: float) -> float:
    """Return a threshold t with lo < t <= hi, so that {p < t} splits exactly between lo and hi."""
    mid = 0.5 * lo + 0.5 * hi  # halves first: no overflow for huge finite values
    # Adjacent floats have no float strictly between them; rounding onto lo would move lo to the wrong side.
    return mid if mid > lo else hi


def fit_threshold(ppl: np.ndarray, correct: np.ndarray, min_window: int = 0) -> ThresholdFit:
    """Fit τ* minimising err(τ) = #{c=1, p ≥ τ} + #{c=0, p < τ} and evaluate the gate (DIPO_SPEC.md §3)."""
    p, c = _window_arrays(ppl, correct)
    if min_window < 0:
        raise ValueError(f"min_window must be >= 0, got {min_window}")
    n = int(p.size)
    if n == 0:
        return ThresholdFit(float("-inf"), 0.0, 0.0, 0.0, False, 0)

    # Order among equal p values is irrelevant (splits fall only between distinct values), so the fast unstable sort
    # is exact here.
    order = np.argsort(p)
    ps = p[order]
    # cum_correct[k] = correct responses among the k smallest p.
    cum_correct = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(c[order], out=cum_correct[1:])
    total_correct = int(cum_correct[-1])

    # Split k puts the k smallest items in EiS; it is a real candidate only between distinct values (or at 0, n).
    # err(k) = (correct in ErS) + (wrong in EiS) = (C - cc[k]) + (k - cc[k]).
    ks = np.concatenate(([0], np.flatnonzero(ps[1:] > ps[:-1]) + 1, [n]))
    errs = total_correct + ks - 2 * cum_correct[ks]
    best = int(np.argmin(errs))  # first minimum = smallest candidate, since ks ascend like their thresholds
    k = int(ks[best])
    if k == 0:
        tau = float("-inf")
    elif k == n:
        tau = float("inf")
    else:
        tau = _midpoint(float(ps[k - 1]), float(ps[k]))

    exploit_correct = int(cum_correct[k])
    explore_wrong = (n - k) - (total_correct - exploit_correct)
    exploit_share = exploit_correct / k if k else 0.0
    explore_share = explore_wrong / (n - k) if k < n else 0.0
    # At the chosen minimum the EiS share is always > 1/2 (k > 0 must beat k = 0 strictly); the ErS share can be
    # exactly 1/2 (a tie with +inf that the smaller candidate wins), so both majority tests matter as written.
    gate_open = n >= min_window and 0 < k < n and exploit_share > 0.5 and explore_share > 0.5
    return ThresholdFit(
        tau=tau,
        error_rate=int(errs[best]) / n,
        exploit_correct_share=exploit_share,
        explore_wrong_share=explore_share,
        gate_open=bool(gate_open),
        window_size=n,
    )


def _group_arrays(
    ppl: np.ndarray, correct: np.ndarray, rewards: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one group's arrays and return (ppl float64, correct bool, rewards float64)."""
    p, c = _window_arrays(ppl, correct)
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape != p.shape:
        raise ValueError(f"rewards must have the group's shape {p.shape}, got {r.shape}")
    if p.size == 0:
        raise ValueError("a group needs at least one response")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards must be finite: map verifier failures to a status, not to NaN")
    return p, c, r


def _classify(c: np.ndarray, r: np.ndarray) -> GroupKind:
    """Return the group kind: extreme kinds need identical rewards (zero DAPO signal) and uniform correctness."""
    if not np.all(r == r[0]):
        return "normal"  # shaped rewards that differ already carry a DAPO signal
    if not c.any():
        return "hard"
    if c.all():
        return "easy"
    return "normal"


def _statistic(p: np.ndarray, membership: str, side: Literal["low", "high"]) -> float:
    """Return the perplexity that membership tests against τ*: for "all", the value closest to the other side."""
    if membership == "max":
        return float(p.max())
    if membership == "mean":
        return float(p.mean())
    # "all": every p in EiS iff max p < τ*; every p in ErS iff min p ≥ τ*.
    return float(p.max()) if side == "low" else float(p.min())


def reallocate(
    ppl: np.ndarray,
    correct: np.ndarray,
    rewards: np.ndarray,
    fit: ThresholdFit,
    membership: str = "max",
    enable_reward: bool = True,
    enable_penalty: bool = True,
) -> Reallocation:
    """Bidirectional reward reallocation for ONE group under a fitted threshold (DIPO_SPEC.md §4).

    For hard groups "max" and "all" coincide (all p < τ* iff max p < τ*); for easy groups "max" is the loosest test
    and "all" the strictest.
    """
    if membership not in MEMBERSHIPS:
        raise ValueError(f"membership must be one of {MEMBERSHIPS}, got {membership!r}")
    p, c, r = _group_arrays(ppl, correct, rewards)
    kind = _classify(c, r)
    realloc = np.zeros(p.size, dtype=np.float64)
    j = int(np.argmax(p))  # numpy returns the lowest index on ties, as the spec requires
    if not fit.gate_open:
        return Reallocation(realloc, kind, "none")
    if kind == "hard" and enable_reward and _statistic(p, membership, "low") < fit.tau:
        realloc[j] = 1.0  # confidently wrong: reward the least confident attempt (exploration)
        return Reallocation(realloc, kind, "reward")
    if kind == "easy" and enable_penalty and _statistic(p, membership, "high") >= fit.tau:
        realloc[:] = 1.0
        realloc[j] = 0.0  # correct but unsure: penalise the least confident answer (exploitation)
        return Reallocation(realloc, kind, "penalty")
    return Reallocation(realloc, kind, "none")


def group_has_signal(rewards: np.ndarray, realloc: Reallocation) -> bool:
    """Return True when the group carries a learning signal: R or Rr not all equal (dynamic sampling keeps it)."""
    r = np.asarray(rewards, dtype=np.float64)
    rr = realloc.rewards
    if r.shape != rr.shape:
        raise ValueError(f"rewards {r.shape} and reallocated rewards {rr.shape} must have the same shape")
    if r.size == 0:
        return False
    return bool(not np.all(r == r[0]) or not np.all(rr == rr[0]))


def quadrant_shares(ppl: np.ndarray, correct: np.ndarray, tau: float) -> dict[str, float]:
    """Return the CL/CH/EL/EH shares (correct/error × low/high perplexity at τ) of a window (DIPO_SPEC.md §7)."""
    p, c = _window_arrays(ppl, correct)
    if np.isnan(tau):
        raise ValueError("tau must not be NaN: pass ThresholdFit.tau")
    n = p.size
    if n == 0:
        return {"CL": 0.0, "CH": 0.0, "EL": 0.0, "EH": 0.0}
    low = p < tau  # same sides as ThresholdFit: ties at τ count as high
    return {
        "CL": float(np.count_nonzero(c & low)) / n,
        "CH": float(np.count_nonzero(c & ~low)) / n,
        "EL": float(np.count_nonzero(~c & low)) / n,
        "EH": float(np.count_nonzero(~c & ~low)) / n,
    }
