"""The example backend of docs/EXTENDING.md, registered the way a new backend is (one line in the BACKENDS table)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from model_factories import save_tiny_llama
from transformers import LlamaForCausalLM

from rollout_server.backends import BackendOptions, backend_class, create_backend
from rollout_server.backends.base import Backend, WeightsTag
from rollout_server.policy_weights import PolicyWeights
from services import extensions
from services.protocol import Sampling

REPO = Path(__file__).resolve().parents[3]
MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), max_positions=256)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Iterator[Backend]:
    sys.path.insert(0, str(REPO / "docs/examples"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(extensions.BACKENDS, "sequential", "sequential_backend:SequentialBackend")
        assert backend_class("sequential").__name__ == "SequentialBackend"
        built = create_backend("sequential", BackendOptions(model=tiny_model_dir))
    yield built
    built.close()
    sys.path.remove(str(REPO / "docs/examples"))


def teacher_forced(model: LlamaForCausalLM, prompt: np.ndarray, tokens: np.ndarray, temperature: float) -> np.ndarray:
    ids = torch.tensor(np.concatenate([prompt, tokens]).astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).numpy()


def test_logprobs_are_those_of_the_distribution_sampled_from(backend: Backend, tiny_model_dir: Path) -> None:
    [group] = backend.generate([MESSAGES], 3, Sampling(temperature=0.7, max_new_tokens=12, seed=5), timeout_s=120)
    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert len(group.completions) == 3
    for c in group.completions:
        assert [(s.start, s.weights.version) for s in c.spans] == [(0, 0)]
        expected = teacher_forced(reference, group.prompt_token_ids, c.token_ids, 0.7)
        np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)


def test_a_swap_lands_between_decode_steps_and_the_canary_is_scored_under_it(
    backend: Backend, tiny_model_dir: Path
) -> None:
    weights = PolicyWeights(backend)  # what the rollout server drives every backend through
    before = weights.score_canary()
    shifted = [
        (name, p.detach() + 0.05) for name, p in LlamaForCausalLM.from_pretrained(tiny_model_dir).named_parameters()
    ]
    future = backend.submit(backend.encode_prompts([MESSAGES])[0], 2, Sampling(max_new_tokens=60, seed=1))
    while backend.state().steps == 0 or backend.state().rows == 0:
        assert not future.done(), future.exception()
        time.sleep(0.01)
    canary = weights.swap(shifted, WeightsTag(1, "v1:shifted"))
    group = future.result(120)
    assert canary.version == 1 and np.abs(canary.logprobs - before.logprobs).mean() > 1e-3
    np.testing.assert_allclose(backend.score(weights.canary_ids).result(10), canary.logprobs, atol=1e-6)
    for c in group.completions:
        versions = [(s.weights.version, s.weights.fingerprint) for s in c.spans]
        assert versions in ([(0, ""), (1, "v1:shifted")], [(0, "")])  # a response that ended before the swap: one span
    assert any(len(c.spans) == 2 and 0 < c.spans[1].start < len(c.token_ids) for c in group.completions)
    assert backend.state().weights == WeightsTag(1, "v1:shifted") and backend.state().swaps == 1
    with pytest.raises(ValueError, match="does not match"):
        backend.swap([("model.nope", torch.zeros(1))], WeightsTag(2), [1, 2])
