"""Typed, versioned stream messages encoded with msgpack; the wire contract is docs/PROTOCOL.md.

Every message is a msgpack map with ``"v"`` (schema version) and ``"t"`` (type tag) next to its fields. Arrays
travel as packed little-endian bytes (token ids ``<u4``, floats ``<f4``, flags ``<u1``). Decoding is strict: any
malformed input raises :class:`ProtocolError` and nothing else, so a consumer can dead-letter it and carry on.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NoReturn, Self, TypeAlias

import msgpack
import numpy as np

from services.extensions import TASK_KINDS

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = frozenset({1, SCHEMA_VERSION})
"""Version 1 responses (``version_first``/``version_last``, weights fixed per response) are converted on decode."""
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 32
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

FINISH_REASONS = frozenset({"stop", "length", "abort"})
GROUP_KINDS = frozenset({"easy", "normal", "hard"})
ACTIONS = frozenset({"none", "reward", "penalty"})

Json: TypeAlias = None | bool | int | float | str | list["Json"] | dict[str, "Json"]

_U32 = np.dtype("<u4")
_F32 = np.dtype("<f4")
_U8 = np.dtype("<u1")


class ProtocolError(ValueError):
    """A message is malformed: it cannot be encoded or decoded under the current schema."""


def _fail(where: str, what: str) -> NoReturn:
    raise ProtocolError(f"{where}: {what}")


# ---------------------------------------------------------------- checks shared by encode (validate) and decode


def _check_str(value: object, where: str, *, non_empty: bool = False) -> None:
    if not isinstance(value, str):
        _fail(where, f"expected str, got {type(value).__name__}")
    if non_empty and not value:
        _fail(where, "must not be empty")


def _check_choice(value: object, choices: Collection[str], where: str) -> None:
    _check_str(value, where)
    if value not in choices:
        _fail(where, f"{value!r} is not one of {sorted(choices)}")


def _check_int(value: object, where: str, *, lo: int | None = None) -> None:
    # bool is an int subclass, and msgpack decodes true/false to bool: never accept it as a number
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(where, f"expected int, got {type(value).__name__}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        _fail(where, "outside the int64 range")
    if lo is not None and value < lo:
        _fail(where, f"must be >= {lo}, got {value}")


def _check_bool(value: object, where: str) -> None:
    if not isinstance(value, bool):
        _fail(where, f"expected bool, got {type(value).__name__}")


def _check_float(value: object, where: str, *, allow_nan: bool = False, allow_inf: bool = False) -> None:
    if not isinstance(value, float | int) or isinstance(value, bool):
        _fail(where, f"expected float, got {type(value).__name__}")
    if isinstance(value, float):
        if math.isnan(value) and not allow_nan:
            _fail(where, "NaN is not allowed")
        if math.isinf(value) and not allow_inf:
            _fail(where, "infinity is not allowed")


def _check_array(value: object, dtype: np.dtype[Any], where: str, *, length: int | None = None) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        _fail(where, f"expected a numpy array, got {type(value).__name__}")
    # kind + itemsize accepts either byte order (the encoder converts) and is cheaper than comparing dtypes
    if value.ndim != 1 or value.dtype.kind != dtype.kind or value.dtype.itemsize != dtype.itemsize:
        _fail(where, f"expected a 1-D {dtype.name} array, got {value.ndim}-D {value.dtype}")
    if length is not None and len(value) != length:
        _fail(where, f"length {len(value)} disagrees with the expected {length}")
    return value


def _check_finite(value: np.ndarray, where: str) -> None:
    if not np.isfinite(value).all():
        _fail(where, "non-finite values are not allowed")


def _check_str_list(value: object, where: str) -> None:
    if not isinstance(value, list):
        _fail(where, f"expected a list, got {type(value).__name__}")
    for i, item in enumerate(value):
        _check_str(item, f"{where}[{i}]")


def _check_json(value: object, where: str) -> None:
    """Check a JSON-like tree iteratively, so depth is bounded without recursion."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            _fail(where, f"nesting deeper than {MAX_JSON_DEPTH}")
        if item is None or isinstance(item, bool | str):
            continue
        if isinstance(item, int):
            _check_int(item, where)
        elif isinstance(item, float):
            _check_float(item, where)
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_str(key, f"{where} (map key)")
                stack.append((child, depth + 1))
        else:
            _fail(where, f"{type(item).__name__} is not JSON-like")


