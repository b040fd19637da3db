"""A learner stand-in that dies in the middle of a weight broadcast (run as a script by test_weight_faults.py).

It hosts a sync store, publishes its endpoint in the run's policy hash with ``status=running``, waits for the
receivers, and broadcasts the model's weights shifted by ``--seed`` as ``--version`` in small buckets; before
packing bucket ``--die-at`` it kills itself with SIGKILL, so the receivers get a truncated round.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from transformers import LlamaForCausalLM

from learner.weight_sync import WeightBroadcaster, redis_hash_publisher
from services.contracts import POLICY
from services.streams import connect_sync, run_key


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--redis", "--run", "--model"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--die-at", type=int, required=True)
    args = parser.parse_args(argv)
    model = LlamaForCausalLM.from_pretrained(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    named = [(k, (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous()) for k, v in model.named_parameters()]

    def die(bucket: int, _data: torch.Tensor) -> None:
        if bucket == args.die_at:
            print(f"dying before bucket {bucket}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    client = connect_sync(args.redis)
    key = run_key(args.run, POLICY)
    learner = WeightBroadcaster(timeout_s=20.0, bucket_bytes=256 << 10, publish=redis_hash_publisher(client, key),
                                tamper=die)  # fmt: skip
    client.hset(key, "status", "running")
    print("endpoint", learner.endpoint, flush=True)
    if learner.wait_for_receivers(args.receivers, 120) < args.receivers:
        sys.exit("receivers did not join")
    learner.broadcast(named, args.version)
    sys.exit("the broadcast finished: --die-at is past the last bucket")


if __name__ == "__main__":
    main(sys.argv[1:])
