"""The canary codec and the choice of scorings a group is judged by (services/canary.py)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from services.canary import (
    MAX_BLOB_BYTES,
    CanaryScore,
    canary_distance,
    decode_scorings,
    encode_scorings,
    scorings_during,
)
from services.protocol import ProtocolError


def scoring(at: float, shift: float = 0.0, version: int = 3) -> CanaryScore:
    return CanaryScore(version, f"v{version}:abc", np.linspace(-3, -0.1, 8, dtype=np.float32) + shift, at)


def test_scorings_round_trip_exactly() -> None:
    scorings = [scoring(10.0), scoring(20.0, shift=0.5)]
    back = decode_scorings(encode_scorings(scorings))
    assert [(c.version, c.weights, c.at) for c in back] == [(3, "v3:abc", 10.0), (3, "v3:abc", 20.0)]
    for a, b in zip(scorings, back, strict=True):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert a.digest == b.digest
    assert scorings[0].digest != scorings[1].digest


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([]),  # no scoring
        msgpack.packb({"v": 3}),  # a map, not a list
        msgpack.packb([{"v": 3, "w": "x", "at": 1.0}]),  # no log-probs
        msgpack.packb([{"v": 3, "w": "x", "at": 1, "lp": b""}]),  # an int time
        msgpack.packb([{"v": -1, "w": "x", "at": 1.0, "lp": b""}]),
        msgpack.packb([{"v": 3, "w": "x", "at": 1.0, "lp": b"abc"}]),  # a partial float32
        msgpack.packb([{"v": 3, "w": "x", "at": 1.0, "lp": np.array([np.nan], "<f4").tobytes()}]),
        encode_scorings([scoring(2.0), scoring(1.0)]),  # out of time order
        encode_scorings([scoring(1.0), scoring(2.0, version=4)]),  # two versions in one field
        b"\x90" + b"\x00" * MAX_BLOB_BYTES,  # too large
    ],
)
def test_malformed_blobs_are_protocol_errors(blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_scorings(blob)


def test_a_group_is_judged_by_the_scorings_in_force_while_it_was_generated() -> None:
    first, reload, later = scoring(10.0), scoring(20.0), scoring(30.0)
    history = [first, reload, later]
    assert scorings_during(history, 12.0, 18.0) == [first]  # generated under the first scoring only
    assert scorings_during(history, 15.0, 25.0) == [first, reload]  # spans the reload: both judge it
    assert scorings_during(history, 20.0, 21.0) == [reload]  # started right at the reload
    assert scorings_during(history, 5.0, 11.0) == [first]  # started before v3 arrived: from its first scoring
    assert scorings_during(history, 1.0, 2.0) == history  # a clock that jumped: every scoring judges it


def test_distance_is_mean_absolute_difference_and_infinite_for_other_tokens() -> None:
    a = np.zeros(4, np.float32)
    assert canary_distance(a, a + 0.25) == pytest.approx(0.25)
    assert canary_distance(a, np.zeros(5, np.float32)) == math.inf
    assert canary_distance(a[:0], a[:0]) == math.inf
