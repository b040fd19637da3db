"""The reward service's HTTP app: ``/health``, ``/metrics`` and ``POST /v1/score``; it also runs the stream worker.

``create_app(cfg)`` holds no module-level state: the verifier pool, the Redis client and the worker live in the
app's lifespan. ``POST /v1/score`` scores one group through the same code path as the worker (verifiers, the fit
in force, reallocation) without adding ad-hoc groups to the training window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from typing import cast

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from reward_service.metrics import RewardMetrics
from reward_service.scoring import CLOSED_FIT, FitStamp, score_group
from reward_service.verifiers.base import Status, VerifyResult
from reward_service.verify import Verifiers
from reward_service.worker import RewardWorker
from services.api_models import HealthResponse, ScoreRequest, ScoreResponse, task_size_problem
from services.config import RunConfig
from services.http import bearer_auth, exit_on_failure, json_body_schema, limit_requests, read_body, unprocessable
from services.metrics import metrics_asgi_app
from services.protocol import PromptTask, ProtocolError, Response, RolloutGroup, Sampling, ScoredGroup
from services.streams import async_client_from_config

log = logging.getLogger(__name__)

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
_DISCONNECT_POLL_S = 0.25
_HEALTH_TASK = PromptTask(
    prompt_id="health",
    task_kind="math",
    messages=[{"role": "user", "content": "What is 2 + 2?"}],
    ground_truth="4",
    n=2,
    sampling=Sampling(max_new_tokens=16),
)


def _health_group() -> RolloutGroup:
    texts = ["2 + 2 = \\boxed{4}", "\\boxed{5}"]
    responses = [
        Response.of_version(np.array([1, 2], np.uint32), np.array([-0.1, -0.2], np.float32), t, "stop", 0)
        for t in texts
    ]
    return RolloutGroup(_HEALTH_TASK, np.array([1], np.uint32), responses, "health", time.time(), 0.0)


_HEALTH_RESULTS = [VerifyResult(Status.CORRECT, 1.0, "4"), VerifyResult(Status.WRONG, 0.0, "5")]
"""What the verifiers give the health group: /health scores these without queueing behind work."""


def request_to_group(body: ScoreRequest) -> RolloutGroup:
    """Turn a JSON score request into the stream message the worker would have read (validated)."""
    # Before any numpy conversion: JSON integers are unbounded, and int64 overflows on the larger ones.
    if any(not 0 <= t < 2**32 for r in body.responses for t in r.token_ids):
        raise ProtocolError("response.token_ids: values must be in [0, 2**32)")
    task = body.task
    group = RolloutGroup(
        task=PromptTask(
            prompt_id=task.prompt_id,
            task_kind=task.task_kind,
            messages=[turn.model_dump() for turn in task.messages],
            ground_truth=task.ground_truth,
            n=len(body.responses),
            sampling=task.sampling.record(),
            tools=task.tools,
            category=task.category,
        ),
        prompt_token_ids=np.zeros(0, np.uint32),
        responses=[
            Response.of_version(
                token_ids=np.asarray(r.token_ids, dtype=np.int64).astype(np.uint32),
                logprobs=np.asarray(r.logprobs, dtype=np.float32),
                text=r.text,
                finish_reason=r.finish_reason,
                version=r.version,
            )
            for r in body.responses
        ],
        worker_id="http",
        generated_at=time.time(),
        gen_seconds=0.0,
    )
    group.validate()
    return group


def scored_to_response(scored: ScoredGroup) -> ScoreResponse:
    """The JSON view of a scored group (NaN and infinities become null)."""

    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return ScoreResponse(
        prompt_id=scored.rollout.task.prompt_id,
        status=scored.status,
        correct=[bool(c) for c in scored.correct],
        reward=[float(r) for r in scored.reward],
        realloc_reward=[float(r) for r in scored.realloc_reward],
        perplexity=[finite(float(p)) for p in scored.perplexity],
        group_kind=scored.group_kind,
        action=scored.action,
        tau=finite(scored.tau),
        gate_open=scored.gate_open,
        signal=scored.signal,
    )


def _worker(request: Request) -> RewardWorker:
    worker: RewardWorker = request.app.state.worker
    return worker


async def health(request: Request) -> JSONResponse:
    """Liveness, answered at once and never behind verification work: the stream worker runs, Redis answers, every
    verifier's processes are up, and the scoring code scores known results right. ``/health/deep`` also verifies."""
    return await _health(request, deep=False)


async def deep_health(request: Request) -> JSONResponse:
    """Score a known group end to end through the verifier processes (it waits in their queue like any request)."""
    return await _health(request, deep=True)


