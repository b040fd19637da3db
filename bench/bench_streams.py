"""Benchmark produce → consume → ack of full rollout groups through a private redis-server.

Run: .venv/bin/python bench/bench_streams.py [--groups 300] [--responses 16] [--tokens 2048]
One producer process encodes and XADDs groups; the consumer (this process) reads them through a consumer group,
decodes, validates and acknowledges. Writes bench/results/streams.json. Target: >= 200 groups/s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from multiprocessing.sharedctypes import Synchronized

from _common import write_result
from bench_protocol import make_rollout_group

from runner.redis_server import LocalRedis
from services.contracts import REWARD_GROUP, ROLLOUTS
from services.protocol import RolloutGroup
from services.streams import StreamClient, StreamSpec, connect

TARGET_GROUPS_S = 200.0
RUN = "bench"


async def _produce(url: str, groups: int, responses: int, tokens: int, started: Synchronized[float]) -> None:
    redis = connect(url)
    client = StreamClient(redis, StreamSpec(RUN, ROLLOUTS))
    template = make_rollout_group(responses, tokens)
    started.value = time.time()
    for i in range(groups):
        template.task.prompt_id = f"bench-{i}"  # a distinct message each time, encoded as a rollout server would
        await client.produce(template.to_bytes())
    await redis.aclose()


def produce(url: str, groups: int, responses: int, tokens: int, started: Synchronized[float]) -> None:
    """Producer process entry point."""
    asyncio.run(_produce(url, groups, responses, tokens, started))


async def consume(url: str, groups: int, batch: int) -> float:
    """Read, decode and ack until `groups` groups are done; return the time the last one was acknowledged."""
    redis = connect(url)
    client = StreamClient(redis, StreamSpec(RUN, ROLLOUTS), REWARD_GROUP, "consumer-0")
    done, seen = 0, set()
    while done < groups:
        got = await client.read_decoded(RolloutGroup.from_bytes, count=batch, block_ms=1000)
        seen.update(group.task.prompt_id for _, group in got)
        done += await client.ack([entry_id for entry_id, _ in got])
    finished = time.time()
    info = await client.info()
    if info.pending or len(seen) != groups or client.stats.dead_lettered:
        raise RuntimeError(f"lost or broken groups: {info}, {len(seen)} distinct, {client.stats}")
    await redis.aclose()
    return finished


def main() -> None:
    """Run one producer process against this consumer, print and write bench/results/streams.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--responses", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="entries per XREADGROUP")
    args = parser.parse_args()

    payload_bytes = len(make_rollout_group(args.responses, args.tokens).to_bytes())
    with LocalRedis() as server:  # AOF with appendfsync everysec, the default a deployment runs with
        asyncio.run(_ensure_group(server.url))
        ctx = mp.get_context("spawn")
        started = ctx.Value("d", 0.0)
        producer = ctx.Process(target=produce, args=(server.url, args.groups, args.responses, args.tokens, started))
        producer.start()
        finished = asyncio.run(consume(server.url, args.groups, args.batch))
        producer.join(60)
        if producer.exitcode != 0:
            raise RuntimeError(f"producer exited with {producer.exitcode}")
    elapsed = finished - started.value
    groups_s = args.groups / elapsed
    figures = {
        "groups": args.groups,
        "responses": args.responses,
        "tokens": args.tokens,
        "payload_bytes": payload_bytes,
        "seconds": elapsed,
        "groups_per_s": groups_s,
        "mb_per_s": groups_s * payload_bytes / 1e6,
        "target_groups_per_s": TARGET_GROUPS_S,
        "meets_target": groups_s >= TARGET_GROUPS_S,
        "appendfsync": "everysec",
    }
    print(
        f"{args.groups} groups of {payload_bytes / 1e3:.0f} kB in {elapsed:.2f} s: {groups_s:.0f} groups/s "
        f"({figures['mb_per_s']:.0f} MB/s; target >= {TARGET_GROUPS_S:.0f} groups/s)"
    )
    print(f"wrote {write_result('streams', figures)}")


async def _ensure_group(url: str) -> None:
    redis = connect(url)
    await StreamClient(redis, StreamSpec(RUN, ROLLOUTS), REWARD_GROUP, "setup").ensure_group()
    await redis.aclose()


if __name__ == "__main__":
    main()
