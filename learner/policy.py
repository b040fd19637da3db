"""The learner's writer of the run's ``policy`` hash in Redis: what rollout servers and the tooling read.

The fields and their meaning are the kernel's :class:`services.contracts.PolicyField`; readers parse the hash with
:class:`services.contracts.PolicyView`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import redis

from services.contracts import POLICY, PolicyField, PolicyView
from services.streams import run_key

log = logging.getLogger(__name__)


class PolicyPublisher:
    """Writes the policy hash with a synchronous client (it is called from the training thread too)."""

    def __init__(self, client: redis.Redis, run: str) -> None:
        self.client = client
        self.key = run_key(run, POLICY)

    def publish(self, fields: Mapping[str, str | int | float]) -> None:
        """Set some fields (and ``updated_at``)."""
        mapping = {k: str(v) for k, v in fields.items()} | {PolicyField.UPDATED_AT: repr(time.time())}
        self.client.hset(self.key, mapping=mapping)

    def publish_phase(self, phase: str) -> None:
        """Best-effort: the phase is for watchers (the panel, the chaos runner), not worth failing a step over."""
        try:
            self.client.hset(self.key, PolicyField.PHASE, phase)
        except redis.RedisError as exc:
            log.debug("could not publish phase %s: %s", phase, exc)

    def read(self) -> PolicyView:
        """The current hash."""
        return PolicyView.from_hash(self.client.hgetall(self.key))
