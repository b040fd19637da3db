"""The transformers backend (CPU, CUDA, tests): continuous batching over a KV cache, in-flight weight swaps.

Why not ``model.generate``: it keeps every sequence until the longest one ends, and on the reference workload only a
third of the decode slots produce tokens; and weights could change only between its calls. Here one engine thread
(``hf_engine.HFEngine``) keeps up to ``max_rows`` sequences of many groups in one decode batch, admits a new group's
n samples as soon as slots free up (its prompt prefilled once, its KV repeated n times), returns each group the
moment it is done, and applies new weights between two decode steps. docs/ROLLOUT.md explains the design and what
it measured against transformers' own continuous-batching manager.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rollout_server.backends.base import Backend, BackendOptions, EngineState, PromptGroup, WeightsTag
from rollout_server.backends.hf_engine import HFEngine
from services.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer
from services.protocol import Sampling

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 64
"""Decode slots when none are configured: on a CPU the weights are read once per step whatever the batch, so
rows are nearly free until attention over the cache dominates (docs/ROLLOUT.md has the measurement)."""


class HFBackend(Backend):
    """Continuous batching with transformers on CPU or CUDA; records the behaviour log-prob of every sampled token."""

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        num_threads: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        if num_threads is not None:
            # Process-wide: the rollout worker shares the machine's cores with the learner.
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        dtype = dtype or ("float32" if self.device.type == "cpu" else "bfloat16")
        self._model: PreTrainedModel | None = load_model(model, dtype=dtype, device=self.device).eval()
        self._tokenizer = load_tokenizer(model)
        self.eos_token_ids = frozenset(eos_token_ids if eos_token_ids is not None else self._default_eos_ids())
        self._engine = HFEngine(self._model, self._tokenizer, eos_token_ids=self.eos_token_ids, device=self.device,
                                max_rows=max_rows, weights=WeightsTag(0))  # fmt: skip

    @classmethod
    def from_options(cls, options: BackendOptions) -> HFBackend:
        """Build from the shared backend options (``extra`` may hold ``eos_token_ids``)."""
        return cls(options.model, device=options.device, dtype=options.dtype, num_threads=options.num_threads,
                   max_rows=options.max_rows or DEFAULT_MAX_ROWS, **dict(options.extra))  # fmt: skip

    def _default_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        configured = self.model.generation_config.eos_token_id
        if configured is not None:
            ids.update([configured] if isinstance(configured, int) else configured)
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return ids

    @property
    def model(self) -> PreTrainedModel:
        """The policy model; raises once the backend is closed."""
        if self._model is None:
            raise RuntimeError("backend is closed")
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer whose chat template renders prompts."""
        return self._tokenizer

    def submit(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> Future[PromptGroup]:
        """Queue one group; it joins the running decode batch as soon as ``n`` slots are free."""
        return self._engine.submit(prompt_ids, n, sampling)

    def swap(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weights: WeightsTag, canary_ids: Sequence[int]
    ) -> Future[np.ndarray]:
        """Apply new weights between two decode steps; resolves with the canary's log-probs under them."""
        return self._engine.swap(named_tensors, weights, canary_ids)

    def score(self, token_ids: Sequence[int]) -> Future[np.ndarray]:
        """Teacher-forced log-probs of ``token_ids[1:]`` under the weights in place."""
        return self._engine.score(token_ids)

    def state(self) -> EngineState:
        """The engine's state now."""
        return self._engine.state()

    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the model's parameters (tied weights once), in module order."""
        return [(name, tuple(param.shape)) for name, param in self.model.named_parameters()]

    def close(self) -> None:
        """Stop the engine and drop the model so its memory can be reclaimed."""
        self._engine.close()
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
