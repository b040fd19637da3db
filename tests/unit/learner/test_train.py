"""The train step on a tiny random Llama: direction of the update, exact loss values, invariances, schedule,
the single-pass proximal policy, PPO mini-batches, and bad input (non-finite loss, empty and over-long samples)."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.advantages import group_advantages
from learner.batch import Sample
from learner.distributed import DistInfo
from learner.packing import BudgetError
from learner.train import Trainer, build_scheduler, lr_factor, shard, split_evenly
from services.config import RunConfig

VOCAB = 64
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = False) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 and 64 tokens, random weights (no download)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(dtype)


def make_cfg(**learner: object) -> RunConfig:
    """A RunConfig with learner overrides; max_new_tokens 16 fixes the Dr.GRPO constant."""
    return RunConfig.model_validate({"learner": learner, "sampling": {"max_new_tokens": 16}})


def model_logprobs(
    model: torch.nn.Module, prompt: np.ndarray, response: np.ndarray, temperature: float
) -> torch.Tensor:
    """Log-probs of the response tokens from a plain, unpadded full forward (the reference computation)."""
    ids = torch.tensor(np.concatenate([prompt, response]).astype(np.int64)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return logp[len(prompt) - 1 :]


def make_group(
    model: torch.nn.Module,
    rng: np.random.Generator,
    rewards: list[float],
    prompt_len: int = 6,
    max_response: int = 10,
    temperature: float = 1.0,
    group_id: str = "g",
) -> list[Sample]:
    """One group (one prompt, one group id) of responses with the model's own log-probs (on-policy) and
    alpha-derived advantages."""
    prompt = rng.integers(0, VOCAB, prompt_len).astype(np.uint32)
    advantages = group_advantages(np.array(rewards), np.zeros(len(rewards)), alpha=0.1)
    samples = []
    for adv in advantages:
        response = rng.integers(0, VOCAB, int(rng.integers(3, max_response + 1))).astype(np.uint32)
        logp = model_logprobs(model, prompt, response, temperature).float().numpy()
        samples.append(Sample(group_id, prompt, response, logp, float(adv), temperature, 0, True))
    return samples


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's parameters."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two parameter sets of one model."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def summed_logp(model: torch.nn.Module, samples: list[Sample]) -> float:
    """Sum of the response log-probs of the samples under the model."""
    return sum(float(model_logprobs(model, s.prompt_ids, s.response_ids, s.temperature).sum()) for s in samples)


def test_steps_raise_logp_of_positive_advantage_responses() -> None:
    model = tiny_model()
    rng = np.random.default_rng(0)
    samples = make_group(model, rng, [1, 0, 0, 1]) + make_group(model, rng, [0, 1, 0, 0], group_id="h")
    positive = [s for s in samples if s.advantage > 0]
    negative = [s for s in samples if s.advantage < 0]
    before_pos, before_neg = summed_logp(model, positive), summed_logp(model, negative)
    trainer = Trainer(make_cfg(lr=1e-2, correction="tis"), model, CPU)
    metrics = [trainer.train_step(samples) for _ in range(3)]
    assert summed_logp(model, positive) > before_pos + 0.5
    assert summed_logp(model, negative) < before_neg - 0.5
    first = metrics[0]
    # On-policy first step: proximal == behaviour (to float32 rounding), so the weights and ratios are 1.
    assert first["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert first["kl_behaviour"] == pytest.approx(0.0, abs=1e-6)
    assert first["tokens"] == sum(len(s.response_ids) for s in samples)
    assert first["sequences"] == len(samples)
    assert 0.0 < first["entropy"] <= math.log(VOCAB) + 1e-6
    assert first["grad_norm"] > 0 and first["skipped"] == 0.0
    # Later steps move away from the behaviour policy: the IS weights and the KL become visible.
    assert metrics[-1]["kl_behaviour"] > 1e-4
    assert metrics[-1]["is_weight_max"] > 1.0
    assert trainer.steps_done == 3


def hand_loss(model: torch.nn.Module, samples: list[Sample], loss: str, eps_low: float, eps_high: float) -> float:
    """The objective computed by hand, per token, from the model's own unpadded log-probs (correction=none)."""
    per_sequence, total, tokens = [], 0.0, 0
    for s in samples:
        logp = model_logprobs(model, s.prompt_ids, s.response_ids, s.temperature)
        ratio = torch.exp(logp - torch.from_numpy(s.behaviour_logprobs).double())
        low, high = (eps_low, eps_low) if loss == "grpo" else (eps_low, eps_high)
        surrogate = torch.minimum(ratio * s.advantage, ratio.clamp(1 - low, 1 + high) * s.advantage)
        per_sequence.append(float(-surrogate.mean()))
        total += float(-surrogate.sum())
        tokens += len(s.response_ids)
    if loss == "dapo":
        return total / tokens
    if loss == "grpo":
        return sum(per_sequence) / len(samples)
    return total / (16 * len(samples))  # drgrpo: max_new_tokens x sequences


