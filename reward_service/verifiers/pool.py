"""A pool of killable verifier worker processes, shared by the math and the function-call verifiers.

Each slot owns one worker process and a thread that feeds it one job at a time over a pipe. A job carries a hard
deadline: the worker arms its own soft timer for ``timeout_s`` (and answers ``timeout``), and the slot gives up
``kill_grace_s`` later, SIGKILLs the worker and starts a replacement, so a check that never ends costs one item and
a restart, never a stuck thread. ``concurrent.futures.ProcessPoolExecutor`` is not used because it cannot kill one
stuck worker. A worker that dies mid-item makes that item ``error``.

Only JSON-encoded lists of str/float cross the pipes (no pickles of our own). A worker target is
``target(conn, *args)``: it sends ``["ready"]`` once warm, then answers each ``["verify", *fields]`` with a list,
and returns on ``["stop"]`` or when the pipe closes (``serve_requests`` does that loop).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import queue
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Literal

from reward_service.verifiers.base import Status, VerifyResult

logger = logging.getLogger(__name__)

_POLL_S = 0.5
_PRELOAD: set[str] = set()
Field = str | float


def encode_message(*fields: Field | None) -> bytes:
    """One pool message."""
    return json.dumps(fields).encode()


def decode_message(data: bytes) -> list[Any]:
    """Parse one pool message; ValueError when malformed."""
    fields = json.loads(data)
    if not isinstance(fields, list) or not fields:
        raise ValueError("malformed pool message")
    return fields


class SoftTimeout(BaseException):
    """Raised in a worker by its interval timer; a BaseException so a library's ``except Exception`` lets it pass."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeout


def prepare_worker(memory_limit_mb: int) -> None:
    """A worker's first step: leave Ctrl-C to the parent, arm SIGALRM for :func:`soft_deadline`, cap its memory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent closes the pool
    signal.signal(signal.SIGALRM, _on_alarm)
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@contextlib.contextmanager
def soft_deadline(timeout_s: float) -> Iterator[None]:
    """Raise SoftTimeout in the block once ``timeout_s`` passed (the worker lives on; the slot's kill is the hard
    bound for code that does not return to Python)."""
    signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def serve_requests(conn: Connection, answer: Callable[[list[Any]], Sequence[Field | None]]) -> None:
    """A worker's loop after its warm-up: say ready, then answer every ``verify`` request until told to stop."""
    conn.send_bytes(encode_message("ready"))
    while True:
        try:
            request = decode_message(conn.recv_bytes())
        except EOFError:
            return
        if request[0] != "verify":
            return
        conn.send_bytes(encode_message(*answer(request[1:])))


@dataclass(slots=True)
class PoolJob:
    """One item: the fields sent to a worker, its time bound, and how its reply becomes a result."""

    fields: tuple[Field, ...]
    timeout_s: float
    future: Future[VerifyResult]
    decode: Callable[[list[Any]], VerifyResult]
    """The worker's reply as a result (ValueError or KeyError for a reply of the wrong shape)."""
    failed: Callable[[Status, str], VerifyResult]
    """The result of an item the pool could not verify (``error``, ``timeout``), with the item's own details."""


def fail(job: PoolJob, detail: str) -> None:
    """Resolve a job that will never run with ``error``."""
    if job.future.set_running_or_notify_cancel():
        job.future.set_result(job.failed(Status.ERROR, detail))


