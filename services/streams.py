"""Asyncio client for one Redis stream read through a consumer group (produce, read, ack, claim, dead-letter).

Delivery is at-least-once: an entry is re-delivered when a consumer dies before acknowledging it, when a retried
XADD had in fact reached the server before the connection broke, and after a Redis restart that replays its AOF.
Consumers must therefore be idempotent, keyed by the message's own identity (``prompt_id`` and
``dispatch_version``), never by entry id alone; :class:`RecentIds` is a small helper for that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry as SyncRetry

from services.config import RedisConfig, RunConfig
from services.contracts import DEADLETTER, KEY_PREFIX
from services.protocol import DeadLetter, ProtocolError

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_FIELD = "d"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# BusyLoadingError (the server is replaying its AOF) is a ConnectionError subclass
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, ConnectionError)
_TRANSIENT_REPLIES = ("READONLY", "OOM", "TRYAGAIN", "MASTERDOWN", "LOADING", "CLUSTERDOWN")
"""Error replies of a Redis that is there but cannot serve now (a replica during failover, maxmemory reached, a
master not yet elected): retried like an outage. Any other error reply is a bug or a misconfiguration."""


class RedisUnavailable(ConnectionError):
    """A transient error reply (``_TRANSIENT_REPLIES``) that outlasted the retries: an outage, for every caller."""


# redis-py turns some of those replies into their own classes (and drops the prefix from the message).
_TRANSIENT_REPLY_TYPES = (
    rexc.OutOfMemoryError,
    rexc.ReadOnlyError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.ClusterDownError,
)


def is_transient_reply(exc: BaseException) -> bool:
    """True for an error reply that says "not now" rather than "never" (READONLY, OOM, TRYAGAIN, ...)."""
    if isinstance(exc, _TRANSIENT_REPLY_TYPES):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).split(" ", 1)[0] in _TRANSIENT_REPLIES


_MAX_ERROR_CHARS = 4000
DEADLETTER_KEEP_BYTES = 64 * 1024
"""Bytes of each field a dead letter keeps; a longer value is stored as this prefix plus its size and sha256."""


def run_key(run: str, name: str) -> str:
    """The Redis key of ``name`` (a stream, hash or set) in run ``run``: ``dipo:{run}:{name}``."""
    for part, what in ((run, "run"), (name, "name")):
        if not _NAME_RE.match(part):
            raise ValueError(f"{what} {part!r} must be 1-128 characters of [A-Za-z0-9_.-], starting alphanumeric")
    return f"{KEY_PREFIX}:{run}:{name}"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """Addresses one stream of one run; ``str(spec)`` is its Redis key."""

    run: str
    name: str

    def __post_init__(self) -> None:
        run_key(self.run, self.name)

    def __str__(self) -> str:
        return f"{KEY_PREFIX}:{self.run}:{self.name}"

    def sibling(self, name: str) -> StreamSpec:
        """Another stream (or key) of the same run."""
        return StreamSpec(self.run, name)


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as delivered to this consumer."""

    id: str
    fields: dict[str, bytes]
    deliveries: int = 1

    @property
    def data(self) -> bytes | None:
        """The payload in field ``d``, or None if the entry has none."""
        return self.fields.get(DATA_FIELD)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """Length and consumer-group state of a stream."""

    length: int
    pending: int
    lag: int | None
    consumers: int
    last_delivered_id: str


@dataclass(slots=True)
class StreamStats:
    """Counters of tolerated faults, for the owner's metrics."""

    retries: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    deleted_while_pending: int = 0
    group_recreated: int = 0


class RecentIds:
    """A bounded set of recently seen keys, for consumers that drop at-least-once duplicates."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """Record key; True if it was not seen recently (process it), False for a duplicate (skip it)."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._seen)


