"""The transformers backend: a hand-written batched sampling loop over a KV cache, for CPU and tests.

Why not `model.generate`: it keeps every sequence in the batch until the longest one ends, and on the reference
workload only about a third of the decode slots produce tokens. This loop drops a sequence from the batch (and its
rows of the KV cache) as soon as it finishes, and prefills each prompt once before expanding it to n samples.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rollout_server.backends.base import Backend, BackendOptions, Completion, FinishReason, PromptGroup, Prompts
from services.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer
from services.protocol import Sampling

logger = logging.getLogger(__name__)

# Extra tokens decoded before a stop string's possible start, so a character split across byte tokens or a
# tokenizer's leading-space cleanup at the window edge cannot hide a match.
_STOP_WINDOW_SLACK = 8


class HFBackend(Backend):
    """Batched sampling with transformers on CPU or CUDA; records the behaviour log-prob of every sampled token."""

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        num_threads: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        if num_threads is not None:
            # Process-wide: the rollout worker shares the machine's cores with the learner.
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        dtype = dtype or ("float32" if self.device.type == "cpu" else "bfloat16")
        self._model: PreTrainedModel | None = load_model(model, dtype=dtype, device=self.device)
        self._tokenizer = load_tokenizer(model)
        self.eos_token_ids = frozenset(eos_token_ids if eos_token_ids is not None else self._default_eos_ids())
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, options: BackendOptions) -> HFBackend:
        """Build from the shared backend options (``extra`` may hold ``eos_token_ids``)."""
        return cls(options.model, device=options.device, dtype=options.dtype, num_threads=options.num_threads,
                   **dict(options.extra))  # fmt: skip

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

    def generate(self, prompts: Prompts, n: int, sampling: Sampling) -> list[PromptGroup]:
        """Sample `n` completions for each prompt; returns one group per prompt, in order."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if len(prompts) == 0:
            return []
        prompt_ids = self.encode_prompts(prompts)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids in prompt_ids) + sampling.max_new_tokens
        if limit is not None and longest > limit:
            raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's context of {limit}")
        with self._lock:
            completions = self._sample(prompt_ids, n, sampling)
        return [
            PromptGroup(prompt_token_ids=np.asarray(ids, dtype=np.uint32), completions=completions[i * n : (i + 1) * n])
            for i, ids in enumerate(prompt_ids)
        ]

    @torch.inference_mode()
    def _sample(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> list[Completion]:
        """Prefill once per prompt, then decode all len(prompts) × n rows, dropping each row as it finishes."""
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        cache, logits, mask, next_pos = self._prefill(prompt_ids, n)
        rows = list(range(len(prompt_ids) * n))  # original row of each row still in the batch
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        reasons: list[FinishReason] = ["length" for _ in rows]
        stops = _StopStrings(self._tokenizer, sampling.stop)
        while True:
            sampled, sampled_logprobs = sample_tokens(logits, sampling, generator)
            keep: list[int] = []
            for i, (token, logprob) in enumerate(zip(sampled.tolist(), sampled_logprobs.tolist(), strict=True)):
                row = rows[i]
                tokens[row].append(token)
                logprobs[row].append(logprob)
                if token in self.eos_token_ids or stops.completed(tokens[row]):
                    reasons[row] = "stop"
                elif len(tokens[row]) < sampling.max_new_tokens:
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, sampled = mask[index], next_pos[index], sampled[index]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = self.model(
                input_ids=sampled[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        return [self._completion(t, lp, r) for t, lp, r in zip(tokens, logprobs, reasons, strict=True)]

    def _prefill(
        self, prompt_ids: list[list[int]], n: int
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts once and expand cache, last logits, mask and next positions to n rows per prompt."""
        input_ids, mask = left_pad(prompt_ids, self._tokenizer.pad_token_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        # Row b of the decode batch is sample b % n of prompt b // n.
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
        next_pos = positions[:, -1].repeat_interleave(n) + 1
        return cache, logits, mask.repeat_interleave(n, dim=0), next_pos

    def _completion(self, tokens: list[int], logprobs: list[float], reason: FinishReason) -> Completion:
        return Completion(
            token_ids=np.asarray(tokens, dtype=np.uint32),
            logprobs=np.asarray(logprobs, dtype=np.float32),
            text=self._tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=reason,
        )

    def load_state_dict(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights into the policy in place; waits for a running generate call to finish."""
        targets = self.model.state_dict(keep_vars=True)  # includes tied aliases such as lm_head.weight
        with self._lock, torch.no_grad():
            for name, tensor in named_tensors:
                target = targets.get(name)
                if target is None:
                    raise ValueError(f"unknown weight {name!r}; see state_dict_names_and_shapes()")
                if target.shape != tensor.shape:
                    raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
                target.copy_(tensor)

    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the model's parameters (tied weights once), in module order."""
        return [(name, tuple(param.shape)) for name, param in self.model.named_parameters()]

    def close(self) -> None:
        """Drop the model so its memory can be reclaimed."""
        with self._lock:
            self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask) so every prompt ends at the last column."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (top_k=-1, top_p=1 disable them)."""
    if top_k != -1 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays (also when
        # a tiny top_p rounds to 0 in the logits' dtype, which would otherwise drop every token).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return it with its log-prob under the distribution it was drawn from."""
    if sampling.temperature == 0:
        # Greedy: the point mass carries no information, so record the untempered log-prob instead.
        tokens = logits.argmax(dim=-1)
        return tokens, logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    # Shifted so the top logit is exactly 0: a tiny temperature then sends the others to -inf instead of turning
    # the top one into inf (or 0/0) and every log-prob into NaN. The clamp keeps the divisor non-zero in float32.
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = shifted / max(sampling.temperature, torch.finfo(logits.dtype).tiny)
    logprobs = filter_logits(scaled, sampling.top_k, sampling.top_p).log_softmax(dim=-1)
    tokens = draw(logprobs.exp(), generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF sampling of one index per row, with a single uniform per row."""
    # torch.multinomial takes ~100 ms for 16 rows of a 49k vocabulary on CPU; this takes a few ms.
    # float64 keeps the cumulative sum fine enough that rare tokens keep their share.
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device) * total
    # u < total strictly, and a zero-probability token repeats its predecessor's cdf value, so the first
    # cdf entry above u always belongs to a token with positive probability.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class _StopStrings:
    """Detects, one token at a time, the first token at which a stop string completes in the decoded text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        # A token decodes to at least one character, so a stop string ending in the newest token starts in the
        # last len(stop) tokens; earlier occurrences were already reported at an earlier step.
        self._window = max((len(s) for s in stop), default=0) + _STOP_WINDOW_SLACK

    def completed(self, tokens: list[int]) -> bool:
        """Whether a stop string occurs in the text of `tokens` (checked after each appended token)."""
        if not self._stop:
            return False
        tail = self._tokenizer.decode(tokens[-self._window :], skip_special_tokens=True)
        return any(s in tail for s in self._stop)
