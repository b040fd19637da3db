"""The policy's forward over a packed micro-batch: decoder, hidden states at the predicting positions, the head.

``PolicyScorer`` is the root module the train step calls: ``scorer(inputs, temperature)`` runs the decoder body on
the rows of a micro-batch (learner/packing.py: shared-prefix segments under the tree mask, or plain padded
sequences), keeps only the hidden states that predict response tokens, and sends those through the log-prob and
entropy head (learner/head.py) — the full-vocabulary projection never sees a prompt position. It returns [B, T]
left-aligned log-probs and entropies that line up with the behaviour log-probs as recorded.

Under FSDP2 the scorer is the root unit, so its forward is what unshards the parameters the decoder layers do not
own: embeddings, final norm and the output layer (``apply_fsdp``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from learner.head import chunkable, response_logprobs
from learner.losses import decoder_and_head
from learner.packing import TREE_MASK_IMPLEMENTATIONS, ModelInputs, attention_for

DEFAULT_ATTENTION = "sdpa"


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation a transformers model runs with (sdpa when it does not say)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None) if config is not None else None
    return str(name or DEFAULT_ATTENTION)


def check_tree_mask_support(model: nn.Module) -> None:
    """Raise ValueError unless the model's attention takes the shared-prefix 4-D mask."""
    name = attention_implementation(model)
    if name not in TREE_MASK_IMPLEMENTATIONS:
        raise ValueError(
            f"learner.shared_prefix needs an attention implementation that takes a 4-D mask "
            f"({', '.join(TREE_MASK_IMPLEMENTATIONS)}); the model runs {name!r}: load it with sdpa, or set "
            "learner.shared_prefix=false"
        )


def score_packed(model: nn.Module, inputs: ModelInputs, temperature: float, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """Return (log-probs, entropies) [B, T] of the response tokens of one packed micro-batch (0 past each response).

    Logits are divided by the sampling temperature, so the log-probs are those of the distribution sampled from.
    Entropies carry no gradient through the plain head; through the chunked head they do (unused by the losses).
    """
    decoder, head = decoder_and_head(model)
    dtype = next(iter(decoder.parameters())).dtype
    mask = attention_for(inputs, attention_implementation(model), dtype)
    out = decoder(input_ids=inputs.input_ids, attention_mask=mask, position_ids=inputs.position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    selected = hidden[inputs.predictor_rows, inputs.predictor_cols]  # [N, H]: only these reach the vocabulary
    token_logp, token_entropy = response_logprobs(selected, head, inputs.targets, temperature, chunk_tokens)
    slots = (inputs.slot_rows, inputs.slot_cols)
    logp = token_logp.new_zeros(inputs.shape).index_put(slots, token_logp)
    entropy = token_entropy.new_zeros(inputs.shape).index_put(slots, token_entropy)
    return logp, entropy


class PolicyScorer(nn.Module):
    """Root module around the policy whose forward is ``score_packed``: under FSDP2 its forward is what unshards
    the parameters it reaches outside the decoder layers (embeddings, final norm, the output layer), since it calls
    the decoder body and the output weight separately, never ``model.forward``."""

    def __init__(self, policy: nn.Module, autocast_dtype: torch.dtype | None = None, chunk_tokens: int = 0) -> None:
        super().__init__()
        self.policy = policy
        self.autocast_dtype = autocast_dtype
        """Compute dtype of the forward when the parameters stay float32 (bf16 training on one CUDA device)."""
        self.chunk_tokens = chunk_tokens
        """Rows per chunk of the log-prob head (learner.head_chunk_tokens); 0: all logits at once."""

    def forward(self, inputs: ModelInputs, temperature: float) -> tuple[Tensor, Tensor]:
        """Return (log-probs, entropies) [B, T] of the micro-batch's response tokens, as ``score_packed``."""
        if self.autocast_dtype is None:
            return score_packed(self.policy, inputs, temperature, self.chunk_tokens)
        with torch.autocast(inputs.input_ids.device.type, dtype=self.autocast_dtype):
            return score_packed(self.policy, inputs, temperature, self.chunk_tokens)


def apply_fsdp(scorer: PolicyScorer, mixed_precision: bool = True, param_dtype: torch.dtype = torch.bfloat16) -> None:
    """Shard the policy in place with FSDP2: one unit per decoder layer, the decoder body as its own unit when the
    output layer is not tied, and the scorer as the root unit. The root holds the output layer: the chunked head
    multiplies by its weight directly, outside the layer's own forward (where a unit of its own would unshard), and
    with tied embeddings the shared matrix must stay in one unit anyway. Runs on NCCL ranks, and on gloo for tests."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = scorer.policy
    kwargs: dict[str, Any] = {}
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
        if not (scorer.chunk_tokens > 0 and chunkable(head)):
            fully_shard(head, **kwargs)  # the plain head calls the layer, so it may be a unit of its own
        fully_shard(decoder, **kwargs)
    fully_shard(scorer, **kwargs)
    # Each rank's loss is already divided by the step's global denominator: gradients must be summed, not averaged.
    # A divide factor makes fp32/bf16 reductions PREMUL_SUM, which gloo lacks: there, plain SUM (then a x1 scale).
    plain_sum = torch.distributed.get_backend() == "gloo"
    for module in scorer.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(plain_sum)
