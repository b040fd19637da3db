"""Publishing a new policy version while the learner already waits for its next batch.

One publication: broadcast the weights (receivers acknowledge on receipt, so this ends when the bytes are delivered,
never after a generation), record the version's fingerprint and the learner's canary scoring of it (learner/
provenance.py), then announce the version in the policy hash. It runs as a background task that overlaps the wait
for the next batch; the learner awaits it before the next optimizer step changes the weights, and before a
checkpoint (whose folder records the fingerprint).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from learner.policy import PolicyPublisher
from learner.provenance import Provenance, canary_reference
from learner.weight_sync import BroadcastReport, WeightBroadcaster
from services.contracts import PolicyField

log = logging.getLogger(__name__)

OnReport = Callable[[BroadcastReport], None]


class Publication:
    """The learner's publications, one at a time."""

    def __init__(
        self, broadcaster: WeightBroadcaster, provenance: Provenance, publisher: PolicyPublisher, on_report: OnReport
    ) -> None:
        self.broadcaster = broadcaster
        self.provenance = provenance
        self.publisher = publisher
        self.on_report = on_report
        self._task: asyncio.Task[None] | None = None
        self.version = -1
        """The version of the newest publication started."""
        self.fingerprint = ""
        """The fingerprint of the newest publication finished."""
        self.last_seconds = 0.0
        """How long the newest finished publication took (broadcast and record)."""

    @property
    def busy(self) -> bool:
        """Whether a publication is still running."""
        return self._task is not None and not self._task.done()

    def start(self, named: Sequence[tuple[str, torch.Tensor]], version: int, canary: np.ndarray) -> None:
        """Begin publishing ``version`` (the previous publication must be awaited first)."""
        assert not self.busy, "await the previous publication before starting another"
        self.version = version
        self.provenance.expect(version)
        self._task = asyncio.create_task(self._publish(list(named), version, canary), name=f"publish v{version}")

    async def wait(self) -> float:
        """Wait for the running publication (raising its error); returns how long this call blocked."""
        start = time.monotonic()
        task, self._task = self._task, None
        if task is not None:
            await task
        return time.monotonic() - start

    async def _publish(self, named: list[tuple[str, torch.Tensor]], version: int, canary: np.ndarray) -> None:
        start = time.monotonic()
        try:
            report = await asyncio.to_thread(self.broadcaster.broadcast, named, version)
            await self.provenance.record(canary_reference(version, report.fingerprint, canary))
        finally:
            self.provenance.settled(version)
        self.on_report(report)
        self.publisher.publish({PolicyField.VERSION: version})
        self.fingerprint = report.fingerprint
        self.last_seconds = time.monotonic() - start
