"""Tests of the policy losses, importance weights, KL, entropy and response scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_factories import one_torch_thread  # noqa: F401 - an autouse fixture
from transformers import LlamaConfig, LlamaForCausalLM

from learner.advantages import group_advantages
from learner.losses import (
    dapo_token_loss,
    grpo_sequence_loss,
    k3_kl,
    loss_denominator,
    response_token_mask,
    score_responses,
    select_old_logp,
    token_entropy,
    truncated_is_weights,
)

# Ratios [[1, 1.5, 0.5], [1, 0.5, (masked)]] with A = [+1, -2]:
#   seq 0: t0 -min(1, 1)·1 = -1;  t1 -min(1.5, 1.28) = -1.28 (clip high);  t2 -min(0.5, 0.8) = -0.5 (unclipped)
#   seq 1: t0 -min(-2, -2) = 2;   t1 -min(-1.0, -1.6) = 1.6 (clip low)
RATIOS = [[1.0, 1.5, 0.5], [1.0, 0.5, 9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADVANTAGES = [1.0, -2.0]


def hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (logp with grad, old_logp, advantages, mask) of the hand-computed batch above."""
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(RATIOS, dtype=torch.float64))).requires_grad_(True)
    return logp, old, torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(MASK)


def test_dapo_loss_matches_hand_computation() -> None:
    logp, old, adv, mask = hand_batch()
    terms = dapo_token_loss(logp, old, adv, mask)
    assert terms.loss_sum.item() == pytest.approx(-1.0 - 1.28 - 0.5 + 2.0 + 1.6)
    assert terms.token_count.item() == 5
    assert terms.sequence_count.item() == 2
    assert terms.clip_low_count.item() == 1
    assert terms.clip_high_count.item() == 1
    assert terms.ratio_sum.item() == pytest.approx(1.0 + 1.5 + 0.5 + 1.0 + 0.5)
    assert terms.ratio_max.item() == pytest.approx(1.5)  # the masked 9.0 is ignored
    assert terms.is_weight_sum.item() == 5
    assert not terms.clip_low_count.requires_grad
    terms.loss_sum.backward()
    # d/dlogp of -ρA is -ρA where unclipped, 0 where clipped or masked.
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.0, -0.5], [2.0, 0.0, 0.0]], dtype=torch.float64))


def test_dapo_loss_with_importance_weights() -> None:
    logp, old, adv, mask = hand_batch()
    weights = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    terms = dapo_token_loss(logp, old, adv, mask, is_weights=weights)
    assert terms.loss_sum.item() == pytest.approx(-1.0 - 2.56 - 0.25 + 2.0 + 1.6)
    assert terms.is_weight_sum.item() == pytest.approx(5.5)
    assert terms.is_weight_max.item() == pytest.approx(2.0)


def test_grpo_loss_is_sequence_mean_with_symmetric_clip() -> None:
    logp, old, adv, mask = hand_batch()
    terms = grpo_sequence_loss(logp, old, adv, mask)
    # seq 0: (-1 - 1.2 - 0.5) / 3 = -0.9;  seq 1: (2 + 1.6) / 2 = 1.8
    assert terms.loss_sum.item() == pytest.approx(-0.9 + 1.8)
    assert terms.clip_high_count.item() == 1
    assert loss_denominator("sequence", terms.token_count.item(), terms.sequence_count.item()) == 2.0


def test_loss_denominators() -> None:
    assert loss_denominator("token", 5, 2) == 5.0
    assert loss_denominator("constant", 5, 2, max_response_len=4) == 8.0  # Dr.GRPO: L_max × sequences
    assert loss_denominator("token", 0, 0) == 1.0
    with pytest.raises(ValueError, match="max_response_len"):
        loss_denominator("constant", 5, 2)
    with pytest.raises(ValueError, match="normalisation"):
        loss_denominator("mean", 5, 2)  # type: ignore[arg-type]


def test_kl_term_is_added_unweighted() -> None:
    logp, old, adv, mask = hand_batch()
    ref = logp.detach() + math.log(2.0)
    terms = dapo_token_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.5)
    per_token_kl = 2.0 - math.log(2.0) - 1.0
    assert terms.kl_sum.item() == pytest.approx(5 * per_token_kl)
    assert terms.loss_sum.item() == pytest.approx(0.82 + 0.5 * 5 * per_token_kl)


def test_alpha_zero_gives_exactly_the_dapo_gradient() -> None:
    groups = [np.array([1.0, 0.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0, 1.0])]
    reallocs = [np.zeros(4), np.array([0.0, 1.0, 0.0, 0.0]), np.zeros(4)]
    dipo = np.concatenate([group_advantages(r, rr, alpha=0.0) for r, rr in zip(groups, reallocs, strict=True)])
    dapo = np.concatenate([(r - r.mean()) / (r.std(ddof=1) + 1e-6) for r in groups])
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    old = base + 0.3 * torch.randn(12, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(12, 5, generator=gen) > 0.2

    def grad_for(adv: np.ndarray) -> torch.Tensor:
        logp = base.clone().requires_grad_(True)
        terms = dapo_token_loss(logp, old, torch.from_numpy(adv), mask)
        (terms.loss_sum / loss_denominator("token", terms.token_count.item(), terms.sequence_count.item())).backward()
        assert logp.grad is not None
        return logp.grad

    assert torch.equal(grad_for(dipo), grad_for(dapo))
    assert grad_for(dapo).abs().sum() > 0


def test_padding_values_cannot_poison_the_loss() -> None:
    logp, old, adv, mask = hand_batch()
    with torch.no_grad():
        logp[1, 2] = 1e4  # garbage under the mask would overflow exp without masking first
    terms = dapo_token_loss(logp, old, adv, mask)
    terms.loss_sum.backward()
    assert torch.isfinite(terms.loss_sum)
    assert logp.grad is not None and torch.isfinite(logp.grad).all()


def test_truncated_is_weights_cap() -> None:
    behaviour = torch.zeros(3)
    proximal = torch.log(torch.tensor([3.0, 1.5, 0.1])).requires_grad_(True)
    weights = truncated_is_weights(proximal, behaviour, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5, 0.1]))
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(proximal, behaviour, cap=0.0)


