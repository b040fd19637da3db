"""Learner side of weight sync: host the rendezvous store, broadcast each new policy version (docs/WEIGHT_SYNC.md)."""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from services.contracts import PolicyField
from services.http import is_loopback
from services.modeling.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    Group,
    Keys,
    Manifest,
    TensorEntry,
    broadcast,
    checksum,
    checksum_for,
    fingerprint,
    get_json,
    listening_socket,
    membership_proof,
    new_group,
    pack_bucket,
    plan_buckets,
    put_json,
    release_group,
    send_bytes,
    wait_keys,
    wait_work,
)

logger = logging.getLogger(__name__)

Publish = Callable[[dict[str, str]], None]
Tamper = Callable[[int, torch.Tensor], None]


class _HashSetter(Protocol):
    def hset(self, name: str, mapping: Mapping[str, str]) -> Any: ...


def redis_hash_publisher(client: _HashSetter, key: str) -> Publish:
    """Adapt a sync redis.Redis client to `publish`: fields go into the hash `key` (the run's policy hash)."""

    def publish(fields: dict[str, str]) -> None:
        client.hset(key, mapping=fields)

    return publish


@dataclass(frozen=True)
class BroadcastReport:
    """Outcome of one broadcast round."""

    version: int
    round: int
    receivers: tuple[str, ...]
    """Members that acknowledged receipt of the new weights (verified and staged; they swap them in next)."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Members removed from the group in this round, with the reason."""
    bytes: int = 0
    seconds: float = 0.0
    fingerprint: str = ""
    """``v{version}:{digest}`` of the weights sent (computed even when no receiver took part)."""


