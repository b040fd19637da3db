"""The run's ``policy`` hash in Redis: what the learner publishes for rollout servers and the launcher.

Fields (all strings): ``version`` (the policy version rollout servers should generate with), ``checkpoint`` and
``checkpoint_version`` (the newest complete checkpoint, a Hugging Face folder a late joiner loads first),
``sync_endpoint`` (host:port of the weight-sync rendezvous store, written by the WeightBroadcaster),
``status`` (``starting | running | done | failed``), ``step``, ``phase`` and ``updated_at``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from services.streams import POLICY, run_key

log = logging.getLogger(__name__)

VERSION = "version"
CHECKPOINT = "checkpoint"
CHECKPOINT_VERSION = "checkpoint_version"
STATUS = "status"
STEP = "step"
PHASE = "phase"
"""What the learner is doing: ``wait`` (for a batch), ``train``, ``sync`` (weight broadcast), ``checkpoint``."""


def policy_key(run: str) -> str:
    """Redis key of the run's policy hash."""
    return run_key(run, POLICY)


@dataclass(frozen=True)
class PolicyState:
    """A reader's view of the policy hash."""

    version: int
    checkpoint: Path | None
    checkpoint_version: int
    status: str
    sync_endpoint: str | None

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> PolicyState:
        """Parse the hash as HGETALL returns it (missing fields take their initial values)."""
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}  # fmt: skip
        checkpoint = data.get(CHECKPOINT) or None
        return cls(
            version=int(data.get(VERSION, 0)),
            checkpoint=Path(checkpoint) if checkpoint else None,
            checkpoint_version=int(data.get(CHECKPOINT_VERSION, -1)),
            status=data.get(STATUS, "starting"),
            sync_endpoint=data.get("sync_endpoint") or None,
        )


class PolicyPublisher:
    """Writes the policy hash with a synchronous client (it is called from the training thread too)."""

    def __init__(self, client: redis.Redis, run: str) -> None:
        self.client = client
        self.key = policy_key(run)

    def publish(self, fields: Mapping[str, str | int | float]) -> None:
        """Set some fields (and ``updated_at``)."""
        mapping = {k: str(v) for k, v in fields.items()} | {"updated_at": repr(time.time())}
        self.client.hset(self.key, mapping=mapping)

    def publish_phase(self, phase: str) -> None:
        """Best-effort: the phase is for watchers (the panel, the chaos runner), not worth failing a step over."""
        try:
            self.client.hset(self.key, PHASE, phase)
        except redis.RedisError as exc:
            log.debug("could not publish phase %s: %s", phase, exc)

    def read(self) -> PolicyState:
        """The current hash."""
        return PolicyState.from_hash(self.client.hgetall(self.key))
