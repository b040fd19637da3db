"""Keeping a rollout server's weights at the learner's version (docs/ROLLOUT.md, docs/WEIGHT_SYNC.md).

:class:`WeightSync` runs on its own thread: it loads the newest checkpoint before joining the learner's rounds,
receives each round into host staging (acknowledged on receipt, so the learner never waits for a generation), hands
it to :class:`~rollout_server.policy_weights.PolicyWeights`, which swaps it in at the engine's next step boundary,
and publishes the version and its canary. It re-joins after a ``ResyncNeeded``, builds a new receiver when the learner
restarts (a new ``sync_endpoint``), and reloads a checkpoint when the learner quarantines it (its canary failed).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import redis
import torch

from rollout_server.backends.base import WeightsTag
from rollout_server.checkpoints import CheckpointError
from rollout_server.metrics import RolloutMetrics
from rollout_server.policy_weights import PolicyWeights
from rollout_server.weight_receiver import WeightReceiver
from services.canary import CanaryScore
from services.config import RunConfig
from services.contracts import CANARIES, POLICY, QUARANTINE, ROLLOUT_VERSIONS, RUNNING, PolicyView
from services.modeling.loading import torch_dtype
from services.modeling.weight_sync import ChecksumMismatch, ManifestRejected, ResyncNeeded
from services.streams import run_key

log = logging.getLogger(__name__)

_MAX_RETRY_S = 30.0  # longest pause between failed sync steps (e.g. a learner store that stopped answering)


def read_policy(client: redis.Redis, run: str) -> PolicyView:
    """The run's policy hash as it is now."""
    return PolicyView.from_hash(client.hgetall(run_key(run, POLICY)))


def _failure_reason(exc: ResyncNeeded) -> str:
    if isinstance(exc, ManifestRejected):
        return "rejected"
    if isinstance(exc, ChecksumMismatch):
        return "checksum"
    return "resync"