# ---------------------------------------------------------------- wire helpers


def _pack_array(value: np.ndarray, dtype: np.dtype[Any]) -> bytes:
    return value.astype(dtype, copy=False).tobytes()


def _unpack_array(value: object, dtype: np.dtype[Any], where: str) -> np.ndarray:
    if not isinstance(value, bytes):
        _fail(where, f"expected packed bytes, got {type(value).__name__}")
    if len(value) % dtype.itemsize:
        _fail(where, f"{len(value)} bytes is not a multiple of the item size {dtype.itemsize}")
    # astype copies into a writable, native-endian array that does not pin the message buffer
    return np.frombuffer(value, dtype=dtype).astype(dtype.newbyteorder("="))


def _as_float(value: object) -> object:
    """Widen a wire int to float (msgpack producers may write 1 for 1.0); leave anything else to validate()."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _unpack(data: object, max_bytes: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        _fail("message", f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        _fail("message", f"{size} bytes exceeds the limit of {max_bytes}")
    try:
        # the max_*_len limits default to len(data), so a huge declared length fails before allocating
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext, timestamp=0)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, FormatError, StackError, ...)
        raise ProtocolError(f"message: not valid msgpack ({type(exc).__name__}: {exc})") from exc


def _take(m: object, keys: frozenset[str], where: str) -> dict[str, Any]:
    """Check that a wire map has exactly the expected keys."""
    if not isinstance(m, dict):
        _fail(where, f"expected a map, got {type(m).__name__}")
    if m.keys() != keys:
        missing = sorted(keys - m.keys())
        unknown = sorted(repr(k)[:40] for k in m.keys() - keys)
        _fail(where, f"missing keys {missing}, unknown keys {unknown[:8]}")
    return m


def _take_list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(where, f"expected a list, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- messages


_FIELD_NAMES: dict[type, tuple[tuple[str, ...], frozenset[str]]] = {}


def _field_names(cls: type) -> tuple[tuple[str, ...], frozenset[str]]:
    """A dataclass's field names, in order and as a set (cached: decoding looks them up per nested message)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        ordered = tuple(f.name for f in fields(cls))
        names = _FIELD_NAMES[cls] = (ordered, frozenset(ordered))
    return names