def connect(
    url: str,
    *,
    timeout_s: float = 10.0,
    ssl_ca_certs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    ssl_cert_reqs: str = "required",
    max_connections: int | None = None,
    **opts: Any,
) -> aioredis.Redis:
    """An asyncio Redis client for ``redis://[:pw@]host:port/db`` or ``rediss://`` (TLS) URLs.

    Every socket operation times out after ``timeout_s``. redis-py's own retries are switched off: the stream
    client retries with its own bounded backoff, and nesting two retry loops would multiply the wait.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://, got {url!r}")
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 30,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
    }
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if scheme == "rediss":
        kwargs.update(
            ssl_ca_certs=ssl_ca_certs, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, ssl_cert_reqs=ssl_cert_reqs
        )
    elif ssl_ca_certs or ssl_certfile or ssl_keyfile:
        raise ValueError("TLS options need a rediss:// URL")
    kwargs.update(opts)
    return aioredis.from_url(url, **kwargs)


def clip_fields(fields: Mapping[str, bytes], keep_bytes: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """Each field cut to ``keep_bytes``, and ``"<size> bytes sha256:<hex>"`` of every value that was cut."""
    kept: dict[str, bytes] = {}
    clipped: dict[str, str] = {}
    for name, value in fields.items():
        if len(value) > keep_bytes:
            clipped[name] = f"{len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()}"
            value = value[:keep_bytes]
        kept[name] = value
    return kept, clipped


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


class StreamClient:
    """Produce to, and consume through a consumer group from, one stream.

    Every call has a timeout and is retried with exponential backoff and jitter on connection errors, timeouts
    and a server still loading its AOF, so a Redis restart is survived. Entries that fail to decode, or that were
    delivered more than ``max_deliveries`` times, are moved to the run's ``deadletter`` stream (as a
    :class:`~services.protocol.DeadLetter` with the raw fields) and acknowledged, atomically.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        spec: StreamSpec,
        group: str | None = None,
        consumer: str | None = None,
        *,
        max_deliveries: int = 5,
        timeout_s: float = 10.0,
        retries: int = 8,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 2.0,
        deadletter: StreamSpec | None = None,
        deadletter_keep_bytes: int = DEADLETTER_KEEP_BYTES,
    ) -> None:
        if max_deliveries < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("need max_deliveries >= 1, retries >= 0 and timeout_s > 0")
        self.redis = redis
        self.spec = spec
        self.key = str(spec)
        self.group = group
        self.consumer = consumer
        self.max_deliveries = max_deliveries
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.deadletter = deadletter or spec.sibling(DEADLETTER)
        self.deadletter_keep_bytes = deadletter_keep_bytes
        self.stats = StreamStats()
        self._claim_cursor = "0-0"
        # a BLOCK longer than the socket timeout would read as a dead connection
        socket_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block_ms = int(socket_timeout * 500) if socket_timeout else None

    @classmethod
    def from_config(
        cls, redis: aioredis.Redis, cfg: RunConfig, name: str, group: str | None = None, consumer: str | None = None
    ) -> StreamClient:
        """A client for stream ``name`` of the run, with the run config's delivery limit, timeouts and retries."""
        rc = cfg.redis
        return cls(
            redis,
            StreamSpec(cfg.name, name),
            group,
            consumer,
            max_deliveries=cfg.streams.max_deliveries,
            timeout_s=rc.socket_timeout_s,
            retries=rc.retries,
            backoff_base_s=rc.backoff_base_s,
            backoff_cap_s=rc.backoff_max_s,
        )

    # ------------------------------------------------------------ plumbing

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]], extra_s: float = 0.0) -> T:
        """Run one Redis operation with a timeout and bounded, jittered exponential-backoff retries."""

        def count_retry() -> None:
            self.stats.retries += 1

        return await call_with_retries(
            f"{op} on {self.key}",
            fn,
            timeout_s=self.timeout_s + extra_s,
            retries=self.retries,
            backoff_base_s=self.backoff_base_s,
            backoff_cap_s=self.backoff_cap_s,
            on_retry=count_retry,
        )

    def _need_group(self) -> tuple[str, str]:
        if self.group is None or self.consumer is None:
            raise RuntimeError(f"StreamClient for {self.key} was built without a group and consumer name")
        return self.group, self.consumer

    @staticmethod
    def _entry(entry_id: bytes | str, raw: dict[bytes, bytes], deliveries: int = 1) -> Entry:
        return Entry(_text(entry_id), {_text(k): v for k, v in raw.items()}, deliveries)

    # ------------------------------------------------------------ producing

    async def ensure_group(self, start_id: str = "0") -> None:
        """Create the consumer group (and the stream) if missing; an existing group is left as it is."""
        group, _ = self._need_group()
        try:
            await self._call(
                "XGROUP CREATE", lambda: self.redis.xgroup_create(self.key, group, start_id, mkstream=True)
            )
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def produce(self, data: bytes, *, maxlen: int | None = None) -> str:
        """Append one payload; returns its entry id. ``maxlen`` trims approximately (only where loss is fine)."""
        entry_id = await self._call("XADD", lambda: self._xadd(self.redis, self.key, data, maxlen))
        return _text(entry_id)

    async def produce_many(self, payloads: Sequence[bytes], *, maxlen: int | None = None) -> list[str]:
        """Append several payloads in one round trip; returns their entry ids in order."""

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for data in payloads:
                    self._xadd(pipe, self.key, data, maxlen)
                return await pipe.execute()

        return [_text(i) for i in await self._call("XADD*", op)] if payloads else []

    @staticmethod
    def _xadd(target: Any, key: str, data: bytes, maxlen: int | None) -> Any:
        if maxlen is None:
            return target.xadd(key, {DATA_FIELD: data})
        return target.xadd(key, {DATA_FIELD: data}, maxlen=maxlen, approximate=True)

    # ------------------------------------------------------------ consuming

    async def read(self, count: int = 16, block_ms: int = 1000) -> list[Entry]:
        """Read up to ``count`` new entries for this consumer, waiting up to ``block_ms`` (0: do not wait)."""
        group, consumer = self._need_group()
        if self._max_block_ms is not None:
            block_ms = min(block_ms, self._max_block_ms)

        async def op() -> Any:
            return await self.redis.xreadgroup(group, consumer, {self.key: ">"}, count=count, block=block_ms or None)

        try:
            resp = await self._call("XREADGROUP", op, extra_s=block_ms / 1000)
        except rexc.ResponseError as exc:
            if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            # the stream key vanished (a Redis without persistence restarted: NOGROUP; the key was deleted while
            # this read blocked on it: UNBLOCKED): recreate and carry on
            self.stats.group_recreated += 1
            log.warning("consumer group %s on %s is gone; recreating it", group, self.key)
            await self.ensure_group()
            resp = await self._call("XREADGROUP", op, extra_s=block_ms / 1000)
        return [self._entry(i, raw) for _, entries in (resp or []) for i, raw in entries if raw is not None]

    async def ack(
        self,
        ids: Iterable[str],
        *,
        produce: Sequence[tuple[StreamSpec, bytes]] = (),
        hashes: Mapping[str, Mapping[str, bytes]] | None = None,
    ) -> int:
        """Acknowledge entries; returns how many were still pending.

        ``produce`` lists outputs to append in the same MULTI transaction, so an output is written if and only if
        its input is acknowledged (a retried transaction may still write it twice: at-least-once); ``hashes`` are
        hash fields (key -> field -> value) set in that transaction too.
        """
        group, _ = self._need_group()
        ids = list(ids)
        if not produce and not hashes:
            return int(await self._call("XACK", lambda: self.redis.xack(self.key, group, *ids))) if ids else 0

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                for spec, data in produce:
                    pipe.xadd(str(spec), {DATA_FIELD: data})
                for key, mapping in (hashes or {}).items():
                    if mapping:
                        pipe.hset(key, mapping=dict(mapping))
                if ids:
                    pipe.xack(self.key, group, *ids)
                return await pipe.execute()

        results = await self._call("MULTI XADD+XACK", op)
        return int(results[-1]) if ids else 0

    async def claim_idle(self, min_idle_ms: int, count: int = 16) -> list[Entry]:
        """Take over entries idle for ``min_idle_ms`` (their consumer is presumed dead).

        Entries delivered more than ``max_deliveries`` times are dead-lettered instead of returned.
        """
        group, consumer = self._need_group()
        start = self._claim_cursor

        async def op() -> Any:
            return await self.redis.xautoclaim(self.key, group, consumer, min_idle_ms, start_id=start, count=count)

        resp = await self._call("XAUTOCLAIM", op)
        self._claim_cursor = _text(resp[0])  # "0-0" once the scan wrapped around
        if len(resp) > 2 and resp[2]:
            # trimmed while pending: Redis 7 already dropped them from the PEL, there is nothing left to process
            self.stats.deleted_while_pending += len(resp[2])
        claimed = [(_text(i), raw) for i, raw in resp[1] if i is not None and raw is not None]
        if not claimed:
            return []
        counts = await self._delivery_counts([i for i, _ in claimed])
        entries, exhausted = [], []
        for entry_id, raw in claimed:
            if entry_id not in counts:  # acknowledged by its slow first consumer meanwhile
                continue
            entry = self._entry(entry_id, raw, counts[entry_id])
            if entry.deliveries > self.max_deliveries:
                exhausted.append((entry, f"delivered {entry.deliveries} times (limit {self.max_deliveries})"))
            else:
                entries.append(entry)
        self.stats.claimed += len(entries)
        if exhausted:
            await self.dead_letter(exhausted)
        return entries

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        group, _ = self._need_group()

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xpending_range(self.key, group, min=entry_id, max=entry_id, count=1)
                return await pipe.execute()

        rows = await self._call("XPENDING", op)
        return {_text(r["message_id"]): int(r["times_delivered"]) for found in rows for r in found}

    async def dead_letter(self, items: Sequence[tuple[Entry, str]]) -> None:
        """Move entries to the dead-letter stream with their error, and acknowledge them, in one transaction."""
        group, consumer = self._need_group()
        now = time.time()
        letters = []
        for entry, error in items:
            fields, clipped = clip_fields(entry.fields, self.deadletter_keep_bytes)
            letter = DeadLetter(source_stream=self.key, entry_id=entry.id, group=group, consumer=consumer,
                                error=error[:_MAX_ERROR_CHARS], deliveries=entry.deliveries, fields=fields, at=now,
                                prompt_id=self._prompt_id(entry), clipped=clipped)  # fmt: skip
            letters.append(letter.to_bytes())

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                for letter in letters:
                    pipe.xadd(str(self.deadletter), {DATA_FIELD: letter})
                pipe.xack(self.key, group, *(entry.id for entry, _ in items))
                return await pipe.execute()

        if items:
            await self._call("MULTI dead-letter", op)
            self.stats.dead_lettered += len(items)
            for entry, error in items:
                log.warning("dead-lettered %s from %s: %s", entry.id, self.key, error[:200])

    def _prompt_id(self, entry: Entry) -> str:
        """The prompt id an entry of this stream carries, or "" (recorded in its dead letter before clipping)."""
        from services.ledger import entry_prompt_id  # the ledger builds on this module

        return entry_prompt_id(self.key, {k.encode(): v for k, v in entry.fields.items()}) or ""

    async def _decode(self, entries: list[Entry], decoder: Callable[[bytes], T]) -> list[tuple[str, T]]:
        good: list[tuple[str, T]] = []
        bad: list[tuple[Entry, str]] = []
        for entry in entries:
            data = entry.data
            if data is None:
                bad.append((entry, f"entry has no {DATA_FIELD!r} field"))
                continue
            try:
                good.append((entry.id, decoder(data)))
            except ProtocolError as exc:  # only malformed input is tolerated; any other error is a bug
                bad.append((entry, str(exc)))
        await self.dead_letter(bad)
        return good

    async def read_decoded(
        self, decoder: Callable[[bytes], T], count: int = 16, block_ms: int = 1000
    ) -> list[tuple[str, T]]:
        """``read`` then decode; entries that raise ProtocolError are dead-lettered, the rest returned in order."""
        return await self._decode(await self.read(count, block_ms), decoder)

    async def claim_decoded(
        self, decoder: Callable[[bytes], T], min_idle_ms: int, count: int = 16
    ) -> list[tuple[str, T]]:
        """``claim_idle`` then decode, dead-lettering entries that raise ProtocolError."""
        return await self._decode(await self.claim_idle(min_idle_ms, count), decoder)

    # ------------------------------------------------------------ inspection

    async def info(self) -> StreamInfo:
        """Stream length plus this group's pending count, lag and consumer count."""
        group, _ = self._need_group()

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.key)
                pipe.xinfo_groups(self.key)
                return await pipe.execute()

        length, groups = await self._call("XINFO", op)
        for g in groups:
            row = {_text(k): v for k, v in g.items()}
            if _text(row["name"]) == group:
                lag = row.get("lag")
                return StreamInfo(
                    length=int(length),
                    pending=int(row["pending"]),
                    lag=None if lag is None else int(lag),
                    consumers=int(row["consumers"]),
                    last_delivered_id=_text(row["last-delivered-id"]),
                )
        raise LookupError(f"consumer group {group!r} does not exist on {self.key}")

    async def pending_ids(self, consumer: str | None = None, count: int = 10_000) -> list[str]:
        """Ids pending in this group (optionally for one consumer), oldest first."""
        group, _ = self._need_group()

        async def op() -> Any:
            return await self.redis.xpending_range(
                self.key, group, min="-", max="+", count=count, consumername=consumer
            )

        return [_text(r["message_id"]) for r in await self._call("XPENDING", op)]