async def _health(request: Request, *, deep: bool) -> JSONResponse:
    worker = _worker(request)
    start = time.perf_counter()
    task: asyncio.Task[None] | None = request.app.state.worker_task
    try:
        if task is not None and task.done():  # the stream worker ended: this replica scores nothing any more
            error = None if task.cancelled() else task.exception()
            raise RuntimeError(f"the stream worker stopped ({error!r})")
        await cast(Awaitable[bool], worker.redis.ping())
        group = _health_group()
        if deep:
            results = await worker.verify_all(group)
        else:
            if not worker.verifiers.wait_ready(0.0):
                raise RuntimeError("verifier processes are not up (starting or being replaced)")
            results = _HEALTH_RESULTS
        scored = score_group(group, results, FitStamp(CLOSED_FIT), worker.cfg.reward, overlong_buffer=4)
        ok = list(scored.correct) == [1, 0]
        detail = "" if ok else f"health item scored {scored.status}"
    except Exception as exc:  # /health reports failures instead of raising them
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    body = HealthResponse(ok=ok, component="reward", detail=detail, seconds=time.perf_counter() - start)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


async def _group_from(request: Request, max_bytes: int) -> RolloutGroup:
    """The group a score request carries: a JSON ScoreRequest, or the msgpack ``rollouts`` message itself."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in (*MSGPACK_TYPES, "application/json"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"unsupported content type {content_type}")
    body = await read_body(request, max_bytes)
    try:
        if content_type in MSGPACK_TYPES:
            group = RolloutGroup.from_bytes(body, max_bytes=max_bytes)
            problem = task_size_problem(group.task.ground_truth, group.task.tools)
            if problem is not None:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
            return group
        return request_to_group(ScoreRequest.model_validate_json(body))
    except (ValidationError, ProtocolError) as exc:
        raise unprocessable(exc) from exc


async def score(request: Request) -> ScoreResponse:
    """Score one group synchronously: a JSON ScoreRequest, or a msgpack ``rollouts`` message."""
    worker = _worker(request)
    group = await _group_from(request, worker.cfg.reward.server.max_body_bytes)
    scoring = asyncio.ensure_future(worker.score(group, update_window=False))
    budget_s = worker.cfg.reward.request_timeout_s
    deadline = time.monotonic() + budget_s
    try:
        while not scoring.done():  # until scored, the client gone, or the request's verification budget spent
            await asyncio.wait({scoring}, timeout=min(_DISCONNECT_POLL_S, max(0.0, deadline - time.monotonic())))
            if scoring.done():
                break
            if await request.is_disconnected():
                log.info("score request abandoned by its client: its queued verifications are cancelled")
                raise HTTPException(499, "client closed the request")  # nobody reads this answer
            if time.monotonic() >= deadline:
                detail = f"verifying this request took over reward.request_timeout_s={budget_s:g} s"
                raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, detail)
        scored = scoring.result()
    except ValueError as exc:
        raise unprocessable(exc) from exc
    finally:
        scoring.cancel()  # a no-op once done; otherwise its queued verifications never start
    return scored_to_response(scored)


_SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": json_body_schema(ScoreRequest)},
            "application/msgpack": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def create_app(cfg: RunConfig, *, run_worker: bool = True) -> FastAPI:
    """Build the reward service: verifier pool + Redis client + stream worker in the lifespan, and the routes."""
    if cfg.redis.url is None:
        raise ValueError("the reward service needs redis.url (dipo run sets it; or DIPO_REDIS__URL=redis://...)")
    metrics = RewardMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verifiers = Verifiers(cfg.reward)
        redis = async_client_from_config(cfg.redis)
        worker = RewardWorker(cfg, redis, verifiers, metrics)
        app.state.worker, app.state.worker_task = worker, None
        stop = asyncio.Event()
        try:
            await asyncio.to_thread(verifiers.wait_ready, 120.0)
            if run_worker:
                app.state.worker_task = asyncio.create_task(worker.run(stop), name="reward-worker")
                exit_on_failure(app, app.state.worker_task, "the reward stream worker")
            yield
        finally:
            stop.set()
            if app.state.worker_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    try:
                        await asyncio.wait_for(app.state.worker_task, cfg.streams.block_ms / 1000 + 30)
                    except Exception:  # it failed while running: logged by exit_on_failure, reported by /health
                        log.debug("the reward stream worker had failed", exc_info=True)
            verifiers.close()
            await redis.aclose()

    server = cfg.reward.server
    docs = {"docs_url": "/docs", "redoc_url": "/redoc"} if server.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="dipo reward service", version="1", lifespan=lifespan, **docs)
    limit_requests(app, server)
    app.mount("/metrics", metrics_asgi_app(metrics.component))
    app.add_api_route("/health", health, methods=["GET"], response_model=HealthResponse)
    app.add_api_route("/health/deep", deep_health, methods=["GET"], response_model=HealthResponse)
    app.add_api_route("/v1/score", score, methods=["POST"], response_model=ScoreResponse, openapi_extra=_SCORE_BODY,
                      dependencies=[Depends(bearer_auth(cfg.reward.server.api_token))])  # fmt: skip
    return app
