"""Reward assembly for one group: verifier results -> R, perplexity, BRR, group kind, dynamic-sampling decision.

Pure functions (no I/O): the stream worker and the HTTP app both call :func:`score_group`, so a group scored
through ``POST /v1/score`` gets exactly what the worker would have written to ``scored``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reward_service.dipo import ThresholdFit, group_has_signal, reallocate, sequence_perplexity
from reward_service.verifiers.base import Status, VerifyResult
from services.config import RewardConfig
from services.protocol import RolloutGroup, ScoredGroup

#: The fit used before any window exists (and when DiPO is disabled): gate closed, nothing reallocated.
CLOSED_FIT = ThresholdFit(
    tau=float("inf"), error_rate=0.0, exploit_correct_share=0.0, explore_wrong_share=0.0, gate_open=False
)


@dataclass(frozen=True, slots=True)
class FitStamp:
    """The threshold fit in force and where it came from; stamped on every scored group."""

    fit: ThresholdFit
    fitted_at: float = 0.0


def status_reward(result: VerifyResult, timeout_as_wrong: bool = True) -> tuple[float, bool]:
    """The one place that maps a verifier outcome to (reward R, correctness c).

    Infrastructure failures (timeout, error) are scored as wrong when ``timeout_as_wrong`` (the caller counts
    them); otherwise they return NaN so that the group is dropped instead of trained on a made-up 0.
    """
    if result.status.is_infrastructure_failure and not timeout_as_wrong:
        return float("nan"), False
    if result.status is Status.CORRECT:
        return float(result.score), True
    # wrong / no_answer / unparsable (and tolerated failures): the verifier's score, which may be a shaped
    # partial-credit value for function calls, 0.0 for binary tasks.
    return float(result.score), False


def overlong_penalty(lengths: np.ndarray, max_len: int, buffer: int) -> np.ndarray:
    """DAPO soft overlong penalty: ((L - L_c) - |o|) / L_c for |o| > L - L_c, floored at -1, else 0."""
    if not 0 < buffer < max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}), got {buffer}")
    start = max_len - buffer
    penalty = (start - lengths.astype(np.float64)) / buffer
    return np.where(lengths > start, np.maximum(penalty, -1.0), 0.0)


def response_perplexities(rollout: RolloutGroup) -> np.ndarray:
    """Per-response perplexity from the behaviour log-probs; NaN for empty or non-finite responses."""
    out = np.full(len(rollout.responses), np.nan, dtype=np.float64)
    for i, response in enumerate(rollout.responses):
        if response.logprobs.size == 0:
            continue
        try:
            out[i] = sequence_perplexity(response.logprobs)
        except ValueError:
            continue  # non-finite log-probs: excluded from the window, like an empty response
    return out


def _overlong_penalties(rollout: RolloutGroup, cfg: RewardConfig, overlong_buffer: int | None) -> np.ndarray:
    """The soft overlong penalty of each response (DIPO_SPEC section 5); zeros when it is off or cannot apply."""
    penalty = np.zeros(len(rollout.responses), dtype=np.float64)
    max_len = rollout.task.sampling.max_new_tokens
    if not cfg.overlong.enabled or max_len <= 1:  # a 1-token limit leaves no room for a soft zone
        return penalty
    buffer = min(overlong_buffer or max(1, max_len // 4), max_len - 1)
    lengths = np.array([r.token_ids.size for r in rollout.responses])
    penalty += overlong_penalty(lengths, max_len, buffer)
    if cfg.overlong.filter_truncated:  # truncated responses are masked from the loss instead (DAPO's filter)
        penalty[[r.finish_reason == "length" for r in rollout.responses]] = 0.0
    return penalty


def score_group(
    rollout: RolloutGroup,
    results: Sequence[VerifyResult],
    stamp: FitStamp,
    cfg: RewardConfig,
    *,
    overlong_buffer: int | None = None,
    scorer_id: str = "",
) -> ScoredGroup:
    """Assemble the scored group of DIPO_SPEC sections 1, 4 and 5 from the verifier results of its responses.

    ``overlong_buffer`` is L_c (``reward.overlong.buffer``); None takes a quarter of the task's own
    ``max_new_tokens``. Either way it is clamped below the task's limit, so a task with a short limit is scored
    with a shorter soft zone instead of being refused.
    """
    if len(results) != len(rollout.responses):
        raise ValueError(f"{len(results)} verifier results for {len(rollout.responses)} responses")
    pairs = [status_reward(r, cfg.timeout_as_wrong) for r in results]
    reward = np.array([p[0] for p in pairs], dtype=np.float64)
    correct = np.array([p[1] for p in pairs], dtype=bool)
    failed = np.isnan(reward)  # only possible with timeout_as_wrong=False
    reward[failed] = 0.0

    reward += _overlong_penalties(rollout, cfg, overlong_buffer)

    ppl = response_perplexities(rollout)
    fit = stamp.fit if cfg.dipo.enabled else CLOSED_FIT
    if np.isnan(ppl).any():
        # A response without a perplexity cannot be ranked: leave the group to plain DAPO.
        fit = CLOSED_FIT
    realloc = reallocate(
        np.nan_to_num(ppl, nan=0.0),
        correct,
        reward,
        fit,
        membership=cfg.dipo.membership,
        enable_reward=cfg.dipo.enable_reward,
        enable_penalty=cfg.dipo.enable_penalty,
    )
    signal = group_has_signal(reward, realloc) and not failed.any()
    return ScoredGroup(
        rollout=rollout,
        status=[str(r.status) for r in results],
        correct=correct.astype(np.uint8),
        reward=reward.astype(np.float32),
        realloc_reward=np.asarray(realloc.rewards, dtype=np.float32),
        perplexity=ppl.astype(np.float32),
        group_kind=realloc.kind,
        action=realloc.action,
        tau=float(stamp.fit.tau),
        gate_open=bool(stamp.fit.gate_open and fit.gate_open),
        fit_window=int(stamp.fit.window_size),
        fit_at=float(stamp.fitted_at),
        signal=bool(signal),
        scorer_id=scorer_id,
        scored_at=time.time(),
    )
