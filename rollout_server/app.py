"""The rollout server's HTTP app: ``/health``, ``/metrics``, ``POST /v1/generate``, ``/v1/weights/reload``,
``/v1/drain``.

``create_app(cfg)`` holds no module-level state: the backend, the Redis clients, the stream worker and the weight-sync
thread live in the app's lifespan, in one :class:`ServerState` at ``app.state.server``. With ``redis.url`` set (and
``run_worker``) the server consumes ``prompts`` and follows the learner's weights; without it, it only answers HTTP
requests. ``/health`` reads the engine's state and never queues behind generation; ad-hoc ``/v1/generate`` requests
join the running decode batch like any group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse

from rollout_server.api_models import (
    CompletionBody,
    DrainRequest,
    DrainResponse,
    GenerateRequest,
    GenerateResponse,
    ReloadRequest,
    ReloadResponse,
    RolloutHealth,
    SpanBody,
    WorkerState,
)
from rollout_server.backends import Backend, BackendOptions, Completion, create_backend
from rollout_server.checkpoints import CheckpointError
from rollout_server.metrics import RolloutMetrics
from rollout_server.policy_weights import PolicyWeights
from rollout_server.sync import WeightSync
from rollout_server.worker import RolloutWorker
from services.config import RunConfig
from services.contracts import RunFolder, consumer_name
from services.http import bearer_auth, exit_on_failure, json_body, limit_requests, read_model, unprocessable
from services.metrics import metrics_asgi_app
from services.streams import clients_from_config

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 20.0
"""How long shutdown waits for the groups in flight before abandoning them (they stay pending and are claimed)."""
ENGINE_STALL_S = 120.0
"""/health fails when the engine has rows to decode but has not finished a decode step for this long."""


def backend_from_config(cfg: RunConfig) -> Backend:
    """Build the configured backend on the configured model (blocking: loads the weights)."""
    return create_backend(cfg.rollout.backend, BackendOptions.from_config(cfg))


@dataclass
class ServerState:
    """What the routes of one rollout server read: its config, backend, weights and stream worker."""

    cfg: RunConfig
    backend: Backend
    weights: PolicyWeights
    metrics: RolloutMetrics
    worker: RolloutWorker | None = None
    worker_task: asyncio.Task[None] | None = None
    _progress: tuple[int, float] = field(default=(-1, 0.0))  # (decode steps, when /health saw them change)

    @property
    def worker_state(self) -> WorkerState:
        """The stream worker's state: ``disabled`` (no Redis), ``running``, ``stopped`` or ``failed``."""
        task = self.worker_task
        if task is None:
            return "disabled"
        if not task.done():
            return "running"
        return "failed" if not task.cancelled() and task.exception() is not None else "stopped"

    def engine_stalled_s(self, steps: int, busy: bool) -> float:
        """Seconds the engine has had work without finishing a decode step (0 when it moves or is idle)."""
        now = time.monotonic()
        if steps < 0 or steps != self._progress[0] or not busy:  # steps < 0: the backend does not count them
            self._progress = (steps, now)
            return 0.0
        return now - self._progress[1]


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


# ---------------------------------------------------------------------------------------------------- routes


async def health(request: Request) -> JSONResponse:
    """The engine's state, the last canary and the worker's state; 503 when any of them is broken."""
    server = _state(request)
    start = time.perf_counter()
    engine = server.backend.state()
    canary = server.weights.last_canary
    problems = []
    if not engine.alive:
        problems.append("the engine stopped (see the log)")
    stalled = server.engine_stalled_s(engine.steps, busy=engine.rows > 0)
    if stalled > ENGINE_STALL_S:
        problems.append(f"the engine has not finished a decode step for {stalled:.0f}s")
    if server.weights.dirty:
        problems.append("a weight swap failed half-way; waiting for a checkpoint reload")
    if server.worker_state == "failed":
        problems.append("the stream worker stopped with an error (see the log)")
    body = RolloutHealth(
        ok=not problems, detail="; ".join(problems), seconds=time.perf_counter() - start,
        version=engine.weights.version, weights=engine.weights.fingerprint,
        canary_version=canary.version if canary else None, worker=server.worker_state, groups=engine.groups,
        rows=engine.rows, max_rows=engine.max_rows, steps=engine.steps,
    )  # fmt: skip
    return JSONResponse(body.model_dump(), status_code=503 if problems else 200)


