"""Reward assembly: status -> reward, overlong penalty, perplexity, BRR on a group, dynamic sampling."""

from __future__ import annotations

import numpy as np
import pytest
from factories import math_group

from reward_service.dipo import ThresholdFit
from reward_service.scoring import CLOSED_FIT, FitStamp, overlong_penalty, score_group, status_reward
from reward_service.verifiers.base import Status, VerifyResult
from services.config import RewardConfig
from services.protocol import Response, Sampling

OPEN_FIT = FitStamp(
    ThresholdFit(tau=2.0, error_rate=0.1, exploit_correct_share=0.9, explore_wrong_share=0.9, gate_open=True,
                 window_size=256),
    fitted_at=123.0,
)  # fmt: skip


def results(*statuses: Status) -> list[VerifyResult]:
    return [VerifyResult(s, 1.0 if s is Status.CORRECT else 0.0) for s in statuses]


C, W, T = Status.CORRECT, Status.WRONG, Status.TIMEOUT


def test_status_reward_maps_every_status() -> None:
    assert status_reward(VerifyResult(C, 1.0)) == (1.0, True)
    for s in (Status.WRONG, Status.NO_ANSWER, Status.UNPARSABLE, Status.TIMEOUT, Status.ERROR):
        assert status_reward(VerifyResult(s, 0.0)) == (0.0, False)
    reward, correct = status_reward(VerifyResult(T, 0.0), timeout_as_wrong=False)
    assert np.isnan(reward) and not correct
    # shaped partial credit passes through for wrong answers
    assert status_reward(VerifyResult(W, -1.5)) == (-1.5, False)


def test_overlong_penalty_follows_dapo() -> None:
    lengths = np.array([10, 48, 49, 56, 64, 100])
    pen = overlong_penalty(lengths, max_len=64, buffer=16)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -1 / 16, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_len=64, buffer=64)


@pytest.mark.parametrize("filter_truncated", [False, True])
def test_truncated_responses_are_penalised_or_filtered_never_both(filter_truncated: bool) -> None:
    # max_new_tokens 64, buffer 16: 56 tokens that stopped, 64 that hit the limit, 10 well inside
    group = math_group("p", ["7", "7", "7"])
    group.responses = [
        Response.of_version(np.arange(n, dtype=np.uint32), np.full(n, -0.2, np.float32), r.text, finish, 0)
        for r, (n, finish) in zip(group.responses, [(56, "stop"), (64, "length"), (10, "stop")], strict=True)
    ]
    group.task.sampling = Sampling(max_new_tokens=64)
    cfg = RewardConfig.model_validate({"overlong": {"filter_truncated": filter_truncated}})
    scored = score_group(group, results(C, C, C), OPEN_FIT, cfg, overlong_buffer=16)
    truncated = 1.0 if filter_truncated else 0.0  # filtered: masked from the loss instead, so no penalty as well
    assert scored.reward.tolist() == pytest.approx([0.5, truncated, 1.0])


def test_mixed_group_is_normal_and_keeps_its_signal() -> None:
    group = math_group("p", ["7", "3", "7", "1"], nlls=[0.1, 1.5, 0.2, 1.4])
    scored = score_group(group, results(C, W, C, W), OPEN_FIT, RewardConfig(), overlong_buffer=16)
    assert scored.group_kind == "normal" and scored.action == "none"
    assert scored.signal
    assert scored.correct.tolist() == [1, 0, 1, 0]
    assert scored.reward.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert scored.perplexity == pytest.approx(np.exp([0.1, 1.5, 0.2, 1.4]), rel=1e-4)
    assert scored.tau == 2.0 and scored.gate_open and scored.fit_at == 123.0 and scored.fit_window == 256


def test_confidently_wrong_hard_group_rewards_its_max_ppl_response() -> None:
    # all wrong, every perplexity below tau*=2 (nll < ln 2): the whole group sits in the exploitation space
    group = math_group("p", ["1", "2", "3", "4"], nlls=[0.1, 0.5, 0.3, 0.2])
    scored = score_group(group, results(W, W, W, W), OPEN_FIT, RewardConfig(), overlong_buffer=16)
    assert scored.group_kind == "hard" and scored.action == "reward"
    assert scored.realloc_reward.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert scored.signal


