"""Shared fixtures: a private redis-server on a free port (never the machine's 6379), stopped by its pid."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from runner.redis_server import LocalRedis
from services.streams import connect


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """One LocalRedis (AOF everysec) for the whole session; tests isolate themselves with a unique run name."""
    server = LocalRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: LocalRedis) -> str:
    """URL of the session's private Redis."""
    return redis_server.url


@pytest.fixture
def run_name() -> str:
    """A fresh run name, so keys (``dipo:{run}:...``) never collide between tests."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of the session's Redis, closed after the test."""
    client = connect(redis_url, timeout_s=5.0)
    try:
        yield client
    finally:
        await client.aclose()
