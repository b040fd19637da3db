"""The rollout server's HTTP app: ``/health``, ``/metrics``, ``POST /v1/generate``, ``POST /v1/weights/reload``.

``create_app(cfg)`` holds no module-level state: the backend, the Redis clients, the stream worker and the weight-sync
thread live in the app's lifespan, in one :class:`ServerState` at ``app.state.server``. With ``redis.url`` set (and
``run_worker``) the server consumes ``prompts`` and follows the learner's weights; without it, it only answers HTTP
requests. The routes are plain functions below that read that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse

from rollout_server.api_models import (
    CompletionBody,
    GenerateRequest,
    GenerateResponse,
    ReloadRequest,
    ReloadResponse,
    RolloutHealth,
    WorkerState,
)
from rollout_server.backends import Backend, BackendOptions, Completion, PromptGroup, create_backend
from rollout_server.metrics import RolloutMetrics
from rollout_server.sync import CheckpointError, PolicyWeights, WeightSync
from rollout_server.worker import RolloutWorker
from services.config import RunConfig
from services.contracts import consumer_name
from services.http import bearer_auth, json_body, read_model, unprocessable
from services.metrics import metrics_asgi_app
from services.protocol import Sampling
from services.streams import clients_from_config

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 20.0
"""How long shutdown waits for the batch in progress before abandoning it (it stays pending and is claimed)."""
_HEALTH_PROMPT = [{"role": "user", "content": "Say hi."}]
_HEALTH_SAMPLING = Sampling(temperature=0.0, max_new_tokens=1)


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
    worker_task: asyncio.Task[None] | None = None

    @property
    def worker_state(self) -> WorkerState:
        """The stream worker's state: ``disabled`` (no Redis), ``running``, ``stopped`` or ``failed``."""
        task = self.worker_task
        if task is None:
            return "disabled"
        if not task.done():
            return "running"
        return "failed" if not task.cancelled() and task.exception() is not None else "stopped"


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


# ---------------------------------------------------------------------------------------------------- routes


async def health(request: Request) -> JSONResponse:
    """Generate one token through the backend and report the loaded version and the worker's state."""
    server = _state(request)
    start = time.perf_counter()
    try:
        groups = await asyncio.to_thread(server.backend.generate, [_HEALTH_PROMPT], 1, _HEALTH_SAMPLING)
        ok = len(groups) == 1 and len(groups[0].completions[0].token_ids) == 1
        detail = "" if ok else "the backend did not return one token"
    except Exception as exc:  # /health reports failures instead of raising them
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    worker = server.worker_state
    if worker == "failed":
        ok, detail = False, detail or "the stream worker stopped with an error (see the log)"
    body = RolloutHealth(ok=ok, detail=detail, seconds=time.perf_counter() - start, version=server.weights.version,
                         worker=worker)  # fmt: skip
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _completion(c: Completion) -> CompletionBody:
    return CompletionBody(
        text=c.text,
        token_ids=[int(t) for t in c.token_ids],
        logprobs=[float(x) for x in c.logprobs],
        finish_reason=c.finish_reason,
    )


async def generate(request: Request) -> GenerateResponse:
    """Sample n completions of one prompt with the weights in place (ad hoc; nothing goes to the streams)."""
    server = _state(request)
    body = await read_model(request, GenerateRequest, server.cfg.rollout.server.max_body_bytes)
    weights = server.weights
    prompt = [turn.model_dump() for turn in body.messages] if body.messages is not None else body.prompt
    sampling = body.sampling.record()

    def run() -> tuple[PromptGroup, int]:
        with weights.batch() as version:
            return weights.backend.generate([prompt], body.n, sampling)[0], version  # type: ignore[list-item]

    start = time.perf_counter()
    try:
        group, version = await asyncio.to_thread(run)
    except ValueError as exc:  # e.g. prompt + max_new_tokens beyond the model's context
        raise unprocessable(exc) from exc
    return GenerateResponse(
        version=version,
        prompt_token_ids=[int(t) for t in group.prompt_token_ids],
        completions=[_completion(c) for c in group.completions],
        seconds=time.perf_counter() - start,
    )


async def reload(request: Request) -> ReloadResponse:
    """Load a checkpoint folder's weights (validated first: a folder of another model changes nothing)."""
    server = _state(request)
    body = await read_model(request, ReloadRequest, server.cfg.rollout.server.max_body_bytes)
    weights = server.weights
    folder = Path(body.checkpoint)
    if not folder.is_dir():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no folder {folder} on this server")
    version = weights.version if body.version is None else body.version
    start = time.perf_counter()
    try:
        count = await asyncio.to_thread(weights.load_checkpoint, folder, version)
    except CheckpointError as exc:
        raise unprocessable(exc) from exc
    log.info("reloaded weights from %s as v%d (%d tensors)", folder, version, count)
    return ReloadResponse(version=version, tensors=count, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- the app


async def _stop_worker(task: asyncio.Task[None], grace_s: float) -> None:
    """Let the worker finish its batch within grace_s, else cancel it (the batch stays pending)."""
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception:  # already failed while running; /health reported it, the log keeps the trace
            log.exception("the rollout worker had failed")


@contextlib.asynccontextmanager
async def _stream_worker(server: ServerState, run_worker: bool, grace_s: float) -> AsyncIterator[None]:
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
        worker = RolloutWorker(cfg, server.backend, aredis, server.metrics, consumer, weights=server.weights)
        server.worker_task = asyncio.create_task(worker.run(stop), name="rollout-worker")
        yield
    finally:
        stop.set()
        if server.worker_task is not None:
            await _stop_worker(server.worker_task, grace_s)
        await asyncio.to_thread(sync.stop)
        await aredis.aclose()
        sredis.close()


def create_app(
    cfg: RunConfig, backend: Backend | None = None, *, run_worker: bool = True, grace_s: float = SHUTDOWN_GRACE_S
) -> FastAPI:
    """Build the rollout server; the backend is created from ``cfg`` in the lifespan unless one is given."""
    metrics = RolloutMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        be = backend if backend is not None else await asyncio.to_thread(backend_from_config, cfg)
        weights = PolicyWeights(be)
        weights.add_listener(metrics.policy_version.set)
        metrics.policy_version.set(weights.version)
        server = app.state.server = ServerState(cfg, be, weights, metrics)
        try:
            async with _stream_worker(server, run_worker, grace_s):
                yield
        finally:
            if backend is None:
                be.close()

    app = FastAPI(title="dipo rollout server", version="1", lifespan=lifespan)
    app.mount("/metrics", metrics_asgi_app(metrics.component))
    admin = [Depends(bearer_auth(cfg.rollout.server.api_token))]
    app.add_api_route("/health", health, methods=["GET"], response_model=RolloutHealth)
    app.add_api_route("/v1/generate", generate, methods=["POST"], response_model=GenerateResponse,
                      dependencies=admin, openapi_extra=json_body(GenerateRequest))  # fmt: skip
    app.add_api_route("/v1/weights/reload", reload, methods=["POST"], response_model=ReloadResponse,
                      dependencies=admin, openapi_extra=json_body(ReloadRequest))  # fmt: skip
    return app
