"""Bounded work per request on a real reward service (issue 16.5, 16.8): real process, real HTTP, real sockets.

The attack of the audit: answers that make sympy evaluate a power tower hold a verifier process for the whole
per-item timeout, and one request may carry many of them. Against that, ``/health`` answers without queueing behind
verification, a request's verification has a budget of its own (``reward.request_timeout_s``: 504), a client that
hangs up gets its queued verifications cancelled, a body trickled byte by byte is cut off
(``server.body_timeout_s``: 408), at most ``server.max_concurrent_requests`` are served at once (503 beyond), and
the interactive docs are off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"  # sympy would evaluate it for ever: each one holds a worker verify_timeout_s


def _head(length: int) -> bytes:
    return (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\n\r\n".encode())  # fmt: skip


def _attack(count: int) -> dict:
    task = {"task_kind": "math", "ground_truth": "7", "messages": [{"role": "user", "content": "What is 3 + 4?"}]}
    return {"task": task, "responses": [{"text": TOWER} for _ in range(count)]}


@pytest.fixture(scope="module")
def service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("reward-limits")
    cfg = {
        "name": "limits",
        "redis": {"url": redis_url},
        "reward": {"verifier_workers": 1, "verify_timeout_s": 3.0, "request_timeout_s": 4.0,
                   "server": {"api_token": TOKEN, "body_timeout_s": 1.5, "max_concurrent_requests": 2}},
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    port_file = folder / "port"
    with (folder / "reward.log").open("wb") as log:
        command = [sys.executable, "-m", "reward_service", "--config", str(folder / "config.yaml"),
                   "--port-file", str(port_file)]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "reward.log").read_text()[-3000:]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        while httpx.get(f"{url}/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _post_in_background(url: str, body: dict, timeout_s: float) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def post() -> None:
        try:
            outcome["response"] = httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=timeout_s)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread, outcome


def test_health_answers_while_verification_is_saturated_and_the_request_hits_its_budget(service: str) -> None:
    attack, outcome = _post_in_background(service, _attack(8), timeout_s=60)  # 8 x 3 s of work for one worker
    time.sleep(0.5)
    health = httpx.get(f"{service}/health", timeout=10)
    assert health.status_code == 200, health.text
    assert attack.is_alive()  # answered while the attack still occupies the verifier
    attack.join(60)
    assert outcome["response"].status_code == 504, outcome  # 4 s budget, not 24 s of verification
    assert "request_timeout_s" in outcome["response"].text


def test_a_client_that_hangs_up_gets_its_queued_verifications_cancelled(service: str) -> None:
    body = json.dumps(_attack(8)).encode()
    host, port = service.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_head(len(body)) + body)
        time.sleep(0.5)  # accepted and queued
    # Had the 7 queued ones stayed, this end-to-end check would wait behind 21 s of them: the client gives it 15 s.
    deep = httpx.get(f"{service}/health/deep", timeout=15)
    assert deep.status_code == 200, deep.text


def test_a_trickled_body_is_cut_off_and_the_concurrency_limit_holds(service: str) -> None:
    host, port = service.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port))) for _ in range(2)]  # both slots held by slow senders
    try:
        for sock in slow:
            sock.sendall(_head(5000) + b"{")
        time.sleep(0.3)
        busy = httpx.post(f"{service}/v1/score", json=_attack(1), headers=AUTH, timeout=10)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
        assert httpx.get(f"{service}/health", timeout=10).status_code == 200  # probes are never limited
        for sock in slow:  # keep trickling: one byte every 0.3 s would take 25 minutes
            sock.settimeout(10)
            reply = b""
            for _ in range(20):
                try:
                    sock.sendall(b" ")
                except OSError:  # the server closed the connection after answering
                    break
                time.sleep(0.3)
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    finally:
        for sock in slow:
            sock.close()
    time.sleep(0.3)
    assert httpx.post(f"{service}/v1/score", json=_attack(0) | {"responses": [{"text": "\\boxed{7}"}]},
                      headers=AUTH, timeout=10).status_code == 200  # the slots are free again  # fmt: skip


def test_the_interactive_docs_are_off_and_the_schema_stays(service: str) -> None:
    assert httpx.get(f"{service}/docs", timeout=10).status_code == 404
    assert httpx.get(f"{service}/redoc", timeout=10).status_code == 404
    assert httpx.get(f"{service}/openapi.json", timeout=10).status_code == 200


def test_a_ground_truth_or_tools_beyond_their_caps_are_refused(service: str) -> None:
    calls = [{"f": {"x": list(range(2000))}} for _ in range(20)]  # about 200 kB of options for the checker
    task = {"task_kind": "function_call", "ground_truth": calls, "messages": [{"role": "user", "content": "go"}],
            "tools": [{"name": "f", "parameters": {"type": "object", "properties": {}}}]}  # fmt: skip
    resp = httpx.post(f"{service}/v1/score", json={"task": task, "responses": [{"text": "[f(x=1)]"}]}, headers=AUTH,
                      timeout=10)  # fmt: skip
    assert resp.status_code == 422 and "ground_truth is" in resp.text and "cap of 65536" in resp.text, resp.text[:500]
    task |= {"ground_truth": [{"f": {"x": [1]}}], "tools": [{"name": f"t{i}", "description": "d" * 2000}
                                                            for i in range(200)]}  # fmt: skip
    resp = httpx.post(f"{service}/v1/score", json={"task": task, "responses": [{"text": "[f(x=1)]"}]}, headers=AUTH,
                      timeout=10)  # fmt: skip
    assert resp.status_code == 422 and "tools is" in resp.text, resp.text[:500]
