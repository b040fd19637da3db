"""Producer and consumer processes for the stream integration tests (run as a script, one role per process).

A producer writes PromptTask payloads (plus a few deliberate poison payloads) and records every entry id that XADD
returned. A consumer reads, decodes and acknowledges; its ack and a record ``"<consumer> <entry id> <prompt id>"``
on the run's ``acklog`` stream go in one MULTI, so the acklog shows exactly which acknowledgements took effect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from services.contracts import PROMPTS, ROLLOUT_GROUP
from services.protocol import PromptTask, Sampling
from services.streams import StreamClient, StreamSpec, connect

ACKLOG = "acklog"
POISON = (b"\xc1 not msgpack", b"\x81\xa1v\x01", b"")


def make_task(prompt_id: str, index: int) -> PromptTask:
    """A small valid prompt task."""
    return PromptTask(
        prompt_id=prompt_id,
        task_kind="math",
        messages=[{"role": "user", "content": f"What is {index} + 1?"}],
        ground_truth=str(index + 1),
        n=4,
        sampling=Sampling(max_new_tokens=16),
        index=index,
        created_at=time.time(),
    )


async def produce(args: argparse.Namespace) -> dict[str, int]:
    """Write args.count tasks and args.poison poison payloads in batches; record ids as they are acknowledged."""
    redis = connect(args.url, timeout_s=2.0)
    client = StreamClient(redis, StreamSpec(args.run, PROMPTS), timeout_s=2.0, retries=12)
    poison_at = {round((k + 1) * args.count / (args.poison + 1)) for k in range(args.poison)}
    items: list[tuple[str, bytes]] = []
    for i in range(args.count):
        if i in poison_at:
            items.append(("POISON", POISON[len(items) % len(POISON)]))
        items.append((f"{args.name}-{i}", make_task(f"{args.name}-{i}", i).to_bytes()))
    with open(args.out, "w") as out:
        for start in range(0, len(items), args.batch):
            batch = items[start : start + args.batch]
            ids = await client.produce_many([data for _, data in batch])
            out.writelines(
                f"{entry_id} {label} {data.hex()}\n" for entry_id, (label, data) in zip(ids, batch, strict=True)
            )
            out.flush()
            if args.pace_s:
                await asyncio.sleep(args.pace_s)
    await redis.aclose()
    return {"retries": client.stats.retries}


async def consume(args: argparse.Namespace) -> dict[str, int]:
    """Consume until the stop file appears; optionally hang mid-batch (read, not acked) to be SIGKILLed."""
    redis = connect(args.url, timeout_s=2.0)
    spec = StreamSpec(args.run, PROMPTS)
    client = StreamClient(redis, spec, ROLLOUT_GROUP, args.name, timeout_s=2.0, retries=12, max_deliveries=3)
    await client.ensure_group()
    acklog = spec.sibling(ACKLOG)
    done, loops = 0, 0
    while not Path(args.stop_file).exists():
        loops += 1
        got = await client.read_decoded(PromptTask.from_bytes, count=args.batch, block_ms=100)
        if not got or loops % 20 == 0:
            got += await client.claim_decoded(PromptTask.from_bytes, min_idle_ms=args.claim_idle_ms, count=args.batch)
        if not got:
            continue
        if args.hang_after and done >= args.hang_after:
            Path(args.hang_file).write_text(json.dumps([entry_id for entry_id, _ in got]))
            await asyncio.sleep(3600)  # the test SIGKILLs this process here: read but never acknowledged
        records = [(acklog, f"{args.name} {entry_id} {task.prompt_id}".encode()) for entry_id, task in got]
        await client.ack([entry_id for entry_id, _ in got], produce=records)
        done += len(got)
    await redis.aclose()
    return {"acked": done, "retries": client.stats.retries, "dead_lettered": client.stats.dead_lettered}


def main() -> None:
    """Parse the role and run it; print the stats as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["produce", "consume"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--poison", type=int, default=0)
    parser.add_argument("--pace-s", type=float, default=0.0)
    parser.add_argument("--out", default="")
    parser.add_argument("--stop-file", default="")
    parser.add_argument("--claim-idle-ms", type=int, default=3000)
    parser.add_argument("--hang-after", type=int, default=0)
    parser.add_argument("--hang-file", default="")
    args = parser.parse_args()
    stats = asyncio.run(produce(args) if args.role == "produce" else consume(args))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    sys.exit(main())
