"""The decode batch of the hf engine: sequences of different groups, lengths and ages in one ragged KV cache.

Rows are samples. A new group's prompt is prefilled once and its KV repeated for its n samples, then merged into the
running batch by left-padding the shorter of the two caches along the sequence axis (``[B, heads, S, head_dim]``
tensors of every ``DynamicCache`` layer) and extending the 2-D attention mask. Every row carries its own position:
rotary embeddings were applied to the cached keys at their true positions, so left padding shifts nothing. A row
that finishes leaves the batch and the cache at once; columns that are padding for every remaining row are cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from rollout_server.backends.sampling import left_pad


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim -2 (the sequence axis of a cache tensor) on the left up to ``length``."""
    return F.pad(tensor, (0, 0, length - tensor.shape[-2], 0))


class RunningBatch:
    """The rows being decoded: KV cache, attention mask, next positions and the token each row feeds next."""

    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        """[rows, S]: 1 where the cache holds a real token of the row, 0 for left padding."""
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        """[rows]: position id of each row's next input token."""

    @property
    def rows(self) -> int:
        """Sequences in the batch."""
        return int(self.positions.shape[0])

    @property
    def cached_tokens(self) -> int:
        """Cache slots in use, padding included (rows × sequence length)."""
        return int(self.mask.numel())

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], repeats: Sequence[int], pad_id: int) -> torch.Tensor:
        """Run new prompts once, repeat each one's KV ``repeats[i]`` times and merge the rows into the batch (after
        the existing rows, in order); returns the last-position logits of the new rows (float32)."""
        input_ids, mask = left_pad(prompts, pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        index = torch.repeat_interleave(torch.arange(len(prompts), device=self.device),
                                        torch.tensor(list(repeats), device=self.device))  # fmt: skip
        cache.batch_select_indices(index)
        logits = out.logits[:, -1][index].float()
        self._merge(cache, mask[index], positions[index, -1] + 1)
        return logits

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self.cache is None or self.rows == 0:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)])
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)])
        self.mask = torch.cat(
            [F.pad(self.mask, (length - self.mask.shape[1], 0)), F.pad(mask, (length - mask.shape[1], 0))]
        )
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (indices into the batch, in order); drop padding columns no row needs any more."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.cache, self.mask, self.positions = None, self.mask[:0, :0], self.positions[:0]
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        assert self.cache is not None
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            self.mask = self.mask[:, lead:]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits of every row (float32)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                         past_key_values=self.cache, use_cache=True)  # fmt: skip
        self.positions = self.positions + 1
        return out.logits[:, -1].float()
