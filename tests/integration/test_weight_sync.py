"""Weight sync over gloo: the learner runs in the test process, receivers are subprocesses running this file."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from learner.weight_sync import WeightBroadcaster, redis_hash_publisher
from rollout_server.weight_receiver import WeightReceiver
from services.contracts import PolicyField
from services.modeling.weight_sync import (
    BUCKET_PAD,
    Manifest,
    ManifestRejected,
    ResyncNeeded,
    TensorEntry,
    checksum,
    expected_from_named,
    plan_buckets,
    validate_manifest,
)

SPEC: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "embed.weight": ((64, 16), torch.float32),
    "layers.0.w": ((16, 16), torch.bfloat16),
    "layers.0.b": ((16,), torch.float32),
    "step": ((), torch.int64),
    "positions": ((33,), torch.int64),
    "lm_head.weight": ((300, 40), torch.float32),  # larger than BUCKET_BYTES: travels in a bucket of its own
}
BUCKET_BYTES = 8192
RECEIVER_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0

pytestmark = pytest.mark.timeout(180)


def make_weights(version: int) -> dict[str, torch.Tensor]:
    """Deterministic weights of one version (version 0 is the receivers' all-zero start)."""
    gen = torch.Generator().manual_seed(1000 + version)
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in SPEC.items():
        if version == 0:
            out[name] = torch.zeros(shape, dtype=dtype)
        elif dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            out[name] = torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)
    return out


