"""Rollout-server side of weight sync: join the learner's rounds and stage verified weights (docs/WEIGHT_SYNC.md).

A round's buckets land in host staging memory (received there directly over gloo; over NCCL through two device
buckets copied into pinned host buffers, never a second copy of the model on the GPU). Once every checksum matches
the receiver acknowledges the round, so the learner's broadcast ends when the bytes are delivered, and hands the
staged tensors to its caller, who swaps them into the engine while the learner already trains the next step.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from services.http import is_loopback
from services.modeling.weight_sync import (
    ChecksumMismatch,
    Expected,
    Group,
    Keys,
    Manifest,
    ManifestRejected,
    ResyncNeeded,
    broadcast,
    checksum,
    fingerprint,
    get_json,
    membership_proof,
    new_group,
    parse_endpoint,
    put_json,
    recv_bytes,
    release_group,
    unpack,
    validate_manifest,
    wait_keys,
    wait_work,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One received and verified version: its tensors are views into the receiver's staging buffers, valid until the
    next ``receive()`` call overwrites them (copy them into the model before that)."""

    version: int
    fingerprint: str
    named: list[tuple[str, torch.Tensor]]


class WeightReceiver:
    """A member of the learner's sync rounds; use it from one dedicated thread (close() from any thread)."""

    def __init__(
        self,
        endpoint: str,
        receiver_id: str,
        expected: Expected,
        *,
        secret: str,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        device: torch.device | None = None,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if "#" in receiver_id or "/" in receiver_id:
            raise ValueError(f"receiver_id {receiver_id!r} must not contain '#' or '/' (they delimit store keys)")
        self.host, self.port = parse_endpoint(endpoint)
        self.receiver_id = receiver_id
        self.secret = secret
        """The learner's sync secret (policy hash ``sync_secret``): it proves this receiver's joins and leaves."""
        self.expected = dict(expected)
        self.backend = backend
        self.timeout_s = timeout_s
        self.device = device or torch.device("cuda" if backend == "nccl" else "cpu")
        self._bind_host = "127.0.0.1" if is_loopback(self.host) else None
        self._store: dist.TCPStore | None = None
        self._token: str | None = None
        self._next_round = 0
        self._invited = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._staging: list[torch.Tensor] = []  # host buffers kept between rounds: fresh ones page-fault every round
        self._transport: list[torch.Tensor] = []  # NCCL only: two device buckets the rounds stream through

    @property
    def token(self) -> str | None:
        """This incarnation's member name (receiver_id#random), or None when not joined."""
        return self._token

    def join(self) -> None:
        """Register for the next rounds; call again after a ResyncNeeded once the newest checkpoint is loaded."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("WeightReceiver is closed")
            if self._store is None:
                self._store = dist.TCPStore(
                    self.host, self.port, is_master=False, timeout=timedelta(seconds=self.timeout_s)
                )
            current = int(self._store.add(Keys.rounds, 0))  # rounds up to here were fixed before we registered
            token = f"{self.receiver_id}#{secrets.token_hex(4)}"
            index = int(self._store.add(Keys.events_count, 1))
            put_json(self._store, Keys.event(index), self._event("join", token))
            self._token, self._next_round, self._invited = token, current + 1, False

    def receive(self, wait_s: float | None = None) -> Delivery | None:
        """Wait up to wait_s (default timeout_s) for the next round; receive, verify and acknowledge it.

        Returns None when no round started in time or the receiver is closing. Raises ResyncNeeded (or its
        subclasses ManifestRejected, ChecksumMismatch) when this receiver missed or refused an update: nothing was
        staged; load the newest checkpoint and join() again.
        """
        with self._lock:
            store, token = self._store, self._token
            if store is None or token is None:
                raise RuntimeError("call join() before receive()")
            try:
                found = self._next_invite(store, token, self.timeout_s if wait_s is None else wait_s)
                if found is None:
                    return None
                return self._take_part(store, token, *found)
            except ResyncNeeded:
                self._token = None
                raise
            except dist.DistError as exc:  # the learner's store went away or stopped answering
                self._token = None
                raise ResyncNeeded(f"sync store unreachable: {exc}") from exc

    def close(self) -> None:
        """Leave the group (waits for an in-flight round to finish) and disconnect."""
        self._stop.set()
        with self._lock:
            if self._store is not None and self._token is not None:
                try:
                    index = int(self._store.add(Keys.events_count, 1))
                    put_json(self._store, Keys.event(index), self._event("leave", self._token))
                except dist.DistError:
                    logger.info("could not announce leaving: the learner's store is gone")
            self._store, self._token = None, None

    def _event(self, op: str, member: str) -> dict[str, str]:
        return {"op": op, "member": member, "proof": membership_proof(self.secret, op, member)}

    def _next_invite(self, store: dist.Store, token: str, wait_s: float) -> tuple[int, int] | None:
        """The next round that invites us, as (round, version); skips rounds from before our registration."""
        deadline = time.monotonic() + wait_s
        while True:
            rnd = self._next_round
            remaining = max(0.0, deadline - time.monotonic())
            if not wait_keys(store, [Keys.invite(rnd)], remaining, self._stop):
                return None
            invite = get_json(store, Keys.invite(rnd))
            self._next_round = rnd + 1
            if token in invite["members"]:
                self._invited = True
                return rnd, int(invite["version"])
            if self._invited:
                raise ResyncNeeded(f"dropped by the learner before round {rnd} (v{invite['version']})")

    def _take_part(self, store: dist.Store, token: str, rnd: int, invited_version: int) -> Delivery:
        store.set(Keys.ready(rnd, token), "1")
        # The learner writes the roster once every member is ready or its own timeout_s (counted from the invite)
        # passed: a stopped member makes it wait all of it. Waiting twice as long leaves no race at the deadline.
        if not wait_keys(store, [Keys.roster(rnd)], 2 * self.timeout_s):
            raise ResyncNeeded(f"round {rnd}: the learner published no roster within {2 * self.timeout_s}s")
        roster = get_json(store, Keys.roster(rnd))
        if token not in roster:
            raise ResyncNeeded(f"round {rnd}: dropped (not ready within the learner's timeout)")
        group = None
        failed = True
        try:
            prefix = dist.PrefixStore(Keys.group_prefix(rnd), store)
            rank, size = roster.index(token) + 1, len(roster) + 1
            group = new_group(self.backend, prefix, rank, size, self.timeout_s, self.device, self._bind_host)
            delivery = self._receive_round(group, rnd, invited_version)
            failed = False
        except ResyncNeeded as exc:
            self._ack(store, rnd, token, "rejected", str(exc))
            raise
        except RuntimeError as exc:  # gloo/NCCL failure or timeout mid-round
            self._ack(store, rnd, token, "failed", str(exc))
            raise ResyncNeeded(f"round {rnd} failed: {exc}") from exc
        finally:
            if group is not None:
                release_group(group, failed)
        self._ack(store, rnd, token, "ok", delivery.fingerprint)
        return delivery

    def _ack(self, store: dist.Store, rnd: int, token: str, status: str, detail: str) -> None:
        if status != "ok":
            logger.warning("weight sync round %d %s: %s", rnd, status, detail)
        try:
            put_json(store, Keys.ack(rnd, token), {"status": status, "detail": detail[:500]})
        except dist.DistError:
            logger.info("could not ack round %d: the learner's store is gone", rnd)

    def _receive_round(self, group: Group, rnd: int, invited_version: int) -> Delivery:
        manifest = Manifest.decode(recv_bytes(group, self.device, self.timeout_s))
        problems = validate_manifest(manifest, self.expected)
        if (manifest.round, manifest.version) != (rnd, invited_version):
            problems.append(f"manifest is for round {manifest.round} v{manifest.version}, not {rnd} v{invited_version}")
        if problems:
            # A broadcast cannot skip a rank: take the round's bytes so the other receivers are not held up.
            self._drain(group, manifest)
            raise ManifestRejected("; ".join(problems))
        sums = self._recv_buckets(group, manifest)
        trailer = torch.zeros(len(manifest.buckets), dtype=torch.int64, device=self.device)
        wait_work(broadcast(group, trailer, self.timeout_s), self.timeout_s)
        sent = trailer.tolist()
        bad = [k for k, (got, want) in enumerate(zip(sums, sent, strict=True)) if got != want]
        if bad:
            raise ChecksumMismatch(f"round {rnd} (v{manifest.version}): {manifest.checksum} differs in buckets {bad}")
        return Delivery(manifest.version, fingerprint(manifest, sent), unpack(manifest, self._staging))

    def _recv_buckets(self, group: Group, manifest: Manifest) -> list[int]:
        """Receive every bucket into host staging (bucket k+1 in flight while bucket k is checksummed)."""
        if [b.numel() for b in self._staging] != list(manifest.buckets):
            self._staging = []  # free the old set before allocating the new one
            pin = self.device.type == "cuda"
            self._staging = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for size in manifest.buckets]
        if self.device.type == "cpu":
            return self._recv_into(group, self._staging, manifest.checksum)
        return self._recv_through_device(group, manifest)

    def _recv_into(self, group: Group, buffers: list[torch.Tensor], algo: str) -> list[int]:
        # Every bucket has its own staging buffer, so all receives are posted at once (the transport never waits
        # for this thread) and each bucket is checksummed as soon as it has arrived.
        works = [broadcast(group, buf, self.timeout_s) for buf in buffers]
        sums: list[int] = []
        for work, buf in zip(works, buffers, strict=True):
            wait_work(work, self.timeout_s)
            sums.append(checksum(buf, algo))
        return sums

    def _recv_through_device(self, group: Group, manifest: Manifest) -> list[int]:
        """NCCL: two device buckets alternate; each is checksummed on the device and copied to pinned host memory."""
        largest = max(manifest.buckets, default=1)
        if not self._transport or self._transport[0].numel() < largest:
            self._transport = []
            self._transport = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(2)]
        sums: list[int] = []
        for k, size in enumerate(manifest.buckets):
            slot = self._transport[k % 2][:size]
            wait_work(broadcast(group, slot, self.timeout_s), self.timeout_s)
            sums.append(checksum(slot, manifest.checksum))
            self._staging[k].copy_(slot)  # synchronous: the slot is reused two buckets later
        return sums

    def _drain(self, group: Group, manifest: Manifest) -> None:
        scratch = torch.empty(max(manifest.buckets, default=1), dtype=torch.uint8, device=self.device)
        for size in manifest.buckets:
            wait_work(broadcast(group, scratch[:size], self.timeout_s), self.timeout_s)
        trailer = torch.zeros(len(manifest.buckets), dtype=torch.int64, device=self.device)
        wait_work(broadcast(group, trailer, self.timeout_s), self.timeout_s)
