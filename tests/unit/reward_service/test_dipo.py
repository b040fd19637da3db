"""Tests of the pure DiPO core: perplexity, PSD threshold fit, BRR and the dynamic-sampling signal."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.advantages import group_advantages
from reward_service.dipo import (
    Reallocation,
    ThresholdFit,
    fit_threshold,
    group_has_signal,
    quadrant_shares,
    reallocate,
    sequence_perplexity,
)

OPEN_FIT = ThresholdFit(tau=3.0, error_rate=0.1, exploit_correct_share=0.9, explore_wrong_share=0.8, gate_open=True)
CLOSED_FIT = ThresholdFit(tau=3.0, error_rate=0.4, exploit_correct_share=0.6, explore_wrong_share=0.5, gate_open=False)


def brute_force_fit(ppl: list[float], correct: list[int]) -> tuple[float, int]:
    """O(N²) reference: evaluate err at every candidate in ascending order and keep the first minimum."""
    values = sorted(set(ppl))
    candidates = [-math.inf] + [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)] + [math.inf]
    best_tau, best_err = math.nan, None
    for tau in candidates:
        err = sum(1 for p, c in zip(ppl, correct, strict=True) if (c == 1 and p >= tau) or (c == 0 and p < tau))
        if best_err is None or err < best_err:
            best_tau, best_err = tau, err
    assert best_err is not None
    return best_tau, best_err


# --- sequence_perplexity -------------------------------------------------------------------------------------------


def test_sequence_perplexity_is_exp_of_mean_nll() -> None:
    logprobs = np.array([-1.0, -2.0, -3.0])
    assert sequence_perplexity(logprobs) == pytest.approx(math.exp(2.0))


def test_sequence_perplexity_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError, match="empty response"):
        sequence_perplexity(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        sequence_perplexity(np.array([-1.0, np.nan]))
    with pytest.raises(ValueError, match="NaN"):
        sequence_perplexity(np.array([-1.0, -np.inf]))
    with pytest.raises(ValueError, match="1-D"):
        sequence_perplexity(np.zeros((2, 2)))


# --- fit_threshold -------------------------------------------------------------------------------------------------


def test_fit_separable_window_puts_tau_between_the_classes() -> None:
    fit = fit_threshold(np.array([1.0, 2.0, 5.0, 7.0]), np.array([1, 1, 0, 0]))
    assert fit.tau == 3.5
    assert fit.error_rate == 0.0
    assert fit.exploit_correct_share == 1.0
    assert fit.explore_wrong_share == 1.0
    assert fit.gate_open
    assert fit.window_size == 4


def test_fit_ties_choose_the_smallest_candidate() -> None:
    # err(-inf)=2, err(1.5)=3, err(2.5)=2, err(3.5)=3, err(+inf)=2: three minima, -inf is the smallest.
    fit = fit_threshold(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 1, 0, 1]))
    assert fit.tau == -math.inf
    assert fit.error_rate == 0.5
    assert not fit.gate_open  # EiS is empty


def test_fit_tie_between_midpoint_and_plus_inf_closes_gate_on_even_explore_space() -> None:
    # err(-inf)=2, err(1.5)=1, err(2.5)=2, err(+inf)=1: 1.5 wins the tie; ErS={2,3} is half wrong, not a majority.
    fit = fit_threshold(np.array([3.0, 1.0, 2.0]), np.array([1, 1, 0]))
    assert fit.tau == 1.5
    assert fit.error_rate == pytest.approx(1 / 3)
    assert fit.exploit_correct_share == 1.0
    assert fit.explore_wrong_share == 0.5
    assert not fit.gate_open


def test_fit_duplicate_values_split_only_between_distinct_values() -> None:
    fit = fit_threshold(np.array([2.0, 2.0, 2.0, 4.0]), np.array([1, 1, 0, 0]))
    assert fit.tau == 3.0
    assert fit.error_rate == 0.25
    assert fit.exploit_correct_share == pytest.approx(2 / 3)
    assert fit.gate_open


def test_fit_all_correct_window_has_empty_exploration_space() -> None:
    fit = fit_threshold(np.array([1.0, 2.0, 3.0]), np.array([True, True, True]))
    assert fit.tau == math.inf
    assert fit.error_rate == 0.0
    assert fit.exploit_correct_share == 1.0
    assert fit.explore_wrong_share == 0.0
    assert not fit.gate_open


def test_fit_all_wrong_window_has_empty_exploitation_space() -> None:
    fit = fit_threshold(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 0]))
    assert fit.tau == -math.inf
    assert fit.explore_wrong_share == 1.0
    assert fit.exploit_correct_share == 0.0
    assert not fit.gate_open


def test_fit_empty_window_is_closed() -> None:
    fit = fit_threshold(np.array([]), np.array([], dtype=bool))
    assert not fit.gate_open
    assert fit.window_size == 0
    assert fit.error_rate == 0.0


def test_fit_short_window_keeps_gate_closed() -> None:
    ppl, correct = np.array([1.0, 2.0, 5.0, 7.0]), np.array([1, 1, 0, 0])
    assert not fit_threshold(ppl, correct, min_window=5).gate_open
    assert fit_threshold(ppl, correct, min_window=4).gate_open


def test_fit_adjacent_floats_keep_the_split_exact() -> None:
    lo = 1.0
    hi = float(np.nextafter(lo, 2.0))
    fit = fit_threshold(np.array([lo, hi]), np.array([1, 0]))
    assert lo < fit.tau <= hi
    assert fit.error_rate == 0.0
    # The upper neighbour sits exactly on tau and belongs to the exploration space, as err counted it.
    assert quadrant_shares(np.array([lo, hi]), np.array([1, 0]), fit.tau) == {
        "CL": 0.5,
        "CH": 0.0,
        "EL": 0.0,
        "EH": 0.5,
    }


@pytest.mark.parametrize(
    ("ppl", "correct", "message"),
    [
        (np.array([1.0, 2.0]), np.array([1]), "same length"),
        (np.array([[1.0, 2.0]]), np.array([[1, 0]]), "1-D"),
        (np.array([1.0, np.nan]), np.array([1, 0]), "finite"),
        (np.array([1.0, 2.0]), np.array([1, 2]), "0/1"),
    ],
)
def test_fit_rejects_bad_input(ppl: np.ndarray, correct: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_threshold(ppl, correct)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=12), st.booleans()),
        min_size=0,
        max_size=25,
    )
)
def test_fit_matches_brute_force(items: list[tuple[int, bool]]) -> None:
    ppl = [1.0 + p / 4 for p, _ in items]  # a coarse grid so that duplicates and ties are frequent
    correct = [int(c) for _, c in items]
    fit = fit_threshold(np.array(ppl, dtype=np.float64), np.array(correct, dtype=np.int64))
    tau, err = brute_force_fit(ppl, correct)
    assert fit.tau == tau
    assert fit.window_size == len(ppl)
    if ppl:
        assert fit.error_rate == pytest.approx(err / len(ppl))
        eis = [c for p, c in zip(ppl, correct, strict=True) if p < tau]
        ers = [c for p, c in zip(ppl, correct, strict=True) if p >= tau]
        expected_open = bool(eis and ers and sum(eis) / len(eis) > 0.5 and (len(ers) - sum(ers)) / len(ers) > 0.5)
        assert fit.gate_open == expected_open


# --- reallocate ----------------------------------------------------------------------------------------------------


def test_hard_group_rewards_its_max_ppl_response() -> None:
    out = reallocate(np.array([1.0, 2.5, 2.0]), np.array([0, 0, 0]), np.zeros(3), OPEN_FIT)
    assert out.kind == "hard"
    assert out.action == "reward"
    np.testing.assert_array_equal(out.rewards, [0.0, 1.0, 0.0])


def test_hard_group_outside_exploitation_space_is_untouched() -> None:
    out = reallocate(np.array([1.0, 3.5, 2.0]), np.array([0, 0, 0]), np.zeros(3), OPEN_FIT)
    assert (out.kind, out.action) == ("hard", "none")
    np.testing.assert_array_equal(out.rewards, np.zeros(3))


def test_easy_group_penalises_its_max_ppl_response_with_a_negative_advantage() -> None:
    ppl = np.array([1.0, 4.0, 2.0, 4.0])  # two responses share the max: the lowest index is j
    out = reallocate(ppl, np.ones(4), np.ones(4), OPEN_FIT)
    assert (out.kind, out.action) == ("easy", "penalty")
    np.testing.assert_array_equal(out.rewards, [1.0, 0.0, 1.0, 1.0])
    adv = group_advantages(np.ones(4), out.rewards, alpha=0.1)
    assert adv[1] < 0.0
    assert np.all(adv[[0, 2, 3]] > 0.0)
    assert adv.sum() == pytest.approx(0.0, abs=1e-12)


def test_easy_group_inside_exploitation_space_is_untouched() -> None:
    out = reallocate(np.array([1.0, 2.0]), np.ones(2), np.ones(2), OPEN_FIT)
    assert (out.kind, out.action) == ("easy", "none")


def test_easy_group_at_exactly_tau_counts_as_exploration_space() -> None:
    out = reallocate(np.array([1.0, 3.0]), np.ones(2), np.ones(2), OPEN_FIT)
    assert out.action == "penalty"


def test_hard_group_at_exactly_tau_is_not_in_exploitation_space() -> None:
    out = reallocate(np.array([1.0, 3.0]), np.zeros(2), np.zeros(2), OPEN_FIT)
    assert out.action == "none"


def test_closed_gate_reallocates_nothing() -> None:
    hard = reallocate(np.array([1.0, 2.0]), np.zeros(2), np.zeros(2), CLOSED_FIT)
    easy = reallocate(np.array([4.0, 5.0]), np.ones(2), np.ones(2), CLOSED_FIT)
    assert (hard.kind, hard.action) == ("hard", "none")
    assert (easy.kind, easy.action) == ("easy", "none")
    np.testing.assert_array_equal(easy.rewards, np.zeros(2))


def test_mixed_correctness_group_is_normal() -> None:
    out = reallocate(np.array([1.0, 2.0]), np.array([1, 0]), np.array([1.0, 0.0]), OPEN_FIT)
    assert (out.kind, out.action) == ("normal", "none")
    np.testing.assert_array_equal(out.rewards, np.zeros(2))


def test_shaped_rewards_that_differ_make_a_normal_group() -> None:
    # All wrong, but the overlong penalty made the rewards differ: DAPO already has a signal, BRR leaves it alone.
    rewards = np.array([0.0, -0.25, 0.0])
    out = reallocate(np.array([1.0, 2.0, 1.5]), np.zeros(3), rewards, OPEN_FIT)
    assert (out.kind, out.action) == ("normal", "none")
    np.testing.assert_array_equal(out.rewards, np.zeros(3))
    assert group_has_signal(rewards, out)


def test_equal_shaped_rewards_still_count_as_extreme() -> None:
    out = reallocate(np.array([1.0, 2.0]), np.zeros(2), np.array([-0.5, -0.5]), OPEN_FIT)
    assert (out.kind, out.action) == ("hard", "reward")


@pytest.mark.parametrize(
    ("membership", "hard_action", "easy_action"),
    [("max", "none", "penalty"), ("mean", "reward", "none"), ("all", "none", "none")],
)
def test_membership_modes(membership: str, hard_action: str, easy_action: str) -> None:
    ppl = np.array([1.0, 1.0, 5.0])  # max 5 >= tau, mean 7/3 < tau, min 1 < tau
    hard = reallocate(ppl, np.zeros(3), np.zeros(3), OPEN_FIT, membership=membership)
    easy = reallocate(ppl, np.ones(3), np.ones(3), OPEN_FIT, membership=membership)
    assert hard.action == hard_action
    assert easy.action == easy_action


def test_membership_all_for_easy_group_fully_in_exploration_space() -> None:
    out = reallocate(np.array([3.5, 4.0]), np.ones(2), np.ones(2), OPEN_FIT, membership="all")
    assert out.action == "penalty"
    np.testing.assert_array_equal(out.rewards, [1.0, 0.0])


def test_direction_switches() -> None:
    hard_ppl, easy_ppl = np.array([1.0, 2.0]), np.array([1.0, 4.0])
    no_reward = reallocate(hard_ppl, np.zeros(2), np.zeros(2), OPEN_FIT, enable_reward=False)
    assert (no_reward.kind, no_reward.action) == ("hard", "none")
    still_penalty = reallocate(easy_ppl, np.ones(2), np.ones(2), OPEN_FIT, enable_reward=False)
    assert still_penalty.action == "penalty"
    no_penalty = reallocate(easy_ppl, np.ones(2), np.ones(2), OPEN_FIT, enable_penalty=False)
    assert (no_penalty.kind, no_penalty.action) == ("easy", "none")
    still_reward = reallocate(hard_ppl, np.zeros(2), np.zeros(2), OPEN_FIT, enable_penalty=False)
    assert still_reward.action == "reward"


def test_reallocate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="membership"):
        reallocate(np.ones(2), np.ones(2), np.ones(2), OPEN_FIT, membership="median")
    with pytest.raises(ValueError, match="rewards must have"):
        reallocate(np.ones(2), np.ones(2), np.ones(3), OPEN_FIT)
    with pytest.raises(ValueError, match="at least one"):
        reallocate(np.array([]), np.array([]), np.array([]), OPEN_FIT)
    with pytest.raises(ValueError, match="finite"):
        reallocate(np.array([1.0, np.inf]), np.ones(2), np.ones(2), OPEN_FIT)


# --- group_has_signal and quadrant_shares --------------------------------------------------------------------------


def test_group_has_signal() -> None:
    none = Reallocation(np.zeros(3), "hard", "none")
    rewarded = Reallocation(np.array([0.0, 1.0, 0.0]), "hard", "reward")
    assert not group_has_signal(np.zeros(3), none)
    assert group_has_signal(np.zeros(3), rewarded)
    assert group_has_signal(np.array([1.0, 0.0, 0.0]), none)
    with pytest.raises(ValueError, match="same shape"):
        group_has_signal(np.zeros(2), none)


def test_quadrant_shares_count_each_quadrant() -> None:
    ppl = np.array([1.0, 2.0, 4.0, 1.5, 5.0, 6.0, 3.0, 0.5])
    correct = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    shares = quadrant_shares(ppl, correct, tau=3.0)
    # CL {1, 2, 0.5}, CH {4}, EL {1.5}, EH {5, 6, 3 (at tau: high)}
    assert shares == {"CL": 3 / 8, "CH": 1 / 8, "EL": 1 / 8, "EH": 3 / 8}
    assert quadrant_shares(np.array([]), np.array([]), 1.0) == {"CL": 0.0, "CH": 0.0, "EL": 0.0, "EH": 0.0}
