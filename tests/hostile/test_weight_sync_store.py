"""The learner's weight-sync store against a hostile local client (issue 16.1), over real sockets.

torch's TCPStore listens on every interface whatever host it is given, and accepts any client. The broadcaster
binds its own socket where configured (loopback by default), and a membership event counts only with the proof
of the run's secret, which the learner publishes beside its endpoint in the run's policy hash (behind Redis's
password). A forged join would otherwise make every round wait the full sync timeout for a member that never
comes; a garbage event used to raise JSONDecodeError out of the learner's sync code.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from learner.weight_sync import WeightBroadcaster
from rollout_server.weight_receiver import WeightReceiver
from services.contracts import PolicyField
from services.modeling.weight_sync import Keys, expected_from_named, membership_proof

WEIGHTS = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}


@pytest.fixture
def learner() -> Iterator[WeightBroadcaster]:
    published: dict[str, str] = {}
    broadcaster = WeightBroadcaster("127.0.0.1", 0, timeout_s=3.0, publish=published.update)
    broadcaster.published = published  # type: ignore[attr-defined]
    try:
        yield broadcaster
    finally:
        broadcaster.close()


def _listening(port: int) -> list[str]:
    """Local addresses in LISTEN state on ``port``, read from the kernel's socket tables (not from any config)."""
    found = []
    for table, width in ((Path("/proc/net/tcp"), 8), (Path("/proc/net/tcp6"), 32)):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _client(learner: WeightBroadcaster) -> dist.TCPStore:
    host, port = learner.endpoint.rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))


def _write_event(store: dist.TCPStore, value: bytes | str) -> None:
    index = int(store.add(Keys.events_count, 1))
    store.set(Keys.event(index), value)


def test_the_store_listens_only_on_the_configured_address(learner: WeightBroadcaster) -> None:
    port = int(learner.endpoint.rsplit(":", 1)[1])
    assert _listening(port) == ["127.0.0.1"]


def test_the_secret_is_published_beside_the_endpoint(learner: WeightBroadcaster) -> None:
    published = learner.published  # type: ignore[attr-defined]
    assert published[PolicyField.SYNC_ENDPOINT] == learner.endpoint
    assert published[PolicyField.SYNC_SECRET] == learner.secret and len(learner.secret) >= 32
    other = WeightBroadcaster("127.0.0.1", 0, timeout_s=3.0)
    try:
        assert other.secret != learner.secret  # one per learner start
    finally:
        other.close()


def test_a_forged_join_changes_nothing(learner: WeightBroadcaster) -> None:
    store = _client(learner)
    _write_event(store, json.dumps({"op": "join", "member": "intruder#1"}))  # no proof
    _write_event(store, json.dumps({"op": "join", "member": "intruder#2", "proof": "00" * 32}))  # a wrong one
    forged = membership_proof("not the secret", "join", "intruder#3")
    _write_event(store, json.dumps({"op": "join", "member": "intruder#3", "proof": forged}))
    assert learner.wait_for_receivers(1, timeout_s=0.5) == 0
    report = learner.broadcast(WEIGHTS.items(), 1)
    assert report.receivers == () and report.dropped == {} and report.round == 0  # no round ran, nobody waited for
    assert learner.rejected_events == {"malformed": 1, "unauthenticated": 2}


def test_a_forged_leave_cannot_remove_a_real_member(learner: WeightBroadcaster) -> None:
    receiver = WeightReceiver(learner.endpoint, "real", expected_from_named(WEIGHTS.items()), secret=learner.secret,
                              timeout_s=5.0)  # fmt: skip
    try:
        receiver.join()
        assert learner.wait_for_receivers(1, timeout_s=5.0) == 1
        token = receiver.token
        assert token is not None and learner.members == [token]
        _write_event(_client(learner), json.dumps({"op": "leave", "member": token, "proof": "ab" * 32}))
        learner.wait_for_receivers(2, timeout_s=0.3)  # reads the events
        assert learner.members == [token] and learner.rejected_events == {"unauthenticated": 1}
    finally:
        receiver.close()
    learner.wait_for_receivers(1, timeout_s=0.3)
    assert learner.members == []  # its own, proven leave counts


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xfe not utf-8", "{not json", "[1, 2, 3]", json.dumps({"op": "join"}),
     json.dumps({"op": "join", "member": 7, "proof": "x"}), json.dumps({"op": "delete", "member": "m", "proof": "x"}),
     json.dumps({"op": "join", "member": "m" * 10_000, "proof": "x"})],
)  # fmt: skip
def test_garbage_events_are_dropped_and_counted(learner: WeightBroadcaster, garbage: bytes | str) -> None:
    _write_event(_client(learner), garbage)
    assert learner.wait_for_receivers(1, timeout_s=0.3) == 0  # no JSONDecodeError out of the learner
    assert learner.rejected_events == {"malformed": 1}


def test_a_receiver_without_the_secret_is_never_invited(learner: WeightBroadcaster) -> None:
    expected = expected_from_named(WEIGHTS.items())
    outsider = WeightReceiver(learner.endpoint, "outsider", expected, secret="guessed", timeout_s=5.0)
    try:
        outsider.join()
        assert learner.wait_for_receivers(1, timeout_s=0.5) == 0
        assert learner.rejected_events == {"unauthenticated": 1}
    finally:
        outsider.close()
