"""HTTP helpers shared by the services' FastAPI apps: bearer-token auth, bounded bodies, serving."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import HTTPException, Request, status
from pydantic import BaseModel, ValidationError

BodyReader = Callable[[Request], Awaitable[bytes]]
ModelT = TypeVar("ModelT", bound=BaseModel)
_MAX_ERROR_CHARS = 2000


def is_loopback(host: str) -> bool:
    """Whether a host name points at this machine's loopback interface."""
    return host in ("localhost", "::1") or host.startswith("127.")


def json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for an OpenAPI ``requestBody`` written by hand.

    Routes that read their body themselves (to cap its size) declare it through ``openapi_extra``; pydantic's schema
    refers to nested models as ``#/$defs/Name``, which inside an OpenAPI document points nowhere, so clients and
    fuzzers could not build a body from it. The API models are not recursive, so inlining terminates.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


def bearer_auth(token: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency requiring ``Authorization: Bearer <token>`` when ``token`` is set (else a no-op)."""

    def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong bearer token")

    return check


BODY_TIMEOUT_S = 30.0
"""How long a request body may take to arrive unless the app sets ``state.body_timeout_s``."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) anything over ``max_bytes`` before reading it whole, and (408) a body that
    has not arrived within the app's body timeout: a client trickling bytes cannot hold a connection for ever."""
    deadline_s = float(getattr(request.app.state, "body_timeout_s", BODY_TIMEOUT_S))
    try:
        async with asyncio.timeout(deadline_s):
            return await _read_body(request, max_bytes)
    except TimeoutError as exc:
        raise HTTPException(
            status.HTTP_408_REQUEST_TIMEOUT, f"request body not received within {deadline_s:g} s"
        ) from exc


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid Content-Length") from exc
        if size > max_bytes:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body over {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_model(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """The request's JSON body as ``model``: 413 over ``max_bytes``, 422 with pydantic's reasons when invalid."""
    raw = await read_body(request, max_bytes)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)[:_MAX_ERROR_CHARS]) from exc


def unprocessable(exc: Exception) -> HTTPException:
    """A 422 whose detail is ``exc``'s message (bounded), for input the route could parse but not serve."""
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)[:_MAX_ERROR_CHARS])


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its JSON body itself (to cap its size), so clients and fuzzers see
    the body's schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": json_body_schema(model)}}}}


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one); the caller reads the real port from it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class ConcurrencyLimit:
    """ASGI middleware: at most ``limit`` ``/v1/`` requests in flight; one more is answered 503 at once.

    Work is bounded per request (body size and time, verification time); this bounds how many there are, so a flood
    cannot queue unbounded work. ``/health`` and ``/metrics`` are not counted: a probe never waits behind work.
    """

    def __init__(self, app: Any, limit: int, prefix: str = "/v1/") -> None:
        self.app = app
        self.limit = limit
        self.prefix = prefix
        self.active = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            body = json.dumps({"detail": f"busy: {self.limit} requests in flight; retry shortly"}).encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                       (b"content-length", str(len(body)).encode())]  # fmt: skip
            await send({"type": "http.response.start", "status": status.HTTP_503_SERVICE_UNAVAILABLE,
                        "headers": headers})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def limit_requests(app: Any, server: Any) -> None:
    """Apply a ``ServerConfig``'s request limits to a FastAPI app: body timeout and concurrent ``/v1/`` requests."""
    app.state.body_timeout_s = server.body_timeout_s
    app.add_middleware(ConcurrencyLimit, limit=server.max_concurrent_requests)


def exit_on_failure(app: Any, task: asyncio.Task[Any], what: str) -> None:
    """Make a background worker's death the process's: under :func:`serve`, a ``task`` that ends with an error
    logs it, shuts the server down and makes the process exit 1, so the supervisor or Kubernetes restarts it (its
    unacknowledged entries are reclaimed). A process that stayed up with a dead worker would only say 503 forever.

    Apps run in-process (tests, ``TestClient``) are not served by :func:`serve`: there the task's error is left to
    ``/health`` and to whoever awaits the task.
    """

    def on_done(done: asyncio.Task[Any]) -> None:
        server = getattr(app.state, "uvicorn_server", None)
        if done.cancelled() or done.exception() is None or server is None:
            return
        error = done.exception()
        logging.getLogger(__name__).critical(
            "%s stopped: %s: %s; exiting so that the process is restarted", what, type(error).__name__, error,
            exc_info=error,
        )  # fmt: skip
        app.state.worker_failure = f"{what} stopped: {type(error).__name__}: {error}"
        server.should_exit = True  # what uvicorn's SIGTERM handler does: a graceful shutdown, then serve() exits 1

    task.add_done_callback(on_done)


def serve(app: Any, host: str, port: int, *, port_file: Path | None = None, log_level: str = "info") -> None:
    """Serve an ASGI app with uvicorn on host:port until SIGINT/SIGTERM; writes the bound port to ``port_file``.

    Exits 1 (SystemExit) when a worker registered with :func:`exit_on_failure` died with an error.
    """
    import uvicorn

    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    if port_file is not None:
        port_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(bound))
        tmp.replace(port_file)
    logging.getLogger(__name__).info("serving on http://%s:%d", host, bound)
    config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False, timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    state = getattr(app, "state", None)
    if state is not None:
        state.uvicorn_server = server
    server.run(sockets=[sock])
    failure = getattr(state, "worker_failure", None)
    if failure is not None:
        raise SystemExit(f"exiting with status 1: {failure}")
