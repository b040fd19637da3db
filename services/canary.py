"""Weight provenance: the canary every rollout server scores after each weight update, and how it is compared.

After applying version v a server scores a fixed canary sequence (teacher-forced log-probs at T = 1) and publishes
its recent scorings of v in the run's ``canaries`` hash as field ``{server}:{v}``; the learner publishes its own
scoring of the same sequence for v as ``ref:{v}``. A server can score one version several times (a re-join, a
checkpoint reload after a quarantine), so a field holds the scorings in time order, each stamped with the server's
clock: a group is judged by the scorings its server held while it generated the group. The learner rejects a
server's groups of version v when a scoring differs from its own by more than ``rollout.canary_tolerance`` (mean
absolute difference, nats per token): the server's weights are not the ones the learner published, whatever it says
it loaded (docs/WEIGHT_SYNC.md, "Provenance"). Blobs are msgpack, the log-probs packed little-endian float32, never
pickles.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from services.protocol import ProtocolError

CANARY_TEXT = (
    "The learner and every rollout server score these words after each weight update, so that a server holding "
    "other weights than the learner published is noticed: 2 + 3 = 5, and the sky over the sea is blue."
)
"""Rendered by each side's own tokenizer as one user turn of the chat template (services.modeling.canary)."""
CANARY_TOKENS = 64
"""The canary is cut to this many tokens."""
MAX_BLOB_BYTES = 64 * 1024
SCORINGS_KEPT = 8
"""Scorings of one version a server keeps (and publishes): more than a version ever lives through."""

_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class CanaryScore:
    """One side's log-probs of the canary under the weights of ``version`` with fingerprint ``weights``, scored at
    ``at`` (Unix seconds, the scorer's clock)."""

    version: int
    weights: str
    logprobs: np.ndarray
    at: float = 0.0

    def to_map(self) -> dict[str, object]:
        """The msgpack map of one scoring."""
        return {"v": self.version, "w": self.weights, "at": float(self.at),
                "lp": np.asarray(self.logprobs, dtype=_F32).tobytes()}  # fmt: skip

    @classmethod
    def from_map(cls, body: object) -> CanaryScore:
        """Strict inverse of ``to_map``; ProtocolError on anything malformed."""
        if not isinstance(body, dict) or set(body) != {"v", "w", "at", "lp"}:
            raise ProtocolError("canary: expected a map with keys v, w, at, lp")
        version, weights, at, raw = body["v"], body["w"], body["at"], body["lp"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 0 or not isinstance(weights, str):
            raise ProtocolError("canary: v must be a non-negative int and w a string")
        if not isinstance(at, float) or not math.isfinite(at):
            raise ProtocolError("canary: at must be a finite float")
        if not isinstance(raw, bytes) or len(raw) % _F32.itemsize:
            raise ProtocolError("canary: lp must be packed float32")
        logprobs = np.frombuffer(raw, dtype=_F32).astype(np.float32)
        if not np.isfinite(logprobs).all():
            raise ProtocolError("canary: log-probs must be finite")
        return cls(version, weights, logprobs, at)

    @property
    def digest(self) -> bytes:
        """Identity of this scoring (for caching verdicts)."""
        return hashlib.blake2b(msgpack.packb(self.to_map(), use_bin_type=True), digest_size=16).digest()


def encode_scorings(scorings: Sequence[CanaryScore]) -> bytes:
    """The blob of one canaries-hash field: the scorings in time order."""
    packed: bytes = msgpack.packb([c.to_map() for c in scorings], use_bin_type=True)
    return packed


def decode_scorings(data: bytes) -> list[CanaryScore]:
    """Strict inverse of ``encode_scorings``; ProtocolError on anything malformed."""
    if len(data) > MAX_BLOB_BYTES:
        raise ProtocolError(f"canary: {len(data)} bytes is over {MAX_BLOB_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types
        raise ProtocolError(f"canary: not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(body, list) or not body:
        raise ProtocolError("canary: expected a non-empty list of scorings")
    scorings = [CanaryScore.from_map(item) for item in body]
    times = [c.at for c in scorings]
    if len({c.version for c in scorings}) != 1 or times != sorted(times):
        raise ProtocolError("canary: scorings of one field are of one version, in time order")
    return scorings


def scorings_during(scorings: Sequence[CanaryScore], start: float, end: float) -> list[CanaryScore]:
    """The scorings in force at some moment of [start, end]: the last one at or before ``start`` and every later
    one up to ``end``; all of them when none falls in that range (a clock that jumped)."""
    before = [c for c in scorings if c.at <= start]
    relevant = before[-1:] + [c for c in scorings if start < c.at <= end]
    return relevant or list(scorings)


def canary_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two canary scorings (infinite when they do not cover the same tokens)."""
    if a.shape != b.shape or a.size == 0:
        return math.inf
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def reference_field(version: int) -> str:
    """The canaries-hash field of the learner's own scoring of ``version``."""
    return f"ref:{version}"


def server_field(server: str, version: int) -> str:
    """The canaries-hash field of one rollout server's scoring of ``version``."""
    return f"{server}:{version}"
