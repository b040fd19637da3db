"""Policy-gradient losses (DAPO, GRPO, Dr.GRPO), off-policy weights, KL, entropy and response scoring.

All losses return SUMS plus counts (``LossTerms``) rather than means, so that the train step can divide by a count
gathered over every micro-batch and rank of the step; ``loss_denominator`` turns the counts into the divisor that
each objective needs (DIPO_SPEC.md §5):

- ``"token"`` (DAPO, the default): token-mean over all response tokens of the step.
- ``"sequence"`` (GRPO): ``grpo_sequence_loss`` sums per-sequence means, divided by the number of sequences.
- ``"constant"`` (Dr.GRPO): ``dapo_token_loss``'s token sum divided by max response length × number of sequences,
  a constant that does not depend on how long the sampled responses happen to be.

Off-policy correction for asynchronous rollouts (``select_old_logp``):

- ``correction="tis"``: π_old is the proximal policy (log-probs the learner recomputes at the start of the step)
  and each token is weighted by ``min(π_old / π_behav, cap)`` from ``truncated_is_weights``.
- ``correction="none"``: the behaviour log-probs recorded by the rollout server are used directly as π_old and no
  weights are applied (cheaper: no proximal forward pass; exact only for on-policy data).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from services.config import LearnerConfig
from services.extensions import LOSSES, resolve

Normalisation = Literal["token", "sequence", "constant"]
Correction = Literal["tis", "none"]

MIN_TEMPERATURE = 1e-3
"""Smallest temperature the scores are computed at (see ``score_responses``)."""

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to ±20 before exp: a token that far off-policy would otherwise overflow to inf/NaN."""


@dataclass(frozen=True)
class LossTerms:
    """A micro-batch's loss sum (with grad) and detached statistics, all sums so they add across micro-batches.

    Everything is at least float32, whatever the dtype of the log-probs (bf16 cannot count past 256 exactly).
    """

    loss_sum: Tensor
    token_count: Tensor
    """Response tokens in the micro-batch (mask sum)."""
    sequence_count: Tensor
    """Sequences with at least one response token."""
    clip_low_count: Tensor
    """Tokens with ρ < 1 - ε_low and A < 0 (clipped from below: no gradient)."""
    clip_high_count: Tensor
    """Tokens with ρ > 1 + ε_high and A > 0 (clipped from above: no gradient)."""
    ratio_sum: Tensor
    ratio_max: Tensor
    is_weight_sum: Tensor
    """Sum of the importance weights over tokens (equals token_count when no weights are given)."""
    is_weight_max: Tensor
    kl_sum: Tensor
    """Sum of the k3 KL over tokens (0 when no reference log-probs are given)."""


def loss_denominator(
    normalisation: Normalisation,
    token_count: float,
    sequence_count: float,
    max_response_len: int | None = None,
) -> float:
    """Return the divisor of a step's summed loss, from counts gathered over all micro-batches and ranks."""
    if normalisation == "token":
        value = float(token_count)
    elif normalisation == "sequence":
        value = float(sequence_count)
    elif normalisation == "constant":
        if max_response_len is None or max_response_len <= 0:
            raise ValueError("normalisation='constant' (Dr.GRPO) needs max_response_len > 0: pass the sampling limit")
        value = float(max_response_len) * float(sequence_count)
    else:
        raise ValueError(f"normalisation must be 'token', 'sequence' or 'constant', got {normalisation!r}")
    return max(value, 1.0)  # an empty step has loss_sum 0; dividing by 1 keeps it 0 instead of NaN


def _check_token_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    """Raise ValueError unless logp/old_logp/mask are [B, T] of one shape and advantages is [B]."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T] (response tokens only), got shape {tuple(logp.shape)}")
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} must match"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return float32 for half-precision logits (softmax needs the range) and keep float32/float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Return the max of a non-negative x over the mask (0 when nothing is masked in), without a host sync."""
    if x.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(mask, x, torch.zeros_like(x)).max()


