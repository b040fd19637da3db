"""How a step's samples become micro-batches: shared-prefix segments, rows packed without padding, the masks.

A **segment** is a prompt and the responses that share it. With ``learner.shared_prefix`` (the default) the samples
of one group (same ``group_id``, prompt and temperature) form one segment, laid out as the prompt once and then its
responses one after another::

    positions   0 1 … P-1 | P … P+L1-1 | P … P+L2-1 | …      (each response restarts after the prompt)
    tokens      prompt    | response 1 | response 2 | …

Under the **tree mask** every response token sees the prompt and the earlier tokens of its own response, nothing
else, so each response gets exactly the log-probs it would get alone after its prompt, while the prompt is computed
once instead of n times (~80 % of the positions on the quick start). The first token of every response is predicted
from the last prompt position. Without ``shared_prefix`` each sample is a segment of its own (the previous layout).

A **row** holds one or more segments side by side under a block-diagonal mask: short segments are packed into rows
of up to ``learner.pack_row_tokens`` (first-fit, longest first), so a micro-batch of short groups carries no
padding. Longer segments get rows of their own: with a dense mask a row's attention grows with the SQUARE of its
length, so packing two long segments into one row costs more attention than the padding it saves (docs/LEARNER.md
has the measurement). A **micro-batch** is a set of rows of similar length, padded to its longest, within
``learner.micro_batch_tokens`` (rows × width). A segment longer than the budget is split into several segments
that repeat the prompt; a single prompt + response longer than the budget is a ``BudgetError`` naming the setting.

Only rows that need it get the 4-D mask: a micro-batch whose rows are each one plain sequence keeps the 2-D padding
mask, so the attention kernel's causal fast path stays available. The mask's form follows the model's attention
implementation: bool for ``sdpa``, additive for ``eager``, a ``BlockMask`` for ``flex_attention`` (block-sparse, for
long packed rows on GPUs; it has no backward pass on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learner.batch import Sample, micro_batches

TREE_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take a custom 4-D mask (transformers passes a 4-D mask through unchanged)."""


class BudgetError(ValueError):
    """A sequence does not fit in one micro-batch: a configuration error, raised before any forward pass."""


@dataclass(frozen=True, eq=False)
class Segment:
    """A prompt and the samples (responses) that share it: what packing places in a row."""

    prompt_ids: np.ndarray
    samples: tuple[Sample, ...]

    @property
    def length(self) -> int:
        """Tokens the segment occupies in a row: the prompt once plus every response."""
        return len(self.prompt_ids) + sum(len(s.response_ids) for s in self.samples)

    @property
    def temperature(self) -> float:
        """Sampling temperature of the segment's responses (one per group)."""
        return self.samples[0].temperature


@dataclass(frozen=True, eq=False)
class Row:
    """One row of a micro-batch: segments side by side, each seeing only itself."""

    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        """Tokens of the row before padding."""
        return sum(seg.length for seg in self.segments)


def group_key(sample: Sample) -> tuple[str, float, bytes]:
    """Samples with equal keys share their prompt: group id, temperature and the prompt's token ids."""
    return sample.group_id, sample.temperature, np.asarray(sample.prompt_ids, dtype=np.uint32).tobytes()


def groups_of(samples: Sequence[Sample]) -> list[list[Sample]]:
    """The samples gathered by ``group_key``, groups and samples in order of first appearance."""
    groups: dict[tuple[str, float, bytes], list[Sample]] = {}
    for s in samples:
        groups.setdefault(group_key(s), []).append(s)
    return list(groups.values())


def check_fits(sample: Sample, budget: int) -> None:
    """Raise BudgetError unless the sample's prompt + response fits in one micro-batch of `budget` tokens."""
    if sample.length > budget:
        raise BudgetError(
            f"a sample of group {sample.group_id!r} has {len(sample.prompt_ids)} prompt + {len(sample.response_ids)} "
            f"response tokens, more than learner.micro_batch_tokens={budget}: raise learner.micro_batch_tokens to at "
            f"least {sample.length}, or keep prompts shorter (data)"
        )


