"""The learner's optimizer step: proximal pass, DAPO/GRPO/Dr.GRPO loss over micro-batches, gradient sync, AdamW.

``Trainer.train_step(samples)`` takes the WHOLE step's batch, identical on every rank (rank 0 broadcasts it with
``broadcast_bytes`` first), and:

1. keeps the trainable samples with a response and gives this rank its ``shard`` (balanced by token count);
2. counts the step's response tokens and sequences over all ranks: the loss denominators (DIPO_SPEC.md §5) are
   global, so every micro-batch's summed loss is divided by the same number and gradients simply add up;
3. with ``correction="tis"`` recomputes the proximal log-probs (no grad, eval mode, logits / sampling temperature);
4. runs forward + backward per micro-batch (padded to its longest sequence, sequences sorted by length, scored at
   response positions only), then sums gradients over ranks, clips the global norm, steps AdamW and the schedule.

Sequences are laid out prompt + response, right-padded; ``score_responses`` derives position ids from the attention
mask and returns left-aligned response log-probs, which line up with the behaviour log-probs as recorded.

Parallelism: on CPU (gloo) each rank keeps a full replica and gradients are all-reduced (summed) in flat buckets
after accumulation. On CUDA with more than one rank the model is sharded with FSDP2 (``fully_shard``, bf16 compute,
fp32 gradient reduction); ``learner.fsdp=on`` shards on gloo ranks too (``apply_fsdp`` documents the unit layout).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from learner.batch import Sample, micro_batches
from learner.distributed import DistInfo, all_reduce_max, all_reduce_sum
from learner.losses import LossInputs, build_loss, k3_kl, score_responses, select_old_logp
from services.config import LearnerConfig, RunConfig
from services.contracts import MetricKey as K
from services.modeling.loading import torch_dtype

logger = logging.getLogger(__name__)

GRAD_BUCKET_BYTES = 32 * 1024 * 1024
"""Gradients are all-reduced in flat buckets of about this size: few collectives, bounded extra memory."""

# Statistics summed over micro-batches and ranks, and those maxed; the order is the layout of the reduced vectors.
_SUM_FIELDS = (
    "loss",
    "tokens",
    "sequences",
    "clip_low",
    "clip_high",
    "ratio_sum",
    "is_weight_sum",
    "kl_ref_sum",
    "entropy_sum",
    "kl_behaviour_sum",
)
_MAX_FIELDS = ("is_weight_max", "ratio_max", "step_seconds", "forward_backward_seconds", "proximal_seconds")


def sample_tokens(sample: Sample) -> int:
    """Tokens a sample occupies in a micro-batch: prompt plus response."""
    return sample.length


def shard(samples: Sequence[Sample], rank: int, world: int) -> list[Sample]:
    """Return rank's share of the batch, balanced by token count (longest first to the lightest rank), in order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    loads = [0] * world
    owner = [0] * len(samples)
    for i in sorted(range(len(samples)), key=lambda j: (-sample_tokens(samples[j]), j)):
        target = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = target
        loads[target] += sample_tokens(samples[i])
    return [s for s, r in zip(samples, owner, strict=True) if r == rank]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Return the learning-rate multiplier of optimizer step `step` (0-based): linear warm-up, then constant/cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LearnerConfig) -> LambdaLR:
    """Return the LambdaLR of the config's warm-up and schedule (a LambdaLR so that it checkpoints)."""
    warmup, total, schedule = cfg.warmup_steps, cfg.steps, cfg.schedule

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, schedule)

    return LambdaLR(optimizer, factor)


