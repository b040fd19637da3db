"""The learner step: PPO mini-batches of the DAPO/GRPO/Dr.GRPO loss over packed micro-batches, gradient sync, AdamW.

``Trainer.train_step(samples)`` takes the WHOLE step's batch, identical on every rank (rank 0 broadcasts it with
``broadcast_bytes`` first), and:

1. keeps the trainable samples with a response, gathers them into groups and splits the groups into
   ``learner.minibatches`` mini-batches — from the global batch, before sharding, so every rank runs the same
   number of updates and collectives;
2. per mini-batch: packs its groups into segments and micro-batches (learner/packing.py; shared prefix, no
   padding), gives this rank its ``shard`` (balanced by tokens) and counts the mini-batch's response tokens and
   sequences over all ranks — known from the global batch, so no collective is needed: the loss denominators
   (DIPO_SPEC.md §5) are global, every micro-batch's summed loss is divided by the same number and gradients add up;
3. with ``correction="tis"`` finds the proximal log-probs (π_old). With one update per step (``minibatches`` ×
   ``epochs`` = 1, the default) the policy does not move before the update, so they are the detached log-probs of
   the gradient forward itself: no second forward, ``proximal_seconds`` 0. With more updates, one no-grad pass at
   the start of the step scores the mini-batches after the first (whose gradient forward gives its own);
4. runs ``epochs`` × ``minibatches`` optimizer updates: forward + backward per micro-batch, a check that the loss
   is finite on every rank (a NaN or infinite loss skips the update and keeps the weights and AdamW's state), the
   gradient sum over ranks, clipping, AdamW and the schedule (which counts updates).

Parallelism: on CPU (gloo) each rank keeps a full replica and gradients are all-reduced (summed) in flat buckets
after accumulation. On CUDA with more than one rank the model is sharded with FSDP2 (learner/scorer.py
``apply_fsdp``, bf16 compute, fp32 gradient reduction); ``learner.fsdp=on`` shards on gloo ranks too.
docs/LEARNER.md describes the step, its versions and its measurements.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from learner.batch import HasLength, Sample
from learner.distributed import DistInfo, all_reduce_max, all_reduce_sum
from learner.losses import LossInputs, build_loss, k3_kl, select_old_logp
from learner.packing import (
    MicroBatch,
    Segment,
    collate,
    filler_batch,
    groups_of,
    plan_micro_batches,
    segments_of,
    split_for_ranks,
)
from learner.scorer import PolicyScorer, apply_fsdp, check_tree_mask_support
from services.config import LearnerConfig, RunConfig
from services.contracts import MetricKey as K
from services.modeling.loading import torch_dtype

logger = logging.getLogger(__name__)

GRAD_BUCKET_BYTES = 32 * 1024 * 1024
"""Gradients are all-reduced in flat buckets of about this size: few collectives, bounded extra memory."""

# Statistics summed over micro-batches, updates and ranks, and those maxed; the order is the reduced vectors' layout.
_SUM_FIELDS = (
    "token_passes",
    "clip_low",
    "clip_high",
    "ratio_sum",
    "is_weight_sum",
    "kl_ref_sum",
    "entropy_sum",
    "kl_behaviour_sum",
)
_MAX_FIELDS = ("is_weight_max", "ratio_max", "step_seconds", "forward_backward_seconds", "proximal_seconds")

_Item = TypeVar("_Item", bound=HasLength)


def shard(items: Sequence[_Item], rank: int, world: int) -> list[_Item]:
    """Return rank's share of the items, balanced by token count (longest first to the lightest rank), in order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    loads = [0] * world
    owner = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda j: (-items[j].length, j)):
        target = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = target
        loads[target] += items[i].length
    return [s for s, r in zip(items, owner, strict=True) if r == rank]


