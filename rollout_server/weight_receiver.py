"""Rollout-server side of weight sync: join the learner's rounds and apply verified weights (docs/WEIGHT_SYNC.md)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

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
    get_json,
    is_loopback,
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

Apply = Callable[[Iterable[tuple[str, torch.Tensor]], int], None]
"""apply(named_tensors, version): copy the tensors into the model. They are views into staging buffers that the
next round overwrites, so copy them (as `param.copy_(t)` or vLLM's load_weights does); never keep references."""


class WeightReceiver:
    """A member of the learner's sync rounds; use it from one dedicated thread (close() from any thread)."""

    def __init__(
        self,
        endpoint: str,
        receiver_id: str,
        expected: Expected,
        *,
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
        self._staging: list[torch.Tensor] = []  # kept between rounds: fresh buffers would page-fault every round

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
            put_json(self._store, Keys.event(index), {"op": "join", "member": token})
            self._token, self._next_round, self._invited = token, current + 1, False

    def receive(self, apply: Apply, wait_s: float | None = None) -> int | None:
        """Wait up to wait_s (default timeout_s) for the next round; apply it; return the applied version.

        Returns None when no round started in time or the receiver is closing. Raises ResyncNeeded (or its
        subclasses ManifestRejected, ChecksumMismatch) when this receiver missed or refused an update: the model
        is untouched; load the newest checkpoint and join() again.
        """
        with self._lock:
            store, token = self._store, self._token
            if store is None or token is None:
                raise RuntimeError("call join() before receive()")
            try:
                found = self._next_invite(store, token, self.timeout_s if wait_s is None else wait_s)
                if found is None:
                    return None
                return self._take_part(store, token, *found, apply)
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
                    put_json(self._store, Keys.event(index), {"op": "leave", "member": self._token})
                except dist.DistError:
                    logger.info("could not announce leaving: the learner's store is gone")
            self._store, self._token = None, None

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

    def _take_part(self, store: dist.Store, token: str, rnd: int, invited_version: int, apply: Apply) -> int:
        store.set(Keys.ready(rnd, token), "1")
        if not wait_keys(store, [Keys.roster(rnd)], self.timeout_s):
            raise ResyncNeeded(f"round {rnd}: the learner published no roster within {self.timeout_s}s")
        roster = get_json(store, Keys.roster(rnd))
        if token not in roster:
            raise ResyncNeeded(f"round {rnd}: dropped (not ready within the learner's timeout)")
        group = None
        failed = True
        try:
            prefix = dist.PrefixStore(Keys.group_prefix(rnd), store)
            rank, size = roster.index(token) + 1, len(roster) + 1
            group = new_group(self.backend, prefix, rank, size, self.timeout_s, self.device, self._bind_host)
            version = self._receive_round(group, rnd, invited_version, apply)
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
        self._ack(store, rnd, token, "ok", f"v{version}")
        return version

    def _ack(self, store: dist.Store, rnd: int, token: str, status: str, detail: str) -> None:
        if status != "ok":
            logger.warning("weight sync round %d %s: %s", rnd, status, detail)
        try:
            put_json(store, Keys.ack(rnd, token), {"status": status, "detail": detail[:500]})
        except dist.DistError:
            logger.info("could not ack round %d: the learner's store is gone", rnd)

    def _receive_round(self, group: Group, rnd: int, invited_version: int, apply: Apply) -> int:
        manifest = Manifest.decode(recv_bytes(group, self.device, self.timeout_s))
        problems = validate_manifest(manifest, self.expected)
        if (manifest.round, manifest.version) != (rnd, invited_version):
            problems.append(f"manifest is for round {manifest.round} v{manifest.version}, not {rnd} v{invited_version}")
        if problems:
            # A broadcast cannot skip a rank: take the round's bytes so the other receivers are not held up.
            self._drain(group, manifest)
            raise ManifestRejected("; ".join(problems))
        buffers, sums = self._recv_buckets(group, manifest)
        trailer = torch.zeros(len(manifest.buckets), dtype=torch.int64, device=self.device)
        wait_work(broadcast(group, trailer, self.timeout_s), self.timeout_s)
        bad = [k for k, (got, sent) in enumerate(zip(sums, trailer.tolist(), strict=True)) if got != sent]
        if bad:
            raise ChecksumMismatch(f"round {rnd} (v{manifest.version}): {manifest.checksum} differs in buckets {bad}")
        try:
            apply(unpack(manifest, buffers), manifest.version)
        except Exception as exc:  # the model may be half-updated: only a checkpoint reload makes it whole again
            raise ResyncNeeded(f"apply() failed for v{manifest.version}: {exc!r}") from exc
        return manifest.version

    def _recv_buckets(self, group: Group, manifest: Manifest) -> tuple[list[torch.Tensor], list[int]]:
        """Receive bucket k+1 while checksumming bucket k; all buckets are kept until validation ends."""
        if [b.numel() for b in self._staging] != list(manifest.buckets):
            self._staging = []  # free the old set before allocating the new one
            self._staging = [torch.empty(size, dtype=torch.uint8, device=self.device) for size in manifest.buckets]
        buffers = self._staging
        sums: list[int] = []
        work = broadcast(group, buffers[0], self.timeout_s) if buffers else None
        for k, buf in enumerate(buffers):
            wait_work(work, self.timeout_s)
            if k + 1 < len(buffers):
                work = broadcast(group, buffers[k + 1], self.timeout_s)
            sums.append(checksum(buf, manifest.checksum))
        return buffers, sums

    def _drain(self, group: Group, manifest: Manifest) -> None:
        scratch = torch.empty(max(manifest.buckets, default=1), dtype=torch.uint8, device=self.device)
        for size in manifest.buckets:
            wait_work(broadcast(group, scratch[:size], self.timeout_s), self.timeout_s)
        trailer = torch.zeros(len(manifest.buckets), dtype=torch.int64, device=self.device)
        wait_work(broadcast(group, trailer, self.timeout_s), self.timeout_s)