@pytest.mark.parametrize("loss", ["dapo", "grpo", "drgrpo"])
def test_loss_matches_hand_computation(loss: str) -> None:
    model = tiny_model(seed=1)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, n).astype(np.uint32) for n in (5, 9)]
    responses = [rng.integers(0, VOCAB, n).astype(np.uint32) for n in (7, 4)]
    samples = []
    for i, (p, r, adv) in enumerate(zip(prompts, responses, (1.3, -0.7), strict=True)):
        # Behaviour log-probs off the model's by up to ±0.4, so that some ratios are clipped on each side.
        offsets = rng.uniform(-0.4, 0.4, len(r))
        behaviour = (model_logprobs(model, p, r, 0.7).numpy() + offsets).astype(np.float32)
        samples.append(Sample(f"s{i}", p, r, behaviour, adv, 0.7, 0, True))
    expected = hand_loss(model, samples, loss, eps_low=0.2, eps_high=0.28)
    trainer = Trainer(make_cfg(loss=loss, correction="none", lr=1e-3), model, CPU)
    metrics = trainer.train_step(samples)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert metrics["proximal_seconds"] < metrics["step_seconds"]
    assert metrics["clip_low"] + metrics["clip_high"] > 0  # the offsets put some tokens outside the trust region


def test_all_untrainable_batch_is_a_noop() -> None:
    model = tiny_model()
    rng = np.random.default_rng(2)
    samples = [
        Sample(s.group_id, s.prompt_ids, s.response_ids, s.behaviour_logprobs, s.advantage, 1.0, 0, False)
        for s in make_group(model, rng, [1, 0, 1, 0])
    ]
    empty = Sample("e", np.arange(3, dtype=np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.float32), 1.0, 1.0, 0)
    before = params(model)
    trainer = Trainer(make_cfg(lr=1e-2), model, CPU)
    metrics = trainer.train_step([*samples, empty])
    assert max_param_diff(before, params(model)) == 0.0
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["skipped"] == 1.0 and metrics["tokens"] == 0.0
    assert trainer.steps_done == 0 and trainer.scheduler.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())


def test_lr_factor_warmup_then_cosine() -> None:
    got = [lr_factor(step, warmup_steps=2, total_steps=6, schedule="cosine") for step in range(7)]
    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert got == pytest.approx([0.5, 1.0, *cos])
    assert got[-1] == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(s, 3, 10, "constant") for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(5, 0, 10, "linear")


