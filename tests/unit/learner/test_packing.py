"""Shared-prefix packing: the layout, the tree mask, the planning rules, and log-probs and gradients equal to the
unshared forward on real (tiny and default) models."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from model_factories import one_torch_thread  # noqa: F401 - an autouse fixture
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import Sample
from learner.packing import (
    BudgetError,
    Row,
    Segment,
    collate,
    groups_of,
    pad_samples,
    plan_micro_batches,
    segments_of,
    split_for_ranks,
    tree_mask,
)
from learner.scorer import check_tree_mask_support, score_packed
from services.modeling.loading import DEFAULT_MODEL, load_model

VOCAB = 64
CPU = torch.device("cpu")


def tiny_model(attn: str = "sdpa", dtype: torch.dtype = torch.float64, tied: bool = True) -> LlamaForCausalLM:
    """A 2-layer random Llama (RMSNorm and RoPE compute in float32 even in float64: a ~1e-7 floor)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def sample(group: str, prompt: np.ndarray, response_len: int, rng: np.random.Generator, **kw: object) -> Sample:
    """A sample of `group` with a random response and behaviour log-probs."""
    response = rng.integers(0, VOCAB, response_len).astype(np.uint32)
    behaviour = rng.uniform(-5, -3, response_len).astype(np.float32)
    return Sample(group, prompt, response, behaviour, float(rng.normal()), 1.0, 0, **kw)  # type: ignore[arg-type]


def ragged_groups(rng: np.random.Generator) -> list[Sample]:
    """Groups of different prompt and response lengths, one of them a group of one."""
    samples = []
    for g, (prompt_len, lengths) in enumerate([(7, [5, 2, 9, 3]), (4, [6]), (11, [1, 8, 4])]):
        prompt = rng.integers(0, VOCAB, prompt_len).astype(np.uint32)
        samples += [sample(f"g{g}", prompt, n, rng) for n in lengths]
    return samples


def unshared_logprobs(model: torch.nn.Module, s: Sample, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the response tokens from a plain full forward of prompt + response alone (the reference)."""
    ids = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64)).unsqueeze(0)
    logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return logp[len(s.prompt_ids) - 1 :]


def packed(samples: list[Sample], budget: int = 4096, row_tokens: int = 4096, shared: bool = True) -> list[list[Row]]:
    """The micro-batch plan of the samples."""
    segments = [seg for group in groups_of(samples) for seg in segments_of(group, shared, budget)]
    return plan_micro_batches(segments, budget, row_tokens)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters' gradients, then cleared."""
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def compare(
    model: torch.nn.Module, samples: list[Sample], plan: list[list[Row]], chunk: int, tol: float, grad_rtol: float = 0.0
) -> None:
    """Packed log-probs and the gradients of a weighted sum of them equal the unshared forward's: within `tol`, or
    (float32 on a real model) each parameter's gradient within `grad_rtol` of its norm."""
    weights = {id(s): torch.linspace(-1.0, 1.0, len(s.response_ids), dtype=torch.float64) for s in samples}
    reference = {id(s): unshared_logprobs(model, s) for s in samples}
    sum(float(s.advantage) * (weights[id(s)] * reference[id(s)]).sum() for s in samples).backward()
    expected = grads(model)
    seen = 0
    for rows in plan:
        batch = collate(rows, CPU)
        logp, _ = score_packed(model, batch.inputs, 1.0, chunk)
        total = torch.zeros((), dtype=torch.float64)
        for b, s in enumerate(batch.samples):
            n = len(s.response_ids)
            torch.testing.assert_close(logp[b, :n].double(), reference[id(s)].detach(), atol=tol, rtol=0)
            assert (logp[b, n:] == 0).all()
            total = total + float(s.advantage) * (weights[id(s)] * logp[b, :n].double()).sum()
            seen += 1
        total.backward()
    assert seen == len(samples)
    got = grads(model)
    assert set(got) == set(expected)
    for name in expected:
        if grad_rtol:
            assert float((got[name] - expected[name]).norm()) <= grad_rtol * float(expected[name].norm()), name
        else:
            torch.testing.assert_close(got[name], expected[name], atol=tol, rtol=tol, msg=name)


# --- layout ---------------------------------------------------------------------------------------------------------


def test_a_group_is_the_prompt_once_then_its_responses_with_restarting_positions() -> None:
    prompt = np.array([5, 6, 7], np.uint32)
    a = Sample("g", prompt, np.array([10, 11], np.uint32), np.full(2, -1.0, np.float32), 1.0, 1.0, 0)
    b = Sample("g", prompt, np.array([20, 21, 22], np.uint32), np.full(3, -2.0, np.float32), -1.0, 1.0, 0)
    batch = collate([Row((Segment(prompt, (a, b)),))], CPU)
    x = batch.inputs
    assert x.input_ids.tolist() == [[5, 6, 7, 10, 11, 20, 21, 22]]
    assert x.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert x.attention_mask is None and x.segment_ids is not None and x.branch_ids is not None
    # the first token of each response is predicted by the last prompt position (2), the rest by their predecessor
    assert x.predictor_cols.tolist() == [2, 3, 2, 5, 6]
    assert x.targets.tolist() == [10, 11, 20, 21, 22]
    assert (x.slot_rows.tolist(), x.slot_cols.tolist()) == ([0, 0, 1, 1, 1], [0, 1, 0, 1, 2])
    mask = tree_mask(x.segment_ids, x.branch_ids)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # response 1 sees the prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # response 2 does not see response 1
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    assert batch.behaviour_logp.tolist() == [[-1.0, -1.0, 0.0], [-2.0, -2.0, -2.0]]
    assert batch.token_mask.tolist() == [[True, True, False], [True, True, True]]


def test_groups_share_a_row_block_diagonally_and_padding_sees_only_itself() -> None:
    rng = np.random.default_rng(0)
    p, q = rng.integers(0, VOCAB, 2).astype(np.uint32), rng.integers(0, VOCAB, 1).astype(np.uint32)
    a, b = sample("a", p, 1, rng), sample("b", q, 2, rng)
    c = sample("c", p, 1, rng)
    batch = collate([Row((Segment(p, (a,)), Segment(q, (b,)))), Row((Segment(p, (c,)),))], CPU)
    x = batch.inputs
    assert x.segment_ids is not None and x.branch_ids is not None
    mask = tree_mask(x.segment_ids, x.branch_ids)[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]  # fmt: skip
    assert mask[1][3:] == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]  # padding: the diagonal
    assert x.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2]