async def call_with_retries(
    op: str,
    fn: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = 10.0,
    retries: int = 8,
    backoff_base_s: float = 0.05,
    backoff_cap_s: float = 2.0,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run one Redis operation with a timeout and bounded, jittered exponential-backoff retries.

    Retried: connection errors, timeouts, a server still loading its AOF (so a Redis restart is survived) and the
    transient error replies (READONLY, OOM, TRYAGAIN, MASTERDOWN, ...), which raise :class:`RedisUnavailable` once
    the retries are spent, so every caller treats them as the outage they are.
    """
    attempt = 0
    while True:
        try:
            return await asyncio.wait_for(fn(), timeout_s)
        except (*_TRANSIENT, rexc.ResponseError) as exc:
            if isinstance(exc, rexc.ResponseError) and not is_transient_reply(exc):
                raise
            if attempt >= retries:
                if isinstance(exc, rexc.ResponseError):
                    raise RedisUnavailable(f"{op}: {type(exc).__name__}: {exc}") from exc
                raise
            delay = min(backoff_cap_s, backoff_base_s * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            if on_retry is not None:
                on_retry()
            log.warning("%s failed (%s: %s); retry %d in %.2fs", op, type(exc).__name__, exc, attempt, delay)
            await asyncio.sleep(delay)


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = _TRANSIENT
"""What :func:`call_with_retries` raises once its retries are spent (Redis unreachable, too slow, or answering
"not now": :class:`RedisUnavailable` is a ConnectionError); long-lived loops catch these and wait."""


def connect_sync(
    url: str,
    *,
    timeout_s: float = 10.0,
    retries: int = 8,
    backoff_base_s: float = 0.05,
    backoff_cap_s: float = 2.0,
    ssl_ca_certs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    **opts: Any,
) -> redis.Redis:
    """A blocking Redis client (for threads that cannot await) with redis-py's own bounded backoff retries."""
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": SyncRetry(ExponentialBackoff(cap=backoff_cap_s, base=backoff_base_s), retries),
        "retry_on_error": [rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError],
    }
    if urlsplit(url).scheme == "rediss":
        kwargs.update(ssl_ca_certs=ssl_ca_certs, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    elif ssl_ca_certs or ssl_certfile or ssl_keyfile:
        raise ValueError("TLS options need a rediss:// URL")
    kwargs.update(opts)
    return redis.Redis.from_url(url, **kwargs)


def _client_options(cfg: RedisConfig) -> dict[str, Any]:
    if cfg.url is None:
        raise ValueError("redis.url is not set: `dipo run` sets it, or set DIPO_REDIS__URL=redis://host:port/0")
    options: dict[str, Any] = {
        "timeout_s": cfg.socket_timeout_s,
        "ssl_ca_certs": cfg.tls_ca_file,
        "ssl_certfile": cfg.tls_cert_file,
        "ssl_keyfile": cfg.tls_key_file,
    }
    if cfg.password:
        options["password"] = cfg.password
    return options


def async_client_from_config(cfg: RedisConfig) -> aioredis.Redis:
    """The asyncio client a process builds from the run config's ``redis`` section."""
    options = _client_options(cfg)
    assert cfg.url is not None  # checked by _client_options
    return connect(cfg.url, **options)


def clients_from_config(cfg: RedisConfig) -> tuple[aioredis.Redis, redis.Redis]:
    """The asyncio and blocking clients a process builds from the run config's ``redis`` section."""
    options = _client_options(cfg)
    assert cfg.url is not None  # checked by _client_options
    sync = connect_sync(cfg.url, retries=cfg.retries, backoff_base_s=cfg.backoff_base_s,
                        backoff_cap_s=cfg.backoff_max_s, **options)  # fmt: skip
    return connect(cfg.url, **options), sync