def _completion(c: Completion) -> CompletionBody:
    return CompletionBody(
        text=c.text,
        token_ids=[int(t) for t in c.token_ids],
        logprobs=[float(x) for x in c.logprobs],
        finish_reason=c.finish_reason,
        spans=[SpanBody(start=s.start, version=s.weights.version, weights=s.weights.fingerprint) for s in c.spans],
    )


async def generate(request: Request) -> GenerateResponse:
    """Sample n completions of one prompt (ad hoc: it joins the decode batch, nothing goes to the streams)."""
    server = _state(request)
    body = await read_model(request, GenerateRequest, server.cfg.rollout.server.max_body_bytes)
    prompt = [turn.model_dump() for turn in body.messages] if body.messages is not None else body.prompt
    start = time.perf_counter()
    future = None
    try:
        ids = (await asyncio.to_thread(server.backend.encode_prompts, [prompt]))[0]  # type: ignore[list-item]
        future = server.backend.submit(ids, body.n, body.sampling.record())
        group = await asyncio.wrap_future(future)
    except ValueError as exc:  # e.g. prompt + max_new_tokens beyond the model's context
        raise unprocessable(exc) from exc
    finally:
        if future is not None and not future.done():
            future.cancel()  # the client went away: free the decode slots
    return GenerateResponse(
        version=min(c.spans[0].weights.version for c in group.completions),
        prompt_token_ids=[int(t) for t in group.prompt_token_ids],
        completions=[_completion(c) for c in group.completions],
        seconds=time.perf_counter() - start,
    )


def _run_checkpoint(cfg: RunConfig, requested: str) -> Path:
    """The folder to load: inside this run's checkpoint folder (an absolute path there, or a name relative to it).

    Anything else, a missing folder or one outside (``/etc``, ``../..``, a symlink out), gets the same 404, so the
    endpoint tells a caller nothing about the server's file system.
    """
    root = RunFolder(cfg.resolved_run_dir).checkpoints.resolve()
    folder = (root / requested).resolve()  # an absolute `requested` replaces root; symlinks are followed
    if folder == root or not folder.is_relative_to(root) or not folder.is_dir():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no checkpoint {requested[:200]!r} in this run's checkpoints")
    return folder


async def reload(request: Request) -> ReloadResponse:
    """Load a checkpoint folder's weights (validated first: a folder of another model changes nothing)."""
    server = _state(request)
    body = await read_model(request, ReloadRequest, server.cfg.rollout.server.max_body_bytes)
    weights = server.weights
    folder = _run_checkpoint(server.cfg, body.checkpoint)
    version = weights.version if body.version is None else body.version
    start = time.perf_counter()
    try:
        count = await asyncio.to_thread(weights.load_checkpoint, folder, version)
    except CheckpointError as exc:
        raise unprocessable(exc) from exc
    log.info("reloaded weights from %s as v%d (%d tensors)", folder, version, count)
    return ReloadResponse(version=version, tensors=count, seconds=time.perf_counter() - start)


async def drain(request: Request) -> DrainResponse:
    """Stop taking prompts; the groups in flight are still written (a preStop hook, then polls ``GET /v1/drain``)."""
    server = _state(request)
    await read_model(request, DrainRequest, server.cfg.rollout.server.max_body_bytes)
    if server.worker is not None and not server.worker.draining:
        server.worker.draining = True
        log.info("draining: taking no more prompts, %d groups in flight", server.worker.inflight)
    return drain_state(request)


