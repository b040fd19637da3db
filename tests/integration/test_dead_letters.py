"""The dead-letter stream stays bounded (issue 16.10), against a real redis-server.

A dead letter keeps a prefix of each field, with the whole value's size and sha256, and the prompt id read before
clipping (so the chaos ledger still accounts for the prompt); the learner's trim keeps the stream to its newest
``streams.deadletter_max_entries`` letters and none older than ``streams.deadletter_retain_s``.
"""

from __future__ import annotations

import hashlib
import time

import redis.asyncio as aioredis
from factories import math_task

from services.contracts import DEADLETTER, PROMPTS
from services.ledger import dead_letter_prompt_id
from services.protocol import DeadLetter, PromptTask
from services.stream_upkeep import trim_dead_letters
from services.streams import DATA_FIELD, StreamClient, StreamSpec, run_key

KEEP = 4096


async def _dead_letter_one(redis: aioredis.Redis, run: str, payload: bytes) -> tuple[DeadLetter, dict[bytes, bytes]]:
    prompts = StreamClient(redis, StreamSpec(run, PROMPTS), "rollout", "c1", deadletter_keep_bytes=KEEP)
    await prompts.ensure_group()
    await prompts.produce(payload)
    (entry,) = await prompts.read(count=1, block_ms=100)
    await prompts.dead_letter([(entry, "rejected by the test")])
    (_, raw), *_ = await redis.xrange(run_key(run, DEADLETTER))
    assert await redis.xpending(run_key(run, PROMPTS), "rollout") == {"pending": 0, "min": None, "max": None,
                                                                      "consumers": []}  # fmt: skip
    return DeadLetter.from_bytes(raw[DATA_FIELD.encode()]), raw


async def test_a_large_entry_is_stored_as_a_prefix_with_its_digest_and_prompt_id(
    redis_client: aioredis.Redis, run_name: str
) -> None:
    task = math_task("big-prompt")
    big = PromptTask(**{**{f: getattr(task, f) for f in PromptTask.field_names()},
                        "messages": [{"role": "user", "content": "x" * 200_000}]})  # fmt: skip
    payload = big.to_bytes()
    letter, raw = await _dead_letter_one(redis_client, run_name, payload)
    assert letter.fields[DATA_FIELD] == payload[:KEEP]
    assert letter.clipped == {DATA_FIELD: f"{len(payload)} bytes sha256:{hashlib.sha256(payload).hexdigest()}"}
    assert letter.prompt_id == "big-prompt"
    assert dead_letter_prompt_id(raw) == "big-prompt"  # what the chaos ledger reads


async def test_undecodable_garbage_is_clipped_without_a_prompt_id(redis_client: aioredis.Redis, run_name: str) -> None:
    garbage = bytes(range(256)) * 4096  # 1 MiB
    letter, raw = await _dead_letter_one(redis_client, run_name, garbage)
    assert len(letter.fields[DATA_FIELD]) == KEEP and letter.prompt_id == ""
    assert letter.clipped[DATA_FIELD].startswith(f"{len(garbage)} bytes sha256:")
    assert dead_letter_prompt_id(raw) is None


async def test_small_entries_are_kept_whole(redis_client: aioredis.Redis, run_name: str) -> None:
    payload = math_task("small").to_bytes()
    letter, _ = await _dead_letter_one(redis_client, run_name, payload)
    assert letter.fields[DATA_FIELD] == payload and letter.clipped == {} and letter.prompt_id == "small"


async def test_dead_letters_are_trimmed_by_age_and_count(redis_client: aioredis.Redis, run_name: str) -> None:
    key = run_key(run_name, DEADLETTER)
    week_ago_ms = int((time.time() - 8 * 24 * 3600) * 1000)
    for i in range(30):  # older than the retention
        await redis_client.xadd(key, {DATA_FIELD: b"old"}, id=f"{week_ago_ms + i}-0")
    for _ in range(30):
        await redis_client.xadd(key, {DATA_FIELD: b"new"})
    newest = (await redis_client.xrevrange(key, count=1))[0][0]
    removed = await trim_dead_letters(redis_client, key, max_entries=20, retain_s=7 * 24 * 3600.0)
    left = await redis_client.xrange(key)
    assert removed == 40 and len(left) == 20
    assert {fields[DATA_FIELD.encode()] for _, fields in left} == {b"new"}
    assert left[-1][0] == newest