@dataclass
class MicroBatch:
    """One padded micro-batch: [B, L] model inputs and [B, T] left-aligned response tensors."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    behaviour_logp: Tensor
    token_mask: Tensor
    advantages: Tensor
    temperature: float
    filler: bool = False
    """A stand-in that only keeps FSDP ranks in step: its loss is multiplied by 0 and its statistics are dropped."""


def collate(samples: Sequence[Sample], device: torch.device) -> MicroBatch:
    """Pad samples (one temperature, each with a prompt and a response) into a right-padded MicroBatch."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    temperatures = {s.temperature for s in samples}
    if len(temperatures) != 1:
        raise ValueError(f"a micro-batch is scored at one temperature, got {sorted(temperatures)}")
    width = max(sample_tokens(s) for s in samples)
    resp_width = max(len(s.response_ids) for s in samples)
    ids = np.zeros((len(samples), width), dtype=np.int64)
    attn = np.zeros((len(samples), width), dtype=np.int64)
    resp = np.zeros((len(samples), width), dtype=bool)
    behaviour = np.zeros((len(samples), resp_width), dtype=np.float32)
    tmask = np.zeros((len(samples), resp_width), dtype=bool)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p == 0 or r == 0:
            raise ValueError(f"sample of group {s.group_id!r} needs a prompt and a response, got {p} and {r} tokens")
        if len(s.behaviour_logprobs) != r:
            raise ValueError(f"sample of group {s.group_id!r}: {len(s.behaviour_logprobs)} log-probs for {r} tokens")
        ids[i, :p], ids[i, p : p + r] = s.prompt_ids, s.response_ids
        attn[i, : p + r] = 1
        resp[i, p : p + r] = True
        behaviour[i, :r], tmask[i, :r] = s.behaviour_logprobs, True
    return MicroBatch(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(attn).to(device),
        response_mask=torch.from_numpy(resp).to(device),
        behaviour_logp=torch.from_numpy(behaviour).to(device),
        token_mask=torch.from_numpy(tmask).to(device),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        temperature=temperatures.pop(),
    )


def filler_batch(device: torch.device) -> MicroBatch:
    """A two-token micro-batch whose loss is zeroed: FSDP ranks with fewer micro-batches run it to stay in step."""
    batch = collate(
        [Sample("", np.zeros(1, np.uint32), np.zeros(1, np.uint32), np.zeros(1, np.float32), 0.0, 1.0, 0, False)],
        device,
    )
    batch.filler = True
    return batch


def plan_micro_batches(samples: Sequence[Sample], token_budget: int) -> list[list[Sample]]:
    """Split samples into micro-batches of one temperature each, sequences of similar length together."""
    by_temperature: dict[float, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=sample_tokens):
        by_temperature[s.temperature].append(s)
    return [mb for t in sorted(by_temperature) for mb in micro_batches(by_temperature[t], token_budget) if mb]


class PolicyScorer(nn.Module):
    """Root module around the policy whose forward is ``score_responses``: under FSDP2 its forward is what
    unshards the parameters that ``score_responses`` reaches outside the decoder layers (embeddings, final norm,
    a tied output layer), since it calls the decoder and the output layer separately, never ``model.forward``."""

    def __init__(self, policy: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.autocast_dtype = autocast_dtype
        """Compute dtype of the forward when the parameters stay float32 (bf16 training on one CUDA device)."""

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor]:
        """Return (log-probs, entropies) of the response tokens, as ``score_responses``."""
        if self.autocast_dtype is None:
            return score_responses(self.policy, input_ids, attention_mask, response_mask, temperature)
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype):
            return score_responses(self.policy, input_ids, attention_mask, response_mask, temperature)


