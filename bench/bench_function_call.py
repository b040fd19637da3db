"""Benchmark the function-call verifier: per-call latency of verify_function_call on real BFCL v4 items.

Run: .venv/bin/python bench/bench_function_call.py [--items 30] [--rounds 20]
Writes bench/results/verifier_function_call.json: p50/p99 latency (microseconds) of one verify over responses built
from the ground truth in the three syntaxes (tool_call tags, bare JSON, Python calls), a wrong-name variant, prose,
with and without partial credit, and over hostile responses (64 KiB answers, deep nesting, huge numbers).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from _common import write_result

from reward_service.verifiers.function_call import verify_function_call
from services.bfcl import BfclItem, load_bfcl

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "irrelevance")


def _first(options: list[Any]) -> Any:
    return next(o for o in options if o != "")


def _pick(options: list[Any], schema: dict[str, Any]) -> Any:
    value = _first(options)
    if schema.get("type") == "dict" and isinstance(value, dict):
        return {k: _first(v) for k, v in value.items() if "" not in v}
    if schema.get("items", {}).get("type") == "dict" and isinstance(value, list):
        return [{k: _first(v) for k, v in element.items() if "" not in v} for element in value]
    return value


def ground_truth_calls(item: BfclItem) -> list[tuple[str, dict[str, Any]]] | None:
    """First acceptable value of every mandatory parameter; None for items BFCL's data makes unsolvable.

    No-call categories (ground truth ``[]``) get a call of their first function: the response to reject."""
    if not item.ground_truth:
        doc = item.functions[0]
        return [(doc["name"], {key: 1 for key in doc["parameters"].get("required", [])})]
    docs = {doc["name"]: doc for doc in item.functions}
    calls = []
    for entry in item.ground_truth:
        ((name, acceptable),) = entry.items()
        properties = docs[name]["parameters"]["properties"]
        try:
            arguments = {k: _pick(v, properties[k]) for k, v in acceptable.items() if "" not in v}
        except (KeyError, StopIteration):
            return None
        calls.append((name, arguments))
    return calls


def render(calls: list[tuple[str, dict[str, Any]]], syntax: str) -> str:
    """One response in the given syntax."""
    if syntax == "tool_call":
        return "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls)
    if syntax == "json":
        return json.dumps([{"name": n, "arguments": a} for n, a in calls])
    return "[" + ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for n, a in calls) + "]"


def workload(items_per_category: int) -> dict[str, list[tuple[BfclItem, str]]]:
    """Responses grouped by kind, each paired with its item."""
    groups: dict[str, list[tuple[BfclItem, str]]] = {
        "tool_call": [],
        "json": [],
        "python": [],
        "wrong": [],
        "prose": [],
    }
    for category in CATEGORIES:
        for item in load_bfcl(category, limit=items_per_category):
            calls = ground_truth_calls(item)
            if calls is None:
                continue
            for syntax in ("tool_call", "json", "python"):
                groups[syntax].append((item, render(calls, syntax)))
            groups["wrong"].append((item, render([(calls[0][0] + "_x", calls[0][1]), *calls[1:]], "python")))
            groups["prose"].append((item, "I am not able to help with that using the tools I have. " * 20))
    item = groups["python"][0][0]
    groups["hostile"] = [
        (item, "f(a='" + "x" * (64 * 1024 - 10) + "')"),
        (item, "f(a=" + "[" * 20_000 + "]" * 20_000 + ")"),
        (item, "f(a=" + "[" * 32 + "]" * 32 + ")"),
        (item, "[" + ", ".join(f"f(a={i}, b='v')" for i in range(64)) + "]"),
        (item, "f(a=" + "9" * 4000 + ")"),
        (item, "f(a=2**10**10)"),
        (item, "x" * 10_000_000),
    ]
    return groups


def measure(cases: list[tuple[BfclItem, str]], rounds: int, partial_credit: bool) -> list[float]:
    """Latency in microseconds of every verify call, all rounds pooled, ascending."""
    clock: Callable[[], float] = time.perf_counter
    samples = []
    for _ in range(rounds):
        for item, response in cases:
            start = clock()
            verify_function_call(
                response, item.functions, item.ground_truth, item.category, partial_credit=partial_credit
            )
            samples.append((clock() - start) * 1e6)
    return sorted(samples)


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def main() -> None:
    """Measure every response kind with and without partial credit, then write the result file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=30, help="items per BFCL category")
    parser.add_argument("--rounds", type=int, default=20, help="passes over the workload")
    args = parser.parse_args()
    groups = workload(args.items)
    figures: dict[str, Any] = {"items_per_category": args.items, "rounds": args.rounds, "categories": CATEGORIES}
    pooled: list[float] = []
    for kind, cases in groups.items():
        rounds = max(1, args.rounds // 10) if kind == "hostile" else args.rounds
        for partial in (False, True):
            samples = measure(cases, rounds, partial)
            if kind != "hostile":
                pooled.extend(samples)
            label = f"{kind}_partial" if partial else kind
            figures[label] = {
                "responses": len(cases),
                "p50_us": round(percentile(samples, 0.5), 1),
                "p99_us": round(percentile(samples, 0.99), 1),
                "max_us": round(samples[-1], 1),
            }
    pooled.sort()
    figures["all_non_hostile"] = {
        "calls": len(pooled),
        "p50_us": round(percentile(pooled, 0.5), 1),
        "p99_us": round(percentile(pooled, 0.99), 1),
    }
    path = write_result("verifier_function_call", figures)
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