class WeightSync:
    """Keeps a rollout server's weights at the learner's version: checkpoint first, then the broadcast rounds."""

    def __init__(
        self,
        cfg: RunConfig,
        weights: PolicyWeights,
        client: redis.Redis,
        consumer: str,
        metrics: RolloutMetrics,
        *,
        poll_s: float = 0.5,
    ) -> None:
        self.cfg = cfg
        self.weights = weights
        self.client = client
        self.consumer = consumer
        self.metrics = metrics
        self.poll_s = poll_s
        self.versions_key = run_key(cfg.name, ROLLOUT_VERSIONS)
        self.canaries_key = run_key(cfg.name, CANARIES)
        self.quarantine_key = run_key(cfg.name, QUARANTINE)
        on_gpu = cfg.rollout.device.startswith("cuda") or type(weights.backend).uses_gpu
        self.comm_backend = "nccl" if on_gpu and torch.cuda.is_available() else "gloo"
        self.expected = weights.expected(torch_dtype(cfg.model.dtype))
        self._receiver: WeightReceiver | None = None
        self._endpoint: tuple[str | None, str] | None = None  # the learner's store address and secret
        self._joined = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        weights.add_listener(self.publish)

    # ------------------------------------------------------------------ publishing

    def publish(self, weights: WeightsTag, canary: CanaryScore) -> None:
        """Record the version in place (metrics, Redis) and this server's canary scoring of it."""
        self.metrics.policy_version.set(weights.version)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(self.versions_key, self.consumer, str(weights.version))
                pipe.hset(self.canaries_key, mapping=self.weights.canary_fields(self.consumer, [weights.version]))
                pipe.execute()
        except redis.RedisError as exc:  # groups carry the canary too; generation must not stop for this
            self.metrics.weight_sync_failures.labels("publish").inc()
            log.warning("could not publish version %d: %s", weights.version, exc)

    # ------------------------------------------------------------------ lifecycle

    def initial_load(self) -> None:
        """Load the newest published checkpoint (a late joiner starts from it), else publish the initial weights."""
        before = self.weights.weights.version, self.weights.last_canary
        self._catch_up(read_policy(self.client, self.cfg.name))
        if self.weights.last_canary is before[1]:  # nothing was loaded: announce the weights in place
            self.publish(self.weights.weights, self.weights.score_canary())

    def start(self) -> None:
        """Start the receiver thread."""
        self._thread = threading.Thread(target=self._run, name="weight-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Leave the sync group, stop the thread and withdraw this server's version from Redis."""
        self._stop.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.close()  # wakes a receive() waiting for an invitation
        if self._thread is not None:
            self._thread.join(timeout_s)
        with contextlib.suppress(redis.RedisError):
            self.client.hdel(self.versions_key, self.consumer)

    def _run(self) -> None:
        errors = 0
        while not self._stop.is_set():
            try:
                self.step()
                errors = 0
            except Exception:  # the thread must outlive any one failure; the next step starts from the policy hash
                if self._stop.is_set():
                    break  # the receiver was closed under us by stop()
                errors += 1
                delay = min(_MAX_RETRY_S, self.poll_s * 2**errors)
                self.metrics.weight_sync_failures.labels("error").inc()
                log.exception("weight sync step failed; retrying in %.1fs", delay)
                self._leave()
                self._stop.wait(delay)
        self._leave()

    # ------------------------------------------------------------------ one step

    def step(self) -> int | None:
        """Read the policy hash, (re)join if needed, and wait up to poll_s for one round; returns a new version."""
        policy = read_policy(self.client, self.cfg.name)
        self._obey_quarantine(policy)
        if policy.status != RUNNING or policy.sync_endpoint is None:
            # Rounds only happen while the learner runs; meanwhile follow its checkpoints.
            self._leave()
            self._catch_up(policy)
            self._stop.wait(self.poll_s)
            return None
        receiver = self._joined_receiver(policy)
        start = time.perf_counter()
        try:
            delivery = receiver.receive(wait_s=self.poll_s)
        except ResyncNeeded as exc:
            self.metrics.weight_sync_failures.labels(_failure_reason(exc)).inc()
            log.warning("weight sync needs a resync (%s); reloading the newest checkpoint and re-joining", exc)
            self._joined = False
            return None
        if delivery is None:
            return None
        received = time.perf_counter()
        self.weights.swap(delivery.named, WeightsTag(delivery.version, delivery.fingerprint))
        # Includes up to poll_s of waiting for the invitation: receive() is polled with that timeout.
        self.metrics.weight_sync_seconds.observe(received - start)
        self.metrics.swap_seconds.observe(time.perf_counter() - received)
        log.info("now generating with policy version %d (%s)", delivery.version, delivery.fingerprint)
        return delivery.version

    def _joined_receiver(self, policy: PolicyView) -> WeightReceiver:
        address = (policy.sync_endpoint, policy.sync_secret)
        if address != self._endpoint:  # first join, or a restarted learner hosting a new store (with a new secret)
            self._leave()
            assert policy.sync_endpoint is not None
            self._receiver = WeightReceiver(policy.sync_endpoint, self.consumer, self.expected,
                                            secret=policy.sync_secret, backend=self.comm_backend,
                                            timeout_s=self.cfg.rollout.weight_sync_timeout_s)  # fmt: skip
            self._endpoint = address
        assert self._receiver is not None
        if not self._joined:
            self._catch_up(policy)  # the newest checkpoint first, then the rounds after it
            self._receiver.join()
            self._joined = True
        return self._receiver

    def _obey_quarantine(self, policy: PolicyView) -> None:
        """When the learner found this server's canary wrong, reload the newest checkpoint from disk."""
        flagged = self.client.hget(self.quarantine_key, self.consumer)
        if flagged is None:
            return
        self.metrics.quarantines.inc()
        log.error("the learner quarantined this server (its canary of v%s disagreed): reloading the newest checkpoint",
                  flagged.decode() if isinstance(flagged, bytes) else flagged)  # fmt: skip
        self._catch_up(policy, force=True)
        self.client.hdel(self.quarantine_key, self.consumer)
        self._leave()  # re-join, so the next round reaches the reloaded weights

    def _catch_up(self, policy: PolicyView, *, force: bool = False) -> None:
        """Load the published checkpoint if it is newer than the weights in place (or they are half-updated)."""
        if policy.checkpoint is None or policy.checkpoint_version < 0:
            return
        if policy.checkpoint_version <= self.weights.version and not self.weights.dirty and not force:
            return
        start = time.perf_counter()
        try:
            count = self.weights.load_checkpoint(Path(policy.checkpoint), policy.checkpoint_version)
        except CheckpointError as exc:  # e.g. a path this machine cannot see: keep the weights we have
            self.metrics.weight_sync_failures.labels("checkpoint").inc()
            log.warning("cannot load checkpoint v%d: %s", policy.checkpoint_version, exc)
            return
        log.info(
            "loaded checkpoint %s (v%d, %d tensors) in %.2fs",
            policy.checkpoint, policy.checkpoint_version, count, time.perf_counter() - start,
        )  # fmt: skip

    def _leave(self) -> None:
        receiver, self._receiver, self._endpoint, self._joined = self._receiver, None, None, False
        if receiver is not None:
            receiver.close()