def test_scheduler_follows_the_factor_and_checkpoints() -> None:
    cfg = make_cfg(lr=0.1, warmup_steps=2, steps=6, schedule="cosine").learner
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1 * lr_factor(s, 2, 6, "cosine") for s in range(6)])
    restored = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr), cfg)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_trainer_reports_the_lr_it_used() -> None:
    model = tiny_model()
    samples = make_group(model, np.random.default_rng(3), [1, 0, 0, 0])
    trainer = Trainer(make_cfg(lr=1e-3, warmup_steps=2, steps=4, schedule="cosine", correction="none"), model, CPU)
    lrs = [trainer.train_step(samples)["lr"] for _ in range(4)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


@pytest.mark.parametrize("loss", ["dapo", "grpo", "drgrpo"])
def test_micro_batch_count_does_not_change_the_update(loss: str) -> None:
    rng = np.random.default_rng(4)
    base = tiny_model(seed=4, dtype=torch.float64)
    samples = make_group(base, rng, [1, 0, 0, 1], prompt_len=33, max_response=16)
    samples += make_group(base, rng, [0, 0, 1, 0], prompt_len=40, max_response=16, group_id="h")
    results, counts = [], []
    for budget in (4096, 64):  # one micro-batch, then groups split over many
        model = copy.deepcopy(base)
        trainer = Trainer(make_cfg(lr=1e-3, loss=loss, micro_batch_tokens=budget), model, CPU)
        counts.append(sum(len(mb.batches) for mb in trainer.plan(samples)))
        trainer.train_step(samples)
        results.append(params(model))
    assert counts[0] == 1 and counts[1] >= len(samples) // 2
    assert max_param_diff(results[0], params(base)) > 1e-4  # the step did move the parameters
    assert max_param_diff(results[0], results[1]) < 1e-6


def test_gradient_checkpointing_gives_the_same_update() -> None:
    rng = np.random.default_rng(5)
    base = tiny_model(seed=5, dtype=torch.float64)
    samples = make_group(base, rng, [1, 0, 1, 1])
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        Trainer(make_cfg(lr=1e-3, gradient_checkpointing=checkpointing), model, CPU).train_step(samples)
        results.append(params(model))
    assert max_param_diff(results[0], results[1]) < 1e-9


def test_kl_to_reference_model() -> None:
    model = tiny_model(seed=6)
    samples = make_group(model, np.random.default_rng(6), [1, 0, 0, 1])
    with pytest.raises(ValueError, match="reference model"):
        Trainer(make_cfg(kl_beta=0.1), model, CPU)
    trainer = Trainer(make_cfg(kl_beta=0.1, lr=1e-2), model, CPU, ref_model=copy.deepcopy(model))
    first, second = trainer.train_step(samples), trainer.train_step(samples)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-7)  # the policy starts at the reference
    assert second["kl_ref"] > 1e-5


