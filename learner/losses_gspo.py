"""GSPO (Group Sequence Policy Optimization, Zheng et al. 2025): the importance ratio and its clip act per sequence.

For response i with tokens t, the sequence ratio is the geometric mean of the token ratios,
``s_i = exp((1/|o_i|) Σ_t (log π_θ(t) − log π_old(t)))``, and the surrogate is
``−min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i)``, averaged over the step's sequences. Written in the paper's
GSPO-token form, ``s_{i,t} = sg[s_i] · π_θ(t) / sg[π_θ(t)]``: the value of every token's ratio is ``s_i``, and the
gradient of sequence i is its token gradients averaged, which is exactly GSPO's. Truncated importance weights
(``correction="tis"``) multiply each token's term. The paper clips far tighter than DAPO (ε about 3e-4 to 4e-4):
set ``learner.eps_low`` / ``eps_high`` accordingly.

Registered as ``gspo`` in ``services.extensions.LOSSES``; the worked example of docs/EXTENDING.md.
"""

from __future__ import annotations

import torch

from learner.losses import LOG_RATIO_CLAMP, Loss, LossInputs, LossTerms, k3_kl


class GspoLoss(Loss):
    """Sequence-level clipped surrogate, per-sequence token-mean, sequence-mean over the step."""

    normalisation = "sequence"

    def terms(self, inputs: LossInputs) -> LossTerms:
        """The summed per-sequence losses of one micro-batch, and the statistics (ratios are the sequences')."""
        c = self.cfg
        logp = inputs.logp.to(torch.promote_types(inputs.logp.dtype, torch.float32))
        old = inputs.old_logp.detach().to(logp.dtype)
        m = inputs.mask.bool()
        lengths = m.sum(dim=1).clamp(min=1).to(logp.dtype)
        token_log_ratio = torch.where(m, logp - old, torch.zeros_like(logp))
        seq_log_ratio = (token_log_ratio.sum(dim=1) / lengths).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        # GSPO-token: the value of every token's ratio is s_i, its gradient that of the token's own log-prob
        ratio = torch.exp(seq_log_ratio.detach()).unsqueeze(1) * torch.exp(logp - logp.detach())
        adv = inputs.advantages.detach().to(logp.dtype).unsqueeze(1)
        clipped = torch.clamp(ratio, 1.0 - c.eps_low, 1.0 + c.eps_high)
        token_loss = -torch.minimum(ratio * adv, clipped * adv)
        weights = torch.ones_like(logp) if inputs.is_weights is None else inputs.is_weights.detach().to(logp.dtype)
        token_loss = token_loss * weights
        kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
        if inputs.ref_logp is not None:
            kl = torch.where(m, k3_kl(logp, inputs.ref_logp.detach()), torch.zeros_like(logp))
            token_loss = token_loss + c.kl_beta * kl
            kl_sum = kl.detach().sum()
        token_loss = torch.where(m, token_loss, torch.zeros_like(token_loss))
        loss_sum = (token_loss.sum(dim=1) / lengths).sum()
        return _statistics(loss_sum, ratio.detach(), weights, adv, m, c.eps_low, c.eps_high, kl_sum)


def _statistics(
    loss_sum: torch.Tensor,
    ratio: torch.Tensor,
    weights: torch.Tensor,
    adv: torch.Tensor,
    m: torch.Tensor,
    eps_low: float,
    eps_high: float,
    kl_sum: torch.Tensor,
) -> LossTerms:
    """Token-level counts of the sequence ratios, in the layout every loss reports."""
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    with torch.no_grad():
        return LossTerms(
            loss_sum=loss_sum,
            token_count=m.sum().to(ratio.dtype),
            sequence_count=m.any(dim=1).sum().to(ratio.dtype),
            clip_low_count=(m & (ratio < 1.0 - eps_low) & (adv < 0)).sum().to(ratio.dtype),
            clip_high_count=(m & (ratio > 1.0 + eps_high) & (adv > 0)).sum().to(ratio.dtype),
            ratio_sum=torch.where(m, ratio, zero).sum(),
            ratio_max=torch.where(m, ratio, zero).max() if ratio.numel() else zero,
            is_weight_sum=torch.where(m, weights, zero).sum(),
            is_weight_max=torch.where(m, weights, zero).max() if weights.numel() else zero,
            kl_sum=kl_sum,
        )
