"""Glue between the learner's ``policy`` hash, the WeightReceiver and the backend (docs/ROLLOUT.md, WEIGHT_SYNC.md).

:class:`PolicyWeights` owns the one lock that keeps weight swaps out of generation: a generation batch holds it from
its first to its last token, and a swap (weight-sync round, checkpoint load, admin reload) copies the new tensors in
under it, so every response of a batch comes from one version. :class:`WeightSync` runs the receiver on its own
thread: it loads the newest checkpoint before joining the learner's rounds, re-joins after a ``ResyncNeeded``, builds
a new receiver when the learner restarts (a new ``sync_endpoint``), and publishes the loaded version only after the
weights are in place.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import redis
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from rollout_server.backends.base import Backend
from rollout_server.metrics import RolloutMetrics
from rollout_server.weight_receiver import WeightReceiver
from services.config import RunConfig
from services.contracts import POLICY, ROLLOUT_VERSIONS, RUNNING, PolicyView
from services.modeling.loading import torch_dtype
from services.modeling.weight_sync import ChecksumMismatch, Expected, ManifestRejected, ResyncNeeded
from services.streams import run_key

log = logging.getLogger(__name__)

VersionListener = Callable[[int], None]
_MAX_RETRY_S = 30.0  # longest pause between failed sync steps (e.g. a learner store that stopped answering)


def read_policy(client: redis.Redis, run: str) -> PolicyView:
    """The run's policy hash as it is now."""
    return PolicyView.from_hash(client.hgetall(run_key(run, POLICY)))


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded into this server's model (missing, unreadable, or a different model)."""


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a Hugging Face folder's *.safetensors files, read from the headers only."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors files")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # safe_open handles are not iterable
                    if name in shapes:
                        raise CheckpointError(f"{name} appears in more than one file of {folder}")
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return shapes


def read_checkpoint(folder: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load a folder's weights after checking that their names and shapes are exactly the model's."""
    shapes = checkpoint_shapes(folder)
    problems = [f"missing {name}" for name in sorted(expected.keys() - shapes.keys())]
    problems += [f"unknown {name}" for name in sorted(shapes.keys() - expected.keys())]
    problems += [
        f"{name} has shape {shapes[name]}, expected {tuple(shape)}"
        for name, shape in expected.items()
        if name in shapes and tuple(shapes[name]) != tuple(shape)
    ]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{folder} does not match the model: {'; '.join(problems[:5])}{more}")
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            weights.update(load_file(path, device="cpu"))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return weights


class PolicyWeights:
    """The backend's weights and the policy version they are; generation batches and weight swaps exclude each other."""

    def __init__(self, backend: Backend, *, version: int = 0) -> None:
        self.backend = backend
        self.shapes = dict(backend.state_dict_names_and_shapes())
        self._lock = threading.Lock()
        self._version = version
        self._dirty = False  # a swap failed half-way: only a full checkpoint load makes the model whole again
        self._listeners: list[VersionListener] = []

    @property
    def version(self) -> int:
        """The policy version of the weights in place."""
        return self._version

    @property
    def dirty(self) -> bool:
        """True after a swap failed half-way (the weights are a mix of two versions)."""
        return self._dirty

    def add_listener(self, listener: VersionListener) -> None:
        """Call ``listener(version)`` after every swap, once the weights are in place (not under the lock)."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def batch(self) -> Iterator[int]:
        """Hold the weights for one generation batch; yields their version."""
        with self._lock:
            yield self._version

    def swap(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy new weights in between batches and set their version; listeners hear of it afterwards."""
        with self._lock:
            self._dirty = True
            self.backend.load_state_dict(named_tensors)
            self._dirty = False
            self._version = version
        for listener in self._listeners:
            listener(version)

    def load_checkpoint(self, folder: Path, version: int) -> int:
        """Validate and load a Hugging Face folder's safetensors; returns the number of tensors loaded."""
        weights = read_checkpoint(Path(folder), self.shapes)  # raises before the model is touched
        self.swap(weights.items(), version)
        return len(weights)

    def expected(self, dtype: torch.dtype) -> Expected:
        """What the weight receiver checks manifests against: the backend's names and shapes, in ``dtype``."""
        # The backend exposes names and shapes only; the learner sends its parameters in the run's model.dtype.
        return {name: (tuple(shape), dtype) for name, shape in self.shapes.items()}


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
        on_gpu = cfg.rollout.device.startswith("cuda") or type(weights.backend).uses_gpu
        self.comm_backend = "nccl" if on_gpu and torch.cuda.is_available() else "gloo"
        self.expected = weights.expected(torch_dtype(cfg.model.dtype))
        self._receiver: WeightReceiver | None = None
        self._endpoint: str | None = None
        self._joined = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        weights.add_listener(self.publish)

    # ------------------------------------------------------------------ version publishing

    def publish(self, version: int) -> None:
        """Record the loaded version in the metrics and in Redis (called once the weights are in place)."""
        self.metrics.policy_version.set(version)
        try:
            self.client.hset(self.versions_key, self.consumer, str(version))
        except redis.RedisError as exc:  # the next swap publishes again; generation must not stop for this
            self.metrics.weight_sync_failures.labels("publish").inc()
            log.warning("could not publish version %d: %s", version, exc)

    # ------------------------------------------------------------------ lifecycle

    def initial_load(self) -> None:
        """Load the newest published checkpoint (a late joiner starts from it) and publish the loaded version."""
        self._catch_up(read_policy(self.client, self.cfg.name))
        self.publish(self.weights.version)

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
        if policy.status != RUNNING or policy.sync_endpoint is None:
            # Rounds only happen while the learner runs; meanwhile follow its checkpoints.
            self._leave()
            self._catch_up(policy)
            self._stop.wait(self.poll_s)
            return None
        if policy.sync_endpoint != self._endpoint:  # first join, or a restarted learner hosting a new store
            self._leave()
            self._receiver = WeightReceiver(
                policy.sync_endpoint,
                self.consumer,
                self.expected,
                backend=self.comm_backend,
                timeout_s=self.cfg.rollout.weight_sync_timeout_s,
            )
            self._endpoint = policy.sync_endpoint
        assert self._receiver is not None
        if not self._joined:
            self._catch_up(policy)  # the newest checkpoint first, then the rounds after it
            self._receiver.join()
            self._joined = True
        start = time.perf_counter()
        try:
            version = self._receiver.receive(self._apply, wait_s=self.poll_s)
        except ResyncNeeded as exc:
            self.metrics.weight_sync_failures.labels(_failure_reason(exc)).inc()
            log.warning("weight sync needs a resync (%s); reloading the newest checkpoint and re-joining", exc)
            self._joined = False
            return None
        if version is not None:
            # Includes up to poll_s of waiting for the invitation: receive() is polled with that timeout.
            self.metrics.weight_sync_seconds.observe(time.perf_counter() - start)
            log.info("now generating with policy version %d", version)
        return version

    def _apply(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.weights.swap(named_tensors, version)

    def _catch_up(self, policy: PolicyView) -> None:
        """Load the published checkpoint if it is newer than the weights in place (or they are half-updated)."""
        if policy.checkpoint is None or policy.checkpoint_version < 0:
            return
        if policy.checkpoint_version <= self.weights.version and not self.weights.dirty:
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
