"""Weight-sync wire format and group formation shared by the learner and the rollout servers.

See docs/WEIGHT_SYNC.md for the protocol: a manifest (msgpack), packed uint8 buckets, a checksum trailer, and
per-round process groups built directly on a PrefixStore of the learner's TCPStore.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgpack
import torch
import torch.distributed as dist
import xxhash

SCHEMA = 1
ALIGN = 16  # bytes; covers every supported element size, so each tensor can be a view into its bucket
BUCKET_PAD = 4096  # bucket sizes are multiples of this so sum64 can view them as rows of SUM64_ROW int32 words
SUM64_ROW = 1024
DEFAULT_BUCKET_BYTES = 64 << 20
CHECKSUMS = ("xxh3", "crc32", "sum64")
POLL_MIN_S, POLL_MAX_S = 0.001, 0.02  # back off from 1 ms: rounds start fast, idle waits stay cheap

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]
Group = Any  # a c10d backend object (ProcessGroupGloo or ProcessGroupNCCL) built by new_group(); no public type


class ResyncNeeded(RuntimeError):
    """The receiver missed or refused an update: load the newest checkpoint, then call join() again."""


class ManifestRejected(ResyncNeeded):
    """The manifest does not describe this receiver's model (names, shapes, dtypes, layout)."""


class ChecksumMismatch(ResyncNeeded):
    """A bucket arrived with bytes that do not match the sender's checksum."""


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a dtype; raises ValueError for dtypes the format does not carry."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be synced; supported: {sorted(_DTYPES)}")
    return _DTYPE_NAMES[dtype]


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the packed buckets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's bytes."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Manifest:
    """Everything a receiver needs to know before the buckets arrive."""

    version: int
    round: int
    checksum: str
    buckets: tuple[int, ...]
    tensors: tuple[TensorEntry, ...]

    def encode(self) -> bytes:
        """msgpack bytes of the manifest."""
        return msgpack.packb(
            {
                "schema": SCHEMA,
                "version": self.version,
                "round": self.round,
                "checksum": self.checksum,
                "buckets": list(self.buckets),
                "tensors": [[t.name, t.dtype, list(t.shape), t.bucket, t.offset] for t in self.tensors],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse and check the structure of manifest bytes; raises ManifestRejected when malformed."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if raw["schema"] != SCHEMA:
                raise ValueError(f"schema {raw['schema']} != {SCHEMA}")
            buckets = tuple(_nonneg_int(b) for b in raw["buckets"])
            tensors = tuple(
                TensorEntry(str(n), str(d), tuple(_nonneg_int(s) for s in shape), _nonneg_int(b), _nonneg_int(o))
                for n, d, shape, b, o in raw["tensors"]
            )
            manifest = cls(_nonneg_int(raw["version"]), _nonneg_int(raw["round"]), raw["checksum"], buckets, tensors)
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise ManifestRejected(f"malformed manifest: {exc!r}") from exc
        problems = manifest.layout_problems()
        if problems:
            raise ManifestRejected("bad manifest layout: " + "; ".join(problems[:5]))
        return manifest

    def layout_problems(self) -> list[str]:
        """Structural problems: unknown dtypes, misaligned, out-of-bounds or overlapping tensors."""
        problems: list[str] = []
        if self.checksum not in CHECKSUMS:
            problems.append(f"unknown checksum {self.checksum!r}")
        if any(size == 0 or size % BUCKET_PAD for size in self.buckets):
            problems.append(f"bucket sizes must be positive multiples of {BUCKET_PAD}")
        spans: dict[int, list[tuple[int, int, str]]] = {}
        for t in self.tensors:
            if t.dtype not in _DTYPES:
                problems.append(f"{t.name}: unknown dtype {t.dtype!r}")
            elif t.bucket >= len(self.buckets) or t.offset % ALIGN or t.offset + t.nbytes > self.buckets[t.bucket]:
                problems.append(f"{t.name}: bucket {t.bucket} offset {t.offset} out of bounds or misaligned")
            else:
                spans.setdefault(t.bucket, []).append((t.offset, t.offset + t.nbytes, t.name))
        for bucket_spans in spans.values():
            bucket_spans.sort()
            for (_, end, name), (start, _, nxt) in zip(bucket_spans, bucket_spans[1:], strict=False):
                if start < end:
                    problems.append(f"{name} overlaps {nxt}")
        if len({t.name for t in self.tensors}) != len(self.tensors):
            problems.append("duplicate tensor names")
        return problems


def _nonneg_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def fingerprint(manifest: Manifest, sums: Sequence[int]) -> str:
    """``v{version}:{digest}`` of the weights one round carries: its tensor table, checksum algorithm and bucket
    checksums (not its round number, so a version sent again has the same fingerprint)."""
    table = [[t.name, t.dtype, list(t.shape), t.bucket, t.offset] for t in manifest.tensors]
    body = msgpack.packb([SCHEMA, manifest.checksum, list(manifest.buckets), table, [int(s) for s in sums]])
    return f"v{manifest.version}:{hashlib.blake2b(body, digest_size=8).hexdigest()}"


def expected_from_named(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Expected:
    """The {name: (shape, dtype)} a receiver checks manifests against, taken from its own model."""
    return {name: (tuple(t.shape), t.dtype) for name, t in named_tensors}


def plan_buckets(named: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int) -> tuple[list[int], list[TensorEntry]]:
    """Assign tensors, in order, to buckets of about bucket_bytes; a larger tensor gets a bucket of its own."""
    sizes: list[int] = []
    entries: list[TensorEntry] = []
    used = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        offset = _align(used, ALIGN)
        if not sizes or (used > 0 and offset + nbytes > bucket_bytes):
            sizes.append(0)
            offset = 0
        entries.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), len(sizes) - 1, offset))
        used = offset + nbytes
        sizes[-1] = used
    return [_align(max(size, 1), BUCKET_PAD) for size in sizes], entries


