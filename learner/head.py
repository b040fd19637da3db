"""The output layer at response positions only: log-prob of each target token and the entropy, chunk by chunk.

``response_logprobs`` takes the hidden states of the positions that PREDICT response tokens ([N, H]) and returns
the log-prob of each target and the entropy of the (temperature-scaled) next-token distribution there, both [N].

With ``chunk_tokens > 0`` (the default, ``learner.head_chunk_tokens``) this goes through ``ChunkedLogProbEntropy``:
the [N, V] logits are never materialised. Each chunk of rows is projected, reduced to two numbers per row (the
log-partition and the expected logit), and freed; the backward pass projects each chunk again and forms the
gradients with respect to the hidden states and the output weight directly. Peak memory of the head is then one
[chunk, V] block instead of [N, V] logits plus their softmax (PERFORMANCE.md: materialised logits are what put the
GPU learner at 66.7 GiB). ``chunk_tokens = 0`` keeps the previous computation (logits of all N rows at once, the
entropy detached), for comparison and for output layers that are not a plain bias-free ``nn.Linear``.

Math, with z = h Wᵀ / T, p = softmax(z), lse = logsumexp(z):
  log p_y = z_y − lse,   H = lse − Σ p z,
  ∂ log p_y / ∂z = onehot(y) − p,   ∂H / ∂z = −p ⊙ (z − E_p[z]),
  ∂/∂h = (g_z / T) W,   ∂/∂W = (g_z / T)ᵀ h.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from learner.losses import MIN_TEMPERATURE, token_entropy


class ChunkedLogProbEntropy(torch.autograd.Function):
    """(log-prob of the target, entropy) per row of h Wᵀ / T, in row chunks, recomputing each chunk in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, inv_temperature: float, chunk: int
    ) -> tuple[Tensor, Tensor]:
        """Return (log-probs [N], entropies [N]) in at least float32; save two floats per row for backward."""
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n, dtype=acc)
        lse_all = hidden.new_empty(n, dtype=acc)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z = (hidden[start:end] @ weight.T).to(acc).mul_(inv_temperature)
            lse = torch.logsumexp(z, dim=-1)
            logp[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - lse
            z.sub_(lse[:, None])  # z now holds log p: one [chunk, V] buffer more (p) is all the chunk needs
            entropy[start:end] = -(z.exp() * z).sum(dim=-1)
            lse_all[start:end] = lse
        ctx.save_for_backward(hidden, weight, targets, lse_all, entropy)
        ctx.inv_temperature, ctx.chunk = inv_temperature, chunk
        ctx.set_materialize_grads(False)  # an unused entropy (the usual case: a metric) then costs nothing
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, g_logp: Tensor | None, g_entropy: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Gradients with respect to the hidden states and the output weight, one recomputed chunk at a time."""
        hidden, weight, targets, lse_all, entropy = ctx.saved_tensors
        inv_t, chunk = ctx.inv_temperature, ctx.chunk
        acc = lse_all.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_h = torch.zeros_like(hidden) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        if (g_logp is None and g_entropy is None) or not (need_h or need_w):
            return g_h, None if g_w is None else g_w.to(weight.dtype), None, None, None
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            log_p = (hidden[start:end] @ weight.T).to(acc).mul_(inv_t).sub_(lse_all[start:end, None])
            p = log_p.exp()
            if g_entropy is not None:  # −g_H · p ⊙ (log p + H), since z − E_p[z] = log p + H
                g_z = log_p.add_(entropy[start:end, None]).mul_(p).mul_(-g_entropy[start:end, None].to(acc))
            else:
                g_z = torch.zeros_like(p)
            if g_logp is not None:  # g_logp · (onehot(y) − p)
                g = g_logp[start:end, None].to(acc)
                g_z.sub_(p.mul_(g)).scatter_add_(1, targets[start:end, None], g)
            g_z = g_z.mul_(inv_t).to(weight.dtype)
            if g_h is not None:
                g_h[start:end] = g_z @ weight
            if g_w is not None:
                g_w.addmm_(g_z.T.to(acc), hidden[start:end].to(acc))
        return g_h, None if g_w is None else g_w.to(weight.dtype), None, None, None


def chunked_logprob_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, chunk_tokens: int = 1024
) -> tuple[Tensor, Tensor]:
    """Log-probs of `targets` and entropies under softmax(hidden @ weightᵀ / temperature), never all logits at once.

    Under autocast the product runs in the autocast dtype (as an ``nn.Linear`` would), the softmax in float32.
    Gradients reach `hidden` and `weight` (a tied embedding matrix included: it is one Parameter).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    inv_temperature = 1.0 / max(float(temperature), MIN_TEMPERATURE)
    with torch.autocast(device, enabled=False):
        out: tuple[Tensor, Tensor] = ChunkedLogProbEntropy.apply(
            hidden, weight, targets.long(), inv_temperature, int(chunk_tokens)
        )
    return out


def plain_logprob_entropy(
    hidden: Tensor, head: nn.Module, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """The unchunked computation: [N, V] logits through `head`, log-probs with grad, entropies detached."""
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / max(temperature, MIN_TEMPERATURE)
    logp = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, token_entropy(logits)


def chunkable(head: nn.Module) -> bool:
    """True when the output layer is a bias-free linear map, which is all the chunked function computes."""
    return isinstance(head, nn.Linear) and head.bias is None


def response_logprobs(
    hidden: Tensor, head: nn.Module, targets: Tensor, temperature: float, chunk_tokens: int
) -> tuple[Tensor, Tensor]:
    """(log-probs, entropies) [N] of the targets predicted from `hidden` [N, H]; chunked unless chunk_tokens is 0."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens > 0 and chunkable(head):
        assert isinstance(head, nn.Linear)
        return chunked_logprob_entropy(hidden, head.weight, targets, temperature, chunk_tokens)
    return plain_logprob_entropy(hidden, head, targets, temperature)