def test_plain_sequences_keep_the_two_dimensional_padding_mask() -> None:
    rng = np.random.default_rng(1)
    samples = [sample(f"s{i}", rng.integers(0, VOCAB, 3 + i).astype(np.uint32), 2, rng) for i in range(3)]
    (rows,) = packed(samples, shared=False, row_tokens=0)
    batch = collate(rows, CPU)
    assert batch.inputs.segment_ids is None and batch.inputs.attention_mask is not None
    assert batch.inputs.attention_mask.sum(dim=1).tolist() == [7, 6, 5]  # longest first
    assert batch.positions == 3 * 7


# --- planning -------------------------------------------------------------------------------------------------------


def test_a_group_over_the_budget_is_split_and_a_sequence_over_it_is_a_configuration_error() -> None:
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, VOCAB, 10).astype(np.uint32)
    group = [sample("g", prompt, n, rng) for n in (20, 20, 20)]
    parts = segments_of(group, True, budget=64)
    assert [len(seg.samples) for seg in parts] == [2, 1]  # 10 + 40 fits, 10 + 60 does not
    assert all(seg.length <= 64 for seg in parts)
    with pytest.raises(BudgetError, match="raise learner.micro_batch_tokens to at least 80"):
        segments_of([sample("h", prompt, 70, rng)], True, budget=64)
    with pytest.raises(BudgetError, match="micro_batch_tokens"):
        segments_of([sample("h", prompt, 70, rng)], False, budget=64)


def test_short_groups_share_rows_long_ones_stay_alone_and_micro_batches_fit_the_budget() -> None:
    rng = np.random.default_rng(3)
    samples = []
    for g, (prompt_len, lengths) in enumerate([(40, [30, 30]), (10, [5, 5]), (8, [4]), (50, [60, 60]), (6, [3, 3])]):
        prompt = rng.integers(0, VOCAB, prompt_len).astype(np.uint32)
        samples += [sample(f"g{g}", prompt, n, rng, trainable=True) for n in lengths]
    plan = packed(samples, budget=256, row_tokens=128)
    rows = [row for mb in plan for row in mb]
    assert sorted(len(s.samples) for row in rows for s in row.segments) == [1, 2, 2, 2, 2]
    assert all(row.length <= 128 or len(row.segments) == 1 for row in rows)
    assert [row.length for row in rows] == [170, 120, 24]  # 170 alone (> 128); 100 + 20; 12 + 12
    assert all(len(mb) * max(r.length for r in mb) <= 256 for mb in plan)
    assert sorted(id(s) for row in rows for seg in row.segments for s in seg.samples) == sorted(map(id, samples))


