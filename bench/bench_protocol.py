"""Benchmark the stream codec: encode + decode of a 16 × 2048-token group on one core.

Run: .venv/bin/python bench/bench_protocol.py [--responses 16] [--tokens 2048] [--runs 200]
Writes bench/results/protocol.json. Target: >= 500 MB/s of packed payload for a full round trip (encode, then
decode, both with validation).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
from _common import write_result

from services.protocol import PromptTask, Response, RolloutGroup, Sampling, ScoredGroup

TARGET_MB_S = 500.0
CHARS_PER_TOKEN = 3  # the decoded text travels too; BPE averages about 3-4 characters per token


def make_rollout_group(responses: int, tokens: int, seed: int = 0, prompt_id: str = "bench-0") -> RolloutGroup:
    """A realistic full-length group: random token ids and log-probs, text of typical length."""
    rng = np.random.default_rng(seed)
    task = PromptTask(
        prompt_id=prompt_id,
        task_kind="math",
        messages=[{"role": "user", "content": "Compute 17 * 23 and put the answer in \\boxed{}. " * 4}],
        ground_truth="391",
        n=responses,
        sampling=Sampling(temperature=1.0, max_new_tokens=tokens),
        created_at=time.time(),
    )
    words = "the answer is therefore boxed step check ".split()
    return RolloutGroup(
        task=task,
        prompt_token_ids=rng.integers(0, 150_000, size=256, dtype=np.uint32),
        responses=[
            Response.of_version(
                token_ids=rng.integers(0, 150_000, size=tokens, dtype=np.uint32),
                logprobs=-rng.exponential(0.5, size=tokens).astype(np.float32),
                text=" ".join(rng.choice(words, size=tokens * CHARS_PER_TOKEN // 6)),
                finish_reason="length",
                version=7,
                weights="v7:0123456789abcdef",
            )
            for _ in range(responses)
        ],
        worker_id="rollout-0",
        generated_at=time.time(),
        gen_seconds=12.5,
    )


def make_scored_group(responses: int, tokens: int, seed: int = 0, prompt_id: str = "bench-0") -> ScoredGroup:
    """The rollout group plus scoring arrays, as the reward service emits it."""
    rollout = make_rollout_group(responses, tokens, seed, prompt_id)
    correct = (np.arange(responses) % 2).astype(np.uint8)
    return ScoredGroup(
        rollout=rollout,
        status=["correct" if c else "wrong" for c in correct],
        correct=correct,
        reward=correct.astype(np.float32),
        realloc_reward=np.zeros(responses, dtype=np.float32),
        perplexity=np.full(responses, 1.7, dtype=np.float32),
        group_kind="normal",
        action="none",
        tau=-math.inf,
        gate_open=False,
        fit_window=512,
        fit_at=time.time(),
        signal=True,
        scorer_id="reward-0",
        scored_at=time.time(),
    )


def time_round_trip(encode: Callable[[], bytes], decode: Callable[[bytes], object], runs: int) -> dict[str, float]:
    """Median encode, decode and round-trip throughput over `runs` after a warm-up."""
    data = encode()
    decode(data)
    enc, dec = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        data = encode()
        t1 = time.perf_counter()
        decode(data)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    e, d = statistics.median(enc), statistics.median(dec)
    mb = len(data) / 1e6
    return {
        "payload_bytes": len(data),
        "encode_us": e * 1e6,
        "decode_us": d * 1e6,
        "encode_mb_s": mb / e,
        "decode_mb_s": mb / d,
        "round_trip_mb_s": mb / (e + d),
    }


def main() -> None:
    """Measure RolloutGroup and ScoredGroup codecs, print and write bench/results/protocol.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    rollout = make_rollout_group(args.responses, args.tokens)
    scored = make_scored_group(args.responses, args.tokens)
    figures: dict[str, object] = {"responses": args.responses, "tokens": args.tokens, "runs": args.runs}
    for name, msg, decode in (
        ("rollout_group", rollout, RolloutGroup.from_bytes),
        ("scored_group", scored, ScoredGroup.from_bytes),
    ):
        result = time_round_trip(msg.to_bytes, decode, args.runs)
        result["meets_target"] = result["round_trip_mb_s"] >= TARGET_MB_S
        figures[name] = result
        print(
            f"{name}: {result['payload_bytes'] / 1e3:.0f} kB, encode {result['encode_us']:.0f} µs, "
            f"decode {result['decode_us']:.0f} µs, round trip {result['round_trip_mb_s']:.0f} MB/s "
            f"(target >= {TARGET_MB_S:.0f})"
        )
    figures["target_mb_s"] = TARGET_MB_S
    print(f"wrote {write_result('protocol', figures)}")


if __name__ == "__main__":
    main()
