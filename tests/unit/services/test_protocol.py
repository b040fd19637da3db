"""Round trips and strict decoding of the stream messages: malformed input raises ProtocolError and nothing else."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.protocol import (
    DEFAULT_MAX_BYTES,
    SCHEMA_VERSION,
    DeadLetter,
    PromptTask,
    ProtocolError,
    Response,
    RolloutGroup,
    Sampling,
    ScoredGroup,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_prompt(n: int = 3, kind: str = "math") -> PromptTask:
    ground_truth: Any = "42" if kind == "math" else [{"name": "f", "arguments": {"x": [1, 2.5, None, True]}}]
    tools = [] if kind == "math" else [{"name": "f", "parameters": {"type": "object", "properties": {}}}]
    return PromptTask(
        prompt_id="gsm8k-17",
        task_kind=kind,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 × 7? 🙂"}],
        ground_truth=ground_truth,
        n=n,
        sampling=Sampling(temperature=0.7, top_p=0.95, top_k=50, max_new_tokens=64, stop=["</s>"], seed=123),
        tools=tools,
        category="simple" if kind == "function_call" else "gsm8k",
        dispatch_version=4,
        epoch=1,
        index=99,
        created_at=1.7e9,
    )


def make_response(length: int, seed: int = 0, version: int = 3) -> Response:
    rng = np.random.default_rng(seed)
    spans = 2 if length > 1 else 1  # a response that spans a weight update, when it has the tokens to
    return Response(
        token_ids=rng.integers(0, 2**32 - 1, size=length, dtype=np.uint32),
        logprobs=-rng.exponential(size=length).astype(np.float32),
        text="x" * length,
        finish_reason="length" if length else "abort",
        span_starts=np.array([0, length // 2][:spans], dtype=np.uint32),
        span_versions=np.array([version, version + 1][:spans], dtype=np.uint32),
        span_weights=[f"v{version}:aa", f"v{version + 1}:bb"][:spans],
    )


def make_rollout(lengths: tuple[int, ...] = (5, 0, 7)) -> RolloutGroup:
    return RolloutGroup(
        task=make_prompt(n=len(lengths)),
        prompt_token_ids=np.arange(11, dtype=np.uint32),
        responses=[make_response(k, seed=i, version=2 + i) for i, k in enumerate(lengths)],
        worker_id="rollout-0",
        generated_at=1.7e9 + 1,
        gen_seconds=0.25,
    )


def make_scored(lengths: tuple[int, ...] = (5, 0, 7)) -> ScoredGroup:
    n = len(lengths)
    ppl = np.array([1.5 if k else np.nan for k in lengths], dtype=np.float32)
    return ScoredGroup(
        rollout=make_rollout(lengths),
        status=["correct", "no_answer", "wrong"][:n] + ["wrong"] * max(0, n - 3),
        correct=np.array([1] + [0] * (n - 1), dtype=np.uint8),
        reward=np.linspace(-1, 1, n, dtype=np.float32),
        realloc_reward=np.zeros(n, dtype=np.float32),
        perplexity=ppl,
        group_kind="normal",
        action="none",
        tau=-math.inf,
        gate_open=False,
        fit_window=128,
        fit_at=1.7e9 + 2,
        signal=True,
        scorer_id="reward-1",
        scored_at=1.7e9 + 3,
    )


def make_deadletter() -> DeadLetter:
    return DeadLetter(
        source_stream="dipo:r:rollouts",
        entry_id="1-0",
        group="reward",
        consumer="reward-0",
        error="boom",
        deliveries=6,
        fields={"d": b"\x00\xff", "extra": b""},
        at=1.7e9,
    )


FACTORIES = {
    "sampling": lambda: make_prompt().sampling,
    "prompt": make_prompt,
    "response": lambda: make_response(9),
    "rollout": make_rollout,
    "scored": make_scored,
    "deadletter": make_deadletter,
}
ALL = list(FACTORIES)


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("tag", ALL)
def test_round_trip_is_byte_exact(tag: str) -> None:
    msg = FACTORIES[tag]()
    data = msg.to_bytes()
    back = type(msg).from_bytes(data)
    assert back.to_bytes() == data
    header = msgpack.unpackb(data)
    assert header["v"] == SCHEMA_VERSION and header["t"] == tag


def test_rollout_arrays_survive_with_dtype_and_are_writable() -> None:
    group = make_rollout()
    back = RolloutGroup.from_bytes(group.to_bytes())
    for a, b in zip(group.responses, back.responses, strict=True):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert b.token_ids.dtype == np.uint32 and b.logprobs.dtype == np.float32
        assert b.token_ids.flags.writeable
    assert back.task == group.task
    assert back.oldest_version == 2 == group.oldest_version


def test_scored_keeps_nan_perplexity_of_empty_response_and_infinite_tau() -> None:
    back = ScoredGroup.from_bytes(make_scored().to_bytes())
    assert np.isnan(back.perplexity[1]) and back.perplexity[0] == np.float32(1.5)
    assert back.tau == -math.inf
    assert back.correct.dtype == np.uint8 and list(back.correct) == [1, 0, 0]
    assert back.oldest_version == 2


def test_function_call_prompt_keeps_json_ground_truth_and_tools() -> None:
    msg = make_prompt(kind="function_call")
    back = PromptTask.from_bytes(msg.to_bytes())
    assert back.ground_truth == msg.ground_truth and back.tools == msg.tools
    assert back.ground_truth[0]["arguments"]["x"][3] is True


def test_big_endian_arrays_are_written_little_endian() -> None:
    r = make_response(4)
    r.token_ids = r.token_ids.astype(">u4")
    back = Response.from_bytes(r.to_bytes())
    np.testing.assert_array_equal(back.token_ids, r.token_ids)


def test_deadletter_keeps_raw_fields() -> None:
    assert DeadLetter.from_bytes(make_deadletter().to_bytes()).fields == {"d": b"\x00\xff", "extra": b""}


def test_decoded_float_fields_are_floats_even_when_sent_as_ints() -> None:
    m = msgpack.unpackb(make_prompt().sampling.to_bytes())
    m["temperature"] = 2
    back = Sampling.from_bytes(msgpack.packb(m))
    assert back.temperature == 2.0 and isinstance(back.temperature, float)


# ------------------------------------------------------------------------------------------------ encode-side checks


SAMPLING_BUGS = {
    "negative temperature": {"temperature": -1.0},
    "top_p 0": {"top_p": 0.0},
    "top_p nan": {"top_p": math.nan},
    "top_k 0": {"top_k": 0},
    "max_new_tokens 0": {"max_new_tokens": 0},
    "bool as int": {"max_new_tokens": True},
    "stop not str": {"stop": [1]},
    "stop not a list": {"stop": "</s>"},
    "empty stop string": {"stop": [""]},
    "seed too big": {"seed": 2**70},
}


@pytest.mark.parametrize("fields", SAMPLING_BUGS.values(), ids=SAMPLING_BUGS.keys())
def test_the_sampling_record_refuses_bad_values_when_built(fields: dict[str, Any]) -> None:
    # The one sampling record is frozen and checks itself, so a bad one never reaches a backend or the wire.
    with pytest.raises(ProtocolError):
        Sampling(**fields)


def test_the_sampling_record_allows_greedy_but_a_training_task_does_not() -> None:
    assert Sampling(temperature=0.0).temperature == 0.0
    task = make_prompt()
    task.sampling = Sampling(temperature=0.0)
    with pytest.raises(ProtocolError, match="temperature > 0"):
        task.to_bytes()


def _broken(tag: str, edit: Any) -> Any:
    msg = FACTORIES[tag]()
    edit(msg)
    return msg


ENCODE_BUGS = {
    "training at temperature 0": ("prompt", lambda m: setattr(m, "sampling", Sampling(temperature=0.0))),
    "unknown task kind": ("prompt", lambda m: setattr(m, "task_kind", "poetry")),
    "empty prompt id": ("prompt", lambda m: setattr(m, "prompt_id", "")),
    "no messages": ("prompt", lambda m: setattr(m, "messages", [])),
    "turn without role": ("prompt", lambda m: setattr(m, "messages", [{"content": "hi"}])),
    "turn content not str": ("prompt", lambda m: setattr(m, "messages", [{"role": "user", "content": 3}])),
    "ground truth set": ("prompt", lambda m: setattr(m, "ground_truth", {1, 2})),
    "ground truth nan": ("prompt", lambda m: setattr(m, "ground_truth", [math.nan])),
    "ground truth int key": ("prompt", lambda m: setattr(m, "ground_truth", {1: "a"})),
    "ground truth too deep": ("prompt", lambda m: setattr(m, "ground_truth", _nested(40))),
    "tools not maps": ("prompt", lambda m: setattr(m, "tools", ["f"])),
    "n 0": ("prompt", lambda m: setattr(m, "n", 0)),
    "negative index": ("prompt", lambda m: setattr(m, "index", -1)),
    "lone surrogate": ("prompt", lambda m: setattr(m, "category", "\ud800")),
    "token ids int64": ("response", lambda m: setattr(m, "token_ids", m.token_ids.astype(np.int64))),
    "token ids 2-D": ("response", lambda m: setattr(m, "token_ids", m.token_ids.reshape(3, 3))),
    "token ids list": ("response", lambda m: setattr(m, "token_ids", [1, 2])),
    "logprobs short": ("response", lambda m: setattr(m, "logprobs", m.logprobs[:-1])),
    "logprobs nan": ("response", lambda m: m.logprobs.__setitem__(0, np.nan)),
    "logprobs -inf": ("response", lambda m: m.logprobs.__setitem__(0, -np.inf)),
    "finish reason": ("response", lambda m: setattr(m, "finish_reason", "eos")),
    "versions reversed": ("response", lambda m: setattr(m, "span_versions", m.span_versions[::-1].copy())),
    "span beyond the tokens": ("response", lambda m: setattr(m, "span_starts", np.array([0, 99], np.uint32))),
    "no span at token 0": ("response", lambda m: setattr(m, "span_starts", np.array([1, 2], np.uint32))),
    "spans not increasing": ("response", lambda m: setattr(m, "span_starts", np.array([0, 0], np.uint32))),
    "fingerprints vs spans": ("response", lambda m: m.span_weights.pop()),
    "no span": ("response", lambda m: setattr(m, "span_starts", np.zeros(0, np.uint32))),
    "responses vs n": ("rollout", lambda m: m.responses.pop()),
    "negative gen seconds": ("rollout", lambda m: setattr(m, "gen_seconds", -1.0)),
    "status short": ("scored", lambda m: m.status.pop()),
    "correct 2": ("scored", lambda m: m.correct.__setitem__(0, 2)),
    "reward long": ("scored", lambda m: setattr(m, "reward", np.zeros(4, np.float32))),
    "reward inf": ("scored", lambda m: m.reward.__setitem__(0, np.inf)),
    "realloc nan": ("scored", lambda m: m.realloc_reward.__setitem__(0, np.nan)),
    "ppl nan non-empty": ("scored", lambda m: m.perplexity.__setitem__(0, np.nan)),
    "ppl negative": ("scored", lambda m: m.perplexity.__setitem__(0, -1.0)),
    "tau nan": ("scored", lambda m: setattr(m, "tau", math.nan)),
    "gate int": ("scored", lambda m: setattr(m, "gate_open", 1)),
    "group kind": ("scored", lambda m: setattr(m, "group_kind", "medium")),
    "action": ("scored", lambda m: setattr(m, "action", "bonus")),
    "nested response broken": ("scored", lambda m: setattr(m.rollout.responses[0], "finish_reason", "?")),
    "dl field not bytes": ("deadletter", lambda m: setattr(m, "fields", {"d": "text"})),
    "dl deliveries negative": ("deadletter", lambda m: setattr(m, "deliveries", -1)),
}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("case", list(ENCODE_BUGS))
def test_encode_rejects_producer_bugs(case: str) -> None:
    tag, edit = ENCODE_BUGS[case]
    msg = _broken(tag, edit)
    with pytest.raises(ProtocolError):
        msg.to_bytes()


def test_allowed_special_values_encode() -> None:
    msg = make_scored()
    msg.tau = math.inf
    msg.perplexity[0] = np.inf  # exp overflow of a very unlikely response is a legal perplexity
    back = ScoredGroup.from_bytes(msg.to_bytes())
    assert back.tau == math.inf and back.perplexity[0] == np.inf


# ------------------------------------------------------------------------------------------------ decode-side checks


def _wire(tag: str) -> dict[str, Any]:
    return msgpack.unpackb(FACTORIES[tag]().to_bytes())


def _decode(tag: str, data: bytes, **kwargs: Any) -> Any:
    return type(FACTORIES[tag]()).from_bytes(data, **kwargs)


def _with(tag: str, edit: Any) -> bytes:
    m = _wire(tag)
    edit(m)
    return msgpack.packb(m)


DECODE_BUGS: dict[str, tuple[str, Any]] = {
    "wrong version": ("prompt", lambda m: m.update(v=SCHEMA_VERSION + 1)),
    "version 0": ("prompt", lambda m: m.update(v=0)),
    "v1 response with a bad version": ("rollout", lambda m: _as_v1(m, version_first="3")),
    "version as bool": ("prompt", lambda m: m.update(v=True)),
    "version as list": ("prompt", lambda m: m.update(v=[1])),
    "no version": ("prompt", lambda m: m.pop("v")),
    "unknown tag": ("prompt", lambda m: m.update(t="nope")),
    "other message's tag": ("prompt", lambda m: m.update(t="rollout")),
    "missing key": ("prompt", lambda m: m.pop("epoch")),
    "unknown key": ("prompt", lambda m: m.update(extra=1)),
    "bytes key": ("prompt", lambda m: m.update({b"epoch": m.pop("epoch")})),
    "nested missing key": ("rollout", lambda m: m["task"]["sampling"].pop("seed")),
    "array not bytes": ("response", lambda m: m.update(token_ids=[1, 2, 3])),
    "array partial item": ("response", lambda m: m.update(token_ids=m["token_ids"][:-1])),
    "arrays disagree": ("response", lambda m: m.update(token_ids=m["token_ids"][:-4])),
    "responses not list": ("rollout", lambda m: m.update(responses={"a": 1})),
    "too few responses": ("scored", lambda m: m["rollout"]["responses"].pop()),
    "per-response array short": ("scored", lambda m: m.update(reward=m["reward"][:-4])),
    "correct as float bytes": ("scored", lambda m: m.update(correct=np.ones(3, np.float32).tobytes())),
    "nan where forbidden": ("scored", lambda m: m.update(fit_at=math.nan)),
    "str for int": ("prompt", lambda m: m.update(n="3")),
    "float for int": ("prompt", lambda m: m.update(n=3.0)),
    "int too large": ("prompt", lambda m: m.update(epoch=2**64 - 1)),
    "ext type": ("prompt", lambda m: m.update(ground_truth=msgpack.ExtType(5, b"xx"))),
    "timestamp": ("prompt", lambda m: m.update(ground_truth=msgpack.Timestamp(1, 0))),
    "json bytes": ("prompt", lambda m: m.update(ground_truth=b"42")),
    "json too deep": ("prompt", lambda m: m.update(ground_truth=_nested(40))),
    "dl fields str values": ("deadletter", lambda m: m.update(fields={"d": "x"})),
    "dl clipped bytes values": ("deadletter", lambda m: m.update(clipped={"d": b"x"})),
    "dl prompt id not str": ("deadletter", lambda m: m.update(prompt_id=7)),
}


def _as_v1(m: dict[str, Any], **response: Any) -> None:
    """Rewrite a rollout map as a version-1 producer wrote it (one version per response, no spans)."""
    m["v"] = 1
    for r in m["responses"]:
        version = int(np.frombuffer(r.pop("span_versions"), "<u4")[0])
        del r["span_starts"], r["span_weights"]
        r.update({"version_first": version, "version_last": version} | response)


def test_version_1_rollouts_decode_as_one_span_from_token_0() -> None:
    group = make_rollout()
    back = RolloutGroup.from_bytes(_with("rollout", _as_v1))
    for old, new in zip(group.responses, back.responses, strict=True):
        assert new.span_starts.tolist() == [0] and new.span_versions.tolist() == [old.version_first]
        assert new.span_weights == [""] and np.array_equal(new.token_ids, old.token_ids)
    assert back.oldest_version == group.oldest_version


def test_version_1_dead_letters_decode_without_prompt_id_or_clipping() -> None:
    def as_v1(m: dict[str, Any]) -> None:
        m["v"] = 1
        del m["prompt_id"], m["clipped"]

    back = DeadLetter.from_bytes(_with("deadletter", as_v1))
    assert (back.prompt_id, back.clipped) == ("", {})
    assert back.fields == make_deadletter().fields


@pytest.mark.parametrize("case", list(DECODE_BUGS))
def test_decode_rejects_malformed_maps(case: str) -> None:
    tag, edit = DECODE_BUGS[case]
    with pytest.raises(ProtocolError):
        _decode(tag, _with(tag, edit))


RAW_BUGS = {
    "empty": b"",
    "not msgpack": b"\xc1",
    "truncated": b"\x82\xa1v",
    "trailing data": msgpack.packb({"v": 1}) + b"\x00",
    "not a map": msgpack.packb([1, 2]),
    "int map key": b"\x81\x01\x01",
    "map map key": b"\x81\x80\x01",
    "huge array header": b"\xdd\xff\xff\xff\xff",
    "huge bin header": b"\xc6\xff\xff\xff\xf0abc",
    "huge map header": b"\xdf\xff\xff\xff\xff",
    "deep nesting": b"\x91" * 5000 + b"\xc0",
    "invalid utf-8": b"\xa2\xff\xfe",
}


@pytest.mark.parametrize("case", list(RAW_BUGS))
@pytest.mark.parametrize("tag", ALL)
def test_decode_rejects_bad_bytes(case: str, tag: str) -> None:
    with pytest.raises(ProtocolError):
        _decode(tag, RAW_BUGS[case])


def test_size_limit_is_checked_before_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_rollout().to_bytes()
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: pytest.fail("unpacked an oversized payload"))
    with pytest.raises(ProtocolError, match="exceeds"):
        RolloutGroup.from_bytes(data, max_bytes=len(data) - 1)


def test_default_size_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_BYTES == 64 * 1024 * 1024
    with pytest.raises(ProtocolError, match="exceeds"):
        PromptTask.from_bytes(bytes(DEFAULT_MAX_BYTES + 1))


@pytest.mark.parametrize("tag", ALL)
def test_decode_rejects_non_bytes(tag: str) -> None:
    with pytest.raises(ProtocolError):
        _decode(tag, "a string")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ type swaps

JSON_FIELDS = {"ground_truth", "tools", "messages", "fields", "stop", "status"}
SWAPS: list[Any] = [None, True, -7, 2.5, "s", b"\x00\x01\x02", [1], {"k": 1}]


def _category(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "num"
    return type(value).__name__


def _paths(m: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in m.items():
        if key in ("v", "t") and not prefix or key in JSON_FIELDS:
            continue
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            yield from _paths(value[0], (*prefix, key, 0))  # type: ignore[arg-type]


def _get_parent(m: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        m = m[part]
    return m


@pytest.mark.parametrize("tag", ALL)
def test_every_field_rejects_a_value_of_another_type(tag: str) -> None:
    wire = _wire(tag)
    checked = 0
    paths = list(_paths(wire))
    for path in paths:
        original = _get_parent(wire, path)[path[-1]]
        for swap in SWAPS:
            if _category(swap) == _category(original) or (path[-1] == "seed" and swap is None):
                continue
            m = copy.deepcopy(wire)
            _get_parent(m, path)[path[-1]] = swap
            with pytest.raises(ProtocolError):
                _decode(tag, msgpack.packb(m))
            checked += 1
    assert checked >= 5 * len(paths) > 0  # every field met at least 5 foreign types


# ------------------------------------------------------------------------------------------------ fuzzing

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=16)
)
wire_values = st.recursive(
    _leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=8,
)


def _decode_or_protocol_error(tag: str, data: bytes) -> None:
    """Decoding either succeeds with a message that validates, or raises ProtocolError; anything else fails."""
    try:
        msg = _decode(tag, data)
    except ProtocolError:
        return
    msg.validate()


@FUZZ
@given(tag=st.sampled_from(ALL), data=st.binary(max_size=512))
def test_fuzz_random_bytes(tag: str, data: bytes) -> None:
    _decode_or_protocol_error(tag, data)


@FUZZ
@given(tag=st.sampled_from(ALL), draw=st.data())
def test_fuzz_mutated_bytes(tag: str, draw: st.DataObject) -> None:
    data = bytearray(FACTORIES[tag]().to_bytes())
    for _ in range(draw.draw(st.integers(1, 4))):
        op = draw.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw.draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw.draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw.draw(st.binary(min_size=1, max_size=9))
        else:
            del data[pos : pos + draw.draw(st.integers(1, 9))]
    _decode_or_protocol_error(tag, bytes(data))


@FUZZ
@given(tag=st.sampled_from(ALL), draw=st.data(), value=wire_values)
def test_fuzz_replaced_field_values(tag: str, draw: st.DataObject, value: Any) -> None:
    wire = _wire(tag)
    paths = [("v",), ("t",), *_paths(wire), *((k,) for k in wire if k in JSON_FIELDS)]
    path = draw.draw(st.sampled_from(paths))
    _get_parent(wire, path)[path[-1]] = value
    _decode_or_protocol_error(tag, msgpack.packb(wire))


@FUZZ
@given(tag=st.sampled_from(ALL), key=st.text(max_size=6), value=wire_values)
def test_fuzz_extra_key_is_rejected(tag: str, key: str, value: Any) -> None:
    wire = _wire(tag)
    if key in wire:
        return
    wire[key] = value
    with pytest.raises(ProtocolError):
        _decode(tag, msgpack.packb(wire))
