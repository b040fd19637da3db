"""The hf backend's engine: one thread that decodes every group in flight together and never waits for a batch.

Each loop turn, at a step boundary: apply a pending weight swap (sequences in flight continue under the new weights;
each of their responses gets a new span), admit waiting groups into free decode slots (one prefill per prompt, its
KV repeated for the group's n samples), decode one token for every row, and resolve each group the moment its last
sample finishes. Rows of different groups are sampled with their group's own parameters and random generator, so a
seeded group draws the same uniforms whatever it is batched with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rollout_server.backends.base import Completion, EngineState, FinishReason, PromptGroup, Span, WeightsTag
from rollout_server.backends.hf_batch import RunningBatch
from rollout_server.backends.sampling import StopStrings, pick, sampling_logprobs
from services.protocol import Sampling

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5
"""How long the idle engine sleeps between checks for work it might have missed (it is woken on every submit)."""


def _settle(future: Future[object], *, result: object = None, error: BaseException | None = None) -> None:
    """Resolve a future unless it was cancelled (or resolved) meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


@dataclass(eq=False)
class _Group:
    prompt_ids: list[int]
    n: int
    sampling: Sampling
    future: Future[PromptGroup]
    generator: torch.Generator
    stops: StopStrings
    rows: list[_Row] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(row.finish is not None for row in self.rows)


@dataclass(eq=False)
class _Row:
    group: _Group
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    finish: FinishReason | None = None


@dataclass(eq=False)
class _Swap:
    named: list[tuple[str, torch.Tensor]]
    weights: WeightsTag
    canary_ids: list[int]
    future: Future[np.ndarray]