def test_shard_is_balanced_deterministic_and_a_partition() -> None:
    rng = np.random.default_rng(7)
    samples = [
        Sample(f"s{i}", np.zeros(int(rng.integers(1, 50)), np.uint32), np.zeros(3, np.uint32), np.zeros(3, np.float32),
               0.0, 1.0, 0)
        for i in range(23)
    ]  # fmt: skip
    parts = [shard(samples, r, 3) for r in range(3)]
    assert sorted(s.group_id for p in parts for s in p) == sorted(s.group_id for s in samples)
    loads = [sum(s.length for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(s.length for s in samples)
    assert [s.group_id for s in shard(samples, 1, 3)] == [s.group_id for s in parts[1]]
    assert shard(samples[:1], 1, 2) == []
    with pytest.raises(ValueError):
        shard(samples, 3, 3)


def test_split_evenly_keeps_order_and_balances_counts() -> None:
    groups = [[Sample(f"g{i}", np.zeros(1, np.uint32), np.zeros(1, np.uint32), np.zeros(1, np.float32), 0.0, 1.0, 0)]
              for i in range(5)]  # fmt: skip
    parts = split_evenly(groups, 3)
    assert [[g[0].group_id for g in p] for p in parts] == [["g0", "g1"], ["g2"], ["g3", "g4"]]
    assert split_evenly(groups[:1], 2) == [[], groups[:1]]


# --- single pass, mini-batches, schedule ----------------------------------------------------------------------------


def off_policy_batch(model: torch.nn.Module, seed: int) -> list[Sample]:
    """Two groups whose behaviour log-probs are off the model's by up to ±0.4 (IS weights ≠ 1, some capped)."""
    rng = np.random.default_rng(seed)
    samples = make_group(model, rng, [1, 0, 0, 1]) + make_group(model, rng, [0, 1, 1, 1], group_id="h")
    return [
        Sample(s.group_id, s.prompt_ids, s.response_ids,
               (s.behaviour_logprobs + rng.uniform(-0.4, 0.4, len(s.response_ids))).astype(np.float32),
               s.advantage, s.temperature, s.version)
        for s in samples
    ]  # fmt: skip


def step_with_gradients(trainer: Trainer, samples: list[Sample]) -> tuple[dict[str, float], list[dict]]:
    """Run a step and return its metrics and the gradients each optimizer update saw (captured just before it)."""
    seen: list[dict[str, torch.Tensor]] = []

    def before_step(*_: object) -> None:
        seen.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    handle = trainer.optimizer.register_step_pre_hook(before_step)
    metrics = trainer.train_step(samples)
    handle.remove()
    return metrics, seen


def test_single_pass_equals_the_two_pass_computation() -> None:
    """One update per step: the proximal log-probs are the gradient forward's own, detached. The separate pass runs
    in eval mode, the gradient forward in train mode; they agree because the model has no dropout (the default model
    has none either: attention_dropout 0 and no dropout layers)."""
    base = tiny_model(seed=8, dtype=torch.float64)
    assert base.config.attention_dropout == 0.0
    samples = off_policy_batch(base, 8)
    runs = {}
    for mode in ("auto", "always"):
        cfg = make_cfg(lr=1e-3, correction="tis", is_cap=1.2, proximal_forward=mode)
        trainer = Trainer(cfg, copy.deepcopy(base), CPU)
        runs[mode] = step_with_gradients(trainer, samples)
    (single, single_grads), (double, double_grads) = runs["auto"], runs["always"]
    assert single["proximal_seconds"] == 0.0 and double["proximal_seconds"] > 0.0
    for key in ("loss", "is_weight_mean", "is_weight_max", "ratio_mean", "ratio_max", "kl_behaviour", "grad_norm"):
        assert single[key] == pytest.approx(double[key], rel=1e-12, abs=1e-12), key
    assert single["is_weight_max"] == pytest.approx(1.2)  # some weights hit the cap: the weights are really used
    assert 0.5 < single["is_weight_mean"] < 1.2 and single["is_weight_mean"] != pytest.approx(1.0, abs=1e-3)
    assert single["ratio_max"] == 1.0 and single["clip_low"] == single["clip_high"] == 0.0
    (a,), (b,) = single_grads, double_grads
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-12
    assert max(float(g.abs().max()) for g in a.values()) > 1e-3


def test_one_minibatch_is_the_previous_update() -> None:
    """With one update per step the single pass makes the previous two-pass update bit for bit; the defaults (shared
    prefix, chunked head) make it up to float rounding (the tiny Llama's RMSNorm runs in float32 even in float64)."""
    base = tiny_model(seed=9, dtype=torch.float64)
    samples = off_policy_batch(base, 9)
    previous = {"shared_prefix": False, "head_chunk_tokens": 0, "proximal_forward": "always"}
    runs = {}
    variants = {"previous": previous, "single": {**previous, "proximal_forward": "auto"}, "new": {}}
    for name, overrides in variants.items():
        model = copy.deepcopy(base)
        metrics, (grads,) = step_with_gradients(Trainer(make_cfg(lr=1e-3, **overrides), model, CPU), samples)
        runs[name] = (params(model), metrics, grads)
    assert max_param_diff(runs["previous"][0], params(base)) > 1e-4
    assert max_param_diff(runs["single"][0], runs["previous"][0]) == 0.0
    (_, new_metrics, new_grads), (_, old_metrics, old_grads) = runs["new"], runs["previous"]
    scale = max(float(g.abs().max()) for g in old_grads.values())
    assert max(float((new_grads[k] - old_grads[k]).abs().max()) for k in old_grads) < 1e-6 * scale
    for key in ("loss", "entropy", "is_weight_mean", "kl_behaviour"):
        assert new_metrics[key] == pytest.approx(old_metrics[key], rel=1e-7), key


def test_several_minibatches_make_the_clip_act() -> None:
    model = tiny_model(seed=10)
    rng = np.random.default_rng(10)
    samples = [s for g in range(4) for s in make_group(model, rng, [1, 0, 0, 1], group_id=f"g{g}")]
    trainer = Trainer(make_cfg(lr=3e-2, minibatches=4, epochs=2, prompts_per_step=4), model, CPU)
    metrics = trainer.train_step(samples)
    assert metrics["updates"] == 8 and trainer.updates_done == 8 and trainer.steps_done == 1
    assert trainer.scheduler.last_epoch == 8
    assert metrics["proximal_seconds"] > 0.0  # mini-batches 2..4 were scored at the start of the step
    assert metrics["clip_low"] + metrics["clip_high"] > 0.0
    assert metrics["ratio_max"] > 1.28
    assert metrics["tokens"] == sum(len(s.response_ids) for s in samples)  # the batch's tokens, not per update
    single = Trainer(make_cfg(lr=3e-2), tiny_model(seed=10), CPU).train_step(samples)
    assert single["clip_low"] == single["clip_high"] == 0.0 and single["ratio_max"] == 1.0


def test_the_schedule_counts_optimizer_updates() -> None:
    model = tiny_model(seed=11)
    samples = [s for g in range(2) for s in make_group(model, np.random.default_rng(g), [1, 0], group_id=f"g{g}")]
    cfg = make_cfg(lr=1e-3, warmup_steps=1, steps=3, schedule="cosine", minibatches=2, prompts_per_step=2)
    trainer = Trainer(cfg, model, CPU)
    lrs = []
    for _ in range(3):
        trainer.train_step(samples)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert trainer.scheduler.last_epoch == 6
    # warm-up of 1 step = 2 updates, then cosine over the remaining 4 updates
    assert lrs == pytest.approx([1e-3 * lr_factor(u, 2, 6, "cosine") for u in (2, 4, 6)])


def test_minibatches_may_not_exceed_the_groups_of_a_step() -> None:
    with pytest.raises(ValueError, match="minibatches"):
        make_cfg(minibatches=5, prompts_per_step=4)


# --- bad input ------------------------------------------------------------------------------------------------------


def optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state, flattened to name -> tensor."""
    state = trainer.optimizer.state_dict()["state"]
    return {f"{i}.{k}": torch.as_tensor(v).clone() for i, s in state.items() for k, v in s.items()}


def test_a_non_finite_loss_skips_the_update_and_keeps_weights_and_adamw_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = tiny_model(seed=12)
    rng = np.random.default_rng(12)
    samples = make_group(model, rng, [1, 0, 0, 1])
    trainer = Trainer(make_cfg(lr=1e-2), model, CPU)
    trainer.train_step(samples)  # AdamW now has moments to lose
    before, state = params(model), optimizer_state(trainer)
    poisoned = [Sample(s.group_id, s.prompt_ids, s.response_ids, s.behaviour_logprobs, math.nan, 1.0, 0)
                for s in samples]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="learner.train"):
        metrics = trainer.train_step(poisoned)
    assert "non-finite loss" in caplog.text
    assert metrics["skipped"] == 1.0 and metrics["updates"] == 0.0
    assert metrics["skipped_nonfinite_loss"] == 1.0 and metrics["skipped_nonfinite_grad"] == 0.0
    assert max_param_diff(before, params(model)) == 0.0
    after = optimizer_state(trainer)
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert trainer.updates_done == 1 and trainer.scheduler.last_epoch == 1
    assert all(p.grad is None for p in model.parameters())
    assert trainer.train_step(samples)["updates"] == 1.0  # and the next good batch trains as usual


def test_a_non_finite_minibatch_skips_only_its_own_update() -> None:
    model = tiny_model(seed=13)
    rng = np.random.default_rng(13)
    good = make_group(model, rng, [1, 0, 0, 1])
    bad = [Sample("h", s.prompt_ids, s.response_ids, s.behaviour_logprobs, math.inf, 1.0, 0)
           for s in make_group(model, rng, [1, 0], group_id="h")]  # fmt: skip
    metrics = Trainer(make_cfg(lr=1e-2, minibatches=2), model, CPU).train_step(good + bad)
    assert (metrics["updates"], metrics["skipped_nonfinite_loss"], metrics["skipped"]) == (1.0, 1.0, 0.0)


def test_empty_responses_train_as_if_absent() -> None:
    base = tiny_model(seed=14, dtype=torch.float64)
    samples = make_group(base, np.random.default_rng(14), [1, 0, 0, 1])
    empty = Sample("g", samples[0].prompt_ids, np.zeros(0, np.uint32), np.zeros(0, np.float32), 0.5, 1.0, 0)
    results = []
    for batch in (samples, [*samples, empty]):
        model = copy.deepcopy(base)
        metrics = Trainer(make_cfg(lr=1e-3), model, CPU).train_step(batch)
        results.append(params(model))
        assert metrics["sequences"] == len(samples)
    assert max_param_diff(results[0], results[1]) == 0.0


def test_a_group_of_one_trains_as_one_sequence() -> None:
    """A group of one has no group-relative signal (advantage 0) but still counts in the denominators; here it gets
    an advantage by hand so that its gradient shows, and the shared layout trains it as the unshared one does."""
    base = tiny_model(seed=15, dtype=torch.float64)
    rng = np.random.default_rng(15)
    alone = make_group(base, rng, [1.0])
    assert alone[0].advantage == 0.0
    one = Sample("solo", alone[0].prompt_ids, alone[0].response_ids, alone[0].behaviour_logprobs, 0.8, 1.0, 0)
    samples = [*make_group(base, rng, [1, 0, 0, 1]), one]
    results = []
    for shared in (True, False):
        metrics, (grads,) = step_with_gradients(Trainer(make_cfg(shared_prefix=shared), copy.deepcopy(base), CPU),
                                                samples)  # fmt: skip
        assert metrics["sequences"] == len(samples)
        results.append(grads)
    scale = max(float(g.abs().max()) for g in results[1].values())
    assert max(float((results[0][k] - results[1][k]).abs().max()) for k in results[1]) < 1e-6 * scale


def test_a_prompt_longer_than_the_budget_is_a_configuration_error_before_any_work() -> None:
    model = tiny_model(seed=16)
    rng = np.random.default_rng(16)
    samples = make_group(model, rng, [1, 0], prompt_len=70, max_response=4)
    before = params(model)
    trainer = Trainer(make_cfg(lr=1e-2, micro_batch_tokens=64), model, CPU)
    with pytest.raises(BudgetError, match="raise learner.micro_batch_tokens to at least 7"):
        trainer.train_step(samples)
    assert max_param_diff(before, params(model)) == 0.0 and trainer.optimizer.state_dict()["state"] == {}
    too_small = RunConfig.model_validate({"learner": {"micro_batch_tokens": 64}, "sampling": {"max_new_tokens": 64}})
    with pytest.raises(ValueError, match="sampling.max_new_tokens"):
        Trainer(too_small, model, CPU)  # known at the start: no response of the longest length could ever fit


def test_a_policy_with_dropout_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(seed=17)
    model.config.attention_dropout = 0.1
    with caplog.at_level(logging.WARNING, logger="learner.train"):
        Trainer(make_cfg(), model, CPU)
    assert "dropout" in caplog.text