def pack_bucket(buf: torch.Tensor, entries: Iterable[TensorEntry], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the tensors of one bucket, in offset order, into its uint8 buffer; gaps are zeroed for stable checksums."""
    cursor = 0
    for entry in entries:
        if entry.offset > cursor:
            buf[cursor : entry.offset].zero_()
        src = tensors[entry.name].detach().reshape(-1).view(torch.uint8)
        buf[entry.offset : entry.offset + entry.nbytes].copy_(src)
        cursor = entry.offset + entry.nbytes
    buf[cursor:].zero_()


def unpack(manifest: Manifest, buffers: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Views of every tensor inside the received buckets."""
    out = []
    for entry in manifest.tensors:
        raw = buffers[entry.bucket][entry.offset : entry.offset + entry.nbytes]
        out.append((entry.name, raw.view(_DTYPES[entry.dtype]).view(entry.shape)))
    return out


def checksum_for(device: torch.device) -> str:
    """The checksum to use for buckets on this device: xxh3 on the CPU, sum64 on accelerators (crc32, the previous
    CPU choice, is still accepted from a sender that names it)."""
    return "xxh3" if device.type == "cpu" else "sum64"


def checksum(buf: torch.Tensor, algo: str) -> int:
    """Checksum of a bucket as a signed 64-bit integer (it travels in an int64 trailer)."""
    if algo == "xxh3":  # 64-bit XXH3: 20+ GB/s on one core, against crc32's 1.4-3.7
        value = xxhash.xxh3_64_intdigest(memoryview(buf.cpu().numpy()))
        return value - (1 << 64) if value >= 1 << 63 else value
    if algo == "crc32":
        return zlib.crc32(buf.cpu().numpy())
    if algo != "sum64":
        raise ValueError(f"unknown checksum {algo!r}; expected one of {CHECKSUMS}")
    rows = buf.view(torch.int32).view(-1, SUM64_ROW)
    weights = torch.arange(1, SUM64_ROW + 1, dtype=torch.int64, device=buf.device)
    acc = torch.zeros((), dtype=torch.int64, device=buf.device)
    chunk = 4096  # rows per step: bounds the int64 temporary to 32 MiB
    for start in range(0, rows.shape[0], chunk):
        acc += (rows[start : start + chunk].to(torch.int64) * weights).sum()
    return int(acc)


def validate_manifest(manifest: Manifest, expected: Expected) -> list[str]:
    """Differences between a manifest and the receiver's model (names, shapes, dtypes)."""
    problems = []
    sent = {t.name: t for t in manifest.tensors}
    missing = sorted(set(expected) - set(sent))
    extra = sorted(set(sent) - set(expected))
    if missing:
        problems.append(f"missing tensors: {missing[:5]}")
    if extra:
        problems.append(f"unexpected tensors: {extra[:5]}")
    for name, (shape, dtype) in expected.items():
        entry = sent.get(name)
        if entry is None:
            continue
        if entry.shape != tuple(shape):
            problems.append(f"{name}: shape {list(entry.shape)} != expected {list(shape)}")
        if entry.dtype != _DTYPE_NAMES.get(dtype):
            problems.append(f"{name}: dtype {entry.dtype} != expected {dtype}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Store keys, rendezvous and process groups


class Keys:
    """Names of the TCPStore keys of the sync protocol (docs/WEIGHT_SYNC.md)."""

    events_count = "events/n"
    rounds = "rounds"

    @staticmethod
    def event(index: int) -> str:
        """Key of the index-th membership event."""
        return f"events/{index}"

    @staticmethod
    def invite(rnd: int) -> str:
        """Key of a round's invitation."""
        return f"r{rnd}/invite"

    @staticmethod
    def ready(rnd: int, member: str) -> str:
        """Key a member sets when it is at the round's start line."""
        return f"r{rnd}/ready/{member}"

    @staticmethod
    def roster(rnd: int) -> str:
        """Key of the members that take part in a round, in rank order."""
        return f"r{rnd}/roster"

    @staticmethod
    def ack(rnd: int, member: str) -> str:
        """Key of a member's outcome for a round."""
        return f"r{rnd}/ack/{member}"

    @staticmethod
    def group_prefix(rnd: int) -> str:
        """Prefix under which a round's process group rendezvouses."""
        return f"r{rnd}/pg"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"sync endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def membership_proof(secret: str, op: str, member: str) -> str:
    """HMAC-SHA256 of a membership event (``op`` of ``member``) under the run's sync secret, hex.

    The learner publishes a fresh secret with its endpoint (in the run's policy hash, behind Redis's password);
    a join or leave that does not carry this proof is dropped, so a client that merely reaches the store port can
    neither add a member that every round would wait for nor remove a real one.
    """
    return hmac.new(secret.encode(), f"{op}:{member}".encode(), hashlib.sha256).hexdigest()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host`` (not every interface, which is what TCPStore itself binds) and listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def put_json(store: dist.Store, key: str, value: Any) -> None:
    """Set a store key to a JSON value."""
    store.set(key, json.dumps(value))


def get_json(store: dist.Store, key: str) -> Any:
    """Read a JSON value (blocks up to the store timeout until the key exists)."""
    return json.loads(store.get(key).decode())


def wait_keys(
    store: dist.Store, keys: Sequence[str], timeout_s: float, stop: threading.Event | None = None
) -> list[str]:
    """Poll until every key exists, the timeout passes or stop is set; returns the keys present."""
    deadline = time.monotonic() + timeout_s
    present: list[str] = []
    pending = list(keys)
    poll_s = POLL_MIN_S
    while True:
        # store.wait() would block server-side but logs a C++ warning on every timeout, so we poll.
        for key in list(pending):
            if store.check([key]):
                present.append(key)
                pending.remove(key)
        if not pending or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return present
        time.sleep(poll_s)
        poll_s = min(2 * poll_s, POLL_MAX_S)


def new_group(
    backend: str, store: dist.Store, rank: int, size: int, timeout_s: float, device: torch.device, bind_host: str | None
) -> Group:
    """A process-group backend of its own, outside the default group (see docs/WEIGHT_SYNC.md)."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        gloo_device = (
            dist.ProcessGroupGloo.create_device(hostname=bind_host)
            if bind_host
            else dist.ProcessGroupGloo.create_default_device()
        )
        opts._devices = [gloo_device]
        return dist.ProcessGroupGloo(store, rank, size, opts)
    if backend == "nccl":
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, size, nccl_opts)
        group.eager_connect_single_device(device)
        return group
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def release_group(group: Group, failed: bool) -> None:
    """End a round's group: abort after a failure (pending work is cancelled), shut down cleanly otherwise."""
    try:
        group.abort() if failed else group.shutdown()
    except RuntimeError:
        pass  # a backend without abort/shutdown is released when the object is dropped


def broadcast(group: Group, tensor: torch.Tensor, timeout_s: float) -> Any:
    """Start a broadcast from rank 0; returns the work item to wait on with the same timeout."""
    return group.broadcast(tensor, 0, timedelta(seconds=timeout_s))


def wait_work(work: Any, timeout_s: float) -> None:
    """Wait for a work item, raising on its failure or after timeout_s."""
    work.wait(timedelta(seconds=timeout_s))


def send_bytes(group: Group, data: bytes, device: torch.device, timeout_s: float) -> None:
    """Broadcast a length-prefixed byte string from rank 0."""
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    wait_work(broadcast(group, length, timeout_s), timeout_s)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    wait_work(broadcast(group, payload, timeout_s), timeout_s)


def recv_bytes(group: Group, device: torch.device, timeout_s: float, max_bytes: int = 256 << 20) -> bytes:
    """Receive a length-prefixed byte string broadcast from rank 0."""
    length = torch.zeros(1, dtype=torch.int64, device=device)
    wait_work(broadcast(group, length, timeout_s), timeout_s)
    n = int(length.item())
    if not 0 < n <= max_bytes:
        raise ManifestRejected(f"manifest length {n} outside (0, {max_bytes}]")
    payload = torch.empty(n, dtype=torch.uint8, device=device)
    wait_work(broadcast(group, payload, timeout_s), timeout_s)
    return payload.cpu().numpy().tobytes()
