"""Benchmark the reward service end to end through Redis: groups of 16 math responses scored per second.

Run: .venv/bin/python bench/bench_reward.py [--groups 150]
Starts a private redis-server, preloads ``rollouts`` with realistic groups (16 responses of ~256 tokens, boxed
answers, a mix of right and wrong), then starts 1 and then 2 reward replicas as processes
(``python -m reward_service``, one verifier worker each) and measures from the first scored group to the last.
Writes bench/results/reward.json.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from _common import write_result

from runner.redis_server import LocalRedis
from services.contracts import ROLLOUTS, SCORED
from services.protocol import PromptTask, Response, RolloutGroup, Sampling
from services.streams import StreamClient, StreamSpec, connect

REPO = Path(__file__).resolve().parents[1]


def make_group(i: int, rng: np.random.Generator, n: int = 16, tokens: int = 256) -> RolloutGroup:
    """A math group: gold a+b, responses boxing the right or a wrong sum, with plausible log-probs."""
    a, b = int(rng.integers(0, 100)), int(rng.integers(0, 100))
    task = PromptTask(f"bench-{i}", "math", [{"role": "user", "content": f"{a}+{b}?"}], str(a + b), n,
                      Sampling(max_new_tokens=512))  # fmt: skip
    responses = []
    for _ in range(n):
        answer = a + b if rng.random() < 0.5 else a + b + int(rng.integers(1, 9))
        text = f"Adding {a} and {b} step by step gives " + "so " * 40 + f"\\boxed{{{answer}}}"
        ids = rng.integers(0, 49_000, tokens).astype(np.uint32)
        logprobs = (-rng.exponential(0.5, tokens)).astype(np.float32)
        responses.append(Response.of_version(ids, logprobs, text, "stop", 0))
    return RolloutGroup(task, np.arange(64, dtype=np.uint32), responses, "bench", time.time(), 1.0)


async def run_case(url: str, run: str, replicas: int, groups: int, workdir: Path) -> dict[str, float]:
    """Preload ``groups`` groups, start ``replicas`` reward processes, time until all are scored."""
    redis = connect(url)
    rollouts = StreamClient(redis, StreamSpec(run, ROLLOUTS), "reward", "bench")
    await rollouts.ensure_group()
    rng = np.random.default_rng(0)
    await rollouts.produce_many([make_group(i, rng).to_bytes() for i in range(groups)])
    config = workdir / f"{run}.yaml"
    config.write_text(yaml.safe_dump({
        "name": run, "redis": {"url": url}, "sampling": {"n": 16},
        "reward": {"verifier_workers": 1}, "streams": {"read_count": 16},
    }))  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "reward_service", "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / f"{run}-{k}.log").open("wb"),
        )  # fmt: skip
        for k in range(replicas)
    ]
    scored_key = str(StreamSpec(run, SCORED))
    try:
        while await redis.xlen(scored_key) == 0:
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        while (done := await redis.xlen(scored_key)) < groups:
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - start
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        await redis.aclose()
    return {"groups": groups, "seconds": round(seconds, 3), "groups_per_s": round((done - 1) / seconds, 2),
            "responses_per_s": round(16 * (done - 1) / seconds, 1)}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=150)
    args = parser.parse_args()
    figures: dict[str, object] = {"responses_per_group": 16, "tokens_per_response": 256}
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as server:
        for replicas in (1, 2):
            figures[f"replicas_{replicas}"] = await run_case(server.url, f"bench{replicas}", replicas, args.groups,
                                                             Path(tmp))  # fmt: skip
            print(f"{replicas} replica(s): {figures[f'replicas_{replicas}']}")
    print(write_result("reward", figures))


if __name__ == "__main__":
    asyncio.run(main())