def _clipped_token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    is_weights: Tensor | None,
    ref_logp: Tensor | None,
    kl_coef: float,
) -> tuple[Tensor, LossTerms]:
    """Return per-token losses (0 outside the mask) and the statistics, with loss_sum left as the token sum."""
    _check_token_inputs(logp, old_logp, advantages, mask)
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    # Compute in at least float32 (a differentiable cast): bf16 sums and counts lose precision past a few hundred.
    dt = _compute_dtype(logp.dtype)
    logp, old_logp = logp.to(dt), old_logp.to(dt)
    m = mask.bool()
    # Masking before exp keeps padding (arbitrary values) from overflowing into NaN gradients.
    log_ratio = torch.where(m, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    token_loss = -surrogate
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    weights = torch.ones_like(logp) if is_weights is None else is_weights.detach().to(logp.dtype)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights must match logp's shape {tuple(logp.shape)}, got {tuple(is_weights.shape)}")
        token_loss = token_loss * weights
    kl_sum = zero
    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp must match logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
        kl = torch.where(m, k3_kl(logp, ref_logp.detach()), torch.zeros_like(logp))
        token_loss = token_loss + kl_coef * kl
        kl_sum = kl.detach().sum()
    token_loss = torch.where(m, token_loss, torch.zeros_like(token_loss))
    loss_sum = token_loss.sum()

    with torch.no_grad():
        r, w = ratio.detach(), weights
        terms = LossTerms(
            loss_sum=loss_sum,
            token_count=m.sum().to(dt),
            sequence_count=m.any(dim=1).sum().to(dt),
            clip_low_count=(m & (r < 1.0 - eps_low) & (adv < 0)).sum().to(dt),
            clip_high_count=(m & (r > 1.0 + eps_high) & (adv > 0)).sum().to(dt),
            ratio_sum=torch.where(m, r, zero).sum(),
            ratio_max=_masked_max(r, m),
            is_weight_sum=torch.where(m, w, zero).sum(),
            is_weight_max=_masked_max(w, m),
            kl_sum=kl_sum,
        )
    return token_loss, terms


def dapo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    is_weights: Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossTerms:
    """Return the DAPO clip-higher loss SUMMED over response tokens; divide by ``loss_denominator("token", ...)``.

    Per token: ``-min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) · w + β · k3_kl``, with ρ = exp(logp - old_logp), w the
    detached truncated importance weight (1 when ``is_weights`` is None) and β = ``kl_coef`` (the KL term needs
    ``ref_logp`` and is not importance-weighted). With ``loss_denominator("constant", ...)`` this is Dr.GRPO.
    """
    _, terms = _clipped_token_losses(logp, old_logp, advantages, mask, eps_low, eps_high, is_weights, ref_logp, kl_coef)
    return terms


def grpo_sequence_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps: float = 0.2,
    is_weights: Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossTerms:
    """Return the GRPO loss: per-sequence token-mean, SUMMED over sequences; divide by ``loss_denominator("sequence")``.

    Symmetric clip ``clip(ρ, 1-eps, 1+eps)``; otherwise the same per-token terms as ``dapo_token_loss``.
    """
    token_loss, terms = _clipped_token_losses(logp, old_logp, advantages, mask, eps, eps, is_weights, ref_logp, kl_coef)
    lengths = mask.bool().sum(dim=1).clamp(min=1).to(token_loss.dtype)
    seq_loss_sum = (token_loss.sum(dim=1) / lengths).sum()
    return replace(terms, loss_sum=seq_loss_sum)


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's tensors, as every loss takes them: [B, T] left-aligned response tokens, [B] advantages."""

    logp: Tensor
    """Log-probs of the response tokens under the current policy (with grad)."""
    old_logp: Tensor
    """π_old: proximal or behaviour log-probs (detached)."""
    advantages: Tensor
    mask: Tensor
    """Which [B, T] positions are response tokens to train on."""
    is_weights: Tensor | None = None
    """Truncated importance weights π_old / π_behav (``correction="tis"``), else None."""
    ref_logp: Tensor | None = None
    """Frozen reference log-probs for the k3 KL term (``kl_beta > 0``), else None."""


class Loss(ABC):
    """A policy loss: its surrogate and the token normalisation it needs, declared together.

    ``terms`` returns summed terms of one micro-batch; the train step divides every micro-batch's sum by
    ``denominator`` of the whole step's counts (gathered over micro-batches and ranks), so gradients simply add up.
    Implementations are named in ``services.extensions.LOSSES``.
    """

    normalisation: ClassVar[Normalisation]

    def __init__(self, cfg: LearnerConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def terms(self, inputs: LossInputs) -> LossTerms:
        """The micro-batch's summed loss (with grad) and statistics."""

    def denominator(self, token_count: float, sequence_count: float, max_response_len: int) -> float:
        """The divisor of the step's summed loss."""
        return loss_denominator(self.normalisation, token_count, sequence_count, max_response_len)


class DapoLoss(Loss):
    """DAPO: clip-higher surrogate, token-mean over every response token of the step (DIPO_SPEC.md §5)."""

    normalisation = "token"

    def terms(self, inputs: LossInputs) -> LossTerms:
        """``dapo_token_loss`` with the configured clip ranges and KL coefficient."""
        c, x = self.cfg, inputs
        return dapo_token_loss(x.logp, x.old_logp, x.advantages, x.mask, c.eps_low, c.eps_high, x.is_weights,
                               x.ref_logp, c.kl_beta)  # fmt: skip


class GrpoLoss(Loss):
    """GRPO: symmetric clip at ``eps_low``, per-sequence token-mean, sequence-mean over the step."""

    normalisation = "sequence"

    def terms(self, inputs: LossInputs) -> LossTerms:
        """``grpo_sequence_loss`` with the configured clip range and KL coefficient."""
        c, x = self.cfg, inputs
        return grpo_sequence_loss(x.logp, x.old_logp, x.advantages, x.mask, c.eps_low, x.is_weights, x.ref_logp,
                                  c.kl_beta)  # fmt: skip


class DrGrpoLoss(DapoLoss):
    """Dr.GRPO: DAPO's token sum divided by max response length × sequences, a constant of the step."""

    normalisation = "constant"


def build_loss(cfg: LearnerConfig) -> Loss:
    """The configured ``learner.loss``."""
    cls: type[Loss] = resolve(LOSSES, cfg.loss, "loss")
    return cls(cfg)


def truncated_is_weights(proximal_logp: Tensor, behaviour_logp: Tensor, cap: float = 2.0) -> Tensor:
    """Return detached per-token weights min(π_old / π_behav, cap) (``correction="tis"``)."""
    if proximal_logp.shape != behaviour_logp.shape:
        raise ValueError(
            f"proximal_logp {tuple(proximal_logp.shape)} and behaviour_logp {tuple(behaviour_logp.shape)} must match"
        )
    if not cap > 0.0:
        raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        # Clamping the log-ratio at log(cap) first is the same truncation, without overflowing exp.
        log_w = (proximal_logp - behaviour_logp).clamp(max=math.log(cap))
        return torch.exp(log_w)


def select_old_logp(
    correction: Correction,
    behaviour_logp: Tensor,
    proximal_logp: Tensor | None = None,
    cap: float = 2.0,
) -> tuple[Tensor, Tensor | None]:
    """Return (old_logp, is_weights) for the loss: proximal + truncated weights ("tis"), or behaviour only ("none")."""
    if correction == "none":
        return behaviour_logp.detach(), None
    if correction == "tis":
        if proximal_logp is None:
            raise ValueError("correction='tis' needs proximal_logp: recompute log-probs at the start of the step")
        return proximal_logp.detach(), truncated_is_weights(proximal_logp, behaviour_logp, cap)
    raise ValueError(f"correction must be 'tis' or 'none', got {correction!r}")


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Return the per-token k3 estimator of KL(π || π_ref): exp(ref - logp) - (ref - logp) - 1."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must match")
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def token_entropy(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Return the detached entropy of softmax(logits) over the last dim, computed in row chunks to bound memory.

    Entropy is a metric here, so it is computed without autograd; each chunk materialises only a
    ``chunk_size × vocab`` buffer, never a second full-size copy of the logits. The result is float32 (float64 for
    float64 logits).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    flat = logits.detach().reshape(-1, logits.shape[-1])
    dtype = _compute_dtype(logits.dtype)
    out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            chunk = flat[start : start + chunk_size].to(dtype)
            log_z = torch.logsumexp(chunk, dim=-1)
            probs = torch.softmax(chunk, dim=-1)
            out[start : start + chunk_size] = log_z - (probs * chunk).sum(dim=-1)
    return out.reshape(logits.shape[:-1])


def response_token_mask(response_mask: Tensor) -> Tensor:
    """Return the [B, T] bool mask of the left-aligned layout that ``score_responses`` produces."""
    lengths = response_mask.bool().sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(width, device=response_mask.device).unsqueeze(0) < lengths.unsqueeze(1)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return (the model body that yields hidden states, the output projection) of an HF causal LM."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError("model has no output embeddings: pass a causal LM (…ForCausalLM), not a bare base model")
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ValueError("cannot find the decoder body: the model needs get_decoder() or base_model")
    return decoder, head


def score_responses(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Return (log-probs, entropies) of the response tokens, left-aligned as [B, T_resp] (0 past each response).

    ``input_ids``/``attention_mask``/``response_mask`` are [B, L]; ``response_mask`` marks the response tokens (any
    padding side). The hidden states are sliced to the positions that predict response tokens BEFORE the output
    layer, so the vocabulary projection runs on response tokens only (PERFORMANCE.md). Logits are divided by the
    sampling temperature so the log-probs are those of the distribution actually sampled from. Position ids are
    derived from the attention mask, matching what ``generate`` uses with left padding. Entropies are detached.
    Use ``response_token_mask(response_mask)`` for the [B, T_resp] mask of the result.
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must all be [B, L]"
        )
    rm = response_mask.bool()
    if rm[:, 0].any():
        raise ValueError("a response token at position 0 has no context to be predicted from: put the prompt first")
    decoder, head = decoder_and_head(model)
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    rows, pos = rm.nonzero(as_tuple=True)
    cols = (rm.long().cumsum(dim=1) - 1)[rows, pos]
    logits = head(hidden[rows, pos - 1])  # [N_response_tokens, V]: only response positions reach the vocabulary
    # A temperature that rounds to 0 would turn the logits into inf and every log-prob into NaN; below
    # MIN_TEMPERATURE sampling is greedy anyway, so the scores of such a (hostile or mistyped) task are taken there.
    logits = logits.to(_compute_dtype(logits.dtype)) / max(temperature, MIN_TEMPERATURE)
    targets = input_ids[rows, pos].unsqueeze(-1)
    token_logp = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    width = int(rm.sum(dim=1).max()) if rm.numel() else 0
    shape = (input_ids.shape[0], width)
    logp = logits.new_zeros(shape).index_put((rows, cols), token_logp)
    entropy = logits.new_zeros(shape).index_put((rows, cols), token_entropy(logits))
    return logp, entropy