def test_select_old_logp_corrections() -> None:
    behaviour = torch.tensor([[-1.0, -2.0]])
    proximal = torch.tensor([[-0.5, -2.5]])
    old, weights = select_old_logp("none", behaviour, proximal)
    assert torch.equal(old, behaviour) and weights is None
    old, weights = select_old_logp("tis", behaviour, proximal, cap=2.0)
    assert torch.equal(old, proximal)
    assert weights is not None
    torch.testing.assert_close(weights, torch.exp(torch.tensor([[0.5, -0.5]])))
    with pytest.raises(ValueError, match="proximal_logp"):
        select_old_logp("tis", behaviour)


def test_k3_kl_values() -> None:
    logp = torch.tensor([0.0, -1.0, -2.0])
    ref = torch.tensor([math.log(2.0), -1.0, -1.0])
    kl = k3_kl(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([1.0 - math.log(2.0), 0.0, math.e - 2.0]))
    assert (kl >= 0).all()


def test_token_entropy_matches_categorical_in_chunks() -> None:
    logits = torch.randn(7, 3, 11, generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits, chunk_size=4), expected)


def test_loss_rejects_bad_shapes() -> None:
    logp, old, adv, mask = hand_batch()
    with pytest.raises(ValueError, match="advantages"):
        dapo_token_loss(logp, old, adv[:1], mask)
    with pytest.raises(ValueError, match="must match"):
        dapo_token_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="eps_low"):
        dapo_token_loss(logp, old, adv, mask, eps_low=1.0)


# --- score_responses -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    # float64 for tight comparisons; sdpa, because transformers' eager attention yields NaN rows for left padding
    # in float64.
    return LlamaForCausalLM(config).double().eval()


def full_logits_reference(
    model: LlamaForCausalLM, ids: torch.Tensor, attn: torch.Tensor, resp: torch.Tensor, temperature: float
) -> tuple[list[list[float]], list[list[float]]]:
    """Score every position through the vocabulary, then pick the response tokens: the slow, obvious way."""
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    entropies = -(log_probs.exp() * log_probs).sum(-1)
    logp_rows, ent_rows = [], []
    for b in range(ids.shape[0]):
        positions = resp[b].nonzero().flatten().tolist()
        logp_rows.append([log_probs[b, p - 1, ids[b, p]].item() for p in positions])
        ent_rows.append([entropies[b, p - 1].item() for p in positions])
    return logp_rows, ent_rows


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_responses_equals_full_logits(tiny_llama: LlamaForCausalLM, temperature: float) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0], [12, 13, 14, 15, 0, 0, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    resp = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        logp, entropy = score_responses(tiny_llama, ids, attn, resp, temperature=temperature)
        ref_logp, ref_ent = full_logits_reference(tiny_llama, ids, attn, resp, temperature)
    assert logp.shape == entropy.shape == (2, 4)
    out_mask = response_token_mask(resp)
    assert out_mask.tolist() == [[True] * 4, [True, True, False, False]]
    for b in range(2):
        n = len(ref_logp[b])
        torch.testing.assert_close(logp[b, :n], torch.tensor(ref_logp[b], dtype=torch.float64))
        torch.testing.assert_close(entropy[b, :n].double(), torch.tensor(ref_ent[b], dtype=torch.float64))
        assert (logp[b, n:] == 0).all()


@pytest.mark.parametrize("temperature", [1e-300, 1e-45])
def test_a_vanishing_temperature_scores_finitely(tiny_llama: LlamaForCausalLM, temperature: float) -> None:
    """A task whose temperature rounds to 0 (a hostile or mistyped one) must not put NaN into the loss."""
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    attn = torch.ones_like(ids)
    resp = torch.tensor([[0, 0, 1, 1, 1]])
    with torch.no_grad():
        logp, entropy = score_responses(tiny_llama.float(), ids, attn, resp, temperature=temperature)
    tiny_llama.double()
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all()


def test_score_responses_left_padding_matches_unpadded(tiny_llama: LlamaForCausalLM) -> None:
    alone = torch.tensor([[20, 21, 22, 23, 24]])
    padded = torch.tensor([[0, 0, 0, 20, 21, 22, 23, 24]])
    with torch.no_grad():
        logp_alone, _ = score_responses(tiny_llama, alone, torch.ones_like(alone), torch.tensor([[0, 0, 1, 1, 1]]))
        logp_padded, _ = score_responses(
            tiny_llama, padded, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]), torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
        )
    torch.testing.assert_close(logp_padded, logp_alone)


def test_score_responses_backpropagates_and_validates(tiny_llama: LlamaForCausalLM) -> None:
    ids = torch.tensor([[3, 4, 5, 6]])
    attn = torch.ones_like(ids)
    logp, _ = score_responses(tiny_llama, ids, attn, torch.tensor([[0, 0, 1, 1]]))
    logp.sum().backward()
    head = tiny_llama.get_output_embeddings()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    tiny_llama.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="position 0"):
        score_responses(tiny_llama, ids, attn, torch.tensor([[1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="temperature"):
        score_responses(tiny_llama, ids, attn, torch.tensor([[0, 0, 1, 1]]), temperature=0.0)