def test_easy_group_with_a_high_ppl_answer_is_penalised() -> None:
    group = math_group("p", ["7"] * 4, nlls=[0.1, 0.2, 1.2, 0.3])  # exp(1.2) > 2
    scored = score_group(group, results(C, C, C, C), OPEN_FIT, RewardConfig(), overlong_buffer=16)
    assert scored.group_kind == "easy" and scored.action == "penalty"
    assert scored.realloc_reward.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_closed_gate_and_disabled_dipo_leave_zero_signal_groups_to_be_dropped() -> None:
    group = math_group("p", ["1", "2", "3", "4"], nlls=[0.1, 0.5, 0.3, 0.2])
    scored = score_group(group, results(W, W, W, W), FitStamp(CLOSED_FIT), RewardConfig(), overlong_buffer=16)
    assert scored.action == "none" and not scored.signal
    cfg = RewardConfig.model_validate({"dipo": {"enabled": False}})
    scored = score_group(group, results(W, W, W, W), OPEN_FIT, cfg, overlong_buffer=16)
    assert scored.action == "none" and not scored.signal and not scored.gate_open


def test_switched_off_direction_is_not_applied() -> None:
    group = math_group("p", ["1", "2", "3", "4"], nlls=[0.1, 0.5, 0.3, 0.2])
    cfg = RewardConfig.model_validate({"dipo": {"enable_reward": False}})
    scored = score_group(group, results(W, W, W, W), OPEN_FIT, cfg, overlong_buffer=16)
    assert scored.action == "none" and not scored.signal


def test_timeouts_can_drop_the_group_instead_of_scoring_zero() -> None:
    group = math_group("p", ["7", "3", "7", "1"])
    cfg = RewardConfig(timeout_as_wrong=False)
    scored = score_group(group, results(C, T, C, W), OPEN_FIT, cfg, overlong_buffer=16)
    assert not scored.signal
    assert scored.status[1] == "timeout"
    scored = score_group(group, results(C, T, C, W), OPEN_FIT, RewardConfig(), overlong_buffer=16)
    assert scored.signal and scored.reward.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_overlong_responses_are_penalised_in_the_reward_not_the_correctness() -> None:
    group = math_group("p", ["7", "7"], nlls=[0.1, 0.2])
    long = group.responses[1]
    group.responses[1] = Response.of_version(np.arange(60, dtype=np.uint32), np.full(60, -0.2, np.float32), long.text,
                                             "length", 0)  # fmt: skip
    scored = score_group(group, results(C, C), FitStamp(CLOSED_FIT), RewardConfig(), overlong_buffer=16)
    assert scored.correct.tolist() == [1, 1]
    assert scored.reward.tolist() == pytest.approx([1.0, 1.0 - 12 / 16])
    assert scored.group_kind == "normal" and scored.signal


def test_empty_response_has_no_perplexity_and_blocks_reallocation() -> None:
    group = math_group("p", ["1", "2"], nlls=[0.1, 0.2])
    r = group.responses[0]
    group.responses[0] = Response.of_version(
        np.zeros(0, np.uint32), np.zeros(0, np.float32), "", "stop", r.version_first
    )
    scored = score_group(group, results(W, W), OPEN_FIT, RewardConfig(), overlong_buffer=16)
    assert np.isnan(scored.perplexity[0])
    assert scored.action == "none"


def test_result_count_must_match() -> None:
    with pytest.raises(ValueError):
        score_group(math_group("p", ["1", "2"]), results(W), OPEN_FIT, RewardConfig(), overlong_buffer=16)


def test_the_overlong_buffer_follows_the_tasks_own_limit() -> None:
    # The run's L_c is 16, but this task allows 8 tokens: the soft zone is clamped to 7 tokens, never refused.
    group = math_group("p", ["7", "7"])
    group.responses = [
        Response.of_version(np.arange(n, dtype=np.uint32), np.full(n, -0.2, np.float32), r.text, "stop", 0)
        for r, n in zip(group.responses, [1, 8], strict=True)
    ]
    group.task.sampling = Sampling(max_new_tokens=8)
    scored = score_group(group, results(C, C), OPEN_FIT, RewardConfig(), overlong_buffer=16)
    assert scored.reward.tolist() == pytest.approx([1.0, 0.0])  # 8 tokens: (1 - 8) / 7 = -1, floored at -1
    default = score_group(group, results(C, C), OPEN_FIT, RewardConfig())  # unset: a quarter of 8
    assert default.reward.tolist() == pytest.approx([1.0, 1.0 - 2 / 2])
