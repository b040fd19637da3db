"""What ``dipo run`` shows while a run trains: a live ``rich`` panel on a terminal, one plain line per step elsewhere.

Sources: the learner's ``<run_dir>/metrics.jsonl`` (read incrementally: only the bytes appended since the last
look), the run's ``policy`` hash and the lengths of its work streams in Redis, and the supervisor's child table.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from runner.supervisor import ChildStatus
from services.config import RunConfig
from services.contracts import POLICY, WORK_STREAMS, PolicyField, RunFolder
from services.contracts import MetricKey as K
from services.streams import connect_sync, run_key

_REDIS_TIMEOUT_S = 1.0  # the panel must never stall the supervision loop for long
_STATE_STYLE = {"running": "green", "restarting": "yellow", "stopping": "yellow", "failed": "red"}


class MetricsTail:
    """Reads the complete lines appended to a JSONL file since the last call (a half-written last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.bad_lines = 0

    def read_new(self) -> list[dict[str, Any]]:
        """The JSON objects of the complete lines appended since the previous call."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # replaced or truncated: start over
            self.offset = 0
        if size == self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        rows: list[dict[str, Any]] = []
        for raw in chunk[:end].splitlines():
            try:
                row = json.loads(raw)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def num(row: dict[str, Any] | None, key: str) -> float | None:
    """A finite number from a metrics row, or None (missing, null, NaN or not a number)."""
    if row is None:
        return None
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def fmt(value: float | None, spec: str = ".3f") -> str:
    """Format a number for display, with a dash for a missing one."""
    return "-" if value is None else format(value, spec)


def fmt_duration(seconds: float | None) -> str:
    """Seconds as ``1h02m`` / ``3m20s`` / ``12s``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Snapshot:
    """Everything one refresh of the panel shows."""

    total_steps: int
    last: dict[str, Any] | None = None
    new_rows: list[dict[str, Any]] = field(default_factory=list)
    realloc_reward_total: float = 0.0
    realloc_penalty_total: float = 0.0
    steps_per_s: float | None = None
    policy: dict[str, str] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)
    redis_error: str | None = None
    children: list[ChildStatus] = field(default_factory=list)

    @property
    def step(self) -> int:
        """The last step written to metrics.jsonl (0 before the first)."""
        value = num(self.last, K.STEP)
        return int(value) if value is not None else 0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the observed step rate."""
        if not self.steps_per_s:
            return None
        return max(0, self.total_steps - self.step) / self.steps_per_s


class RunMonitor:
    """Collects a :class:`Snapshot` of a running job from its run folder, Redis and the supervisor."""

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        redis_url: str | None,
        children: Callable[[], list[ChildStatus]] = list,
    ) -> None:
        self.tail = MetricsTail(RunFolder(Path(run_dir)).metrics)
        self.run = cfg.name
        self.total_steps = cfg.learner.steps
        self.children = children
        self.last: dict[str, Any] | None = None
        self.realloc = [0.0, 0.0]
        self._first_seen: tuple[float, float] | None = None  # (step, time) of the first line seen
        self._policy: dict[str, str] = {}
        self._streams: dict[str, int] = {}
        self._client: redis.Redis | None = None
        if redis_url:
            rc = cfg.redis  # the same password and TLS options as every process of the run
            self._client = connect_sync(redis_url, timeout_s=_REDIS_TIMEOUT_S, retries=0, password=rc.password,
                                        ssl_ca_certs=rc.tls_ca_file, ssl_certfile=rc.tls_cert_file,
                                        ssl_keyfile=rc.tls_key_file)  # fmt: skip

    def snapshot(self) -> Snapshot:
        """Read what changed since the last snapshot."""
        rows = self.tail.read_new()
        for row in rows:
            self.realloc[0] += num(row, K.REALLOC_REWARD) or 0.0
            self.realloc[1] += num(row, K.REALLOC_PENALTY) or 0.0
            step, at = num(row, K.STEP), num(row, K.TIME)
            if step is not None and at is not None and self._first_seen is None:
                self._first_seen = (step, at)
        if rows:
            self.last = rows[-1]
        snap = Snapshot(self.total_steps, self.last, rows, self.realloc[0], self.realloc[1], self._rate())
        snap.children = self.children()
        self._read_redis(snap)
        return snap

    def _rate(self) -> float | None:
        step, at = num(self.last, K.STEP), num(self.last, K.TIME)
        if self._first_seen is not None and step is not None and at is not None and at > self._first_seen[1]:
            return (step - self._first_seen[0]) / (at - self._first_seen[1])
        elapsed = num(self.last, K.ELAPSED_S)  # one line seen so far: the learner's own clock
        return step / elapsed if step and elapsed else None

    def _read_redis(self, snap: Snapshot) -> None:
        if self._client is None:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(run_key(self.run, POLICY))
            for name in WORK_STREAMS:
                pipe.xlen(run_key(self.run, name))
            policy, *lengths = pipe.execute()
        except redis.RedisError as exc:  # Redis restarting: show the last values read, try again next tick
            snap.redis_error = f"{type(exc).__name__}: {exc}"
        else:
            self._policy = {_text(k): _text(v) for k, v in policy.items()}
            self._streams = dict(zip(WORK_STREAMS, (int(n) for n in lengths), strict=True))
        snap.policy, snap.streams = dict(self._policy), dict(self._streams)

    def close(self) -> None:
        """Close the Redis client."""
        if self._client is not None:
            self._client.close()
            self._client = None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------------------------------
# rendering


def _training_table(snap: Snapshot) -> Table:
    row = snap.last
    table = Table.grid(padding=(0, 2))
    for _ in range(4):
        table.add_column(style="bold")
        table.add_column()
    version = snap.policy.get(PolicyField.VERSION) or fmt(num(row, K.VERSION), ".0f")
    kinds = "/".join(fmt(num(row, f"kind_{k}"), ".2f") for k in ("easy", "normal", "hard"))
    staleness = f"{fmt(num(row, 'staleness_mean'), '.2f')} (max {fmt(num(row, 'staleness_max'), '.0f')})"
    table.add_row("step", f"{snap.step} / {snap.total_steps}", "version", version,
                  "status", snap.policy.get(PolicyField.STATUS, "-"), "ETA", fmt_duration(snap.eta_s))  # fmt: skip
    table.add_row("reward", fmt(num(row, K.REWARD_MEAN)), "accuracy", fmt(num(row, K.ACCURACY)),
                  "tau*", fmt(num(row, K.TAU)), "gate open", fmt(num(row, K.GATE_OPEN_RATIO), ".2f"))  # fmt: skip
    table.add_row("easy/normal/hard", kinds, "realloc +/-",
                  f"{fmt(num(row, 'realloc_reward'), '.0f')}/{fmt(num(row, 'realloc_penalty'), '.0f')} "
                  f"(total {snap.realloc_reward_total:.0f}/{snap.realloc_penalty_total:.0f})",
                  "staleness", staleness, "tokens/s", fmt(num(row, K.GEN_TOKENS_PER_S), ".1f"))  # fmt: skip
    return table


def _children_table(snap: Snapshot) -> Table:
    table = Table(expand=False, box=None, header_style="bold")
    for column in ("process", "state", "pid", "restarts", "last exit"):
        table.add_column(column)
    for child in snap.children:
        style = _STATE_STYLE.get(child.state, "")
        state = f"[{style}]{child.state}[/{style}]" if style else child.state
        exit_code = "-" if child.exit_code is None else str(child.exit_code)
        table.add_row(child.name, state, str(child.pid or "-"), str(child.restarts), exit_code)
    return table


def _streams_line(snap: Snapshot) -> str:
    line = "streams: " + "  ".join(f"{name} {snap.streams.get(name, '-')}" for name in WORK_STREAMS)
    if snap.redis_error:
        line += f"  [red](last known; redis unavailable: {escape(snap.redis_error)})[/red]"
    return line


def render(snap: Snapshot, title: str = "dipo run") -> RenderableType:
    """The panel for one snapshot."""
    body = Group(_training_table(snap), "", _children_table(snap), "", _streams_line(snap))
    return Panel(body, title=title, border_style="blue")


def plain_line(row: dict[str, Any], snap: Snapshot) -> str:
    """One log line for one step, for logs and CI."""
    return (
        f"step {int(num(row, 'step') or 0)}/{snap.total_steps}  v{fmt(num(row, 'version'), '.0f')}  "
        f"reward {fmt(num(row, 'reward_mean'))}  acc {fmt(num(row, 'accuracy'))}  tau* {fmt(num(row, 'tau'))}  "
        f"gate {fmt(num(row, 'gate_open_ratio'), '.2f')}  "
        f"e/n/h {'/'.join(fmt(num(row, f'kind_{k}'), '.2f') for k in ('easy', 'normal', 'hard'))}  "
        f"realloc +{fmt(num(row, 'realloc_reward'), '.0f')}/-{fmt(num(row, 'realloc_penalty'), '.0f')}  "
        f"stale {fmt(num(row, 'staleness_mean'), '.2f')}  tok/s {fmt(num(row, 'gen_tokens_per_s'), '.1f')}  "
        f"ETA {fmt_duration(snap.eta_s)}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# displays


class Display(Protocol):
    """Something the supervision loop ticks about once a second."""

    def tick(self) -> None:
        """Refresh from a new snapshot."""


class LiveDisplay:
    """The live panel."""

    def __init__(self, monitor: RunMonitor, live: Live) -> None:
        self.monitor = monitor
        self.live = live

    def tick(self) -> None:
        """Redraw the panel."""
        self.live.update(render(self.monitor.snapshot()), refresh=True)


class PlainDisplay:
    """One printed line per new step, plus a line whenever a child changes state."""

    def __init__(self, monitor: RunMonitor, console: Console) -> None:
        self.monitor = monitor
        self.console = console
        self._states: dict[str, tuple[str, int | None]] = {}

    def tick(self) -> None:
        """Print what is new since the previous tick."""
        snap = self.monitor.snapshot()
        for row in snap.new_rows:
            self._print(plain_line(row, snap))
        for child in snap.children:
            state = (child.state, child.pid)
            if self._states.get(child.name) != state:
                self._states[child.name] = state
                self._print(f"{child.name}: {child.state} (pid {child.pid or '-'}, restarts {child.restarts})")

    def _print(self, line: str) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} {line}", highlight=False, markup=False, soft_wrap=True)


@contextmanager
def open_display(monitor: RunMonitor, console: Console, *, live: bool) -> Iterator[Display]:
    """A live panel when ``live`` (a terminal), else plain step lines."""
    if not live:
        yield PlainDisplay(monitor, console)
        return
    # the supervisor ticks about once a second; Live's own thread only redraws in between
    with Live(render(Snapshot(monitor.total_steps)), console=console, refresh_per_second=1, transient=False) as lv:
        yield LiveDisplay(monitor, lv)


def route_logging_to(console: Console) -> None:
    """Send the root logger's terminal output through ``console`` so it scrolls above a live panel."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