class WorkerPool:
    """``num_workers`` slots, each a worker process and its feeding thread; thread-safe, close() when done."""

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        target_args: tuple[Any, ...],
        *,
        num_workers: int = 2,
        max_pending: int = 1024,
        start_method: Literal["forkserver", "spawn"] = "forkserver",
        start_timeout_s: float = 60.0,
        kill_grace_s: float = 1.0,
        preload: Sequence[str] = (),
    ) -> None:
        if num_workers < 1 or max_pending < 1:
            raise ValueError("num_workers and max_pending must be >= 1")
        self.name = name
        self.target = target
        self.target_args = target_args
        self.start_timeout_s = start_timeout_s
        self.kill_grace_s = kill_grace_s
        self.context: ForkServerContext | SpawnContext
        if start_method == "forkserver":
            self.context = multiprocessing.get_context("forkserver")
            # Workers forked from a server that already imported the heavy modules start fast, which keeps the
            # replacement of a killed worker cheap. Ignored when this process's forkserver already runs.
            if preload:
                _PRELOAD.update(preload)  # one forkserver per process: it preloads what every pool asks for
                self.context.set_forkserver_preload(sorted(_PRELOAD))
        else:
            self.context = multiprocessing.get_context("spawn")
        self._jobs: queue.SimpleQueue[PoolJob | None] = queue.SimpleQueue()
        self._capacity = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._closed = False
        self._starts = 0
        self._slots = [_Slot(self, index) for index in range(num_workers)]
        for slot in self._slots:
            slot.thread.start()

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    @property
    def worker_restarts(self) -> int:
        """Workers started beyond the initial ones (kills, crashes, failed starts): a metric for the service."""
        with self._lock:
            return max(0, self._starts - len(self._slots))

    def count_start(self) -> None:
        """Called by a slot each time it starts a worker process."""
        with self._lock:
            self._starts += 1

    def worker_pids(self) -> list[int]:
        """Process ids of the workers that are currently ready."""
        return [pid for slot in self._slots if slot.ready.is_set() and (pid := slot.pid) is not None]

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until every worker has warmed up (or the timeout passes); True when all are ready."""
        return all(slot.ready.wait(timeout_s) for slot in self._slots)

    def submit(self, job: PoolJob, *, block: bool = True) -> Future[VerifyResult]:
        """Queue a job; queue.Full when ``max_pending`` jobs wait and block is False."""
        if self._closed:
            raise RuntimeError(f"{self.name} verifier is closed")
        if job.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {job.timeout_s}")
        if not self._capacity.acquire(blocking=block):
            raise queue.Full(f"{self.name} verifier queue is full")
        with self._lock:
            if self._closed:
                self._capacity.release()
                raise RuntimeError(f"{self.name} verifier is closed")
            self._jobs.put(job)
        return job.future

    def take_job(self) -> PoolJob | None:
        """Next queued job for a slot, or None after a short wait (so slots notice close() and dead workers)."""
        try:
            job = self._jobs.get(timeout=_POLL_S)
        except queue.Empty:
            return None
        if job is not None:
            self._capacity.release()
        return job

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (asking first, then SIGKILL) and fail every job still queued with ``error``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._slots:
            self._jobs.put(None)
        for slot in self._slots:
            slot.thread.join(timeout_s)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._capacity.release()
                fail(job, f"{self.name} verifier closed before this item ran")


class _Slot:
    """One worker process, its pipe, and the thread that feeds it jobs and replaces it when it dies or hangs."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self._pool = pool
        self.index = index
        self.process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"{pool.name}-verifier-slot-{index}", daemon=True)

    def _run(self) -> None:
        try:
            while not self._pool.closed:
                if not self._ensure_worker():
                    if not self._pool.closed:
                        self._fail_next_job(f"{self._pool.name} worker failed to start")
                    continue
                job = self._pool.take_job()
                if job is None or not job.future.set_running_or_notify_cancel():
                    continue  # nothing queued, or a job whose caller gave up (a client that hung up)
                job.future.set_result(self._run_job(job))
        finally:
            self._stop_worker()

    def _ensure_worker(self) -> bool:
        """Start (or restart) the worker unless a live one is attached; True once it reported ready."""
        if self.process is not None and self.process.is_alive():
            return True
        name = self._pool.name
        if self.process is not None:
            logger.warning("%s worker %s died while idle (exit code %s)", name, self.pid, self._discard_worker())
        parent_conn, child_conn = self._pool.context.Pipe(duplex=True)
        process = self._pool.context.Process(target=self._pool.target, args=(child_conn, *self._pool.target_args),
                                             name=f"{name}-worker-{self.index}")  # fmt: skip
        process.daemon = True
        process.start()
        child_conn.close()
        self.process, self._conn = process, parent_conn
        self._pool.count_start()
        if self._await_ready(parent_conn):
            self.ready.set()
            return True
        if not self._pool.closed:
            logger.error("%s worker %s not ready within %.0f s", name, process.pid, self._pool.start_timeout_s)
        self._kill_worker()
        return False

    def _await_ready(self, conn: Connection) -> bool:
        """Wait for the worker's warm-up message, giving up early when the pool closes."""
        deadline = time.monotonic() + self._pool.start_timeout_s
        try:
            while not self._pool.closed and time.monotonic() < deadline:
                if conn.poll(_POLL_S):
                    return decode_message(conn.recv_bytes()) == ["ready"]
        except (EOFError, OSError, ValueError):
            pass
        return False

    def _run_job(self, job: PoolJob) -> VerifyResult:
        assert self._conn is not None, "a job runs only on a ready worker"
        deadline = job.timeout_s + self._pool.kill_grace_s
        name = self._pool.name
        try:
            self._conn.send_bytes(encode_message("verify", *job.fields))
            if self._conn.poll(deadline):
                return job.decode(decode_message(self._conn.recv_bytes()))
        except (EOFError, OSError, ValueError, KeyError, TypeError) as exc:  # a dead worker, or a malformed reply
            exit_code = self._kill_worker()
            return job.failed(Status.ERROR, f"{name} worker failed (exit code {exit_code}): {exc!r}")
        logger.warning("%s worker %s gave no reply within %.1f s; killing it", name, self.pid, deadline)
        self._kill_worker()
        return job.failed(Status.TIMEOUT, f"no reply within {deadline:g} s: worker killed and replaced")

    def _fail_next_job(self, detail: str) -> None:
        """Resolve one waiting job with ``error`` so callers never wait on a pool that cannot start workers."""
        job = self._pool.take_job()
        if job is not None:
            fail(job, detail)

    @property
    def pid(self) -> int | None:
        """Process id of the attached worker, if any."""
        return self.process.pid if self.process is not None else None

    def _kill_worker(self) -> int | None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        return self._discard_worker()

    def _discard_worker(self) -> int | None:
        """Reap and forget the worker; returns its exit code (None if it could not be reaped)."""
        self.ready.clear()
        exit_code = None
        if self.process is not None:
            self.process.join(timeout=5.0)
            exit_code = self.process.exitcode
            if exit_code is not None:
                self.process.close()
        if self._conn is not None:
            self._conn.close()
        self.process, self._conn = None, None
        return exit_code

    def _stop_worker(self) -> None:
        """Ask the worker to exit, and kill it if it does not within a second."""
        if self._conn is not None and self.process is not None and self.process.is_alive():
            try:
                self._conn.send_bytes(encode_message("stop"))
                self.process.join(timeout=1.0)
            except OSError:
                pass
        self._kill_worker()
