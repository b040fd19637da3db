"""The learner's HTTP endpoint: ``/metrics`` and a ``/health`` that reports real progress.

``/health`` answers 503 when no optimizer step has finished for ``learner.health_stall_s`` (counted from the
learner's start until its first step), so a liveness probe restarts a learner that hangs in a collective or waits
for work that never comes, and not one that is merely slow. The server runs on a thread of rank 0; the training
loop updates one :class:`Progress`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from learner.metrics import LearnerMetrics
from services.api_models import HealthResponse
from services.config import RunConfig
from services.http import bind_socket
from services.metrics import metrics_asgi_app

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What the training loop reports to ``/health``: the last finished step, and when."""

    step: int = 0
    version: int = 0
    started: float = field(default_factory=time.monotonic)
    last_step_at: float | None = None
    phase: str = "starting"

    def stepped(self, step: int, version: int) -> None:
        """Record a finished optimizer step."""
        self.step, self.version, self.last_step_at = step, version, time.monotonic()

    def stalled_s(self) -> float:
        """Seconds since the last finished step (since the start before the first one)."""
        return time.monotonic() - (self.last_step_at if self.last_step_at is not None else self.started)


class LearnerHealth(HealthResponse):
    """``GET /health`` of the learner: its step, version and how long ago a step finished."""

    step: int = 0
    version: int = 0
    phase: str = ""
    since_last_step_s: float = 0.0


async def health(request: Request) -> JSONResponse:
    """200 while steps keep finishing; 503 once none has for ``learner.health_stall_s``."""
    progress: Progress = request.app.state.progress
    limit = request.app.state.stall_s
    stalled = progress.stalled_s()
    ok = stalled <= limit
    detail = "" if ok else f"no optimizer step finished for {stalled:.0f}s (limit {limit:.0f}s)"
    body = LearnerHealth(ok=ok, component="learner", detail=detail, step=progress.step, version=progress.version,
                         phase=progress.phase, since_last_step_s=stalled)  # fmt: skip
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def create_app(cfg: RunConfig, metrics: LearnerMetrics, progress: Progress) -> FastAPI:
    """The learner's app: ``/health`` from ``progress``, ``/metrics`` from ``metrics``."""
    app = FastAPI(title="dipo learner", version="1", docs_url=None, redoc_url=None)  # /openapi.json stays
    app.state.progress, app.state.stall_s = progress, cfg.learner.health_stall_s
    app.mount("/metrics", metrics_asgi_app(metrics.component))
    app.add_api_route("/health", health, methods=["GET"], response_model=LearnerHealth)
    return app


class LearnerServer:
    """Serves the learner's app on ``learner.server`` from a daemon thread (the loop owns the signals)."""

    def __init__(self, cfg: RunConfig, metrics: LearnerMetrics, progress: Progress) -> None:
        sock = bind_socket(cfg.learner.server.host, cfg.learner.server.port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(create_app(cfg, metrics, progress), log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="learner-http")  # fmt: skip
        self._thread.start()
        log.info("learner metrics on http://%s:%d/metrics", cfg.learner.server.host, self.port)

    def close(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        self._thread.join(5)