def test_temperatures_are_never_mixed_in_a_micro_batch() -> None:
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, VOCAB, 5).astype(np.uint32)
    a = sample("a", prompt, 3, rng)
    b = Sample("b", prompt, a.response_ids, a.behaviour_logprobs, 1.0, 0.7, 0)
    plan = packed([a, b])
    assert len(plan) == 2
    assert {collate(rows, CPU).temperature for rows in plan} == {0.7, 1.0}


def test_groups_are_split_when_there_are_fewer_than_ranks() -> None:
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, VOCAB, 5).astype(np.uint32)
    (segment,) = segments_of([sample("g", prompt, 2, rng) for _ in range(5)], True, 64)
    parts = split_for_ranks([segment], 3)
    assert [len(p.samples) for p in parts] == [2, 1, 2]
    assert split_for_ranks(parts, 2) == parts


# --- equal to the unshared forward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_packed_logprobs_and_gradients_equal_the_unshared_forward(attn: str, chunk: int) -> None:
    model = tiny_model(attn)
    samples = ragged_groups(np.random.default_rng(6))
    compare(model, samples, packed(samples), chunk, tol=1e-6)  # one row: three groups block-diagonally
    compare(model, samples, packed(samples, budget=64, row_tokens=0), chunk, tol=1e-6)  # padded rows


def test_packed_equals_unshared_with_an_untied_head_and_gradient_checkpointing() -> None:
    model = tiny_model(tied=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    samples = ragged_groups(np.random.default_rng(7))
    compare(model, samples, packed(samples, row_tokens=24), 3, tol=1e-6)


def test_a_group_partly_masked_by_the_overlong_filter_packs_only_its_trainable_responses() -> None:
    rng = np.random.default_rng(8)
    prompt = rng.integers(0, VOCAB, 6).astype(np.uint32)
    group = [sample("g", prompt, n, rng, trainable=n != 16) for n in (4, 16, 7)]
    useful = [s for s in group if s.trainable]
    plan = packed(useful)
    assert [len(seg.samples) for mb in plan for row in mb for seg in row.segments] == [2]
    compare(tiny_model(), useful, plan, 0, tol=1e-6)


def test_the_model_attention_must_take_a_four_dimensional_mask() -> None:
    check_tree_mask_support(tiny_model("sdpa"))
    model = tiny_model("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="shared_prefix=false"):
        check_tree_mask_support(model)


def test_pad_samples_is_the_right_padded_reference_layout() -> None:
    a = Sample("a", np.array([5, 6], np.uint32), np.array([7, 8, 9], np.uint32), np.zeros(3, np.float32), 1.0, 1.0, 0)
    b = Sample("b", np.array([1, 2, 3], np.uint32), np.array([4], np.uint32), np.zeros(1, np.float32), -1.0, 1.0, 0)
    padded = pad_samples([a, b], CPU)
    assert padded.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert padded.response_mask.int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]]


def test_default_model_packed_logprobs_and_gradients_equal_the_unshared_forward() -> None:
    """The real SmolLM2-135M (float32): its noise floor is ~2e-5 in log-probs (batch size alone changes GEMM sums)."""
    torch.set_num_threads(2)
    model = load_model(DEFAULT_MODEL)
    model.train()
    rng = np.random.default_rng(9)
    samples = []
    for g, (prompt_len, lengths) in enumerate([(30, [6, 2, 9]), (12, [5])]):
        prompt = rng.integers(0, 49_000, prompt_len).astype(np.uint32)
        for n in lengths:
            response = rng.integers(0, 49_000, n).astype(np.uint32)
            samples.append(Sample(f"g{g}", prompt, response, np.zeros(n, np.float32), float(rng.normal()), 1.0, 0))
    compare(model, samples, packed(samples), 1024, tol=2e-4, grad_rtol=1e-4)
    torch.set_num_threads(1)


@pytest.mark.skipif(shutil.which("cc") is None, reason="transformers compiles flex attention: needs a C compiler")
def test_flex_attention_takes_the_tree_mask_as_a_block_mask() -> None:
    """Forward only: on CPU flex attention has no backward pass (it is for GPUs); the no-grad proximal pass uses it."""
    model = tiny_model("flex_attention", dtype=torch.float32).eval()
    reference = tiny_model("sdpa", dtype=torch.float32).eval()
    samples = ragged_groups(np.random.default_rng(10))
    with torch.no_grad():
        for rows in packed(samples):
            batch = collate(rows, CPU)
            logp, _ = score_packed(model, batch.inputs, 1.0, 0)
            for b, s in enumerate(batch.samples):
                n = len(s.response_ids)
                torch.testing.assert_close(logp[b, :n].double(), unshared_logprobs(reference, s), atol=2e-6, rtol=0)
