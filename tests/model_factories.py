"""Tiny random models for tests (importable as ``model_factories``): no download, the real default tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_server.backends.base import Backend, EngineState, PromptGroup, WeightsTag
from services.modeling.loading import DEFAULT_MODEL, load_tokenizer
from services.protocol import Sampling


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Import into a test module to run its tests on one torch thread (the thread count is restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_llama(
    folder: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """A random tied-embedding Llama with the default model's tokenizer and chat template, saved as an HF folder."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class DelegatingBackend(Backend):
    """A backend that hands every call to ``inner`` (a real one): tests subclass it to watch or hold what passes."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    def submit(self, prompt_ids: Any, n: int, sampling: Sampling) -> Future[PromptGroup]:
        return self.inner.submit(prompt_ids, n, sampling)

    def swap(self, named_tensors: Any, weights: WeightsTag, canary_ids: Any) -> Future[np.ndarray]:
        return self.inner.swap(named_tensors, weights, canary_ids)

    def score(self, token_ids: Any) -> Future[np.ndarray]:
        return self.inner.score(token_ids)

    def state(self) -> EngineState:
        return self.inner.state()

    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return self.inner.state_dict_names_and_shapes()
