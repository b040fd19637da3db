"""Entry point of test_checkpoint_sharded: train a tiny Llama a few AdamW steps and checkpoint after each one.

Under torchrun (gloo ranks) the model is sharded with FSDP2 and every rank calls ``save_checkpoint_sharded``; as a
plain process it is the unsharded reference and writes ``save_checkpoint``. Every rank trains on the same batch, so
the gradients FSDP averages over the ranks are the reference's. ``--resume`` continues from the newest checkpoint
the way the learner does: full weights into the unsharded model, then sharding, then the optimizer, scheduler and
RNG states.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from learner.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_checkpoint_sharded,
)

VOCAB = 64


def tiny_model() -> LlamaForCausalLM:
    """The same random tiny Llama in every process (tied embeddings, like the default model)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    """The batch of `step`, the same on every rank."""
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1000 + step))


def main() -> None:
    """Train steps --first..--last, checkpointing after each."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--last", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        dist.init_process_group("gloo")
    model = tiny_model()
    latest = latest_checkpoint(args.root) if args.resume else None
    if latest is not None:
        load_weights(latest, model)  # full weights go in before FSDP shards them
    if ranks > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=3)
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer, scheduler, weights=False, sharded=ranks > 1)
        assert state["step"] == args.first - 1, state
    for step in range(args.first, args.last + 1):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ranks > 1:
            save_checkpoint_sharded(args.root, step, model, optimizer, scheduler, {"version": step}, keep=5,
                                    gather_weights=True)  # fmt: skip
        else:
            save_checkpoint(args.root, step, model, optimizer, scheduler, {"version": step}, keep=5)
    if ranks > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
