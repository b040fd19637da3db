"""Tests of group-relative advantages: A = norm(R) + alpha * norm(Rr)."""

from __future__ import annotations

import numpy as np
import pytest

from learner.advantages import STD_EPS, group_advantages, normalise_group


def dapo_advantages(rewards: np.ndarray) -> np.ndarray:
    """Plain DAPO/GRPO group normalisation written out independently."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-6)


def test_hand_computed_mixed_group() -> None:
    # R = [1, 0, 0, 1]: mean 0.5, sample std sqrt(1/3) = 0.57735...
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), np.zeros(4), alpha=0.1)
    expected = 0.5 / (np.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(adv, [expected, -expected, -expected, expected], rtol=1e-12)


@pytest.mark.parametrize("rewards", [[1.0, 0.0, 0.0, 1.0], [0.3, -0.2, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0]])
def test_alpha_zero_is_exactly_dapo(rewards: list[float]) -> None:
    r = np.array(rewards)
    realloc = np.zeros_like(r)
    realloc[0] = 1.0
    adv = group_advantages(r, realloc, alpha=0.0)
    np.testing.assert_array_equal(adv, dapo_advantages(r))


def test_hard_group_reward_direction() -> None:
    # All wrong, Rr = [0, 1, 0, 0]: mean 0.25, sample std 0.5.
    adv = group_advantages(np.zeros(4), np.array([0.0, 1.0, 0.0, 0.0]), alpha=0.1)
    scale = 0.1 / (0.5 + STD_EPS)
    np.testing.assert_allclose(adv, [-0.25 * scale, 0.75 * scale, -0.25 * scale, -0.25 * scale], rtol=1e-12)


def test_easy_group_penalty_direction_gives_negative_advantage() -> None:
    adv = group_advantages(np.ones(4), np.array([1.0, 0.0, 1.0, 1.0]), alpha=0.1)
    assert adv[1] < 0.0 < adv[0]
    assert adv[0] == adv[2] == adv[3]


def test_population_std_option() -> None:
    adv = group_advantages(np.array([1.0, 0.0]), np.zeros(2), alpha=0.1, std_ddof=0)
    np.testing.assert_allclose(adv, [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)], rtol=1e-12)


def test_dr_grpo_centring_only() -> None:
    adv = group_advantages(np.array([2.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0]), alpha=0.1, norm_by_std=False)
    np.testing.assert_array_equal(adv, [1.0, -1.0, 0.0])


def test_single_response_group_gives_zero_not_nan() -> None:
    adv = group_advantages(np.array([1.0]), np.array([1.0]), alpha=0.1)
    np.testing.assert_array_equal(adv, [0.0])
    assert not np.isnan(normalise_group(np.array([0.7]), std_ddof=1)).any()


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        group_advantages(np.zeros(3), np.zeros(2), alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        group_advantages(np.zeros(3), np.zeros(3), alpha=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(np.array([1.0, np.nan]), np.zeros(2), alpha=0.1)
    with pytest.raises(ValueError, match="at least one"):
        group_advantages(np.array([]), np.array([]), alpha=0.1)
    with pytest.raises(ValueError, match="std_ddof"):
        group_advantages(np.zeros(2), np.zeros(2), alpha=0.1, std_ddof=-1)