def drain_state(request: Request) -> DrainResponse:
    """Whether the server drains, and how many groups it still holds."""
    worker = _state(request).worker
    return DrainResponse(draining=worker is not None and worker.draining,
                         in_flight_groups=worker.inflight if worker is not None else 0)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the app


async def _stop_worker(task: asyncio.Task[None], grace_s: float) -> None:
    """Let the worker finish its groups in flight within grace_s, else cancel it (they stay pending)."""
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception:  # already failed while running; /health reported it, the log keeps the trace
            log.exception("the rollout worker had failed")


@contextlib.asynccontextmanager
async def _stream_worker(app: FastAPI, server: ServerState, run_worker: bool, grace_s: float) -> AsyncIterator[None]:
    """Follow the learner's weights and consume ``prompts`` while the app runs (when Redis is configured)."""
    cfg = server.cfg
    if not run_worker or cfg.redis.url is None:
        yield
        return
    aredis, sredis = clients_from_config(cfg.redis)
    stop = asyncio.Event()
    consumer = consumer_name("rollout")
    sync = WeightSync(cfg, server.weights, sredis, consumer, server.metrics)
    try:
        await asyncio.to_thread(sync.initial_load)  # a late joiner starts from the newest checkpoint
        sync.start()
        server.worker = RolloutWorker(cfg, server.backend, aredis, server.metrics, consumer, weights=server.weights)
        server.worker_task = asyncio.create_task(server.worker.run(stop), name="rollout-worker")
        exit_on_failure(app, server.worker_task, "the rollout stream worker")
        yield
    finally:
        stop.set()
        if server.worker_task is not None:
            await _stop_worker(server.worker_task, grace_s)
        await asyncio.to_thread(sync.stop)
        await aredis.aclose()
        sredis.close()


def _count_swaps(metrics: RolloutMetrics, backend: Backend) -> None:
    state = backend.state()
    metrics.swaps.inc()
    metrics.swap_pause.observe(state.last_swap_pause_s)
    metrics.policy_version.set(state.weights.version)


def create_app(
    cfg: RunConfig, backend: Backend | None = None, *, run_worker: bool = True, grace_s: float = SHUTDOWN_GRACE_S
) -> FastAPI:
    """Build the rollout server; the backend is created from ``cfg`` in the lifespan unless one is given."""
    metrics = RolloutMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        be = backend if backend is not None else await asyncio.to_thread(backend_from_config, cfg)
        weights = PolicyWeights(be)
        weights.add_listener(lambda tag, canary: _count_swaps(metrics, be))
        metrics.policy_version.set(weights.version)
        server = app.state.server = ServerState(cfg, be, weights, metrics)
        try:
            async with _stream_worker(app, server, run_worker, grace_s):
                yield
        finally:
            if backend is None:
                be.close()

    server = cfg.rollout.server
    docs = {"docs_url": "/docs", "redoc_url": "/redoc"} if server.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="dipo rollout server", version="1", lifespan=lifespan, **docs)
    limit_requests(app, server)
    app.mount("/metrics", metrics_asgi_app(metrics.component))
    admin = [Depends(bearer_auth(cfg.rollout.server.api_token))]
    app.add_api_route("/health", health, methods=["GET"], response_model=RolloutHealth)
    for path, route, request_model, response_model in (
        ("/v1/generate", generate, GenerateRequest, GenerateResponse),
        ("/v1/weights/reload", reload, ReloadRequest, ReloadResponse),
        ("/v1/drain", drain, DrainRequest, DrainResponse),
    ):
        app.add_api_route(path, route, methods=["POST"], response_model=response_model, dependencies=admin,
                          openapi_extra=json_body(request_model))  # fmt: skip
    app.add_api_route("/v1/drain", drain_state, methods=["GET"], response_model=DrainResponse)  # read-only
    return app