def segments_of(group: Sequence[Sample], shared_prefix: bool, budget: int) -> list[Segment]:
    """One group's segments: the whole group (split where it exceeds the budget), or one per sample."""
    for s in group:
        check_fits(s, budget)
    if not shared_prefix:
        return [Segment(s.prompt_ids, (s,)) for s in group]
    out: list[Segment] = []
    current: list[Sample] = []
    used = len(group[0].prompt_ids)
    for s in group:
        if current and used + len(s.response_ids) > budget:
            out.append(Segment(group[0].prompt_ids, tuple(current)))
            current, used = [], len(group[0].prompt_ids)
        current.append(s)
        used += len(s.response_ids)
    out.append(Segment(group[0].prompt_ids, tuple(current)))
    return out


def split_for_ranks(segments: Sequence[Segment], world: int) -> list[Segment]:
    """Halve the segments with the most responses until every rank can get one (fewer groups than ranks)."""
    out = list(segments)
    while len(out) < world:
        widest = max(range(len(out)), key=lambda i: (len(out[i].samples), -i), default=None)
        if widest is None or len(out[widest].samples) < 2:
            break
        seg = out.pop(widest)
        half = len(seg.samples) // 2
        out[widest:widest] = [Segment(seg.prompt_ids, seg.samples[:half]), Segment(seg.prompt_ids, seg.samples[half:])]
    return out


def pack_rows(segments: Sequence[Segment], row_tokens: int) -> list[Row]:
    """First-fit decreasing: segments of up to `row_tokens` share rows of at most that length; others go alone."""
    rows: list[list[Segment]] = []
    loads: list[int] = []
    for seg in sorted(segments, key=lambda s: s.length, reverse=True):
        target = next((i for i, load in enumerate(loads) if load + seg.length <= row_tokens), None)
        if target is None:
            rows.append([seg])
            loads.append(seg.length)
        else:
            rows[target].append(seg)
            loads[target] += seg.length
    return [Row(tuple(r)) for r in rows]


def plan_micro_batches(segments: Sequence[Segment], token_budget: int, row_tokens: int = 0) -> list[list[Row]]:
    """Micro-batches of one temperature each: rows packed up to `row_tokens` (0: one segment per row), then rows
    of similar length together while rows × longest fits `token_budget`."""
    by_temperature: dict[float, list[Segment]] = {}
    for seg in segments:
        by_temperature.setdefault(seg.temperature, []).append(seg)
    plan: list[list[Row]] = []
    for temperature in sorted(by_temperature):
        group = by_temperature[temperature]
        rows = pack_rows(group, min(row_tokens, token_budget)) if row_tokens > 0 else [Row((s,)) for s in group]
        plan += micro_batches(rows, token_budget)
    return plan


# ---------------------------------------------------------------------------------------------------- collate


@dataclass(eq=False)
class ModelInputs:
    """What the policy's forward needs of a micro-batch. Integer and bool tensors only: FSDP2 casts floating-point
    inputs of the root module to its compute dtype."""

    input_ids: Tensor
    """[R, L] token ids of every row (0 in padding)."""
    position_ids: Tensor
    """[R, L] positions: 0.. over each prompt, restarting after the prompt for every response."""
    attention_mask: Tensor | None
    """[R, L] padding mask when every row is one plain sequence; None when the tree mask applies."""
    segment_ids: Tensor | None
    """[R, L] which segment each position belongs to (padding: a segment of its own); tree mask only."""
    branch_ids: Tensor | None
    """[R, L] 0 on prompts, k on the k-th response of a segment; tree mask only."""
    predictor_rows: Tensor
    predictor_cols: Tensor
    """[N] position whose hidden state predicts each response token."""
    targets: Tensor
    """[N] the response tokens."""
    slot_rows: Tensor
    slot_cols: Tensor
    """[N] where each response token goes in the [B, T] loss layout (sample, token)."""
    shape: tuple[int, int]
    """(B, T): samples and longest response of the micro-batch."""


