"""The weights a rollout server generates with: their version and fingerprint, the canary under them, and swaps.

Every swap (a weight-sync delivery, a checkpoint load, an admin reload) goes through :class:`PolicyWeights`: it hands
the tensors to the backend, which applies them at its next step boundary while generation goes on, and keeps the
canary scoring the backend returns for the new version (services/canary.py). Swaps are serialised by one lock, which
generation never takes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rollout_server.backends.base import Backend, WeightsTag
from rollout_server.checkpoints import read_checkpoint, read_fingerprint
from services.canary import SCORINGS_KEPT, CanaryScore, encode_scorings, server_field
from services.modeling.canary import canary_token_ids
from services.modeling.weight_sync import Expected

log = logging.getLogger(__name__)

SwapListener = Callable[[WeightsTag, CanaryScore], None]
VERSIONS_KEPT = 32
"""Versions whose canary scorings this server keeps (they travel with its groups)."""
SWAP_TIMEOUT_S = 600.0
"""Longest wait for the backend to apply a swap (it waits for one step boundary, then copies)."""
CORRUPT_SWAPS_ENV = "DIPO_FAULT_CORRUPT_SWAPS"
"""Fault injection for tests and the chaos runner: this many swaps apply wrong bytes (the canary must notice)."""


class PolicyWeights:
    """The backend's weights and what is known of them; thread-safe."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.shapes = dict(backend.state_dict_names_and_shapes())
        self.canary_ids = canary_token_ids(backend.tokenizer)
        self._lock = threading.Lock()
        self._dirty = False  # a swap failed half-way: only a full checkpoint load makes the model whole again
        self._canaries: OrderedDict[int, list[CanaryScore]] = OrderedDict()  # version -> scorings in time order
        self._listeners: list[SwapListener] = []
        self._last: CanaryScore | None = None
        self.corrupt_swaps = int(os.environ.get(CORRUPT_SWAPS_ENV, "0") or 0)

    @property
    def weights(self) -> WeightsTag:
        """Version and fingerprint of the weights in place."""
        return self.backend.state().weights

    @property
    def version(self) -> int:
        """The policy version of the weights in place."""
        return self.weights.version

    @property
    def dirty(self) -> bool:
        """True after a swap failed half-way (the weights are a mix of two versions)."""
        return self._dirty

    @property
    def last_canary(self) -> CanaryScore | None:
        """The canary scored after the most recent swap (None before the first one)."""
        with self._lock:
            return self._last

    def add_listener(self, listener: SwapListener) -> None:
        """Call ``listener(weights, canary)`` after every swap, once the weights are in place."""
        self._listeners.append(listener)

    def swap(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weights: WeightsTag) -> CanaryScore:
        """Apply new weights (at the backend's next step boundary) and return the canary scored under them."""
        named = list(named_tensors)
        with self._lock:
            if self.corrupt_swaps > 0:
                self.corrupt_swaps -= 1
                named = _corrupted(named)
                log.warning("fault injection: applying corrupted bytes for v%d", weights.version)
            self._dirty = True
            logprobs = self.backend.swap(named, weights, self.canary_ids).result(SWAP_TIMEOUT_S)
            self._dirty = False
            canary = self._keep(CanaryScore(weights.version, weights.fingerprint, logprobs, time.time()))
        for listener in self._listeners:
            listener(weights, canary)
        return canary

    def score_canary(self) -> CanaryScore:
        """The canary under the weights in place (a server that starts without a swap scores its initial weights)."""
        with self._lock:
            weights = self.weights
            logprobs = self.backend.score(self.canary_ids).result(SWAP_TIMEOUT_S)
            return self._keep(CanaryScore(weights.version, weights.fingerprint, logprobs, time.time()))

    def _keep(self, canary: CanaryScore) -> CanaryScore:
        """Record a scoring (under the lock)."""
        scorings = self._canaries.pop(canary.version, [])
        self._canaries[canary.version] = [*scorings, canary][-SCORINGS_KEPT:]  # the newest version last
        while len(self._canaries) > VERSIONS_KEPT:
            self._canaries.popitem(last=False)
        self._last = canary
        return canary

    def load_checkpoint(self, folder: Path, version: int) -> int:
        """Validate and load a Hugging Face folder's safetensors as ``version``; returns the number of tensors."""
        tensors = read_checkpoint(Path(folder), self.shapes)  # raises before the model is touched
        digest = read_fingerprint(Path(folder)).partition(":")[2]
        # The digest describes the bytes, not the version label: a resumed learner republishes a checkpoint's
        # weights under a new version, and the same bytes keep the same digest.
        self.swap(tensors.items(), WeightsTag(version, f"v{version}:{digest}" if digest else ""))
        return len(tensors)

    def canary_fields(self, server: str, versions: Iterable[int]) -> dict[str, bytes]:
        """The canaries-hash fields of this server's scorings of ``versions`` (those it still knows)."""
        with self._lock:
            known = {v: list(self._canaries[v]) for v in set(versions) if v in self._canaries}
        return {server_field(server, v): encode_scorings(scorings) for v, scorings in known.items()}

    def expected(self, dtype: torch.dtype) -> Expected:
        """What the weight receiver checks manifests against: the backend's names and shapes, in ``dtype``."""
        # The backend exposes names and shapes only; the learner sends its parameters in the run's model.dtype.
        return {name: (tuple(shape), dtype) for name, shape in self.shapes.items()}


def _corrupted(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The same tensors with the floating ones scaled: bytes that differ from the ones the learner sent."""
    return [(name, t * 1.5 if t.is_floating_point() else t) for name, t in named]
