"""Benchmark weight sync: broadcast SmolLM2-135M-shaped float32 weights (~538 MB) to one receiver over gloo/loopback.

Run: .venv/bin/python bench/bench_weight_sync.py [--rounds 3] [--bucket-mib 64]
Writes bench/results/weight_sync.json. The receiver is a subprocess running this file with `receive`; it acknowledges
on receipt and verified checksums (the learner's round ends there) and then copies each version into its own model
tensors, as a rollout server's swap would. The baseline, measured in the same run, is copying the same tensors into a
second model in memory (`round_over_memcpy`).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from _common import write_result

from learner.weight_sync import WeightBroadcaster
from rollout_server.weight_receiver import WeightReceiver
from services.modeling.weight_sync import (
    SUM64_ROW,
    broadcast,
    checksum,
    expected_from_named,
    new_group,
    release_group,
    wait_work,
)

# SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 query / 3 key-value heads of 64, vocab 49152, tied.
LAYERS, HIDDEN, INTERMEDIATE, KV, VOCAB = 30, 576, 1536, 192, 49152


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of SmolLM2-135M (lm_head is tied to the embedding, so it is not sent)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def receiver_main(endpoint: str, rounds: int) -> None:
    """Receive `rounds` versions into a zero-initialised model, then exit."""
    torch.set_num_threads(1)
    model = {name: torch.zeros(shape) for name, shape in smollm2_shapes().items()}

    secret = os.environ["DIPO_BENCH_SYNC_SECRET"]
    receiver = WeightReceiver(endpoint, "bench", expected_from_named(model.items()), secret=secret, timeout_s=120)
    receiver.join()
    applied = 0
    while applied < rounds:
        delivery = receiver.receive(wait_s=120)
        if delivery is not None:
            for name, tensor in delivery.named:  # the swap, after the learner's round already ended
                model[name].copy_(tensor)
            applied += 1
    receiver.close()


def checksum_speed(nbytes: int) -> dict[str, float]:
    """GB/s of both checksums on one CPU bucket (the receiver and the sender each pay crc32 once per byte)."""
    buf = torch.randint(0, 256, (nbytes // SUM64_ROW * SUM64_ROW,), dtype=torch.uint8)
    out = {}
    for algo in ("xxh3", "crc32", "sum64"):
        start = time.perf_counter()
        checksum(buf, algo)
        out[f"{algo}_cpu_gb_per_s"] = buf.numel() / (time.perf_counter() - start) / 1e9
    return out


def memcpy_seconds(weights: dict[str, torch.Tensor], rounds: int) -> list[float]:
    """Seconds of copying every tensor into a second model in memory (the baseline a broadcast is held to)."""
    model = {name: torch.empty_like(t) for name, t in weights.items()}
    for target, t in zip(model.values(), weights.values(), strict=True):
        target.copy_(t)  # first touch
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for target, t in zip(model.values(), weights.values(), strict=True):
            target.copy_(t)
        seconds.append(time.perf_counter() - start)
    return seconds


def raw_gloo_main(endpoint: str, rank: int, nbytes: int, bucket_mib: int, rounds: int) -> list[float]:
    """The transport's floor: the same bytes as plain gloo broadcasts of preallocated buffers, every bucket posted at
    once, no packing, checksums or rendezvous (rank 0 sends and returns its round times)."""
    host, port = endpoint.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), 2, rank == 0, timeout=timedelta(seconds=120))
    group = new_group("gloo", store, rank, 2, 120.0, torch.device("cpu"), "127.0.0.1")
    step = bucket_mib << 20
    buffers = [torch.ones(min(step, nbytes - i), dtype=torch.uint8) for i in range(0, nbytes, step)]
    seconds = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        for work in [broadcast(group, buf, 120.0) for buf in buffers]:
            wait_work(work, 120.0)
        seconds.append(time.perf_counter() - start)
    release_group(group, False)
    return seconds[1:]


def raw_gloo_seconds(nbytes: int, bucket_mib: int, rounds: int) -> list[float]:
    """``raw_gloo_main`` between this process and a subprocess."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, __file__, "raw", endpoint, str(nbytes), str(bucket_mib), str(rounds)]
    proc = subprocess.Popen(args, env=env)
    try:
        return raw_gloo_main(endpoint, 0, nbytes, bucket_mib, rounds)
    finally:
        proc.wait(timeout=120)


def broadcast_seconds(weights: dict[str, torch.Tensor], rounds: int, bucket_mib: int) -> list[float]:
    """Seconds of each of `rounds` broadcasts to one receiver subprocess, after one untimed warm-up round."""
    learner = WeightBroadcaster(timeout_s=120, bucket_bytes=bucket_mib << 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIPO_BENCH_SYNC_SECRET": learner.secret}
    proc = subprocess.Popen([sys.executable, __file__, "receive", learner.endpoint, str(rounds + 1)], env=env)
    try:
        if learner.wait_for_receivers(1, 120) != 1:
            raise RuntimeError("the receiver process did not register within 120 s")
        seconds = []
        for version in range(rounds + 1):
            report = learner.broadcast(weights.items(), version)
            if len(report.receivers) != 1:
                raise RuntimeError(f"round {version} failed: {report.dropped}")
            if version > 0:  # version 0 warms up: first-touch page faults of the receiver's staging buffers
                seconds.append(report.seconds)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        learner.close()
    return seconds


def main() -> None:
    """Time `rounds` broadcasts after one warm-up round and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bucket-mib", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=gen) for name, shape in smollm2_shapes().items()}
    total = sum(t.nbytes for t in weights.values())
    copy_median = statistics.median(memcpy_seconds(weights, args.rounds))
    raw_median = statistics.median(raw_gloo_seconds(total, args.bucket_mib, args.rounds))
    seconds = broadcast_seconds(weights, args.rounds, args.bucket_mib)
    median = statistics.median(seconds)
    figures = {
        "params": sum(t.numel() for t in weights.values()),
        "bytes": total,
        "bucket_mib": args.bucket_mib,
        "receivers": 1,
        "backend": "gloo (loopback)",
        "rounds": args.rounds,
        "round_seconds_median": median,
        "round_seconds_min": min(seconds),
        "gb_per_s_median": total / median / 1e9,
        "memcpy_seconds_median": copy_median,
        "round_over_memcpy": median / copy_median,
        "raw_gloo_seconds_median": raw_median,
        "raw_gloo_over_memcpy": raw_median / copy_median,
        "round_over_raw_gloo": median / raw_median,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        **checksum_speed(args.bucket_mib << 20),
    }
    path = write_result("weight_sync", figures)
    print(
        f"{total / 1e6:.0f} MB in {median:.3f} s (median of {args.rounds}): {total / median / 1e9:.2f} GB/s, "
        f"{median / copy_median:.2f} x an in-memory copy ({copy_median:.3f} s); bare gloo {raw_median:.3f} s "
        f"({raw_median / copy_median:.2f} x) -> {path}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["receive"]:
        receiver_main(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["raw"]:
        raw_gloo_main(sys.argv[2], 1, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