@dataclass(eq=False)
class MicroBatch:
    """One micro-batch: the model inputs and the [B, T] left-aligned response tensors of the loss."""

    inputs: ModelInputs
    behaviour_logp: Tensor
    token_mask: Tensor
    advantages: Tensor
    temperature: float
    positions: int
    """Positions the forward computes (rows × width, padding included)."""
    filler: bool = False
    """A stand-in that only keeps FSDP ranks in step: its loss is multiplied by 0 and its statistics are dropped."""
    proximal: Tensor | None = None
    """π_old log-probs ([B, T], detached) once known: from the proximal pass or the first gradient forward."""
    reference: Tensor | None = None
    """Reference-model log-probs ([B, T]) when kl_beta > 0."""
    samples: tuple[Sample, ...] = field(default=())


def _layout(rows: Sequence[Row]) -> dict[str, Any]:
    """numpy arrays of the row layout and the response index maps (see ModelInputs)."""
    width = max(row.length for row in rows)
    ids = np.zeros((len(rows), width), np.int64)
    pos, seg, branch = np.zeros_like(ids), np.zeros_like(ids), np.zeros_like(ids)
    real = np.zeros((len(rows), width), bool)
    index: dict[str, list[np.ndarray]] = {k: [] for k in ("pr", "pc", "tg", "sr", "sc")}
    b = 0
    for r, row in enumerate(rows):
        offset = 0
        for k, segment in enumerate(row.segments):
            p = len(segment.prompt_ids)
            ids[r, offset : offset + p], pos[r, offset : offset + p] = segment.prompt_ids, np.arange(p)
            seg[r, offset : offset + p] = k
            start = offset + p
            for branch_id, s in enumerate(segment.samples, start=1):
                n = len(s.response_ids)
                end = start + n
                ids[r, start:end], pos[r, start:end] = s.response_ids, np.arange(p, p + n)
                seg[r, start:end], branch[r, start:end] = k, branch_id
                # the first response token is predicted by the last prompt position, the rest by their predecessor
                index["pc"].append(np.concatenate([[offset + p - 1], np.arange(start, end - 1)]))
                index["pr"].append(np.full(n, r))
                index["tg"].append(np.asarray(s.response_ids, np.int64))
                index["sr"].append(np.full(n, b))
                index["sc"].append(np.arange(n))
                start, b = end, b + 1
            real[r, offset:start] = True
            offset = start
        # padding: each position a segment of its own, so it sees itself only (no fully masked row, no NaN)
        seg[r, offset:] = len(row.segments) + np.arange(width - offset)
    flat = {k: np.concatenate(v).astype(np.int64) for k, v in index.items()}
    return {"ids": ids, "pos": pos, "seg": seg, "branch": branch, "real": real, **flat}


def collate(rows: Sequence[Row], device: torch.device) -> MicroBatch:
    """Lay rows out as one micro-batch (one temperature; every sample with a prompt and a response)."""
    samples = tuple(s for row in rows for seg in row.segments for s in seg.samples)
    if not samples:
        raise ValueError("collate needs at least one sample")
    temperatures = {s.temperature for s in samples}
    if len(temperatures) != 1:
        raise ValueError(f"a micro-batch is scored at one temperature, got {sorted(temperatures)}")
    for s in samples:
        if len(s.prompt_ids) == 0 or len(s.response_ids) == 0:
            raise ValueError(f"sample of group {s.group_id!r} needs a prompt and a response")
    lay = _layout(rows)
    tree = any(len(row.segments) > 1 or len(row.segments[0].samples) > 1 for row in rows)
    width_t = max(len(s.response_ids) for s in samples)
    behaviour = np.zeros((len(samples), width_t), np.float32)
    tmask = np.zeros((len(samples), width_t), bool)
    for i, s in enumerate(samples):
        behaviour[i, : len(s.response_ids)], tmask[i, : len(s.response_ids)] = s.behaviour_logprobs, True

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device)

    inputs = ModelInputs(
        input_ids=t(lay["ids"]), position_ids=t(lay["pos"]),
        attention_mask=None if tree else t(lay["real"].astype(np.int64)),
        segment_ids=t(lay["seg"]) if tree else None, branch_ids=t(lay["branch"]) if tree else None,
        predictor_rows=t(lay["pr"]), predictor_cols=t(lay["pc"]), targets=t(lay["tg"]),
        slot_rows=t(lay["sr"]), slot_cols=t(lay["sc"]), shape=(len(samples), width_t),
    )  # fmt: skip
    return MicroBatch(
        inputs=inputs,
        behaviour_logp=t(behaviour),
        token_mask=t(tmask),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        temperature=temperatures.pop(),
        positions=int(lay["ids"].size),
        samples=samples,
    )


