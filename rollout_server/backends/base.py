"""The interface every sampling backend implements (the registry is ``services.extensions.BACKENDS``), the options
it is built from, and the value types it returns.

Log-prob convention (see docs/SAMPLING.md): `Completion.logprobs[t]` is the log-probability of the sampled token
`t` under the distribution it was actually drawn from: logits divided by the temperature, then top-k / top-p
truncation, renormalised.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
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
        )


@dataclass
class Completion:
    """One sampled response: its tokens, their behaviour log-probs, its text and why it ended."""

    token_ids: np.ndarray  # uint32, includes the EOS token when the model emitted one
    logprobs: np.ndarray  # float32, one per token in token_ids
    text: str
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")


@dataclass
class PromptGroup:
    """The n completions sampled for one prompt."""

    prompt_token_ids: np.ndarray  # uint32
    completions: list[Completion]


class Backend(ABC):
    """A sampler that owns a policy's weights and turns prompts into groups of completions."""

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
    def generate(self, prompts: Prompts, n: int, sampling: Sampling) -> list[PromptGroup]:
        """Sample `n` completions for each prompt; returns one group per prompt, in order."""

    @abstractmethod
    def load_state_dict(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights into the policy in place; call between generate calls."""

    @abstractmethod
    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the weights load_state_dict accepts, in a stable order."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the model and any worker processes."""

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
