"""The hf backend's sampling loop: recorded log-probs, seeding, stop strings, lengths, grouping, weight loading."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, even by accident

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_server.backends import BackendOptions, create_backend
from rollout_server.backends.base import PromptGroup, Span, WeightsTag
from rollout_server.backends.hf import HFBackend
from rollout_server.backends.sampling import draw, filter_logits
from services.modeling.loading import DEFAULT_MODEL, load_tokenizer
from services.protocol import Sampling

torch.set_num_threads(2)

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the sum of 3 and 4? Put the answer in a box."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]
# Every 32nd token ends a sequence, so a random model's samples finish after a few to a few dozen tokens.
MANY_EOS = list(range(0, 49152, 32))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,  # peaked next-token distributions, so temperature and truncation matter
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(tiny_model_dir, eos_token_ids=MANY_EOS)


def _teacher_forced(backend: HFBackend, prompt: np.ndarray, completion: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Log-probs of the completion from one unpadded forward pass, with the sampler's temperature and truncation."""
    ids = torch.from_numpy(np.concatenate([prompt, completion]).astype(np.int64))[None]
    with torch.no_grad():
        logits = backend.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    scaled = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    index = torch.tensor(completion.astype(np.int64))[:, None]
    return scaled.log_softmax(-1).gather(-1, index).squeeze(-1).numpy()


def _flat(groups: list[PromptGroup]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(c.token_ids, c.logprobs) for g in groups for c in g.completions]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_teacher_forced_forward(backend: HFBackend, temperature: float) -> None:
    sampling = Sampling(temperature=temperature, max_new_tokens=24, seed=1)
    groups = backend.generate(PROMPTS, n=3, sampling=sampling)
    completions = [c for g in groups for c in g.completions]
    # The batch must really exercise left padding and dropped rows.
    assert len({len(g.prompt_token_ids) for g in groups}) == len(PROMPTS)
    assert len({len(c.token_ids) for c in completions}) > 2
    assert {c.finish_reason for c in completions} == {"stop", "length"}
    for group in groups:
        for completion in group.completions:
            expected = _teacher_forced(backend, group.prompt_token_ids, completion.token_ids, sampling)
            np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


def test_truncated_logprobs_are_renormalised(backend: HFBackend) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.6, top_k=20, max_new_tokens=12, seed=3)
    groups = backend.generate(PROMPTS[:2], n=2, sampling=sampling)
    full = Sampling(temperature=0.8)
    for group in groups:
        for completion in group.completions:
            expected = _teacher_forced(backend, group.prompt_token_ids, completion.token_ids, sampling)
            np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)
            untruncated = _teacher_forced(backend, group.prompt_token_ids, completion.token_ids, full)
            assert np.all(completion.logprobs >= untruncated - 1e-5)
            assert np.any(completion.logprobs > untruncated + 1e-3)


def test_top_k_one_is_greedy_with_certain_tokens(backend: HFBackend) -> None:
    greedy = backend.generate(PROMPTS, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=10))
    top1 = backend.generate(PROMPTS, n=2, sampling=Sampling(top_k=1, max_new_tokens=10, seed=5))
    for g, t in zip(greedy, top1, strict=True):
        for completion in t.completions:
            np.testing.assert_array_equal(completion.token_ids, g.completions[0].token_ids)
            np.testing.assert_array_equal(completion.logprobs, np.zeros_like(completion.logprobs))


def test_same_seed_same_samples(backend: HFBackend) -> None:
    sampling = Sampling(max_new_tokens=16, seed=7)
    first, second = (_flat(backend.generate(PROMPTS, n=2, sampling=sampling)) for _ in range(2))
    other = _flat(backend.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=16, seed=8)))
    for (ids_a, lp_a), (ids_b, lp_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(lp_a, lp_b)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_stop_string_ends_the_completion_where_it_completes(backend: HFBackend) -> None:
    free = backend.generate(PROMPTS[:1], n=1, sampling=Sampling(max_new_tokens=20, seed=11))[0].completions[0]
    assert len(free.token_ids) >= 5, "seed must give a long enough free completion"
    stop = backend.tokenizer.decode(free.token_ids[2:4].tolist())
    assert stop.strip()
    stopped = backend.generate(PROMPTS[:1], n=1, sampling=Sampling(max_new_tokens=20, seed=11, stop=[stop]))
    completion = stopped[0].completions[0]
    end = len(completion.token_ids)
    assert completion.finish_reason == "stop"
    assert end <= 4
    np.testing.assert_array_equal(completion.token_ids, free.token_ids[:end])
    np.testing.assert_array_equal(completion.logprobs, free.logprobs[:end])
    assert stop in completion.text
    assert stop not in backend.tokenizer.decode(completion.token_ids[: end - 1].tolist())


def test_max_new_tokens_gives_finish_reason_length(tiny_model_dir: Path) -> None:
    no_eos = HFBackend(tiny_model_dir, eos_token_ids=[])
    groups = no_eos.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=7, seed=0))
    for completion in (c for g in groups for c in g.completions):
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == len(completion.logprobs) == 7
        assert completion.token_ids.dtype == np.uint32 and completion.logprobs.dtype == np.float32


