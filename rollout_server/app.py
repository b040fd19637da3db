"""The rollout server's HTTP app: ``/health``, ``/metrics``, ``POST /v1/generate``, ``POST /v1/weights/reload``.

``create_app(cfg)`` holds no module-level state: the backend, the Redis clients, the stream worker and the weight-sync
thread live in the app's lifespan. With ``redis.url`` set (and ``run_worker``) the server consumes ``prompts`` and
follows the learner's weights; without it, it only answers HTTP requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from rollout_server.api_models import (
    CompletionBody,
    GenerateRequest,
    GenerateResponse,
    ReloadRequest,
    ReloadResponse,
    RolloutHealth,
)
from rollout_server.backends import Backend, Completion, PromptGroup, Sampling, create_backend
from rollout_server.metrics import RolloutMetrics
from rollout_server.sync import CheckpointError, PolicyWeights, WeightSync
from rollout_server.worker import RolloutWorker, default_consumer_name
from services.config import RunConfig
from services.http import bearer_auth, json_body_schema, read_body
from services.metrics import metrics_asgi_app
from services.modeling.loading import resolve_model_path
from services.streams import clients_from_config

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 20.0
"""How long shutdown waits for the batch in progress before abandoning it (it stays pending and is claimed)."""
_HEALTH_PROMPT = [{"role": "user", "content": "Say hi."}]


def backend_from_config(cfg: RunConfig) -> Backend:
    """Build the configured backend on the configured model (blocking: loads the weights)."""
    cache = Path(cfg.model.cache_dir) if cfg.model.cache_dir else None
    folder = resolve_model_path(cfg.model.name_or_path, cache)
    rc = cfg.rollout
    if rc.backend == "hf":
        return create_backend("hf", model=folder, device=rc.device, dtype=cfg.model.dtype, num_threads=rc.torch_threads)
    return create_backend(
        "vllm", model=folder, dtype=cfg.model.dtype, gpu_memory_utilization=rc.gpu_memory_utilization,
        seed=cfg.sampling.seed or 0, num_threads=rc.torch_threads,
    )  # fmt: skip


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI of a JSON body the route reads itself (to cap its size), so clients and fuzzers see its schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": json_body_schema(model)}}}}


def _worker_state(task: asyncio.Task[None] | None) -> str:
    if task is None:
        return "disabled"
    if not task.done():
        return "running"
    return "failed" if not task.cancelled() and task.exception() is not None else "stopped"


def _completion(c: Completion) -> CompletionBody:
    return CompletionBody(
        text=c.text,
        token_ids=[int(t) for t in c.token_ids],
        logprobs=[float(x) for x in c.logprobs],
        finish_reason=c.finish_reason,
    )


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


def create_app(
    cfg: RunConfig, backend: Backend | None = None, *, run_worker: bool = True, grace_s: float = SHUTDOWN_GRACE_S
) -> FastAPI:
    """Build the rollout server; the backend is created from ``cfg`` in the lifespan unless one is given."""
    metrics = RolloutMetrics()
    server = cfg.rollout.server
    auth = bearer_auth(server.api_token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        be = backend if backend is not None else await asyncio.to_thread(backend_from_config, cfg)
        weights = PolicyWeights(be)
        weights.add_listener(metrics.policy_version.set)
        metrics.policy_version.set(weights.version)
        app.state.backend, app.state.weights, app.state.worker_task = be, weights, None
        stop = asyncio.Event()
        sync: WeightSync | None = None
        task: asyncio.Task[None] | None = None
        clients = clients_from_config(cfg.redis) if run_worker and cfg.redis.url is not None else None
        try:
            if clients is not None:
                aredis, sredis = clients
                consumer = default_consumer_name()
                sync = WeightSync(cfg, weights, sredis, consumer, metrics)
                await asyncio.to_thread(sync.initial_load)  # a late joiner starts from the newest checkpoint
                sync.start()
                worker = RolloutWorker(cfg, be, aredis, metrics, consumer, weights=weights)
                task = app.state.worker_task = asyncio.create_task(worker.run(stop), name="rollout-worker")
            yield
        finally:
            stop.set()
            if task is not None:
                await _stop_worker(task, grace_s)
            if sync is not None:
                await asyncio.to_thread(sync.stop)
            if clients is not None:
                await clients[0].aclose()
                clients[1].close()
            if backend is None:
                be.close()

    app = FastAPI(title="dipo rollout server", version="1", lifespan=lifespan)
    app.mount("/metrics", metrics_asgi_app(metrics.component))

    @app.get("/health", response_model=RolloutHealth)
    async def health(request: Request) -> JSONResponse:
        """Generate one token through the backend and report the loaded version and the worker's state."""
        weights: PolicyWeights = request.app.state.weights
        worker = _worker_state(request.app.state.worker_task)
        start = time.perf_counter()
        try:
            groups = await asyncio.to_thread(
                weights.backend.generate, [_HEALTH_PROMPT], 1, Sampling(temperature=0.0, max_new_tokens=1)
            )
            ok = len(groups) == 1 and len(groups[0].completions[0].token_ids) == 1
            detail = "" if ok else "the backend did not return one token"
        except Exception as exc:  # /health reports failures instead of raising them
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        if worker == "failed":
            ok, detail = False, detail or "the stream worker stopped with an error (see the log)"
        body = RolloutHealth(ok=ok, detail=detail, seconds=time.perf_counter() - start, version=weights.version,
                             worker=worker)  # fmt: skip
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        dependencies=[Depends(auth)],
        openapi_extra=_json_body(GenerateRequest),
    )
    async def generate(request: Request) -> GenerateResponse:
        """Sample n completions of one prompt with the weights in place (ad hoc; nothing goes to the streams)."""
        raw = await read_body(request, server.max_body_bytes)
        try:
            body = GenerateRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)[:2000]) from exc
        weights: PolicyWeights = request.app.state.weights
        prompt = [turn.model_dump() for turn in body.messages] if body.messages is not None else body.prompt
        sampling = Sampling(**body.sampling.model_dump())

        def run() -> tuple[PromptGroup, int]:
            with weights.batch() as version:
                return weights.backend.generate([prompt], body.n, sampling)[0], version  # type: ignore[list-item]

        start = time.perf_counter()
        try:
            group, version = await asyncio.to_thread(run)
        except ValueError as exc:  # e.g. prompt + max_new_tokens beyond the model's context
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)[:2000]) from exc
        return GenerateResponse(
            version=version,
            prompt_token_ids=[int(t) for t in group.prompt_token_ids],
            completions=[_completion(c) for c in group.completions],
            seconds=time.perf_counter() - start,
        )

    @app.post(
        "/v1/weights/reload",
        response_model=ReloadResponse,
        dependencies=[Depends(auth)],
        openapi_extra=_json_body(ReloadRequest),
    )
    async def reload(request: Request) -> ReloadResponse:
        """Load a checkpoint folder's weights (validated first: a folder of another model changes nothing)."""
        raw = await read_body(request, server.max_body_bytes)
        try:
            body = ReloadRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)[:2000]) from exc
        weights: PolicyWeights = request.app.state.weights
        folder = Path(body.checkpoint)
        if not folder.is_dir():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no folder {folder} on this server")
        version = weights.version if body.version is None else body.version
        start = time.perf_counter()
        try:
            count = await asyncio.to_thread(weights.load_checkpoint, folder, version)
        except CheckpointError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)[:2000]) from exc
        log.info("reloaded weights from %s as v%d (%d tensors)", folder, version, count)
        return ReloadResponse(version=version, tensors=count, seconds=time.perf_counter() - start)

    return app
