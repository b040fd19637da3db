"""A worked example of a rollout backend (docs/EXTENDING.md): transformers, one group at a time, on its own thread.

It is the smallest backend that keeps the whole contract of ``rollout_server.backends.base.Backend``:

- ``submit`` returns a future at once and never blocks on generation; a cancelled future is skipped;
- log-probs are those of the distribution each token was drawn from (temperature, top-k, top-p; docs/SAMPLING.md),
  so the learner's importance ratios are right;
- ``swap`` applies new weights at a step boundary, between two decode steps, while a group is being generated:
  the responses in flight then get a second span, so every token says which weights sampled it;
- ``score`` and the canary ``swap`` returns are teacher-forced log-probs at T = 1 under the weights in place;
- ``state`` answers at once, from counters, never behind generation.

What it leaves out is performance: one group at a time, no KV cache (each step recomputes the whole sequence), so
it is for reading, not for training (the ``hf`` backend batches groups continuously over a ragged KV cache).
tests/unit/rollout_server/test_example_backend.py registers it under the name ``sequential`` and runs it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rollout_server.backends.base import (
    Backend,
    BackendOptions,
    Completion,
    EngineState,
    PromptGroup,
    Span,
    WeightsTag,
)
from rollout_server.backends.sampling import StopStrings, sample_tokens
from services.modeling.loading import load_model, load_tokenizer
from services.protocol import Sampling


@dataclass
class _Swap:
    named: list[tuple[str, torch.Tensor]]
    weights: WeightsTag
    canary_ids: list[int]
    future: Future[np.ndarray]


class SequentialBackend(Backend):
    """Generates one group at a time on a worker thread; swaps weights between two decode steps."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self._tokenizer = tokenizer
        self._params = dict(model.named_parameters())
        self._weights = WeightsTag(0)
        self._groups: queue.Queue[tuple[list[int], int, Sampling, Future[PromptGroup]] | None] = queue.Queue()
        self._swaps: queue.Queue[_Swap] = queue.Queue()
        self._busy = 0
        self._steps = 0
        self._swapped = 0
        self._closed = False
        self._model_lock = threading.Lock()  # a swap's copy and a scoring from another thread never overlap
        self._thread = threading.Thread(target=self._run, name="sequential-backend", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, options: BackendOptions) -> SequentialBackend:
        """The registry's constructor: every backend is built from the same options."""
        return cls(load_model(options.model, dtype=options.dtype or "float32"), load_tokenizer(options.model))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    # ------------------------------------------------------------------ the interface

    def submit(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> Future[PromptGroup]:
        future: Future[PromptGroup] = Future()
        limit = self.model.config.max_position_embeddings
        if len(prompt_ids) + sampling.max_new_tokens > limit:
            future.set_exception(ValueError(f"prompt + max_new_tokens exceeds the model's {limit} positions"))
        else:
            self._groups.put((list(prompt_ids), n, sampling, future))
        return future

    def swap(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weights: WeightsTag, canary_ids: Sequence[int]
    ) -> Future[np.ndarray]:
        named = list(named_tensors)
        for name, tensor in named:  # refuse before anything changes
            if name not in self._params or tuple(tensor.shape) != tuple(self._params[name].shape):
                raise ValueError(f"weight {name!r} does not match the model")
        future: Future[np.ndarray] = Future()
        self._swaps.put(_Swap(named, weights, list(canary_ids), future))
        self._groups.put(None)  # wake an idle worker
        return future

    def score(self, token_ids: Sequence[int]) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        future.set_result(self._score(token_ids))  # on the caller's thread: reading the model is thread-safe
        return future

    def state(self) -> EngineState:
        return EngineState(groups=self._busy, waiting=self._groups.qsize(), rows=self._busy, max_rows=1,
                           cached_tokens=0, weights=self._weights, swaps=self._swapped, last_swap_pause_s=0.0,
                           steps=self._steps, alive=self._thread.is_alive())  # fmt: skip

    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(p.shape)) for name, p in self._params.items()]

    def close(self) -> None:
        self._groups.put(None)
        self._closed = True
        self._thread.join(10)

    # ------------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        while not self._closed:
            item = self._groups.get()
            self._apply_swaps()
            if item is None:
                continue
            prompt_ids, n, sampling, future = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            self._busy = 1
            try:
                future.set_result(self._generate(prompt_ids, n, sampling))
            except Exception as exc:  # a failed group fails its own future, never the thread
                future.set_exception(exc)
            finally:
                self._busy = 0

    def _apply_swaps(self) -> bool:
        """Apply every pending swap (a step boundary); returns whether the weights changed."""
        changed = False
        while not self._swaps.empty():
            swap = self._swaps.get()
            with torch.no_grad(), self._model_lock:
                for name, tensor in swap.named:
                    self._params[name].copy_(tensor)
            self._weights, changed = swap.weights, True
            self._swapped += 1
            swap.future.set_result(self._score(swap.canary_ids))
        return changed

    @torch.no_grad()
    def _generate(self, prompt_ids: list[int], n: int, sampling: Sampling) -> PromptGroup:
        generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else 0)
        rows = torch.tensor([prompt_ids] * n)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        spans = [[Span(0, self._weights)] for _ in range(n)]
        done = [False] * n
        stops = StopStrings(self._tokenizer, sampling.stop)
        eos = self._tokenizer.eos_token_id
        for _ in range(sampling.max_new_tokens):
            if self._apply_swaps():  # sequences continue under the new weights: each gets a new span
                for i in range(n):
                    if not done[i]:
                        spans[i].append(Span(len(tokens[i]), self._weights))
            logits = self.model(input_ids=rows, use_cache=False).logits[:, -1].float()
            picked, picked_logp = sample_tokens(logits, sampling, generator)
            self._steps += 1
            for i in range(n):
                if not done[i]:
                    tokens[i].append(int(picked[i]))
                    logprobs[i].append(float(picked_logp[i]))
                    done[i] = tokens[i][-1] == eos or stops.completed(tokens[i])
            rows = torch.cat([rows, picked[:, None]], dim=1)
            if all(done):
                break
        completions = [
            Completion(
                np.asarray(t, np.uint32),
                np.asarray(lp, np.float32),
                self._tokenizer.decode(t, skip_special_tokens=True),
                "stop" if d else "length",
                s,
            )  # fmt: skip
            for t, lp, d, s in zip(tokens, logprobs, done, spans, strict=True)
        ]
        return PromptGroup(np.asarray(prompt_ids, np.uint32), completions)

    def _score(self, ids: Sequence[int]) -> np.ndarray:
        tokens = torch.tensor([list(ids)])
        with torch.no_grad(), self._model_lock:
            logits = self.model(input_ids=tokens, use_cache=False).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, tokens[0, 1:, None]).squeeze(-1).numpy().astype(np.float32)
