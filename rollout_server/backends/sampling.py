"""Token sampling for the hf backend: the distribution a token is drawn from, the draw, and stop strings.

The log-prob recorded for a sampled token is ``log_softmax(filter(z / T))[y]``: temperature first, then top-k and
top-p truncation, renormalised (docs/SAMPLING.md). Greedy decoding (T = 0) records the untempered log-prob.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from services.protocol import Sampling

_STOP_WINDOW_SLACK = 8
"""Extra tokens decoded before a stop string's possible start, so a character split across byte tokens or a
tokenizer's leading-space cleanup at the window edge cannot hide a match."""


def left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask) so every prompt ends at the last column."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
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


def sampling_logprobs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Log-probs of the distribution each row's next token is drawn from (all rows share ``sampling``)."""
    if sampling.temperature == 0:
        return logits.log_softmax(dim=-1)  # greedy: the argmax is taken; the untempered log-prob is recorded
    # Shifted so the top logit is exactly 0: a tiny temperature then sends the others to -inf instead of turning
    # the top one into inf (or 0/0) and every log-prob into NaN. The clamp keeps the divisor non-zero in float32.
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = shifted / max(sampling.temperature, torch.finfo(logits.dtype).tiny)
    return filter_logits(scaled, sampling.top_k, sampling.top_p).log_softmax(dim=-1)


def pick(logprobs: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row from ``sampling_logprobs`` output: the argmax when greedy, else a draw."""
    if sampling.temperature == 0:
        return logprobs.argmax(dim=-1)
    return draw(logprobs.exp(), generator)


def sample_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return it with its log-prob under the distribution it was drawn from."""
    logprobs = sampling_logprobs(logits, sampling)
    tokens = pick(logprobs, sampling, generator)
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


class StopStrings:
    """Detects, one token at a time, the first token at which a stop string completes in the decoded text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = list(stop)
        # A token decodes to at least one character, so a stop string ending in the newest token starts in the
        # last len(stop) tokens; earlier occurrences were already reported at an earlier step.
        self._window = max((len(s) for s in stop), default=0) + _STOP_WINDOW_SLACK

    def completed(self, tokens: list[int]) -> bool:
        """Whether a stop string occurs in the text of `tokens` (checked after each appended token)."""
        if not self._stop:
            return False
        tail = self._tokenizer.decode(tokens[-self._window :], skip_special_tokens=True)
        return any(s in tail for s in self._stop)
