"""torchrun entry point of test_train_distributed: one train step of a tiny Llama on every rank (gloo).

Rank 0 builds the batch and broadcasts it with ``broadcast_bytes`` as the learner loop does; after the step rank 0
writes the (full) parameters to ``OUT/params.safetensors`` and the metrics to ``OUT/metrics.json``.
The test imports ``build_model``/``build_samples``/``build_cfg`` to compute the single-rank result in-process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import Sample, decode_samples, encode_samples
from learner.distributed import barrier, broadcast_bytes, cleanup, init_distributed
from learner.train import Trainer
from services.config import RunConfig

VOCAB = 64


def build_cfg(loss: str = "dapo", minibatches: int = 1, epochs: int = 1, checkpointing: bool = False) -> RunConfig:
    """The run config of the step: a large lr so that a wrong gradient sum shows, tiny micro-batches (groups
    longer than 64 tokens are split), and with `minibatches` x `epochs` > 1 several updates per step."""
    learner = {"lr": 1e-3, "loss": loss, "micro_batch_tokens": 64, "minibatches": minibatches, "epochs": epochs}
    learner["gradient_checkpointing"] = checkpointing
    return RunConfig.model_validate({"learner": learner, "sampling": {"max_new_tokens": 16}})


def build_model(tied: bool = True) -> LlamaForCausalLM:
    """A 2-layer Llama in float64 (ranks and the reference then agree far below 1e-6), tied embeddings unless
    asked otherwise (untied: FSDP2 keeps the output layer in the root unit for the chunked head)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(torch.float64)


GROUP_SIZES = (4, 3, 1, 3)
"""Responses per group (a group shares its prompt and group id, so the shared-prefix layout packs it)."""


def build_samples(count: int = 11) -> list[Sample]:
    """The first `count` samples of groups of uneven sizes and lengths (11 by default: the shards differ), the
    fourth one untrainable (the overlong filter's mark)."""
    rng = np.random.default_rng(0)
    samples = []
    for g, size in enumerate(GROUP_SIZES):
        prompt = rng.integers(0, VOCAB, int(rng.integers(4, 20))).astype(np.uint32)
        for _ in range(size):
            response = rng.integers(0, VOCAB, int(rng.integers(2, 16))).astype(np.uint32)
            behaviour = rng.uniform(-5.0, -3.0, len(response)).astype(np.float32)
            advantage = float(rng.normal())
            trainable = len(samples) != 3
            samples.append(Sample(f"g{g}", prompt, response, behaviour, advantage, 1.0, 0, trainable=trainable))
    return samples[:count]


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full, contiguous CPU copies of the parameters (gathered from the shards under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = value.detach().cpu().contiguous().clone()
    return out


def main() -> None:
    """Train one step on every rank and save rank 0's parameters and metrics."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--loss", default="dapo")
    parser.add_argument("--samples", type=int, default=11, help="batch size (1: rank 1 has nothing to train on)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (on gloo) instead of replicating")
    parser.add_argument("--minibatches", type=int, default=1, help="PPO mini-batches per step")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the mini-batches")
    parser.add_argument("--untied", action="store_true", help="an output layer of its own")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = build_cfg(args.loss, args.minibatches, args.epochs, args.gradient_checkpointing)
    dist = init_distributed(cfg, timeout_s=60.0)
    try:
        payload = broadcast_bytes(encode_samples(build_samples(args.samples)) if dist.rank == 0 else None)
        trainer = Trainer(cfg, build_model(tied=not args.untied), dist, use_fsdp=args.fsdp)
        metrics = trainer.train_step(decode_samples(payload))
        params = full_parameters(trainer.model)
        if dist.rank == 0:
            out = Path(args.out)
            save_file(params, str(out / "params.safetensors"))
            (out / "metrics.json").write_text(json.dumps({**metrics, "world_size": dist.world_size}))
        barrier()
    finally:
        cleanup()


if __name__ == "__main__":
    main()