class HFEngine:
    """Continuous batching over a transformers causal LM; ``submit`` and ``swap`` may be called from any thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        eos_token_ids: Iterable[int],
        device: torch.device,
        max_rows: int,
        weights: WeightsTag,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.eos = frozenset(eos_token_ids)
        self.max_rows = max_rows
        self.weights = weights
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._params = dict(model.state_dict(keep_vars=True))  # includes tied aliases such as lm_head.weight
        self._batch = RunningBatch(model, device)
        self._rows: list[_Row] = []  # the batch's rows, in batch order
        self._next = torch.zeros(0, dtype=torch.long, device=device)  # the token each row feeds next
        self._waiting: deque[_Group] = deque()
        self._swaps: deque[_Swap] = deque()
        self._scores: deque[tuple[list[int], Future[np.ndarray]]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.swaps_done, self.steps, self.last_swap_pause_s = 0, 0, 0.0
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the API (any thread)

    def submit(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> Future[PromptGroup]:
        """Queue a group; refuses (ValueError on the future) what the model cannot serve."""
        future: Future[PromptGroup] = Future()
        problem = self._refusal(prompt_ids, n, sampling)
        if problem is not None:
            future.set_exception(ValueError(problem))
            return future
        generator = torch.Generator(device=self.device)
        generator.seed() if sampling.seed is None else generator.manual_seed(sampling.seed)
        group = _Group(list(prompt_ids), n, sampling, future, generator, StopStrings(self.tokenizer, sampling.stop))
        with self._wake:
            self._raise_if_dead()
            self._waiting.append(group)
            self._wake.notify()
        return future

    def swap(
        self, named: Iterable[tuple[str, torch.Tensor]], weights: WeightsTag, canary_ids: Sequence[int]
    ) -> Future[np.ndarray]:
        """Queue new weights for the next step boundary (checked against the model's names and shapes first)."""
        named = list(named)
        for name, tensor in named:
            target = self._params.get(name)
            if target is None:
                raise ValueError(f"unknown weight {name!r}; see state_dict_names_and_shapes()")
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        future: Future[np.ndarray] = Future()
        with self._wake:
            self._raise_if_dead()
            self._swaps.append(_Swap(named, weights, list(canary_ids), future))
            self._wake.notify()
        return future

    def score(self, ids: Sequence[int]) -> Future[np.ndarray]:
        """Queue a teacher-forced scoring of ``ids`` under the weights in place (run at the next step boundary)."""
        future: Future[np.ndarray] = Future()
        with self._wake:
            self._raise_if_dead()
            self._scores.append((list(ids), future))
            self._wake.notify()
        return future

    def state(self) -> EngineState:
        """A snapshot of the engine (taken without waiting for the step in progress)."""
        return EngineState(
            groups=len({id(row.group) for row in self._rows}), waiting=len(self._waiting), rows=len(self._rows),
            max_rows=self.max_rows, cached_tokens=self._batch.cached_tokens, weights=self.weights,
            swaps=self.swaps_done, last_swap_pause_s=self.last_swap_pause_s, steps=self.steps,
            alive=self._thread.is_alive(),
        )  # fmt: skip

    def close(self) -> None:
        """Stop the thread; every unfinished future fails (groups) or is cancelled."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(30)

    # ------------------------------------------------------------------ the engine thread

    def _refusal(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> str | None:
        if n < 1:
            return f"n must be >= 1, got {n}"
        if n > self.max_rows:
            return f"a group of n={n} does not fit the engine's {self.max_rows} decode slots (rollout.max_batch_rows)"
        if not prompt_ids:
            return "empty prompt: every prompt must render to at least one token"
        longest = len(prompt_ids) + sampling.max_new_tokens
        if self.context is not None and longest > self.context:
            return f"prompt + max_new_tokens = {longest} tokens exceeds the model's context of {self.context}"
        return None

    def _raise_if_dead(self) -> None:
        if self._closed:
            raise RuntimeError("the hf engine is closed")
        if self._failure is not None:
            raise RuntimeError(f"the hf engine failed: {self._failure!r}")

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:  # the engine is dead: every waiter must hear of it
            log.exception("the hf engine failed")
            self._failure = exc
        self._fail_everything(self._failure or RuntimeError("the hf engine was closed"))

    def _turn(self) -> bool:
        """One step boundary and one decode step; False once closed."""
        with self._wake:
            if not (self._rows or self._waiting or self._swaps or self._scores or self._closed):
                self._wake.wait(_IDLE_WAIT_S)
            if self._closed:
                return False
            swaps, self._swaps = list(self._swaps), deque()
            scores, self._scores = list(self._scores), deque()
            admitted = self._take_admissible()
        for swap in swaps:
            self._apply(swap)
        for ids, future in scores:
            try:
                _settle(future, result=self._score(ids))
            except Exception as exc:  # reported to the caller, the engine goes on
                _settle(future, error=exc)
        self._drop_cancelled()
        if admitted:
            self._admit(admitted)
        if self._rows:
            self._step()
        return True

    def _take_admissible(self) -> list[_Group]:
        """Waiting groups that fit the free decode slots, oldest first (called under the lock)."""
        free = self.max_rows - len(self._rows)
        taken: list[_Group] = []
        while self._waiting and self._waiting[0].n <= free:
            group = self._waiting.popleft()
            if group.future.cancelled():
                continue
            taken.append(group)
            free -= group.n
        return taken

    @torch.inference_mode()
    def _apply(self, swap: _Swap) -> None:
        """Copy the new weights in, open a new span on every row in flight, and score the canary under them."""
        start = time.perf_counter()
        try:
            for name, tensor in swap.named:
                self._params[name].copy_(tensor)
            self.weights = swap.weights
            for row in self._rows:
                if row.spans[-1].start == len(row.tokens):
                    row.spans[-1] = Span(len(row.tokens), swap.weights)  # no token sampled since the last span
                else:
                    row.spans.append(Span(len(row.tokens), swap.weights))
            canary = self._score(swap.canary_ids)
        except Exception as exc:  # half-copied weights: the caller reloads a checkpoint
            _settle(swap.future, error=exc)
            return
        self.swaps_done += 1
        self.last_swap_pause_s = time.perf_counter() - start
        _settle(swap.future, result=canary)

    @torch.inference_mode()
    def _score(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced log-probs (T = 1) of ids[1:] given the tokens before each."""
        if len(ids) < 2:
            return np.zeros(0, dtype=np.float32)
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=tokens, use_cache=False).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, tokens[0, 1:, None]).squeeze(-1).cpu().numpy().astype(np.float32)

    def _admit(self, groups: list[_Group]) -> None:
        """Prefill the groups' prompts once each and add their n rows to the batch."""
        logits = self._batch.prefill([g.prompt_ids for g in groups], [g.n for g in groups], self._pad_id())
        new_rows: list[_Row] = []
        for group in groups:
            group.rows = [_Row(group, spans=[Span(0, self.weights)]) for _ in range(group.n)]
            new_rows += group.rows
        first = self._sample(new_rows, logits)
        self._rows += new_rows
        self._next = torch.cat([self._next, first])
        self._finish_rows(new_rows, first)

    def _step(self) -> None:
        logits = self._batch.step(self._next)
        self.steps += 1
        tokens = self._sample(self._rows, logits)
        self._next = tokens
        self._finish_rows(self._rows, tokens)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """One token per row, each group's rows with its own sampling parameters and generator; records them."""
        tokens = torch.empty(len(rows), dtype=torch.long, device=self.device)
        picked = torch.empty(len(rows), dtype=logits.dtype, device=self.device)
        by_group: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_group.setdefault(id(row.group), []).append(i)
        for indices in by_group.values():
            group = rows[indices[0]].group
            index = torch.tensor(indices, device=self.device)
            logprobs = sampling_logprobs(logits[index], group.sampling)
            chosen = pick(logprobs, group.sampling, group.generator)
            tokens[index], picked[index] = chosen, logprobs.gather(-1, chosen[:, None]).squeeze(-1)
        for row, token, logprob in zip(rows, tokens.tolist(), picked.tolist(), strict=True):
            row.tokens.append(token)
            row.logprobs.append(logprob)
        return tokens

    def _finish_rows(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """Mark rows that ended with this token, drop them from the batch, and resolve finished groups."""
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if token in self.eos or row.group.stops.completed(row.tokens):
                row.finish = "stop"
            elif len(row.tokens) >= row.group.sampling.max_new_tokens:
                row.finish = "length"
        done = [i for i, row in enumerate(self._rows) if row.finish is not None]
        if not done:
            return
        groups = {id(self._rows[i].group): self._rows[i].group for i in done}
        self._keep([i for i, row in enumerate(self._rows) if row.finish is None])
        for group in groups.values():
            if group.finished:
                _settle(group.future, result=self._group_result(group))

    def _drop_cancelled(self) -> None:
        """Rows of groups whose futures were cancelled (the worker gave up on them) stop using decode slots."""
        keep = [i for i, row in enumerate(self._rows) if not row.group.future.cancelled()]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Keep these rows (indices, in order) in the batch and in the engine's per-row state."""
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        self._next = self._next[torch.tensor(keep, dtype=torch.long, device=self.device)]

    def _group_result(self, group: _Group) -> PromptGroup:
        completions = [
            Completion(
                token_ids=np.asarray(row.tokens, dtype=np.uint32),
                logprobs=np.asarray(row.logprobs, dtype=np.float32),
                text=self.tokenizer.decode(row.tokens, skip_special_tokens=True),
                finish_reason=row.finish or "abort",
                spans=row.spans,
            )
            for row in group.rows
        ]
        return PromptGroup(np.asarray(group.prompt_ids, dtype=np.uint32), completions)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else next(iter(self.eos), 0))

    def _fail_everything(self, error: BaseException) -> None:
        with self._wake:
            pending = [row.group.future for row in self._rows] + [g.future for g in self._waiting]
            swaps = [s.future for s in self._swaps] + [future for _, future in self._scores]
            self._waiting.clear()
            self._swaps.clear()
            self._scores.clear()
        for future in pending:
            _settle(future, error=error)
        for swap_future in swaps:
            _settle(swap_future, error=error)