class _Message:
    """Shared codec; subclasses are slotted dataclasses that declare how their non-plain fields travel."""

    __slots__ = ()
    TAG: ClassVar[str]
    ARRAYS: ClassVar[dict[str, np.dtype[Any]]] = {}  # packed little-endian arrays
    FLOATS: ClassVar[frozenset[str]] = frozenset()  # float fields (a wire int is widened)
    NESTED: ClassVar[dict[str, type[_Message]]] = {}  # one nested message
    NESTED_LISTS: ClassVar[dict[str, type[_Message]]] = {}  # a list of nested messages

    def validate(self) -> None:
        """Raise ProtocolError if a field breaks the schema."""
        raise NotImplementedError

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The message's wire keys, in encoding order."""
        return _field_names(cls)[0]

    def to_map(self) -> dict[str, Any]:
        """The wire map of the fields, without the version header (no validation)."""
        out: dict[str, Any] = {}
        for name in _field_names(type(self))[0]:
            value = getattr(self, name)
            if name in self.ARRAYS:
                value = _pack_array(value, self.ARRAYS[name])
            elif name in self.NESTED:
                value = value.to_map()
            elif name in self.NESTED_LISTS:
                value = [item.to_map() for item in value]
            elif name in self.FLOATS:
                value = float(value)
            out[name] = value
        return out

    @classmethod
    def from_map(cls, m: object, where: str) -> Self:
        """Build an (unvalidated) message from its wire map, checking wire types of arrays and nesting."""
        kwargs = _take(m, _field_names(cls)[1], where)
        for name, value in kwargs.items():
            if name in cls.ARRAYS:
                kwargs[name] = _unpack_array(value, cls.ARRAYS[name], f"{where}.{name}")
            elif name in cls.NESTED:
                kwargs[name] = cls.NESTED[name].from_map(value, f"{where}.{name}")
            elif name in cls.NESTED_LISTS:
                items = _take_list(value, f"{where}.{name}")
                kind = cls.NESTED_LISTS[name]
                kwargs[name] = [kind.from_map(item, f"{where}.{name}[{i}]") for i, item in enumerate(items)]
            elif name in cls.FLOATS:
                kwargs[name] = _as_float(value)
        return cls(**kwargs)

    def to_bytes(self) -> bytes:
        """Validate and encode as a versioned msgpack map."""
        self.validate()
        body = {"v": SCHEMA_VERSION, "t": self.TAG}
        body.update(self.to_map())
        try:
            packed: bytes = msgpack.packb(body, use_bin_type=True)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. lone surrogates in a str
            raise ProtocolError(f"{self.TAG}: cannot encode ({exc})") from exc
        return packed

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Self:
        """Strictly decode and validate; raise ProtocolError on anything malformed."""
        m = _unpack(data, max_bytes)
        if not isinstance(m, dict):
            _fail("message", f"expected a map, got {type(m).__name__}")
        version, tag = m.pop("v", None), m.pop("t", None)
        if version is None or tag is None:
            _fail("message", "missing the 'v' or 't' header")
        if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
            _fail("message", f"unsupported schema version {version!r}")
        if tag != cls.TAG:
            _fail("message", f"type tag {tag!r} is not {cls.TAG!r}")
        if version == 1:
            _upgrade_v1(tag, m)
        msg = cls.from_map(m, cls.TAG)
        msg.validate()
        return msg


def _upgrade_v1(tag: object, m: dict[Any, Any]) -> None:
    """Rewrite a version-1 map in place as version 2: each response's ``version_first``/``version_last`` become
    one span from token 0 at ``version_first`` (v1 servers never changed weights inside a response; the oldest
    version is the conservative reading), with no fingerprint."""
    if tag == "deadletter":  # v1 letters held whole entries and no prompt id
        m.setdefault("prompt_id", "")
        m.setdefault("clipped", {})
        return
    responses: object = None
    if tag == "response":
        responses = [m]
    elif tag == "rollout":
        responses = m.get("responses")
    elif tag == "scored" and isinstance(m.get("rollout"), dict):
        responses = m["rollout"].get("responses")
    for r in responses if isinstance(responses, list) else []:
        if not isinstance(r, dict) or "version_first" not in r or "span_starts" in r:
            continue  # malformed or already new: from_map reports what is wrong
        first = r.pop("version_first")
        r.pop("version_last", None)
        if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first < 2**32:
            _fail("response.version_first", f"expected an int in [0, 2**32), got {first!r}")
        r["span_starts"] = np.zeros(1, _U32).tobytes()
        r["span_versions"] = np.full(1, first, _U32).tobytes()
        r["span_weights"] = [""]