def digest(weights: dict[str, torch.Tensor]) -> int:
    """crc32 over every tensor's bytes in SPEC order."""
    crc = 0
    for name in SPEC:
        crc = zlib.crc32(weights[name].reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


# --------------------------------------------------------------------------------------------------------------
# Receiver process (python tests/integration/test_weight_sync.py receive ...)


def receiver_main(argv: list[str]) -> None:
    """Join, apply every round until out/stop exists, rejoin after each resync; log events as JSON lines."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bad-shape", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    weights = make_weights(0)
    expected = expected_from_named(weights.items())
    if args.bad_shape:
        expected["layers.0.w"] = ((16, 17), torch.bfloat16)
    log = (args.out / "log.jsonl").open("a")

    def record(**event: Any) -> None:
        log.write(json.dumps(event) + "\n")
        log.flush()

    secret = os.environ["DIPO_TEST_SYNC_SECRET"]  # never in argv
    receiver = WeightReceiver(args.endpoint, args.id, expected, secret=secret, timeout_s=RECEIVER_TIMEOUT_S)
    receiver.join()
    record(event="joined")
    while not (args.out / "stop").exists():
        try:
            delivery = receiver.receive(wait_s=0.3)
        except ResyncNeeded as exc:
            record(event="resync", kind=type(exc).__name__, detail=str(exc), digest=digest(weights))
            receiver.join()  # a rollout server would load the newest checkpoint first
            record(event="joined")
            continue
        if delivery is not None:
            for name, tensor in delivery.named:  # what a rollout server's swap does with the staged views
                weights[name].copy_(tensor)
            record(event="applied", version=delivery.version, digest=digest(weights), fingerprint=delivery.fingerprint)
    save_file(weights, str(args.out / "final.safetensors"))
    receiver.close()
    record(event="stopped")


# --------------------------------------------------------------------------------------------------------------
# Test side


class Receiver:
    """One receiver subprocess and its event log."""

    def __init__(self, learner: WeightBroadcaster, name: str, out: Path, *extra: str) -> None:
        self.name = name
        self.out = out
        out.mkdir(parents=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DIPO_TEST_SYNC_SECRET": learner.secret}
        cmd = [sys.executable, __file__, "receive", "--endpoint", learner.endpoint, "--id", name, "--out", str(out),
               *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stderr=(out / "stderr.txt").open("w"))

    def events(self) -> list[dict[str, Any]]:
        """Events logged so far (a line still being written is skipped)."""
        path = self.out / "log.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def applied(self) -> list[int]:
        """Versions applied so far, in order."""
        return [e["version"] for e in self.events() if e["event"] == "applied"]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30.0) -> None:
        """Poll the log until the predicate holds; fail with the log and stderr otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        stderr = (self.out / "stderr.txt").read_text()[-3000:]
        raise AssertionError(f"{self.name}: condition not met; events={self.events()}; stderr={stderr}")

    def stop(self) -> None:
        """Ask the process to save its weights and exit; wait for it."""
        (self.out / "stop").touch()
        self.proc.wait(timeout=30)
        assert self.proc.returncode == 0, (self.out / "stderr.txt").read_text()[-3000:]

    def final(self) -> dict[str, torch.Tensor]:
        """The weights the receiver held when it stopped."""
        return load_file(str(self.out / "final.safetensors"))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start receiver subprocesses; any still running at teardown is continued and killed by pid."""
    started: list[Receiver] = []

    def start(learner: WeightBroadcaster, name: str, *extra: str) -> Receiver:
        receiver = Receiver(learner, name, tmp_path / name, *extra)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        if receiver.proc.poll() is None:
            os.kill(receiver.proc.pid, signal.SIGCONT)
            receiver.proc.kill()
            receiver.proc.wait(timeout=10)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Bit-identical tensors with the same dtypes and shapes."""
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def test_receivers_get_identical_weights_and_a_late_joiner_catches_up(
    spawn: Callable[..., Receiver], redis_url: str, run_name: str
) -> None:
    import redis  # only this test needs it; the GPU test runs where the redis client is not installed

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    policy_key = f"dipo:{run_name}:policy"
    learner = WeightBroadcaster(
        timeout_s=10, bucket_bytes=BUCKET_BYTES, publish=redis_hash_publisher(client, policy_key)
    )
    try:
        endpoint = client.hget(policy_key, PolicyField.SYNC_ENDPOINT)
        assert endpoint is not None and endpoint.decode() == learner.endpoint
        a, b = spawn(learner, "a"), spawn(learner, "b")
        assert learner.wait_for_receivers(2, START_TIMEOUT_S) == 2
        fingerprints = {}
        for version in (1, 2, 3):
            report = learner.broadcast(make_weights(version).items(), version)
            assert sorted(m.split("#")[0] for m in report.receivers) == ["a", "b"]
            assert report.dropped == {} and report.bytes >= sum(t.nbytes for t in make_weights(1).values())
            fingerprints[version] = report.fingerprint
            # the same weights give the same fingerprint without a round, and other weights another one
            assert learner.fingerprint(list(make_weights(version).items()), version) == report.fingerprint
        assert len(set(fp.partition(":")[2] for fp in fingerprints.values())) == 3
        late = spawn(learner, "late")
        assert learner.wait_for_receivers(3, START_TIMEOUT_S) == 3
        report = learner.broadcast(make_weights(4).items(), 4)
        assert sorted(m.split("#")[0] for m in report.receivers) == ["a", "b", "late"]
        for receiver in (a, b, late):
            receiver.wait_for(lambda events: any(e.get("version") == 4 for e in events))
            receiver.stop()
    finally:
        learner.close()
        client.close()
    for receiver in (a, b):
        assert receiver.applied() == [1, 2, 3, 4]
        applied = [e for e in receiver.events() if e["event"] == "applied"]
        assert [e["digest"] for e in applied] == [digest(make_weights(v)) for v in (1, 2, 3, 4)]
        assert [e["fingerprint"] for e in applied[:3]] == [fingerprints[v] for v in (1, 2, 3)]
    assert late.applied() == [4]
    for receiver in (a, b, late):
        assert_same(receiver.final(), make_weights(4))


def test_bad_manifest_and_corrupt_bucket_are_rejected_and_old_weights_kept(spawn: Callable[..., Receiver]) -> None:
    state = {"version": 0}

    def flip_a_byte_of_v2(bucket: int, data: torch.Tensor) -> None:
        if state["version"] == 2 and bucket == 1:
            data[7] = data[7] ^ 0x5A

    learner = WeightBroadcaster(timeout_s=10, bucket_bytes=BUCKET_BYTES, tamper=flip_a_byte_of_v2)
    try:
        good, bad = spawn(learner, "good"), spawn(learner, "bad", "--bad-shape")
        assert learner.wait_for_receivers(2, START_TIMEOUT_S) == 2
        state["version"] = 1
        report = learner.broadcast(make_weights(1).items(), 1)
        assert [m.split("#")[0] for m in report.receivers] == ["good"]
        [(dropped, reason)] = report.dropped.items()
        assert dropped.startswith("bad#") and "layers.0.w" in reason and "shape" in reason

        good.wait_for(lambda events: 1 in [e.get("version") for e in events])
        bad.wait_for(lambda events: [e["event"] for e in events].count("joined") == 2)  # rejoined after rejecting
        assert learner.wait_for_receivers(2, START_TIMEOUT_S) == 2
        state["version"] = 2
        report = learner.broadcast(make_weights(2).items(), 2)
        assert report.receivers == ()
        assert any(m.startswith("good#") and "differs in buckets [1]" in r for m, r in report.dropped.items())

        good.wait_for(lambda events: [e["event"] for e in events].count("joined") == 2)
        assert learner.wait_for_receivers(2, START_TIMEOUT_S) == 2
        state["version"] = 3
        report = learner.broadcast(make_weights(3).items(), 3)
        assert [m.split("#")[0] for m in report.receivers] == ["good"]
        good.wait_for(lambda events: 3 in [e.get("version") for e in events])
        good.stop()
        bad.stop()
    finally:
        learner.close()
    assert good.applied() == [1, 3]
    [resync] = [e for e in good.events() if e["event"] == "resync"]
    assert resync["kind"] == "ChecksumMismatch" and resync["digest"] == digest(make_weights(1))
    assert_same(good.final(), make_weights(3))
    assert bad.applied() == []
    assert {e["kind"] for e in bad.events() if e["event"] == "resync"} == {"ManifestRejected"}
    assert_same(bad.final(), make_weights(0))


def test_stopped_receiver_is_dropped_and_the_rest_carry_on(spawn: Callable[..., Receiver]) -> None:
    learner = WeightBroadcaster(timeout_s=3, bucket_bytes=BUCKET_BYTES)
    try:
        a, b = spawn(learner, "a"), spawn(learner, "b")
        assert learner.wait_for_receivers(2, START_TIMEOUT_S) == 2
        assert len(learner.broadcast(make_weights(1).items(), 1).receivers) == 2
        b.wait_for(lambda events: 1 in [e.get("version") for e in events])
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            report = learner.broadcast(make_weights(2).items(), 2)
            assert [m.split("#")[0] for m in report.receivers] == ["a"]
            [(dropped, reason)] = report.dropped.items()
            assert dropped.startswith("b#") and "not ready" in reason
            report = learner.broadcast(make_weights(3).items(), 3)
            assert [m.split("#")[0] for m in report.receivers] == ["a"] and report.dropped == {}
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        b.wait_for(lambda events: any(e["event"] == "resync" for e in events))
        assert learner.wait_for_receivers(2, START_TIMEOUT_S) == 2
        report = learner.broadcast(make_weights(4).items(), 4)
        assert sorted(m.split("#")[0] for m in report.receivers) == ["a", "b"]
        for receiver in (a, b):
            receiver.wait_for(lambda events: 4 in [e.get("version") for e in events])
            receiver.stop()
    finally:
        learner.close()
    assert a.applied() == [1, 2, 3, 4]
    assert b.applied() == [1, 4]
    [resync] = [e for e in b.events() if e["event"] == "resync"]
    assert resync["kind"] == "ResyncNeeded" and "dropped" in resync["detail"]
    for receiver in (a, b):
        assert_same(receiver.final(), make_weights(4))


def test_receiver_close_leaves_the_group_without_a_timeout() -> None:
    learner = WeightBroadcaster(timeout_s=30, bucket_bytes=BUCKET_BYTES)
    receiver = WeightReceiver(learner.endpoint, "x", expected_from_named(make_weights(0).items()),
                              secret=learner.secret, timeout_s=5)  # fmt: skip
    try:
        receiver.join()
        assert learner.wait_for_receivers(1, 10) == 1
        receiver.close()
        report = learner.broadcast(make_weights(1).items(), 1)
        assert report.receivers == () and report.dropped == {} and report.bytes == 0
    finally:
        learner.close()


def test_manifest_round_trips_and_malformed_layouts_are_rejected() -> None:
    weights = make_weights(1)
    sizes, entries = plan_buckets(list(weights.items()), BUCKET_BYTES)
    assert len(sizes) == 2 and all(size % BUCKET_PAD == 0 for size in sizes)
    manifest = Manifest(7, 3, "crc32", tuple(sizes), tuple(entries))
    assert Manifest.decode(manifest.encode()) == manifest
    assert validate_manifest(manifest, expected_from_named(weights.items())) == []
    first = entries[0]
    overlapping = TensorEntry("extra", "float32", (4,), first.bucket, first.offset)
    out_of_bounds = TensorEntry("extra", "float32", (4,), first.bucket, sizes[first.bucket])
    for bad in (overlapping, out_of_bounds):
        with pytest.raises(ManifestRejected):
            Manifest.decode(Manifest(7, 3, "crc32", tuple(sizes), (*entries, bad)).encode())
    with pytest.raises(ManifestRejected):
        Manifest.decode(b"\x92\x01")  # valid msgpack, not a manifest


@pytest.mark.parametrize("algo", ["xxh3", "crc32", "sum64"])
def test_checksums_notice_one_flipped_bit(algo: str) -> None:
    data = torch.randint(0, 256, (2 * BUCKET_PAD,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flipped = data.clone()
    flipped[5000] ^= 1
    assert checksum(data, algo) == checksum(data.clone(), algo)
    assert checksum(data, algo) != checksum(flipped, algo)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_learner_packs_on_the_gpu_and_a_cpu_receiver_gets_identical_weights(
    spawn: Callable[..., Receiver],
) -> None:
    cuda = torch.device("cuda")
    for nbytes in (BUCKET_PAD, 8 << 20):
        data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        assert checksum(data, "sum64") == checksum(data.to(cuda), "sum64")
    learner = WeightBroadcaster(timeout_s=30, bucket_bytes=BUCKET_BYTES, device=cuda)
    try:
        receiver = spawn(learner, "cpu")
        assert learner.wait_for_receivers(1, START_TIMEOUT_S) == 1
        report = learner.broadcast([(name, t.to(cuda)) for name, t in make_weights(1).items()], 1)
        assert len(report.receivers) == 1, report.dropped
        receiver.wait_for(lambda events: 1 in [e.get("version") for e in events])
        receiver.stop()
    finally:
        learner.close()
    assert receiver.applied() == [1]
    assert_same(receiver.final(), make_weights(1))


if __name__ == "__main__" and sys.argv[1:2] == ["receive"]:
    receiver_main(sys.argv[2:])
