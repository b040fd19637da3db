"""The interface every sampling backend (hf, vllm) implements, and the value types it returns.

Log-prob convention (see docs/SAMPLING.md): `Completion.logprobs[t]` is the log-probability of the sampled token
`t` under the distribution it was actually drawn from: logits divided by the temperature, then top-k / top-p
truncation, renormalised.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length", "abort"]
ChatMessages = list[dict[str, str]]
Prompts = Sequence[ChatMessages] | Sequence[str]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one generate call; the defaults are the training defaults (no truncation)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


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
