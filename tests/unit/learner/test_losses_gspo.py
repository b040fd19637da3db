"""GSPO, the docs/EXTENDING.md worked example of a loss: sequence-level ratio and clip, sequence-mean."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import DapoLoss, LossInputs, build_loss
from learner.losses_gspo import GspoLoss
from services.config import LearnerConfig


def inputs(logp: torch.Tensor, old: torch.Tensor, adv: list[float], mask: torch.Tensor) -> LossInputs:
    return LossInputs(logp, old, torch.tensor(adv, dtype=torch.float64), mask)


def test_it_is_the_registered_gspo_loss() -> None:
    loss = build_loss(LearnerConfig(loss="gspo"))
    assert isinstance(loss, GspoLoss) and loss.normalisation == "sequence"
    assert loss.denominator(10, 3, 64) == 3.0


def test_on_policy_it_is_minus_the_mean_advantage_and_its_gradient_is_the_sequence_mean_one() -> None:
    torch.manual_seed(0)
    logp = torch.randn(2, 4, dtype=torch.float64).clamp(max=-0.01).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    terms = GspoLoss(LearnerConfig()).terms(inputs(logp, logp.detach(), [1.0, -2.0], mask))
    assert terms.loss_sum.item() == pytest.approx(-(1.0 - 2.0))
    terms.loss_sum.backward()
    # d/d logp of -A_i * s_i with s_i = exp(mean_t(logp - old)): -A_i / |o_i| on every token of sequence i
    expected = torch.tensor([[-1 / 3] * 3 + [0.0], [2 / 2] * 2 + [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected)
    assert terms.ratio_max.item() == pytest.approx(1.0) and terms.clip_low_count.item() == 0


def test_the_ratio_is_the_geometric_mean_of_the_token_ratios_and_clips_per_sequence() -> None:
    old = torch.full((1, 3), -1.0, dtype=torch.float64)
    shifts = torch.tensor([[0.3, 0.0, -0.1]], dtype=torch.float64)
    logp = (old + shifts).requires_grad_()
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = LearnerConfig(eps_low=0.01, eps_high=0.05)
    terms = GspoLoss(cfg).terms(inputs(logp, old, [1.0], mask))
    s = math.exp(shifts.mean().item())  # 1.0689 > 1 + eps_high: clipped for a positive advantage
    assert terms.ratio_sum.item() == pytest.approx(3 * s)
    assert terms.clip_high_count.item() == 3
    assert terms.loss_sum.item() == pytest.approx(-(1 + cfg.eps_high))
    terms.loss_sum.backward()
    assert torch.count_nonzero(logp.grad) == 0  # a clipped sequence carries no gradient
    # DAPO clips token by token instead: the first token only (0.3 is past 1.05, -0.1 and 0 are not)
    dapo = DapoLoss(cfg).terms(inputs(logp.detach().clone().requires_grad_(), old, [1.0], mask))
    assert dapo.clip_high_count.item() == 1