def filler_batch(device: torch.device) -> MicroBatch:
    """A two-token micro-batch whose loss is zeroed: FSDP ranks with fewer micro-batches run it to stay in step."""
    sample = Sample("", np.zeros(1, np.uint32), np.zeros(1, np.uint32), np.zeros(1, np.float32), 0.0, 1.0, 0, False)
    batch = collate([Row((Segment(sample.prompt_ids, (sample,)),))], device)
    batch.filler = True
    return batch


# ---------------------------------------------------------------------------------------------------- masks


def tree_mask(segment_ids: Tensor, branch_ids: Tensor) -> Tensor:
    """[R, 1, L, L] bool, True where a query may attend: same segment, not later, and the key on the prompt or on
    the query's own response."""
    length = segment_ids.shape[1]
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]  # in place from here: at 16k positions each is 256 MB
    key_branch = branch_ids[:, None, :]
    mask &= (branch_ids[:, :, None] == key_branch).logical_or_(key_branch == 0)
    mask &= torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril_()
    return mask.unsqueeze(1)


def attention_for(inputs: ModelInputs, implementation: str, dtype: torch.dtype) -> Any:
    """The attention_mask argument for the decoder: the 2-D padding mask, or the tree mask in the implementation's
    form (bool for sdpa, additive in `dtype` for eager, a BlockMask for flex_attention)."""
    if inputs.segment_ids is None or inputs.branch_ids is None:
        return inputs.attention_mask
    if implementation == "flex_attention":
        return _block_mask(inputs.segment_ids, inputs.branch_ids)
    mask = tree_mask(inputs.segment_ids, inputs.branch_ids)
    if implementation == "sdpa":
        return mask
    if implementation == "eager":  # eager adds the mask to the scores: a bool one would be silently wrong
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"attention implementation {implementation!r} cannot take the shared-prefix mask: load the model with one of "
        f"{TREE_MASK_IMPLEMENTATIONS}, or set learner.shared_prefix=false"
    )


def _block_mask(segment_ids: Tensor, branch_ids: Tensor) -> Any:
    """The tree mask as a flex-attention BlockMask (blocks that are entirely masked are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        same = segment_ids[b, q] == segment_ids[b, k]
        return same & (q >= k) & ((branch_ids[b, k] == 0) | (branch_ids[b, q] == branch_ids[b, k]))

    rows, length = segment_ids.shape
    fn: Callable[..., Tensor] = mask_mod
    return create_block_mask(fn, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=segment_ids.device)


# ---------------------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class PaddedSequences:
    """Samples as plain right-padded [B, L] sequences: the layout of reference computations and benchmarks."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    advantages: Tensor


def pad_samples(samples: Sequence[Sample], device: torch.device) -> PaddedSequences:
    """Right-pad prompt + response of each sample to the longest (``losses.score_responses``'s layout)."""
    if not samples:
        raise ValueError("pad_samples needs at least one sample")
    width = max(s.length for s in samples)
    ids = np.zeros((len(samples), width), np.int64)
    attn = np.zeros_like(ids)
    resp = np.zeros((len(samples), width), bool)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, :p], ids[i, p : p + r] = s.prompt_ids, s.response_ids
        attn[i, : p + r], resp[i, p : p + r] = 1, True
    return PaddedSequences(
        torch.from_numpy(ids).to(device), torch.from_numpy(attn).to(device), torch.from_numpy(resp).to(device),
        torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
    )  # fmt: skip
