"""Benchmark the math verifier: per-item latency of MathVerifier calls on realistic responses.

Run: .venv/bin/python bench/bench_math_verifier.py [--items 200] [--workers 2]
Writes bench/results/verifier_math.json: p50/p99 latency of one blocking verify (extraction in the caller, the
math-verify comparison in a warm worker), and the throughput of concurrent submission on the same pool.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from concurrent.futures import wait

from _common import write_result

from reward_service.verifiers.base import Status
from reward_service.verifiers.math import MathVerifier

FILLER = "Let me work through this step by step. First we simplify the expression and check each case. "


def realistic_items(count: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """(response, gold, expected correct) triples: boxed integers, fractions vs decimals, LaTeX; about half right."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        kind = index % 4
        right = rng.random() < 0.5
        if kind == 0:
            value = rng.randint(-500, 5000)
            answer, gold = str(value if right else value + rng.randint(1, 9)), str(value)
        elif kind == 1:
            num, den = rng.randint(1, 9), rng.choice([2, 4, 5, 8])
            answer, gold = f"\\frac{{{num}}}{{{den}}}", str(num / den if right else num / den + 0.25)
        elif kind == 2:
            root = rng.choice([2, 3, 5, 7])
            answer, gold = f"{rng.randint(2, 5)}\\sqrt{{{root}}}", ""
            gold = answer if right else f"\\sqrt{{{root + 8}}}"
        else:
            low, high = sorted(rng.sample(range(-9, 10), 2))
            answer = f"[{low}, {high})"
            gold = answer if right else f"({low}, {high}]"
        response = FILLER * rng.randint(2, 30) + f"So the final answer is $\\boxed{{{answer}}}$."
        items.append((response, gold, right))
    return items


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def main() -> None:
    """Measure sequential latency and concurrent throughput, then write the result file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    items = realistic_items(args.items)
    started = time.perf_counter()
    with MathVerifier(num_workers=args.workers) as verifier:
        if not verifier.wait_ready(120):
            raise SystemExit("math workers did not warm up within 120 s")
        warm_up_s = time.perf_counter() - started
        latencies_ms, mismatches = [], 0
        for response, gold, right in items:
            start = time.perf_counter()
            result = verifier.verify(response, gold)
            latencies_ms.append((time.perf_counter() - start) * 1e3)
            mismatches += (result.status is Status.CORRECT) != right
        start = time.perf_counter()
        futures = [verifier.submit(response, gold) for response, gold, _ in items]
        wait(futures)
        concurrent_s = time.perf_counter() - start
    latencies_ms.sort()
    figures = {
        "items": len(items),
        "workers": args.workers,
        "warm_up_s": round(warm_up_s, 3),
        "latency_p50_ms": round(percentile(latencies_ms, 0.50), 3),
        "latency_p99_ms": round(percentile(latencies_ms, 0.99), 3),
        "latency_mean_ms": round(statistics.fmean(latencies_ms), 3),
        "latency_max_ms": round(latencies_ms[-1], 3),
        "concurrent_items_per_s": round(len(items) / concurrent_s, 1),
        "unexpected_verdicts": mismatches,
    }
    path = write_result("verifier_math", figures)
    print(figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