class WeightBroadcaster:
    """Rank 0 of a per-round sync group: hosts the TCPStore and broadcasts packed, checksummed weights."""

    def __init__(
        self,
        store_host: str = "127.0.0.1",
        store_port: int = 0,
        *,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        publish: Publish | None = None,
        advertise_host: str | None = None,
        device: torch.device | None = None,
        tamper: Tamper | None = None,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if timeout_s <= 0 or bucket_bytes <= 0:
            raise ValueError("timeout_s and bucket_bytes must be positive")
        self.backend = backend
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.device = device or torch.device("cuda" if backend == "nccl" else "cpu")
        # Test hook: called with (bucket index, packed bytes) after the bucket's checksum is taken.
        self._tamper = tamper
        # TCPStore would listen on every interface whatever host it is given: bind the socket ourselves and hand
        # it over (the store owns the descriptor from here and closes it with itself).
        listener = listening_socket(store_host, store_port)
        port = listener.getsockname()[1]
        self._store: dist.TCPStore | None = dist.TCPStore(
            store_host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
            master_listen_fd=listener.detach(),
        )  # fmt: skip
        self.secret = secrets.token_hex(16)
        """Receivers prove their membership events with it (published beside the endpoint, behind Redis's auth)."""
        self.rejected_events: Counter[str] = Counter()
        """Membership events dropped, by reason (``malformed``, ``unauthenticated``): running totals."""
        host = advertise_host or store_host
        self.endpoint = f"[{host}]:{self._store.port}" if ":" in host else f"{host}:{self._store.port}"
        self._bind_host = "127.0.0.1" if is_loopback(host) else None
        self._members: list[str] = []
        self._served: set[str] = set()  # members that acknowledged at least one round
        self._events_seen = 0
        self._round = 0
        self._slots: list[torch.Tensor] = []  # two packing buffers, kept between rounds
        self._round_lock = threading.Lock()
        if publish is not None:
            publish({PolicyField.SYNC_ENDPOINT: self.endpoint, PolicyField.SYNC_SECRET: self.secret})

    @property
    def members(self) -> list[str]:
        """Receiver tokens that will be invited to the next round (as of the last event read)."""
        return list(self._members)

    def wait_for_receivers(self, count: int, timeout_s: float) -> int:
        """Block until at least `count` receivers are registered or the timeout passes; returns the count."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._read_events()
            if len(self._members) >= count or time.monotonic() >= deadline:
                return len(self._members)
            time.sleep(0.05)

    def broadcast(self, named_params: Iterable[tuple[str, torch.Tensor]], version: int) -> BroadcastReport:
        """Send one version to every registered receiver; members that fail or stay silent are dropped.

        Thread-safe: rounds from two threads (a publication and the serving of late joiners) run one after the other.
        """
        with self._round_lock:
            return self._broadcast(list(named_params), version)

    def _broadcast(self, named: list[tuple[str, torch.Tensor]], version: int) -> BroadcastReport:
        store = self._require_store()
        start = time.monotonic()
        if not named:
            raise ValueError("broadcast() needs at least one tensor")
        layout = plan_buckets(named, self.bucket_bytes)  # unsupported dtypes fail here, before any round starts
        self._read_events()
        if not self._members:
            fp = self.fingerprint(named, version, layout)
            return BroadcastReport(version, self._round, (), {}, 0, time.monotonic() - start, fp)
        self._round += 1
        rnd, members = self._round, list(self._members)
        put_json(store, Keys.invite(rnd), {"version": version, "members": members})
        store.add(Keys.rounds, 1)  # after the invite: a receiver that reads this count has its invite written

        ready = set(wait_keys(store, [Keys.ready(rnd, m) for m in members], self.timeout_s))
        roster = [m for m in members if Keys.ready(rnd, m) in ready]
        dropped = {m: "not ready within the timeout" for m in members if m not in roster}
        put_json(store, Keys.roster(rnd), roster)
        sent, fp = 0, ""
        acked: list[str] = []
        if roster:
            sent, fp, acked, failed = self._run_round(rnd, version, named, layout, roster)
            dropped.update(failed)
        if not fp:  # nobody took part, or the collective failed before the trailer
            fp = self.fingerprint(named, version, layout)
        self._members = [m for m in self._members if m not in dropped]
        seconds = time.monotonic() - start
        if dropped:
            logger.warning("weight sync round %d (v%d) dropped %s", rnd, version, dropped)
        logger.info(
            "weight sync round %d: v%d to %d receivers, %d bytes in %.3fs", rnd, version, len(acked), sent, seconds
        )
        self._served.update(acked)
        return BroadcastReport(version, rnd, tuple(acked), dropped, sent, seconds, fp)

    def fingerprint(
        self,
        named: Sequence[tuple[str, torch.Tensor]],
        version: int,
        layout: tuple[list[int], list[TensorEntry]] | None = None,
    ) -> str:
        """The fingerprint a broadcast of ``named`` as ``version`` would carry, computed without sending."""
        sizes, entries = layout or plan_buckets(named, self.bucket_bytes)
        algo = checksum_for(self.device)
        tensors = dict(named)
        by_bucket: list[list[TensorEntry]] = [[] for _ in sizes]
        for entry in entries:
            by_bucket[entry.bucket].append(entry)
        self._ensure_slots(max(sizes))
        sums = []
        for k, size in enumerate(sizes):
            buf = self._slots[0][:size]
            pack_bucket(buf, by_bucket[k], tensors)
            sums.append(checksum(buf, algo))
        return fingerprint(Manifest(version, 0, algo, tuple(sizes), tuple(entries)), sums)

    def _ensure_slots(self, size: int) -> None:
        """Two packing buffers of at least ``size`` bytes, kept between rounds."""
        if not self._slots or self._slots[0].numel() < size:
            self._slots = []
            self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]

    def unserved_members(self) -> list[str]:
        """Receivers that joined but have not yet acknowledged a round: they hold whatever weights they loaded
        (a checkpoint, or orphaned weights of a crashed learner) until the next round reaches them."""
        self._read_events()
        return [m for m in self._members if m not in self._served]

    def close(self) -> None:
        """Stop hosting the store; receivers' next store call fails and they resync with the next learner."""
        self._store = None

    def _require_store(self) -> dist.TCPStore:
        if self._store is None:
            raise RuntimeError("WeightBroadcaster is closed")
        return self._store

    def _read_events(self) -> None:
        store = self._require_store()
        count = int(store.add(Keys.events_count, 0))
        for index in range(self._events_seen + 1, count + 1):
            try:
                event = get_json(store, Keys.event(index))
            except dist.DistStoreError:
                logger.warning("membership event %d was allocated but never written; skipping it", index)
                continue
            except ValueError as exc:  # not JSON, or not UTF-8
                self._reject(index, "malformed", f"not JSON ({exc})")
                continue
            self._apply_event(index, event)
        self._events_seen = count

    def _apply_event(self, index: int, event: object) -> None:
        """One membership event: a join or leave of a member that proves it holds the secret."""
        if not isinstance(event, dict) or not all(isinstance(event.get(k), str) for k in ("op", "member", "proof")):
            self._reject(index, "malformed", "not {op, member, proof} strings")
            return
        op, member = event["op"], event["member"]
        if op not in ("join", "leave") or not 0 < len(member) <= 256:
            self._reject(index, "malformed", f"op {op[:20]!r}, member of {len(member)} characters")
            return
        if not hmac.compare_digest(event["proof"], membership_proof(self.secret, op, member)):
            self._reject(index, "unauthenticated", f"{op} of {member[:64]!r} without the run's secret")
            return
        if op == "join" and member not in self._members:
            self._members.append(member)
        elif op == "leave" and member in self._members:
            self._members.remove(member)

    def _reject(self, index: int, reason: str, detail: str) -> None:
        self.rejected_events[reason] += 1
        logger.warning("weight sync: dropped membership event %d (%s): %s", index, reason, detail)

    def _run_round(
        self,
        rnd: int,
        version: int,
        named: Sequence[tuple[str, torch.Tensor]],
        layout: tuple[list[int], list[TensorEntry]],
        roster: list[str],
    ) -> tuple[int, str, list[str], dict[str, str]]:
        """Form the round's group, send, then collect acks; returns bytes sent, fingerprint, acked members, failures."""
        store = self._require_store()
        group = None
        sent, fp = 0, ""
        error = ""
        try:
            prefix = dist.PrefixStore(Keys.group_prefix(rnd), store)
            group = new_group(self.backend, prefix, 0, len(roster) + 1, self.timeout_s, self.device, self._bind_host)
            sent, fp = self._send(group, rnd, version, named, layout)
        except RuntimeError as exc:  # gloo/NCCL failures and timeouts; receivers are judged by their acks below
            error = f"collective failed: {exc}"
            logger.warning("weight sync round %d: %s", rnd, error)
        # Keep the group alive until the acks are in, so no receiver sees its peer vanish mid-read.
        present = set(wait_keys(store, [Keys.ack(rnd, m) for m in roster], self.timeout_s))
        acked: list[str] = []
        failed: dict[str, str] = {}
        for member in roster:
            if Keys.ack(rnd, member) not in present:
                failed[member] = error or "no ack within the timeout"
                continue
            ack = get_json(store, Keys.ack(rnd, member))
            if ack.get("status") == "ok":
                acked.append(member)
            else:
                failed[member] = f"{ack.get('status')}: {ack.get('detail', '')}"
        if group is not None:
            release_group(group, failed=bool(error))
        return sent, fp, acked, failed

    def _send(
        self,
        group: Group,
        rnd: int,
        version: int,
        named: Sequence[tuple[str, torch.Tensor]],
        layout: tuple[list[int], list[TensorEntry]],
    ) -> tuple[int, str]:
        sizes, entries = layout
        algo = checksum_for(self.device)
        manifest = Manifest(version, rnd, algo, tuple(sizes), tuple(entries))
        send_bytes(group, manifest.encode(), self.device, self.timeout_s)
        sums = self._send_buckets(group, sizes, entries, dict(named), algo)
        trailer = torch.tensor(sums, dtype=torch.int64, device=self.device)
        wait_work(broadcast(group, trailer, self.timeout_s), self.timeout_s)
        return sum(sizes), fingerprint(manifest, sums)

    def _send_buckets(
        self, group: Group, sizes: list[int], entries: list[TensorEntry], tensors: dict[str, torch.Tensor], algo: str
    ) -> list[int]:
        """Pack and checksum bucket k+1 while bucket k is in flight; two buffers, kept between rounds."""
        by_bucket: list[list[TensorEntry]] = [[] for _ in sizes]
        for entry in entries:
            by_bucket[entry.bucket].append(entry)
        self._ensure_slots(max(sizes))
        # A checksum thread was slower on the 2-core reference machine: gloo's own thread already overlaps sending.
        sums: list[int] = []
        pending = None
        for k, size in enumerate(sizes):
            buf = self._slots[k % 2][:size]  # its previous bucket (k-2) was sent before bucket k-1 was posted
            pack_bucket(buf, by_bucket[k], tensors)
            sums.append(checksum(buf, algo))
            if self._tamper is not None:
                self._tamper(k, buf)
            if pending is not None:
                wait_work(pending, self.timeout_s)
            pending = broadcast(group, buf, self.timeout_s)
        if pending is not None:
            wait_work(pending, self.timeout_s)
        return sums
