"""Benchmark the DiPO core: PSD fit time on a full window and reallocate() throughput.

Run: .venv/bin/python bench/bench_dipo.py [--window 16384] [--runs 50]
Writes bench/results/dipo.json. Target (DIPO_SPEC.md §3): fit a 16,384-item window in well under 10 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import write_result

from reward_service.dipo import fit_threshold, group_has_signal, reallocate

FIT_TARGET_MS = 10.0


def synthetic_window(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (ppl, correct) where low perplexity tends to be correct, like a model's real window."""
    ppl = rng.lognormal(mean=0.3, sigma=0.4, size=size)
    p_correct = 1.0 / (1.0 + np.exp(4.0 * (ppl - np.median(ppl))))
    return ppl, rng.random(size) < p_correct


def time_fit(ppl: np.ndarray, correct: np.ndarray, runs: int) -> dict[str, float]:
    """Return fit_threshold timings in milliseconds over `runs` calls (after one warm-up call)."""
    fit_threshold(ppl, correct)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fit_threshold(ppl, correct)
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "min_ms": samples[0],
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
    }


def time_reallocate(ppl: np.ndarray, correct: np.ndarray, group_size: int, groups: int) -> dict[str, float]:
    """Return reallocate() + group_has_signal() throughput on groups cut from the window."""
    fit = fit_threshold(ppl, correct)
    cut = groups * group_size
    p_groups = ppl[:cut].reshape(groups, group_size).copy()
    c_groups = correct[:cut].reshape(groups, group_size).copy()
    # Make a third of the groups hard (confidently wrong, below τ*) and a third easy, so every branch of reallocate()
    # is exercised.
    c_groups[0::3] = False
    p_groups[0::3] = np.minimum(p_groups[0::3], 0.99 * fit.tau)
    c_groups[1::3] = True
    r_groups = c_groups.astype(np.float64)
    actions: dict[str, int] = {"none": 0, "reward": 0, "penalty": 0}
    start = time.perf_counter()
    for p, c, r in zip(p_groups, c_groups, r_groups, strict=True):
        out = reallocate(p, c, r, fit)
        group_has_signal(r, out)
        actions[out.action] += 1
    elapsed = time.perf_counter() - start
    return {
        "groups": groups,
        "group_size": group_size,
        "groups_per_s": groups / elapsed,
        "us_per_group": elapsed / groups * 1e6,
        "gate_open": float(fit.gate_open),
        **{f"actions_{k}": float(v) for k, v in actions.items()},
    }


def main() -> None:
    """Run both measurements, print them and write bench/results/dipo.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=16_384, help="PPL window size (items)")
    parser.add_argument("--runs", type=int, default=50, help="timed fit_threshold calls")
    parser.add_argument("--group-size", type=int, default=8, help="responses per group for reallocate()")
    parser.add_argument("--groups", type=int, default=2_000, help="groups timed for reallocate()")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    ppl, correct = synthetic_window(args.window, rng)
    fit = fit_threshold(ppl, correct)
    fit_times = time_fit(ppl, correct, args.runs)
    realloc = time_reallocate(ppl, correct, args.group_size, min(args.groups, args.window // args.group_size))
    figures = {
        "window": args.window,
        "runs": args.runs,
        "fit": {**fit_times, "target_ms": FIT_TARGET_MS, "meets_target": fit_times["median_ms"] < FIT_TARGET_MS},
        "fit_result": {"tau": fit.tau, "error_rate": fit.error_rate, "gate_open": fit.gate_open},
        "reallocate": realloc,
    }
    path = write_result("dipo", figures)
    print(f"fit_threshold on {args.window} items: median {fit_times['median_ms']:.3f} ms (target < {FIT_TARGET_MS} ms)")
    print(f"reallocate: {realloc['groups_per_s']:.0f} groups/s ({realloc['us_per_group']:.1f} µs per group)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
