#!/usr/bin/env python3
"""``dipo-entrypoint gpu-layout``: check a Compose GPU layout against the host before the learner and rollout start.

NCCL weight sync needs the learner and every rollout server on GPUs of their own, and the learner's torchrun needs
one GPU per rank. The layout comes from the environment the Compose files set (LEARNER_GPUS, ROLLOUT_GPUS: comma
lists of the host's GPU indices; NPROC: the learner's ranks); the host's GPUs from ``nvidia-smi`` (the gpu-layout
service reserves all of them to see them). Exits 0 and prints the layout when it fits; exits 1 with the reason and
the way out otherwise. ``--cpu`` (the CPU override) only says there is nothing to check. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DOCS = "deploy/README.md#gpus-with-compose"


class LayoutError(ValueError):
    """The layout does not fit the host; the message says why and what to do."""


def host_gpus() -> list[int]:
    """Indices of the GPUs this container sees (all of the host's, with a `count: all` reservation)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LayoutError(f"cannot run nvidia-smi ({exc}): is the NVIDIA Container Toolkit set up?") from exc
    if done.returncode != 0:
        raise LayoutError(f"nvidia-smi failed ({done.stderr.strip() or done.returncode}): no usable NVIDIA GPU here")
    return sorted(int(line) for line in done.stdout.split() if line.strip())


def parse_gpus(name: str, value: str) -> list[int]:
    """A comma list of GPU indices from the environment variable `name`."""
    try:
        gpus = [int(item) for item in value.replace(" ", "").split(",") if item]
    except ValueError:
        raise LayoutError(f"{name}={value!r} is not a comma list of GPU indices (e.g. 0,1)") from None
    if not gpus or min(gpus) < 0:
        raise LayoutError(f"{name}={value!r} names no GPU")
    if len(set(gpus)) != len(gpus):
        raise LayoutError(f"{name}={value!r} names a GPU twice: each process needs GPUs of its own")
    return gpus


def check(learner: list[int], rollout: list[int], nproc: int, host: list[int]) -> str:
    """The layout as one line when it fits the host; LayoutError otherwise."""
    if len(host) < 2:
        raise LayoutError(
            f"this host has {len(host)} GPU(s), and the learner and a rollout server cannot share one: NCCL puts the "
            "weight broadcast's ranks on distinct GPUs. Run the CPU override (-f deploy/docker/compose.cpu.yaml), "
            f"or a host with at least 2 GPUs ({DOCS})"
        )
    shared = sorted(set(learner) & set(rollout))
    if shared:
        raise LayoutError(f"the learner and the rollout servers share GPU(s) {shared}: give each its own ({DOCS})")
    missing = sorted(set(learner + rollout) - set(host))
    if missing:
        raise LayoutError(
            f"the layout needs GPU(s) {missing}, and this host has {len(host)} (indices {host}): pick the layout of "
            f"deploy/docker/gpus/ for {len(host)} GPUs, or set LEARNER_GPU / ROLLOUT_GPU ({DOCS})"
        )
    if nproc != len(learner):
        raise LayoutError(
            f"NPROC={nproc} learner ranks but the learner reserves {len(learner)} GPU(s) ({learner}): torchrun needs "
            f"one GPU per rank; use a layout of deploy/docker/gpus/ that reserves {nproc}, or NPROC={len(learner)}"
        )
    idle = sorted(set(host) - set(learner) - set(rollout))
    note = f"; idle: {idle}" if idle else ""
    return (f"GPU layout: learner on GPU(s) {learner} ({nproc} rank(s)); rollout servers on GPU(s) {rollout} "
            f"(one each){note}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Check the layout of the environment against the host's GPUs."""
    parser = argparse.ArgumentParser(prog="dipo-entrypoint gpu-layout", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="A CPU run: nothing to lay out.")
    args = parser.parse_args(argv)
    if args.cpu:
        print("GPU layout: none (CPU run)")
        return 0
    try:
        learner = parse_gpus("LEARNER_GPUS", os.environ.get("LEARNER_GPUS", "0"))
        rollout = parse_gpus("ROLLOUT_GPUS", os.environ.get("ROLLOUT_GPUS", "1"))
        nproc_text = os.environ.get("NPROC", "1")
        if not nproc_text.isdigit() or int(nproc_text) < 1:
            raise LayoutError(f"NPROC={nproc_text!r} is not a positive number of learner ranks")
        print(check(learner, rollout, int(nproc_text), host_gpus()))
    except LayoutError as exc:
        print(f"gpu-layout: refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