@dataclass(frozen=True, slots=True)
class Sampling(_Message):
    """How the responses of one prompt are sampled: THE sampling record (docs/SAMPLING.md).

    The config, the HTTP bodies and the stream all convert to this one type, and backends take it as it is. Unlike
    the other messages it checks itself when built, since backends and evaluation build it directly.
    ``temperature == 0`` means greedy decoding (evaluation, ad-hoc generation); training tasks need > 0.
    """

    TAG: ClassVar[str] = "sampling"
    FLOATS = frozenset({"temperature", "top_p"})

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, list):  # msgpack carries a list; the record keeps an immutable tuple
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        """Raise ProtocolError (a ValueError) if a field breaks the schema."""
        _check_float(self.temperature, "sampling.temperature")
        if not self.temperature >= 0:
            _fail("sampling.temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        _check_float(self.top_p, "sampling.top_p")
        if not 0 < self.top_p <= 1:
            _fail("sampling.top_p", f"must be in (0, 1] (1 disables it), got {self.top_p}")
        _check_int(self.top_k, "sampling.top_k", lo=-1)
        if self.top_k == 0:
            _fail("sampling.top_k", "must be -1 (off) or >= 1")
        _check_int(self.max_new_tokens, "sampling.max_new_tokens", lo=1)
        if not isinstance(self.stop, tuple):
            _fail("sampling.stop", f"expected a list of strings, got {type(self.stop).__name__}")
        _check_str_list(list(self.stop), "sampling.stop")
        if any(not s for s in self.stop):
            _fail("sampling.stop", "stop strings must be non-empty")
        if self.seed is not None:
            _check_int(self.seed, "sampling.seed")


@dataclass(slots=True)
class PromptTask(_Message):
    """One prompt to sample n responses for (stream ``prompts``)."""

    TAG: ClassVar[str] = "prompt"
    FLOATS = frozenset({"created_at"})
    NESTED = {"sampling": Sampling}

    prompt_id: str
    task_kind: str
    messages: list[dict[str, str]]
    ground_truth: Json
    n: int
    sampling: Sampling
    tools: list[dict[str, Json]] = field(default_factory=list)
    category: str = ""
    dispatch_version: int = 0
    epoch: int = 0
    index: int = 0
    created_at: float = 0.0

    def validate(self) -> None:
        """Raise ProtocolError if a field breaks the schema."""
        _check_str(self.prompt_id, "prompt.prompt_id", non_empty=True)
        _check_choice(self.task_kind, TASK_KINDS, "prompt.task_kind")
        if not isinstance(self.messages, list) or not self.messages:
            _fail("prompt.messages", "expected a non-empty list of chat turns")
        for i, turn in enumerate(self.messages):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                _fail(f"prompt.messages[{i}]", "expected a map with 'role' and 'content'")
            for key, value in turn.items():
                _check_str(key, f"prompt.messages[{i}] (key)")
                _check_str(value, f"prompt.messages[{i}].{key}")
        _check_json(self.ground_truth, "prompt.ground_truth")
        if not isinstance(self.tools, list) or not all(isinstance(t, dict) for t in self.tools):
            _fail("prompt.tools", "expected a list of maps")
        _check_json(self.tools, "prompt.tools")
        _check_str(self.category, "prompt.category")
        _check_int(self.n, "prompt.n", lo=1)
        if not isinstance(self.sampling, Sampling):
            _fail("prompt.sampling", f"expected Sampling, got {type(self.sampling).__name__}")
        self.sampling.validate()
        if not self.sampling.temperature > 0:
            got = self.sampling.temperature
            _fail("prompt.sampling.temperature", f"a training task samples at a temperature > 0, got {got}")
        _check_int(self.dispatch_version, "prompt.dispatch_version", lo=0)
        _check_int(self.epoch, "prompt.epoch", lo=0)
        _check_int(self.index, "prompt.index", lo=0)
        _check_float(self.created_at, "prompt.created_at")


@dataclass(slots=True)
class Response(_Message):
    """One sampled response with the behaviour log-prob of every sampled token and the weights that produced it.

    Weights can change while a response is generated (in-flight updates), so a response is a sequence of spans:
    span ``k`` covers tokens ``span_starts[k]`` up to the next start, sampled by policy version ``span_versions[k]``
    whose weights have fingerprint ``span_weights[k]`` (``""`` when the server could not fingerprint them).
    """

    TAG: ClassVar[str] = "response"
    ARRAYS = {"token_ids": _U32, "logprobs": _F32, "span_starts": _U32, "span_versions": _U32}

    token_ids: np.ndarray
    logprobs: np.ndarray
    text: str
    finish_reason: str
    span_starts: np.ndarray
    span_versions: np.ndarray
    span_weights: list[str]

    @classmethod
    def of_version(
        cls, token_ids: np.ndarray, logprobs: np.ndarray, text: str, finish_reason: str, version: int, weights: str = ""
    ) -> Response:
        """A response sampled entirely by one version's weights."""
        one = np.array([version], dtype=_U32)
        return cls(token_ids, logprobs, text, finish_reason, np.zeros(1, _U32), one, [weights])

    @property
    def version_first(self) -> int:
        """The version that sampled the first token (the oldest one: versions only increase)."""
        return int(self.span_versions[0])

    @property
    def version_last(self) -> int:
        """The version that sampled the last token."""
        return int(self.span_versions[-1])

    def token_versions(self) -> np.ndarray:
        """The policy version of every token (uint32, one per token id)."""
        ends = np.append(self.span_starts[1:], len(self.token_ids)).astype(np.int64)
        return np.repeat(self.span_versions, ends - self.span_starts.astype(np.int64)).astype(_U32)

    def validate(self) -> None:
        """Raise ProtocolError if a field breaks the schema."""
        ids = _check_array(self.token_ids, _U32, "response.token_ids")
        lp = _check_array(self.logprobs, _F32, "response.logprobs", length=len(ids))
        _check_finite(lp, "response.logprobs")
        _check_str(self.text, "response.text")
        _check_choice(self.finish_reason, FINISH_REASONS, "response.finish_reason")
        starts = _check_array(self.span_starts, _U32, "response.span_starts")
        versions = _check_array(self.span_versions, _U32, "response.span_versions", length=len(starts))
        _check_str_list(self.span_weights, "response.span_weights")
        if len(self.span_weights) != len(starts):
            _fail("response.span_weights", f"{len(self.span_weights)} fingerprints for {len(starts)} spans")
        if len(starts) == 0 or starts[0] != 0:
            _fail("response.span_starts", "must start with a span at token 0")
        if (np.diff(starts.astype(np.int64)) <= 0).any() or (len(ids) and starts[-1] >= len(ids)):
            _fail("response.span_starts", "must increase and lie inside the response")
        if (np.diff(versions.astype(np.int64)) < 0).any():
            _fail("response.span_versions", "versions must not decrease")


@dataclass(slots=True)
class RolloutGroup(_Message):
    """The n responses of one prompt (stream ``rollouts``)."""

    TAG: ClassVar[str] = "rollout"
    ARRAYS = {"prompt_token_ids": _U32}
    FLOATS = frozenset({"generated_at", "gen_seconds"})
    NESTED = {"task": PromptTask}
    NESTED_LISTS = {"responses": Response}

    task: PromptTask
    prompt_token_ids: np.ndarray
    responses: list[Response]
    worker_id: str
    generated_at: float
    gen_seconds: float

    @property
    def oldest_version(self) -> int:
        """The oldest policy version that produced any response (what staleness is measured on)."""
        return min(r.version_first for r in self.responses)

    def validate(self) -> None:
        """Raise ProtocolError if a field breaks the schema."""
        if not isinstance(self.task, PromptTask):
            _fail("rollout.task", f"expected PromptTask, got {type(self.task).__name__}")
        self.task.validate()
        _check_array(self.prompt_token_ids, _U32, "rollout.prompt_token_ids")
        if not isinstance(self.responses, list) or not all(isinstance(r, Response) for r in self.responses):
            _fail("rollout.responses", "expected a list of Response")
        if len(self.responses) != self.task.n:
            _fail("rollout.responses", f"{len(self.responses)} responses for a task with n={self.task.n}")
        for r in self.responses:
            r.validate()
        _check_str(self.worker_id, "rollout.worker_id")
        _check_float(self.generated_at, "rollout.generated_at")
        _check_float(self.gen_seconds, "rollout.gen_seconds")
        if self.gen_seconds < 0:
            _fail("rollout.gen_seconds", "must be >= 0")


@dataclass(slots=True)
class ScoredGroup(_Message):
    """A rollout group with its verification and DiPO reallocation results (stream ``scored``)."""

    TAG: ClassVar[str] = "scored"
    ARRAYS = {"correct": _U8, "reward": _F32, "realloc_reward": _F32, "perplexity": _F32}
    FLOATS = frozenset({"tau", "fit_at", "scored_at"})
    NESTED = {"rollout": RolloutGroup}

    rollout: RolloutGroup
    status: list[str]
    correct: np.ndarray
    reward: np.ndarray
    realloc_reward: np.ndarray
    perplexity: np.ndarray
    group_kind: str
    action: str
    tau: float
    gate_open: bool
    fit_window: int
    fit_at: float
    signal: bool
    scorer_id: str
    scored_at: float

    @property
    def oldest_version(self) -> int:
        """The oldest policy version that produced any response of the group."""
        return self.rollout.oldest_version

    def validate(self) -> None:
        """Raise ProtocolError if a field breaks the schema."""
        if not isinstance(self.rollout, RolloutGroup):
            _fail("scored.rollout", f"expected RolloutGroup, got {type(self.rollout).__name__}")
        self.rollout.validate()
        n = len(self.rollout.responses)
        _check_str_list(self.status, "scored.status")
        if len(self.status) != n:
            _fail("scored.status", f"length {len(self.status)} disagrees with the expected {n}")
        correct = _check_array(self.correct, _U8, "scored.correct", length=n)
        if (correct > 1).any():
            _fail("scored.correct", "values must be 0 or 1")
        _check_finite(_check_array(self.reward, _F32, "scored.reward", length=n), "scored.reward")
        _check_finite(
            _check_array(self.realloc_reward, _F32, "scored.realloc_reward", length=n), "scored.realloc_reward"
        )
        ppl = _check_array(self.perplexity, _F32, "scored.perplexity", length=n)
        empty = np.fromiter((len(r.token_ids) == 0 for r in self.rollout.responses), dtype=bool, count=n)
        nan = np.isnan(ppl)
        if (nan & ~empty).any():
            _fail("scored.perplexity", "NaN is allowed only for empty responses")
        if (ppl[~nan] < 0).any():
            _fail("scored.perplexity", "must be >= 0")
        _check_choice(self.group_kind, GROUP_KINDS, "scored.group_kind")
        _check_choice(self.action, ACTIONS, "scored.action")
        _check_float(self.tau, "scored.tau", allow_inf=True)
        _check_bool(self.gate_open, "scored.gate_open")
        _check_int(self.fit_window, "scored.fit_window", lo=0)
        _check_float(self.fit_at, "scored.fit_at")
        _check_bool(self.signal, "scored.signal")
        _check_str(self.scorer_id, "scored.scorer_id")
        _check_float(self.scored_at, "scored.scored_at")


@dataclass(slots=True)
class DeadLetter(_Message):
    """An entry a consumer gave up on, with its raw fields so nothing is lost (stream ``deadletter``)."""

    TAG: ClassVar[str] = "deadletter"
    FLOATS = frozenset({"at"})

    source_stream: str
    entry_id: str
    group: str
    consumer: str
    error: str
    deliveries: int
    fields: dict[str, bytes]
    """The entry's fields, each cut to the stream client's ``deadletter_keep_bytes`` (see ``clipped``)."""
    at: float
    prompt_id: str = ""
    """The prompt the entry carried, read before clipping ("" when the payload was not decodable)."""
    clipped: dict[str, str] = field(default_factory=dict)
    """Field name -> ``"<size> bytes sha256:<hex>"`` of the whole value, for every field stored as a prefix."""

    def validate(self) -> None:
        """Raise ProtocolError if a field breaks the schema."""
        for name in ("source_stream", "entry_id", "group", "consumer", "error", "prompt_id"):
            _check_str(getattr(self, name), f"deadletter.{name}")
        if not isinstance(self.clipped, dict):
            _fail("deadletter.clipped", f"expected a map, got {type(self.clipped).__name__}")
        for name, digest in self.clipped.items():
            _check_str(name, "deadletter.clipped (key)")
            _check_str(digest, f"deadletter.clipped.{name}")
        _check_int(self.deliveries, "deadletter.deliveries", lo=0)
        if not isinstance(self.fields, dict):
            _fail("deadletter.fields", f"expected a map, got {type(self.fields).__name__}")
        for key, value in self.fields.items():
            _check_str(key, "deadletter.fields (key)")
            if not isinstance(value, bytes):
                _fail(f"deadletter.fields.{key}", f"expected bytes, got {type(value).__name__}")
        _check_float(self.at, "deadletter.at")


MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.TAG: cls for cls in (Sampling, PromptTask, Response, RolloutGroup, ScoredGroup, DeadLetter)
}