def test_groups_follow_prompt_order_with_n_samples(backend: HFBackend) -> None:
    tokenizer = backend.tokenizer
    groups = backend.generate(PROMPTS, n=4, sampling=Sampling(max_new_tokens=4, seed=2))
    assert [len(g.completions) for g in groups] == [4, 4, 4]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        expected = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert group.prompt_token_ids.tolist() == expected["input_ids"]
    rendered = tokenizer.apply_chat_template(PROMPTS[1], add_generation_prompt=True, tokenize=False)
    text_group = backend.generate([rendered], n=1, sampling=Sampling(max_new_tokens=4))[0]
    np.testing.assert_array_equal(text_group.prompt_token_ids, groups[1].prompt_token_ids)
    assert backend.generate([], n=2, sampling=Sampling()) == []


def test_swap_changes_the_policy(tiny_model_dir: Path) -> None:
    local = HFBackend(tiny_model_dir, eos_token_ids=[])
    names = dict(local.state_dict_names_and_shapes())
    assert names["lm_head.weight"] == (len(local.tokenizer), 64)
    sampling = Sampling(temperature=0.0, max_new_tokens=6)
    before = local.generate(PROMPTS[:1], n=1, sampling=sampling)[0].completions[0]
    bias_row = torch.zeros(names["lm_head.weight"])
    bias_row[42] = 1.0  # every hidden state now scores token 42 by the sum of its entries
    new = [("lm_head.weight", bias_row), ("model.norm.weight", torch.full(names["model.norm.weight"], 5.0))]
    canary = local.swap(new, WeightsTag(1, "v1:test"), canary_ids=[1, 2, 3]).result(timeout=60)
    assert canary.shape == (2,) and np.isfinite(canary).all()
    after = local.generate(PROMPTS[:1], n=1, sampling=sampling)[0].completions[0]
    assert not np.array_equal(before.token_ids, after.token_ids)
    assert after.spans == [Span(0, WeightsTag(1, "v1:test"))] and local.state().weights.version == 1
    with pytest.raises(ValueError, match="unknown weight"):
        local.swap([("no.such.weight", torch.zeros(1))], WeightsTag(2), [1, 2])
    with pytest.raises(ValueError, match="shape"):
        local.swap([("model.norm.weight", torch.zeros(3))], WeightsTag(2), [1, 2])
    local.close()
    with pytest.raises(RuntimeError, match="closed"):
        local.generate(PROMPTS[:1], n=1, sampling=sampling)


def test_draw_follows_the_distribution() -> None:
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).expand(20_000, 5)
    draws = draw(probs, torch.Generator().manual_seed(0))
    shares = torch.bincount(draws, minlength=5).double() / len(draws)
    torch.testing.assert_close(shares, probs[0].double(), atol=0.015, rtol=0)
    assert shares[1] == shares[4] == 0


def test_filter_logits_keeps_the_nucleus() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -5.0]])
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(filter_logits(logits, top_k=-1, top_p=float(probs[0] + probs[1]) - 1e-6))[0]
    assert kept.tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0))[0].tolist() == [True, True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=-1, top_p=1e-9))[0].tolist() == [True, False, False, False, False]


def test_sampling_rejects_bad_values() -> None:
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": 0}, {"max_new_tokens": 0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_factory(tiny_model_dir: Path) -> None:
    assert isinstance(create_backend("hf", BackendOptions(tiny_model_dir)), HFBackend)
    with pytest.raises(ValueError, match="unknown backend kind"):
        create_backend("tgi", BackendOptions(tiny_model_dir))
    if importlib.util.find_spec("rollout_server.backends.vllm") is None:
        with pytest.raises(RuntimeError, match="vllm backend"):
            create_backend("vllm", BackendOptions(tiny_model_dir))


def test_default_model_generates_a_group() -> None:
    real = HFBackend(DEFAULT_MODEL, num_threads=2)
    prompt = [{"role": "user", "content": "What is 2+3? Answer with a number."}]
    greedy = real.generate([prompt], n=1, sampling=Sampling(temperature=0.0, max_new_tokens=12))[0]
    assert any(ch.isdigit() for ch in greedy.completions[0].text), greedy.completions[0].text
    group = real.generate([prompt], n=3, sampling=Sampling(max_new_tokens=12, seed=0))[0]
    assert len(group.completions) == 3
    for completion in group.completions:
        assert completion.text.strip()
        assert np.all(np.isfinite(completion.logprobs)) and np.all(completion.logprobs <= 0)
