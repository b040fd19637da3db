"""The interface every sampling backend implements (the registry is ``services.extensions.BACKENDS``), the options
it is built from, and the value types it returns.

Log-prob convention (see docs/SAMPLING.md): `Completion.logprobs[t]` is the log-probability of the sampled token
`t` under the distribution it was actually drawn from: logits divided by the temperature, then top-k / top-p
truncation, renormalised.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from services.config import RunConfig
from services.modeling.loading import resolve_model_path
from services.protocol import Sampling

FinishReason = Literal["stop", "length", "abort"]
ChatMessages = list[dict[str, str]]
Prompts = Sequence[ChatMessages] | Sequence[str]


@dataclass(frozen=True)
class BackendOptions:
    """What every backend is built from; each takes the options that apply to it and ignores the rest."""

    model: str | Path
    """A local Hugging Face folder (or the built-in default's name)."""
    device: str = "cpu"
    """torch device of in-process backends (hf); vLLM places itself."""
    dtype: str | None = None
    """Parameter dtype; None: the backend's default for its device."""
    num_threads: int | None = None
    """torch intra-op threads of this process (CPU)."""
    seed: int = 0
    """Engine seed (vLLM); per-request seeds come with each request's sampling."""
    gpu_memory_utilization: float = 0.85
    """vLLM: share of GPU memory to use."""
    max_rows: int | None = None
    """Decode slots: the most sequences generated at once (None: the backend's default)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Backend-specific keyword arguments (e.g. vLLM engine arguments)."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> BackendOptions:
        """The options of a run's rollout servers (the model folder resolved, converted on first use)."""
        cache = Path(cfg.model.cache_dir) if cfg.model.cache_dir else None
        rc = cfg.rollout
        return cls(
            model=resolve_model_path(cfg.model.name_or_path, cache),
            device=rc.device,
            dtype=cfg.model.dtype,
            num_threads=rc.torch_threads,
            seed=cfg.sampling.seed or 0,
            gpu_memory_utilization=rc.gpu_memory_utilization,
            max_rows=rc.max_batch_rows or rc.max_inflight_groups * cfg.sampling.n,
        )


@dataclass(frozen=True)
class WeightsTag:
    """Which weights a backend samples with: the policy version and the fingerprint of its exact weights."""

    version: int
    fingerprint: str = ""
    """``v{version}:{digest}`` of the weights as the learner published them; ``""`` when not known (the base
    model before the first weight sync)."""


@dataclass(frozen=True)
class Span:
    """Tokens ``start`` onwards (up to the next span) were sampled with these weights."""

    start: int
    weights: WeightsTag


@dataclass
class Completion:
    """One sampled response: its tokens, their behaviour log-probs, its text, why it ended, and which weights
    sampled which tokens (a response generated across a weight update has several spans)."""

    token_ids: np.ndarray  # uint32, includes the EOS token when the model emitted one
    logprobs: np.ndarray  # float32, one per token in token_ids
    text: str
    finish_reason: FinishReason
    spans: list[Span] = field(default_factory=lambda: [Span(0, WeightsTag(0))])

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if not self.spans or self.spans[0].start != 0:
            raise ValueError("a completion's first span starts at token 0")


@dataclass
class PromptGroup:
    """The n completions sampled for one prompt."""

    prompt_token_ids: np.ndarray  # uint32
    completions: list[Completion]


@dataclass(frozen=True)
class EngineState:
    """What a backend is doing now; read without waiting for generation (``/health``, metrics)."""

    groups: int
    """Groups being generated."""
    waiting: int
    """Groups submitted and not yet admitted."""
    rows: int
    """Sequences in the decode batch (each group contributes its n samples)."""
    max_rows: int
    """Decode slots: the most sequences the engine runs at once."""
    cached_tokens: int
    """Tokens held in the KV cache (padding included)."""
    weights: WeightsTag
    swaps: int
    """Weight swaps applied since the start."""
    last_swap_pause_s: float
    """How long generation paused for the last swap (copy + canary)."""
    steps: int
    """Decode steps run since the start (it moves while the engine works)."""
    alive: bool = True
    """False once the engine thread or process has died."""


class Backend(ABC):
    """A sampling engine that owns a policy's weights and generates groups continuously.

    ``submit`` queues one group and returns at once; the engine admits it into the running batch as soon as
    decode slots free up and resolves its future the moment its n samples finish (continuous batching). ``swap``
    hands it new weights, which it applies at its next step boundary while sequences in flight continue under
    them. Both are thread-safe; nothing waits for a whole batch.
    """

    uses_gpu: bool = False
    """Whether the backend always runs on a GPU (then weight sync uses NCCL whatever ``rollout.device`` says)."""

    @classmethod
    def from_options(cls, options: BackendOptions) -> Backend:
        """Build the backend (blocking: loads the weights); every backend in ``services.extensions`` defines it."""
        raise NotImplementedError(f"{cls.__name__} is not built from options (it is not a registered backend)")

    @property
    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer whose chat template renders prompts."""

    @abstractmethod
    def submit(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> Future[PromptGroup]:
        """Queue one group of ``n`` samples of a rendered prompt; the future fails with ValueError for a request
        the engine cannot serve (prompt + max_new_tokens beyond the context, ...). Cancel it to abandon it."""

    @abstractmethod
    def swap(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weights: WeightsTag, canary_ids: Sequence[int]
    ) -> Future[np.ndarray]:
        """Apply new weights at the next step boundary; resolves with the log-probs of ``canary_ids``
        (teacher-forced, T = 1) under them. The tensors are read before the future resolves, not after."""

    @abstractmethod
    def score(self, token_ids: Sequence[int]) -> Future[np.ndarray]:
        """Teacher-forced log-probs (T = 1) of ``token_ids[1:]`` under the weights in place (the canary)."""

    @abstractmethod
    def state(self) -> EngineState:
        """The engine's state now (never blocks on generation)."""

    @abstractmethod
    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the weights ``swap`` accepts, in a stable order."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the model and any worker processes."""

    def generate(
        self, prompts: Prompts, n: int, sampling: Sampling, timeout_s: float | None = None
    ) -> list[PromptGroup]:
        """Sample ``n`` completions for each prompt (submitted together, so they share decode steps); one group
        per prompt, in order. Blocks the calling thread."""
        futures = [self.submit(ids, n, sampling) for ids in self.encode_prompts(prompts)]
        try:
            return [future.result(timeout_s) for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def encode_prompts(self, prompts: Prompts) -> list[list[int]]:
        """Token ids of each prompt: chat messages go through the chat template, strings are taken as rendered."""
        encoded: list[list[int]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                encoded.append(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            else:
                rendered = self.tokenizer.apply_chat_template(
                    list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True
                )
                encoded.append(list(rendered["input_ids"]))
        if any(len(ids) == 0 for ids in encoded):
            raise ValueError("empty prompt: every prompt must render to at least one token")
        return encoded
