"""Every HTTP endpoint fuzzed from its own OpenAPI schema, and hit with oversized bodies and wrong or missing tokens.

Schemathesis turns each app's ``/openapi.json`` into hypothesis strategies of requests: schema-conforming ones
(positive) and deliberately broken ones (negative: wrong types, missing fields, out-of-range values). The reward
service and the rollout server run in-process over ASGI, with their real lifespans (the verifier pool and Redis, a
tiny random Llama); the learner's endpoint is its real uvicorn thread on a loopback port. Whatever is sent, the
answer must be a response, never a 5xx. The explicit tests then walk every mutating route of each app: with a token
configured, a request without it is 401, with a wrong one 403, a body over ``max_body_bytes`` is 413 (declared or
streamed), and the read-only routes keep answering without a token.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, even by accident

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import schemathesis
import torch
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from model_factories import save_tiny_llama
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans

from learner.app import LearnerServer, Progress
from learner.metrics import LearnerMetrics
from reward_service.app import create_app as create_reward_app
from rollout_server.app import create_app as create_rollout_app
from rollout_server.backends.hf import HFBackend
from services.config import RunConfig, load_config

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)

TOKEN = "sekrit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 16 * 1024
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same requests on every run: a failure here is a bug to fix, not a flake
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}

# POST /v1/score also takes a msgpack `rollouts` message: send the generated binary bodies as they are
schemathesis.serializer.alias("application/msgpack", "application/octet-stream")


def reward_config(run: str, url: str) -> RunConfig:
    return load_config(
        None,
        [f"name={run}", f"redis.url={url}", "reward.verifier_workers=1", "reward.verify_timeout_s=2",
         f"reward.server.api_token={TOKEN}", f"reward.server.max_body_bytes={MAX_BODY}"],
        environ={},
    )  # fmt: skip


def rollout_config() -> RunConfig:
    return load_config(
        None, [f"rollout.server.api_token={TOKEN}", f"rollout.server.max_body_bytes={MAX_BODY}"], environ={}
    )


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    # A 64-token context bounds the costliest fuzzed request (n=64 rows to the end of the context); longer asks are
    # refused by the backend, which still means they passed validation and reached the handler.
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), intermediate_size=64, max_positions=64)
    return HFBackend(folder)


@pytest.fixture
def reward_app(redis_url: str, run_name: str) -> FastAPI:
    """A fresh app per test: schemathesis and httpx each run its lifespan their own way."""
    return create_reward_app(reward_config(run_name, redis_url), run_worker=False)


@pytest.fixture
def rollout_app(tiny_backend: HFBackend) -> FastAPI:
    return create_rollout_app(rollout_config(), backend=tiny_backend)


@pytest.fixture(scope="module")
def learner_url() -> Iterator[str]:
    server = LearnerServer(RunConfig(), LearnerMetrics(), Progress())
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.close()


@pytest.fixture(autouse=True)
def _stop_schemathesis_lifespans() -> Iterator[None]:
    """Schemathesis starts an ASGI app's lifespan once and keeps it: stop it after the test (verifier processes,
    Redis clients)."""
    yield
    shutdown_lifespans()


# ------------------------------------------------------------------------------------------------ schema fuzzing


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
REFUSED_BY_BACKEND = -422  # pseudo status: a 422 from the backend (prompt + max_new_tokens over the context)


def fuzz(schema: schemathesis.BaseSchema, headers: dict[str, str], positive: int, negative: int) -> dict[str, set[int]]:
    """Send ``positive`` schema-conforming and ``negative`` schema-breaking requests spread over every operation.

    Any 5xx (or an exception raised out of the app) fails. Returns the status codes seen per operation, so a caller
    can check that requests also got past validation into the handlers.
    """
    seen: dict[str, set[int]] = {}
    for mode, count in ((POSITIVE, positive), (NEGATIVE, negative)):
        if count == 0:
            continue

        @settings(FUZZ, max_examples=count)
        @given(case=schema.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(headers=headers, timeout=120)
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code < 500
            seen.setdefault(case.operation.label, set()).add(response.status_code)
            if response.status_code == 422 and "context" in response.text:
                seen[case.operation.label].add(REFUSED_BY_BACKEND)

        run()
    assert set(seen) == {op.ok().label for op in schema.get_all_operations()}, "every operation was exercised"
    return seen


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_openapi_documents_every_request_body(reward_app: FastAPI, rollout_app: FastAPI) -> None:
    """A fuzzer (or a client generator) can only build what the schema describes: every body, every $ref resolved."""
    for app in (reward_app, rollout_app):
        document = app.openapi()
        for method, path in routes(app, MUTATING):
            body = document["paths"][path][method.lower()].get("requestBody", {})
            assert body.get("required") and "application/json" in body.get("content", {}), (method, path)
        for ref in _refs(document):
            node: object = document
            for part in ref.removeprefix("#/").split("/"):
                assert isinstance(node, dict) and part in node, f"{ref} points nowhere"
                node = node[part]


def test_reward_service_schema_fuzz(reward_app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", reward_app)
    labels = {op.ok().label for op in schema.get_all_operations()}
    assert labels == {"GET /health", "GET /health/deep", "POST /v1/score"}
    seen = fuzz(schema, AUTH, positive=40, negative=20)
    assert 200 in seen["POST /v1/score"] and 422 in seen["POST /v1/score"], seen  # scored some, refused some


def test_rollout_server_schema_fuzz(rollout_app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", rollout_app)
    labels = {op.ok().label for op in schema.get_all_operations()}
    assert labels == {"GET /health", "POST /v1/generate", "POST /v1/weights/reload", "POST /v1/drain", "GET /v1/drain"}
    seen = fuzz(schema, AUTH, positive=30, negative=15)
    reached = seen["POST /v1/generate"] & {200, REFUSED_BY_BACKEND}
    assert reached and 404 in seen["POST /v1/weights/reload"], seen  # some requests got past validation


def test_learner_schema_fuzz(learner_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{learner_url}/openapi.json")
    assert {op.ok().label for op in schema.get_all_operations()} == {"GET /health"}
    # GET /health takes no input, so there is nothing to break: positive cases only
    assert fuzz(schema, {}, positive=5, negative=0) == {"GET /health": {200}}


# ------------------------------------------------------------------------------------------------ auth and sizes


@pytest.fixture
async def reward_client(reward_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with reward_app.router.lifespan_context(reward_app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=reward_app), base_url="http://r") as client:
            yield client


@pytest.fixture
async def rollout_client(rollout_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with rollout_app.router.lifespan_context(rollout_app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rollout_app), base_url="http://g") as client:
            yield client


def routes(app: FastAPI, methods: set[str]) -> list[tuple[str, str]]:
    """(method, path) of every API route of ``app`` with one of ``methods`` (the docs routes are not API routes)."""
    found = [
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods & methods)
    ]
    return sorted(found)


BAD_AUTH = [
    ({}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": "Basic c2Vrcml0LXRva2Vu"}, 401),
    ({"Authorization": TOKEN}, 401),
    ({"Authorization": "Bearer wrong"}, 403),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403),
    ({"Authorization": "Bearer " + "A" * 100_000}, 403),
    ({"Authorization": "Bearer s\u00e9krit"}, 403),
    ({"X-Api-Token": TOKEN}, 401),
]


async def check_auth_and_sizes(client: httpx.AsyncClient, app: FastAPI) -> None:
    mutating = routes(app, MUTATING)
    assert mutating, "the app has mutating endpoints"
    for method, path in mutating:
        for headers, expected in BAD_AUTH:
            encoded = {k: v.encode("utf-8") for k, v in headers.items()}  # non-latin-1 bytes as a client may send
            response = await client.request(method, path, json={}, headers=encoded)
            assert response.status_code == expected, (method, path, headers.keys(), response.text[:200])
            assert response.status_code != 200
        big = b"{" + b" " * MAX_BODY + b"}"
        declared = await client.request(method, path, content=big, headers={**AUTH, "content-type": "application/json"})
        assert declared.status_code == 413, (method, path, declared.text[:200])

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the server must count what it reads
            yield b"{"
            for _ in range(MAX_BODY // 1024 + 1):
                yield b" " * 1024
            yield b"}"

        streamed = await client.request(
            method, path, content=chunks(), headers={**AUTH, "content-type": "application/json"}
        )
        assert streamed.status_code == 413, (method, path, streamed.text[:200])
        lying = await client.request(
            method, path, content=big, headers={**AUTH, "content-type": "application/json", "content-length": "2"}
        )
        assert 400 <= lying.status_code < 500, (method, path, lying.status_code)
        bad_length = await client.request(
            method, path, content=b"{}", headers={**AUTH, "content-type": "application/json", "content-length": "x"}
        )
        assert 400 <= bad_length.status_code < 500
    for method, path in routes(app, {"GET"}):
        assert (await client.request(method, path)).status_code == 200, (method, path)
    assert (await client.get("/metrics/")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200


async def test_reward_service_auth_and_body_limits(reward_client: httpx.AsyncClient, reward_app: FastAPI) -> None:
    await check_auth_and_sizes(reward_client, reward_app)


async def test_rollout_server_auth_and_body_limits(rollout_client: httpx.AsyncClient, rollout_app: FastAPI) -> None:
    await check_auth_and_sizes(rollout_client, rollout_app)


async def test_learner_endpoint_is_read_only(learner_url: str) -> None:
    async with httpx.AsyncClient(base_url=learner_url) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics/")).status_code == 200
        for path in ("/health", "/v1/weights/reload", "/v1/score"):  # (/metrics answers any method, read-only)
            assert (await client.post(path, content=b"x" * MAX_BODY)).status_code in (404, 405)


async def test_reward_token_ids_beyond_uint64_are_422(reward_client: httpx.AsyncClient) -> None:
    body = {
        "task": {"task_kind": "math", "messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2"},
        "responses": [{"text": "\\boxed{2}", "token_ids": [2**64], "logprobs": [-0.1]}],
    }
    for value in (2**64, 2**63, -(2**63) - 1, 2**32, -1):
        body["responses"][0]["token_ids"] = [value]  # type: ignore[index]
        response = await reward_client.post("/v1/score", json=body, headers=AUTH)
        assert response.status_code == 422, (value, response.text[:200])


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 5e-324, "top_k": 1}])
async def test_generate_with_a_vanishing_temperature_or_nucleus_samples_greedily(
    rollout_client: httpx.AsyncClient, sampling: dict[str, float]
) -> None:
    """Allowed by the schema (temperature >= 0, top_p > 0) yet both round to 0 in float32: no 5xx, no NaN."""
    body = {"prompt": "Once upon a time", "n": 2, "sampling": {"max_new_tokens": 4, **sampling}}
    response = await rollout_client.post("/v1/generate", json=body, headers=AUTH)
    assert response.status_code == 200, response.text[:300]
    for completion in response.json()["completions"]:
        assert completion["token_ids"] and all(-1e30 < lp <= 0 for lp in completion["logprobs"])