def apply_fsdp(scorer: PolicyScorer, mixed_precision: bool = True, param_dtype: torch.dtype = torch.bfloat16) -> None:
    """Shard the policy in place with FSDP2: one unit per decoder layer, the output layer and decoder body as their
    own units when the output layer is not tied, and the scorer as the root unit (holding, with tied embeddings, the
    shared embedding/output matrix, which must stay in one unit). Runs on NCCL ranks, and on gloo for tests."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = scorer.policy
    kwargs: dict[str, object] = {}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    decoder = policy.get_decoder()
    head = policy.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or head is None:
        raise ValueError("apply_fsdp needs a causal LM with decoder.layers (a ModuleList) and output embeddings")
    for layer in layers:
        fully_shard(layer, **kwargs)
    tied = head.weight is policy.get_input_embeddings().weight
    if not tied:
        fully_shard(head, **kwargs)
        fully_shard(decoder, **kwargs)
    fully_shard(scorer, **kwargs)
    # Each rank's loss is already divided by the step's global denominator: gradients must be summed, not averaged.
    # A divide factor makes fp32/bf16 reductions PREMUL_SUM, which gloo lacks: there, plain SUM (then a x1 scale).
    plain_sum = torch.distributed.get_backend() == "gloo"
    for module in scorer.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(plain_sum)


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
        self.cfg, self.dist = cfg, dist
        self.model = model.to(dist.device)
        if lc.gradient_checkpointing:
            # Non-reentrant checkpointing works with FSDP2 and with inputs that do not require grad.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Master weights and AdamW state stay in the model's dtype (float32 from the learner); on CUDA the forward
        # runs in model.dtype (bf16): FSDP2's mixed precision when sharded, autocast on a single device. Pure-bf16
        # parameters would round most updates at RL learning rates (~1e-6) to nothing.
        compute = torch_dtype(cfg.model.dtype)
        master = next(model.parameters()).dtype
        low_precision = dist.device.type == "cuda" and compute != torch.float32 and master == torch.float32
        # FSDP2 by default only with NCCL ranks; use_fsdp=True forces it (e.g. to try it on gloo).
        self.fsdp = dist.world_size > 1 and dist.device.type == "cuda" if use_fsdp is None else use_fsdp
        self.scorer = PolicyScorer(self.model, compute if low_precision and not self.fsdp else None)
        if self.fsdp:
            apply_fsdp(self.scorer, mixed_precision=low_precision, param_dtype=compute)
        self.ref_model = ref_model.to(dist.device).eval().requires_grad_(False) if ref_model is not None else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay, foreach=True
        )
        self.scheduler = build_scheduler(self.optimizer, lc)
        self.loss = build_loss(lc)
        self.steps_done = 0
        """Optimizer steps taken (skipped steps do not count)."""

    def train_step(self, samples: Sequence[Sample]) -> dict[str, float]:
        """Run one optimizer step on the whole step's batch (identical on every rank); return rank-reduced metrics."""
        start = time.perf_counter()
        lc = self.cfg.learner
        useful = [s for s in samples if s.trainable and len(s.response_ids) > 0]
        mine = shard(useful, self.dist.rank, self.dist.world_size)
        batches = [collate(mb, self.dist.device) for mb in plan_micro_batches(mine, lc.micro_batch_tokens)]
        # Known up front from the samples: the global denominators, before any backward pass.
        counts = torch.tensor(
            [sum(len(s.response_ids) for s in mine), len(mine)], dtype=torch.float64, device=self.dist.device
        )
        tokens, sequences = all_reduce_sum(counts).tolist()
        if self.fsdp:  # every rank must run as many forwards and backwards as the busiest one
            most = all_reduce_max(torch.tensor([len(batches)], device=self.dist.device))
            batches += [filler_batch(self.dist.device) for _ in range(int(most.item()) - len(batches))]
        if tokens == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return self._skipped_metrics(start)

        was_training = self.model.training
        sums = torch.zeros(len(_SUM_FIELDS), dtype=torch.float64, device=self.dist.device)
        maxes = torch.zeros(len(_MAX_FIELDS), dtype=torch.float64, device=self.dist.device)
        t0 = time.perf_counter()
        proximal = self._score_no_grad(self.scorer, batches) if lc.correction == "tis" else [None] * len(batches)
        reference = self._score_no_grad(self.ref_model, batches) if self.ref_model is not None else None
        t1 = self._sync_time()
        denominator = self.loss.denominator(tokens, sequences, self.cfg.sampling.max_new_tokens)
        self.model.train()
        for i, batch in enumerate(batches):
            if self.fsdp and len(batches) > 1:
                self.scorer.set_requires_gradient_sync(i == len(batches) - 1)  # reduce-scatter once, at the end
            ref = reference[i] if reference is not None else None
            self._forward_backward(batch, proximal[i], ref, denominator, sums, maxes)
        t2 = self._sync_time()
        self.model.train(was_training)
        if not self.fsdp:
            self._all_reduce_grads()
        grad_norm, lr = self._optimizer_step()
        maxes[2:] = torch.tensor([time.perf_counter() - start, t2 - t1, t1 - t0], dtype=torch.float64)
        return self._reduce_metrics(sums, maxes, grad_norm, lr)

    def _sync_time(self) -> float:
        """perf_counter after the device's queued work is done, so phase timings on CUDA mean something."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        return time.perf_counter()

    def _score_no_grad(self, model: nn.Module | None, batches: Sequence[MicroBatch]) -> list[Tensor | None]:
        """Response log-probs of every micro-batch without autograd, in eval mode (no dropout)."""
        assert model is not None
        scorer = model if isinstance(model, PolicyScorer) else PolicyScorer(model, self.scorer.autocast_dtype)
        was_training = scorer.training
        scorer.eval()
        out: list[Tensor | None] = []
        with torch.no_grad():
            for b in batches:
                out.append(scorer(b.input_ids, b.attention_mask, b.response_mask, b.temperature)[0])
        scorer.train(was_training)
        return out

    def _forward_backward(
        self,
        batch: MicroBatch,
        proximal: Tensor | None,
        ref: Tensor | None,
        denominator: float,
        sums: Tensor,
        maxes: Tensor,
    ) -> None:
        """Backpropagate one micro-batch's loss (divided by the step's global denominator); add its statistics."""
        lc = self.cfg.learner
        logp, entropy = self.scorer(batch.input_ids, batch.attention_mask, batch.response_mask, batch.temperature)
        behaviour = batch.behaviour_logp.to(logp.dtype)
        old, weights = select_old_logp(lc.correction, behaviour, proximal, lc.is_cap)
        terms = self.loss.terms(LossInputs(logp, old, batch.advantages, batch.token_mask, weights, ref))
        scale = 0.0 if batch.filler else 1.0 / denominator
        (terms.loss_sum * scale).backward()
        if batch.filler:
            return
        mask = batch.token_mask
        current = (proximal if proximal is not None else logp).detach()
        kl_behaviour = torch.where(mask, k3_kl(behaviour, current), torch.zeros_like(current)).sum()
        stats = (
            terms.loss_sum.detach() * scale,
            terms.token_count,
            terms.sequence_count,
            terms.clip_low_count,
            terms.clip_high_count,
            terms.ratio_sum,
            terms.is_weight_sum,
            terms.kl_sum,
            torch.where(mask, entropy, torch.zeros_like(entropy)).sum(),
            kl_behaviour,
        )
        sums += torch.stack([s.to(torch.float64) for s in stats])
        batch_max = torch.stack([terms.is_weight_max.to(torch.float64), terms.ratio_max.to(torch.float64)])
        maxes[:2] = torch.maximum(maxes[:2], batch_max)

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
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= GRAD_BUCKET_BYTES:
                _all_reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_bucket(bucket)

    def _optimizer_step(self) -> tuple[float, float]:
        """Clip the global gradient norm, step AdamW and the schedule; return (grad norm before clipping, lr used)."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.grad_clip, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor over the shards
            norm = norm.full_tensor()
        grad_norm = float(norm.item())
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.steps_done += 1
        else:
            # A non-finite gradient would poison AdamW's moments for good: drop this step, keep the policy.
            logger.warning("non-finite gradient norm %s: optimizer step skipped", grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def _reduce_metrics(self, sums: Tensor, maxes: Tensor, grad_norm: float, lr: float) -> dict[str, float]:
        """Reduce the step's statistics over ranks and turn them into means and fractions."""
        all_reduce_sum(sums)
        all_reduce_max(maxes)
        s = dict(zip(_SUM_FIELDS, sums.tolist(), strict=True))
        m = dict(zip(_MAX_FIELDS, maxes.tolist(), strict=True))
        tokens = max(s["tokens"], 1.0)
        metrics = {
            K.LOSS: s[K.LOSS],
            K.GRAD_NORM: grad_norm,
            K.LR: lr,
            K.ENTROPY: s["entropy_sum"] / tokens,
            K.CLIP_LOW: s[K.CLIP_LOW] / tokens,
            K.CLIP_HIGH: s[K.CLIP_HIGH] / tokens,
            K.IS_WEIGHT_MEAN: s["is_weight_sum"] / tokens,
            K.IS_WEIGHT_MAX: m[K.IS_WEIGHT_MAX],
            K.KL_BEHAVIOUR: s["kl_behaviour_sum"] / tokens,
            K.KL_REF: s["kl_ref_sum"] / tokens,
            K.RATIO_MEAN: s["ratio_sum"] / tokens,
            K.RATIO_MAX: m[K.RATIO_MAX],
            K.TOKENS: s[K.TOKENS],
            K.SEQUENCES: s[K.SEQUENCES],
            K.STEP_SECONDS: m[K.STEP_SECONDS],
            K.FORWARD_BACKWARD_SECONDS: m[K.FORWARD_BACKWARD_SECONDS],
            K.PROXIMAL_SECONDS: m[K.PROXIMAL_SECONDS],
            K.SKIPPED: 0.0 if math.isfinite(grad_norm) else 1.0,
        }
        return metrics

    def _skipped_metrics(self, start: float) -> dict[str, float]:
        """Metrics of a step with no trainable token anywhere: nothing was computed and nothing changed."""
        metrics = dict.fromkeys(
            (K.LOSS, K.GRAD_NORM, K.ENTROPY, K.CLIP_LOW, K.CLIP_HIGH, K.IS_WEIGHT_MEAN, K.IS_WEIGHT_MAX), 0.0
        )
        metrics |= dict.fromkeys((K.KL_BEHAVIOUR, K.KL_REF, K.RATIO_MEAN, K.RATIO_MAX, K.TOKENS, K.SEQUENCES), 0.0)
        metrics |= {K.FORWARD_BACKWARD_SECONDS: 0.0, K.PROXIMAL_SECONDS: 0.0, K.SKIPPED: 1.0}
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