def split_evenly(groups: Sequence[list[Sample]], parts: int) -> list[list[list[Sample]]]:
    """Split groups, in order, into `parts` contiguous mini-batches whose group counts differ by at most one."""
    bounds = np.linspace(0, len(groups), parts + 1).round().astype(int)
    return [list(groups[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def updates_per_step(cfg: LearnerConfig) -> int:
    """Optimizer updates one learner step makes: mini-batches × epochs."""
    return cfg.minibatches * cfg.epochs


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Return the learning-rate multiplier of optimizer update `step` (0-based): linear warm-up, constant/cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LearnerConfig) -> LambdaLR:
    """Return the LambdaLR of the config's warm-up and schedule (a LambdaLR so that it checkpoints).

    It counts optimizer updates: ``steps`` × ``minibatches`` × ``epochs`` in all, the warm-up ``warmup_steps`` ×
    ``minibatches`` × ``epochs`` of them, so changing the mini-batches keeps the warm-up's length in learner steps.
    """
    per_step = updates_per_step(cfg)
    warmup, total, schedule = cfg.warmup_steps * per_step, cfg.steps * per_step, cfg.schedule

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, schedule)

    return LambdaLR(optimizer, factor)


def has_dropout(model: nn.Module) -> bool:
    """True when a forward in train mode differs from one in eval mode: dropout modules or attention dropout."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return bool(config is not None and (getattr(config, "attention_dropout", 0.0) or 0.0) > 0)


@dataclass
class MiniBatch:
    """One optimizer update's data: this rank's micro-batches and the global counts of the loss denominators."""

    batches: list[MicroBatch]
    tokens: int
    sequences: int


@dataclass
class _StepStats:
    """What a step accumulates: token sums and maxes (reduced over ranks at the end) and per-update outcomes."""

    sums: Tensor
    maxes: Tensor
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    applied: int = 0
    skipped_loss: int = 0
    skipped_grad: int = 0
    forward_backward_seconds: float = 0.0
    proximal_seconds: float = 0.0


class Trainer:
    """Owns the policy's optimizer (AdamW), LR schedule and the train step; one instance per learner rank."""

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        dist: DistInfo,
        ref_model: nn.Module | None = None,
        *,
        use_fsdp: bool | None = None,
    ) -> None:
        lc = cfg.learner
        if lc.kl_beta > 0 and ref_model is None:
            raise ValueError("learner.kl_beta > 0 needs a reference model: pass ref_model or set kl_beta=0")
        if lc.micro_batch_tokens <= cfg.sampling.max_new_tokens:
            raise ValueError(
                f"learner.micro_batch_tokens={lc.micro_batch_tokens} cannot hold a prompt and a response of "
                f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} tokens: raise learner.micro_batch_tokens"
            )
        if lc.shared_prefix:
            check_tree_mask_support(model)
        self.cfg, self.dist = cfg, dist
        self.model = model.to(dist.device)
        if lc.gradient_checkpointing:
            # Non-reentrant checkpointing works with FSDP2 and with inputs that do not require grad.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lc.correction == "tis" and lc.proximal_forward == "auto" and has_dropout(model):
            logger.warning(
                "the policy has dropout: the single-pass proximal log-probs (learner.proximal_forward=auto) are those "
                "of a dropout forward; set proximal_forward=always for eval-mode ones"
            )
        self.scorer, self.ref_scorer = self._scorers(model, ref_model, use_fsdp)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # The fused kernel (CPU and CUDA, DTensor shards included) is ~5x faster than foreach on CPU: 0.07 vs 0.37 s
        # per update of the default model.
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay, fused=True
        )
        self.scheduler = build_scheduler(self.optimizer, lc)
        self.loss = build_loss(lc)
        self.steps_done = 0
        """Learner steps that applied at least one update."""
        self.updates_done = 0
        """Optimizer updates applied (skipped ones do not count)."""

    def _scorers(
        self, model: nn.Module, ref_model: nn.Module | None, use_fsdp: bool | None
    ) -> tuple[PolicyScorer, PolicyScorer | None]:
        """The policy's scorer (sharded with FSDP2 when asked) and the frozen reference model's, if any."""
        cfg, dist = self.cfg, self.dist
        # Master weights and AdamW state stay in the model's dtype (float32 from the learner); on CUDA the forward
        # runs in model.dtype (bf16): FSDP2's mixed precision when sharded, autocast on a single device. Pure-bf16
        # parameters would round most updates at RL learning rates (~1e-6) to nothing.
        compute = torch_dtype(cfg.model.dtype)
        master = next(model.parameters()).dtype
        low_precision = dist.device.type == "cuda" and compute != torch.float32 and master == torch.float32
        # FSDP2 by default only with NCCL ranks; use_fsdp=True forces it (e.g. to try it on gloo).
        self.fsdp = dist.world_size > 1 and dist.device.type == "cuda" if use_fsdp is None else use_fsdp
        chunk = cfg.learner.head_chunk_tokens
        scorer = PolicyScorer(self.model, compute if low_precision and not self.fsdp else None, chunk)
        if self.fsdp:
            apply_fsdp(scorer, mixed_precision=low_precision, param_dtype=compute)
        if ref_model is None:
            return scorer, None
        ref = ref_model.to(dist.device).eval().requires_grad_(False)
        return scorer, PolicyScorer(ref, scorer.autocast_dtype, chunk)

    # ------------------------------------------------------------------ the step

    def train_step(self, samples: Sequence[Sample]) -> dict[str, float]:
        """Run one learner step (``updates_per_step`` optimizer updates) on the whole step's batch, identical on
        every rank; return rank-reduced metrics. Raises BudgetError, before any computation, when a sample does not
        fit in ``learner.micro_batch_tokens``."""
        start = time.perf_counter()
        lc = self.cfg.learner
        useful = [s for s in samples if s.trainable and len(s.response_ids) > 0]
        plan = self.plan(useful)
        tokens, sequences = sum(len(s.response_ids) for s in useful), len(useful)
        if tokens == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return self._skipped_metrics(start)
        stats = _StepStats(
            torch.zeros(len(_SUM_FIELDS), dtype=torch.float64, device=self.dist.device),
            torch.zeros(len(_MAX_FIELDS), dtype=torch.float64, device=self.dist.device),
        )
        was_training = self.model.training
        t0 = time.perf_counter()
        if self._no_grad_passes(plan):
            stats.proximal_seconds = self._sync_time() - t0
        self.model.train()
        for _ in range(lc.epochs):
            for minibatch in plan:
                self._update(minibatch, stats)
        self.model.train(was_training)
        if stats.applied:
            self.steps_done += 1
        return self._reduce_metrics(stats, tokens, sequences, start)

    def plan(self, useful: Sequence[Sample]) -> list[MiniBatch]:
        """The step's mini-batches, each with this rank's micro-batches (FSDP: padded with fillers to the busiest
        rank's count, computed locally since every rank holds the same batch)."""
        lc, rank, world = self.cfg.learner, self.dist.rank, self.dist.world_size
        row_tokens = lc.pack_row_tokens if lc.shared_prefix else 0
        out = []
        for part in split_evenly(groups_of(useful), lc.minibatches):
            segments: list[Segment] = [
                seg for group in part for seg in segments_of(group, lc.shared_prefix, lc.micro_batch_tokens)
            ]
            segments = split_for_ranks(segments, world)
            ranks = range(world) if self.fsdp else (rank,)
            plans = {r: plan_micro_batches(shard(segments, r, world), lc.micro_batch_tokens, row_tokens) for r in ranks}
            batches = [collate(rows, self.dist.device) for rows in plans[rank]]
            if self.fsdp:  # every rank must run as many forwards and backwards as the busiest one
                batches += [filler_batch(self.dist.device) for _ in range(max(map(len, plans.values())) - len(batches))]
            samples = [s for group in part for s in group]
            out.append(MiniBatch(batches, sum(len(s.response_ids) for s in samples), len(samples)))
        return out

    def _sync_time(self) -> float:
        """perf_counter after the device's queued work is done, so phase timings on CUDA mean something."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        return time.perf_counter()

    def _no_grad_passes(self, plan: Sequence[MiniBatch]) -> bool:
        """Score π_old where the gradient forward cannot give it, and the reference log-probs (kl_beta > 0); return
        whether any forward ran."""
        lc = self.cfg.learner
        every = [b for minibatch in plan for b in minibatch.batches]
        later: list[MicroBatch] = []
        if lc.correction == "tis" and (lc.proximal_forward == "always" or updates_per_step(lc) > 1):
            # The first update runs at the policy the step started with: its own forward gives mini-batch 0's.
            first = {id(b) for b in plan[0].batches} if lc.proximal_forward == "auto" else set()
            later = [b for b in every if id(b) not in first]
            for b, logp in zip(later, self._score_no_grad(self.scorer, later), strict=True):
                b.proximal = logp
        if self.ref_scorer is not None:
            for b, logp in zip(every, self._score_no_grad(self.ref_scorer, every), strict=True):
                b.reference = logp
        return bool(later) or self.ref_scorer is not None

    def _score_no_grad(self, scorer: PolicyScorer, batches: Sequence[MicroBatch]) -> list[Tensor]:
        """Response log-probs of every micro-batch without autograd, in eval mode (no dropout)."""
        was_training = scorer.training
        scorer.eval()
        with torch.no_grad():
            out = [scorer(b.inputs, b.temperature)[0] for b in batches]
        scorer.train(was_training)
        return out

    def _update(self, minibatch: MiniBatch, stats: _StepStats) -> None:
        """One optimizer update on a mini-batch: forward + backward of each micro-batch, loss check, step."""
        if minibatch.tokens == 0:  # fewer groups than mini-batches: every rank skips this one alike
            return
        denominator = self.loss.denominator(minibatch.tokens, minibatch.sequences, self.cfg.sampling.max_new_tokens)
        t0 = time.perf_counter()
        local = torch.zeros(1, dtype=torch.float64, device=self.dist.device)
        batches = minibatch.batches
        for i, batch in enumerate(batches):
            if self.fsdp and len(batches) > 1:
                self.scorer.set_requires_gradient_sync(i == len(batches) - 1)  # reduce-scatter once, at the end
            local += self._forward_backward(batch, denominator, stats)
        stats.forward_backward_seconds += self._sync_time() - t0
        loss = float(all_reduce_sum(local).item())  # the same verdict on every rank
        stats.losses.append(loss)
        if not math.isfinite(loss):
            # A NaN loss means NaN gradients: stepping would poison the weights and AdamW's moments for good.
            logger.warning("non-finite loss %s in update %d: skipped, weights and optimizer state kept", loss,
                           self.updates_done + stats.skipped_loss + stats.skipped_grad)  # fmt: skip
            self.optimizer.zero_grad(set_to_none=True)
            stats.skipped_loss += 1
            return
        if not self.fsdp:
            self._all_reduce_grads()
        lr = float(self.optimizer.param_groups[0]["lr"])
        grad_norm, applied = self._optimizer_step()
        stats.grad_norms.append(grad_norm)
        stats.lrs.append(lr)
        stats.applied += applied
        stats.skipped_grad += not applied

    def _forward_backward(self, batch: MicroBatch, denominator: float, stats: _StepStats) -> Tensor:
        """Backpropagate one micro-batch's loss (divided by the mini-batch's global denominator); add its statistics
        and return its (scaled, detached) loss contribution."""
        lc = self.cfg.learner
        logp, entropy = self.scorer(batch.inputs, batch.temperature)
        behaviour = batch.behaviour_logp.to(logp.dtype)
        if lc.correction == "tis" and batch.proximal is None:
            # Single pass: the policy has not moved since the step began, so π_old is this forward's own log-probs.
            # (The train-mode forward equals the eval-mode one the proximal pass uses when the policy has no
            # dropout, as the default model; Trainer warns otherwise.)
            batch.proximal = logp.detach()
        old, weights = select_old_logp(lc.correction, behaviour, batch.proximal, lc.is_cap)
        terms = self.loss.terms(LossInputs(logp, old, batch.advantages, batch.token_mask, weights, batch.reference))
        scale = 0.0 if batch.filler else 1.0 / denominator
        (terms.loss_sum * scale).backward()
        if batch.filler:
            return torch.zeros(1, dtype=torch.float64, device=self.dist.device)
        mask = batch.token_mask
        current = batch.proximal if batch.proximal is not None else logp.detach()
        values = (
            terms.token_count,
            terms.clip_low_count,
            terms.clip_high_count,
            terms.ratio_sum,
            terms.is_weight_sum,
            terms.kl_sum,
            torch.where(mask, entropy.detach(), torch.zeros_like(logp)).sum(),
            torch.where(mask, k3_kl(behaviour, current), torch.zeros_like(current)).sum(),
        )
        stats.sums += torch.stack([v.to(torch.float64) for v in values])
        batch_max = torch.stack([terms.is_weight_max.to(torch.float64), terms.ratio_max.to(torch.float64)])
        stats.maxes[:2] = torch.maximum(stats.maxes[:2], batch_max)
        return (terms.loss_sum.detach() * scale).to(torch.float64).reshape(1)

    def _all_reduce_grads(self) -> None:
        """Sum gradients over ranks in flat buckets (replicated CPU ranks; FSDP reduces its own)."""
        if self.dist.world_size == 1:
            return
        for p in self.params:
            if p.grad is None:  # a rank without micro-batches still joins every bucket's collective
                p.grad = torch.zeros_like(p)
        bucket: list[Tensor] = []
        size = 0
        for p in self.params:
            assert p.grad is not None
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= GRAD_BUCKET_BYTES:
                _all_reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_bucket(bucket)

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip the global gradient norm, step AdamW and the schedule; return (grad norm before clipping, applied)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.grad_clip, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor over the shards
            norm = norm.full_tensor()
        grad_norm = float(norm.item())
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
            self.updates_done += 1
        else:
            # A non-finite gradient would poison AdamW's moments for good: drop this update, keep the policy. AdamW
            # is not stepped, so its moments and step count stay as they were; the gradients are dropped below.
            logger.warning("non-finite gradient norm %s: optimizer update skipped", grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    # ------------------------------------------------------------------ metrics

    def _reduce_metrics(self, stats: _StepStats, tokens: int, sequences: int, start: float) -> dict[str, float]:
        """Reduce the step's statistics over ranks and turn them into means and fractions over its updates."""
        stats.maxes[2:] = torch.tensor(
            [time.perf_counter() - start, stats.forward_backward_seconds, stats.proximal_seconds], dtype=torch.float64
        )
        all_reduce_sum(stats.sums)
        all_reduce_max(stats.maxes)
        s = dict(zip(_SUM_FIELDS, stats.sums.tolist(), strict=True))
        m = dict(zip(_MAX_FIELDS, stats.maxes.tolist(), strict=True))
        passes = max(s["token_passes"], 1.0)  # response tokens scored over all updates: the means' denominator
        return {
            K.LOSS: float(np.mean(stats.losses)) if stats.losses else 0.0,
            K.GRAD_NORM: float(np.mean(stats.grad_norms)) if stats.grad_norms else math.nan,
            K.LR: stats.lrs[0] if stats.lrs else float(self.optimizer.param_groups[0]["lr"]),
            K.ENTROPY: s["entropy_sum"] / passes,
            K.CLIP_LOW: s[K.CLIP_LOW] / passes,
            K.CLIP_HIGH: s[K.CLIP_HIGH] / passes,
            K.IS_WEIGHT_MEAN: s["is_weight_sum"] / passes,
            K.IS_WEIGHT_MAX: m[K.IS_WEIGHT_MAX],
            K.KL_BEHAVIOUR: s["kl_behaviour_sum"] / passes,
            K.KL_REF: s["kl_ref_sum"] / passes,
            K.RATIO_MEAN: s["ratio_sum"] / passes,
            K.RATIO_MAX: m[K.RATIO_MAX],
            K.TOKENS: float(tokens),
            K.SEQUENCES: float(sequences),
            K.STEP_SECONDS: m[K.STEP_SECONDS],
            K.FORWARD_BACKWARD_SECONDS: m[K.FORWARD_BACKWARD_SECONDS],
            K.PROXIMAL_SECONDS: m[K.PROXIMAL_SECONDS],
            K.SKIPPED: 0.0 if stats.applied else 1.0,
            K.UPDATES: float(stats.applied),
            K.SKIPPED_NONFINITE_LOSS: float(stats.skipped_loss),
            K.SKIPPED_NONFINITE_GRAD: float(stats.skipped_grad),
        }

    def _skipped_metrics(self, start: float) -> dict[str, float]:
        """Metrics of a step with no trainable token anywhere: nothing was computed and nothing changed."""
        metrics = dict.fromkeys(
            (K.LOSS, K.GRAD_NORM, K.ENTROPY, K.CLIP_LOW, K.CLIP_HIGH, K.IS_WEIGHT_MEAN, K.IS_WEIGHT_MAX), 0.0
        )
        metrics |= dict.fromkeys((K.KL_BEHAVIOUR, K.KL_REF, K.RATIO_MEAN, K.RATIO_MAX, K.TOKENS, K.SEQUENCES), 0.0)
        metrics |= {K.FORWARD_BACKWARD_SECONDS: 0.0, K.PROXIMAL_SECONDS: 0.0, K.SKIPPED: 1.0, K.UPDATES: 0.0}
        metrics |= {K.SKIPPED_NONFINITE_LOSS: 0.0, K.SKIPPED_NONFINITE_GRAD: 0.0}
        metrics[K.LR] = float(self.optimizer.param_groups[0][K.LR])
        metrics[K.STEP_SECONDS] = time.perf_counter() - start
        return metrics


def _all_reduce_bucket(grads: list[Tensor]) -> None:
    """All-reduce (sum) a list of gradients as one flat tensor and copy the sums back."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
