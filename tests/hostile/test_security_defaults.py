"""Security defaults: no code-executing deserialisation anywhere, loopback binds by default, Redis auth and TLS wired.

(a) An AST scan of every Python file of the project (the packages, benchmarks, scripts and tests) for what could
execute data: the ``eval``/``exec``/``compile`` builtins, pickle-family modules (pickle, marshal, dill, shelve,
joblib...) and the calls that unpickle (``torch.load`` without ``weights_only=True``, ``numpy.load`` with
``allow_pickle=True``, ``read_pickle``, ``torch.distributed``'s ``*_object*`` collectives), ``yaml.load`` without a
safe loader, and shell commands (``shell=`` other than ``False``, ``os.system``, ``os.popen``). Redis's server-side
Lua (``redis.eval``, ``register_script``) is an attribute call, not the builtin, and is not flagged. Offenders are
listed as ``file:line: what``; the scanner is itself tested on snippets that must and must not be flagged.

(b) Every config default whose name says host is loopback; outside deploy/ and docker-compose.yml no Python source,
config or script sets ``0.0.0.0`` (or ``::``), and no listener is opened on all interfaces by omission.

(c) The Redis password and the TLS options reach every client: a real ``redis-server`` with mutual TLS and
``requirepass`` accepts the clients that the learner and rollout server (``clients_from_config``), the reward service
(its app's lifespan) and the ``dipo run`` panel build from ``cfg.redis``, and refuses them without the CA, the client
certificate or the password. A scan checks that no component builds a Redis client any other way, and the compose
and Kubernetes files give every service that talks to Redis the password, and the server ``requirepass``.
"""

from __future__ import annotations

import ast
import asyncio
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.exceptions as rexc
import yaml

from reward_service.app import create_app as create_reward_app
from runner.panel import RunMonitor
from runner.redis_server import free_port
from services.config import RunConfig, load_config
from services.streams import clients_from_config

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ["services", "runner", "learner", "rollout_server", "reward_service", "evaluation"]
SCANNED = [*COMPONENTS, "bench", "scripts", "tests"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ALL_INTERFACES = {"0.0.0.0", "::", "[::]"}

pytestmark = pytest.mark.timeout(120)


def python_files(folders: list[str]) -> list[Path]:
    files = [path for folder in folders for path in (REPO / folder).rglob("*.py") if "__pycache__" not in path.parts]
    return sorted(files)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ------------------------------------------------------------------------------------------------ (a) the scanner

UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
DANGEROUS_BUILTINS = {"eval", "exec", "compile"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
UNSAFE_YAML_CALLS = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
PICKLING_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                        "send_object_list", "recv_object_list"}  # fmt: skip


def _name(node: ast.AST) -> str:
    """The dotted name of a Name/Attribute chain (``yaml.SafeLoader``), or '' for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(node.id)
    return ".".join(reversed(parts))


def _is_safe_loader(node: ast.AST | None, safe: set[str]) -> bool:
    """Whether a Loader expression can only be one of the ``safe`` loader names (both arms of an ``x if c else y``)."""
    if isinstance(node, ast.IfExp):
        return _is_safe_loader(node.body, safe) and _is_safe_loader(node.orelse, safe)
    return node is not None and _name(node).rsplit(".", 1)[-1] in safe


def _safe_loader_names(tree: ast.Module) -> set[str]:
    """Names in the module bound to safe YAML loaders: subclasses of one, or variables assigned only safe ones."""
    safe = set(SAFE_YAML_LOADERS)

    def is_safe(node: ast.AST | None) -> bool:
        return _is_safe_loader(node, safe)

    changed = True
    while changed:  # a fixpoint: a loader may be defined from another one
        changed = False
        for node in ast.walk(tree):
            name, ok = None, False
            if isinstance(node, ast.ClassDef):
                name, ok = node.name, bool(node.bases) and all(is_safe(base) for base in node.bases)
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name, ok = node.targets[0].id, is_safe(node.value)
            if name is not None and ok and name not in safe:
                safe.add(name)
                changed = True
    return safe


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan_source(source: str, filename: str = "<snippet>") -> list[str]:
    """``line: what`` for every construct in ``source`` that could execute data or spawn a shell."""
    tree = ast.parse(source, filename=filename)
    safe_loaders = _safe_loader_names(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in UNPICKLING_MODULES:
                    found.append((node.lineno, f"imports {module}"))
            if isinstance(node, ast.ImportFrom) and node.module == "builtins":
                for alias in node.names:
                    if alias.name in DANGEROUS_BUILTINS:
                        found.append((node.lineno, f"imports builtins.{alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        func, dotted = node.func, _name(node.func)
        attr = func.attr if isinstance(func, ast.Attribute) else ""
        if isinstance(func, ast.Name) and func.id in DANGEROUS_BUILTINS:
            found.append((node.lineno, f"calls {func.id}()"))
        elif dotted in {f"builtins.{b}" for b in DANGEROUS_BUILTINS}:
            found.append((node.lineno, f"calls {dotted}()"))
        if dotted == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        if attr == "load" and dotted.split(".")[0] in ("np", "numpy") and _is_true(_keyword(node, "allow_pickle")):
            found.append((node.lineno, "numpy.load with allow_pickle=True"))
        if attr == "read_pickle" or attr in PICKLING_COLLECTIVES:
            found.append((node.lineno, f"calls {attr} (unpickles)"))
        if dotted.startswith("yaml.") and attr in UNSAFE_YAML_CALLS:
            found.append((node.lineno, f"calls {dotted}"))
        if dotted in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not _is_safe_loader(loader, safe_loaders):
                found.append((node.lineno, f"{dotted} without a safe loader"))
        shell = _keyword(node, "shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append((node.lineno, f"{dotted or 'a call'} with shell={ast.unparse(shell)}"))
        if dotted in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            found.append((node.lineno, f"calls {dotted} (a shell)"))
    return [f"{line}: {what}" for line, what in sorted(found)]


@pytest.mark.parametrize(
    "snippet",
    [
        "eval('1')",
        "exec(code)",
        "compile(src, 'f', 'exec')",
        "import builtins\nbuiltins.eval('1')",
        "from builtins import exec",
        "import pickle",
        "from pickle import loads",
        "import _pickle as p",
        "import marshal",
        "from dill import loads",
        "import joblib",
        "import shelve",
        "import torch\ntorch.load(f)",
        "import torch\ntorch.load(f, weights_only=False)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(f)",
        "import torch.distributed as dist\ndist.broadcast_object_list(objs)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.load(text, yaml.FullLoader)",
        "import yaml\nyaml.load_all(text, Loader=yaml.UnsafeLoader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import yaml\nyaml.full_load(text)",
        "import yaml\nclass L(yaml.Loader): pass\nyaml.load(text, Loader=L)",
        "import subprocess\nsubprocess.run(cmd, shell=True)",
        "import subprocess\nsubprocess.Popen(cmd, shell=flag)",
        "import os\nos.system('ls')",
        "import os\nos.popen('ls')",
    ],
)
def test_scanner_flags_what_executes_data(snippet: str) -> None:
    assert scan_source(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "model.eval()",
        "import re\nre.compile('x')",
        "await redis.eval(LUA, 1, key)",
        "script = client.register_script(LUA)",
        "import torch\ntorch.load(f, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(f)",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.load(text, Loader=yaml.CSafeLoader)",
        "import yaml\nclass L(yaml.SafeLoader): pass\nM = L\nyaml.load_all(text, Loader=M if x else yaml.SafeLoader)",
        "import subprocess\nsubprocess.run(['ls'], shell=False, check=True)",
        "import json\njson.loads(text)",
        "x = 'eval(1) import pickle os.system(1)'",
        "import ast\nast.literal_eval('1')",
    ],
)
def test_scanner_lets_safe_code_through(snippet: str) -> None:
    assert scan_source(snippet) == [], snippet


REVIEWED = {
    "learner/checkpoint_dcp.py:14: imports pickle": "torch's sharded checkpoint (DCP) stores its .metadata as a "
    "pickle; it is read only through _MetadataUnpickler, which admits DCP's own metadata records and nothing else",
    "tests/unit/learner/test_checkpoint_dcp.py:8: imports pickle": "writes a hostile .metadata to show it is refused",
}
"""Findings a person reviewed, each with why it is safe. A finding that moves to another line is a new finding."""


def test_no_python_file_executes_data_or_spawns_a_shell() -> None:
    files = python_files(SCANNED)
    assert len(files) > 50, "the scan must see the project"
    offenders = [
        f"{path.relative_to(REPO)}:{finding}" for path in files for finding in scan_source(path.read_text(), str(path))
    ]
    unreviewed = [o for o in offenders if o not in REVIEWED]
    assert not unreviewed, "code that could execute data or run a shell:\n" + "\n".join(unreviewed)
    assert set(REVIEWED) <= set(offenders), "a reviewed finding is gone: drop it from REVIEWED"


# ------------------------------------------------------------------------------------------------ (b) bind addresses


def _host_defaults(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _host_defaults(value, f"{path}.")
        elif "host" in key:
            yield path, value


def test_every_default_host_is_loopback() -> None:
    hosts = dict(_host_defaults(RunConfig().model_dump()))
    assert {"rollout.server.host", "reward.server.host", "learner.server.host", "learner.weight_sync_host"} <= set(
        hosts
    )
    assert {path: host for path, host in hosts.items() if host not in LOOPBACK} == {}


def test_all_interfaces_appear_only_in_deploy_files() -> None:
    offenders: list[str] = []
    for path in python_files(COMPONENTS + ["bench", "scripts"]):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Constant) and node.value in ALL_INTERFACES:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Call):
                dotted = _name(node.func)
                if dotted.endswith("start_http_server") and _keyword(node, "addr") is None and len(node.args) < 2:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: start_http_server without addr")
                address = node.args[0] if node.args else None
                if dotted.endswith((".bind", "HTTPServer", "TCPServer")) and isinstance(address, ast.Tuple):
                    host = address.elts[0] if address.elts else None
                    if isinstance(host, ast.Constant) and host.value == "":
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: binds every interface ('')")
    others = [
        *(REPO / "configs").rglob("*"),
        *(REPO / "scripts").rglob("*"),
        REPO / "Makefile",
    ]
    for path in others:
        if path.is_file() and path.suffix != ".py":
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if "0.0.0.0" in line:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: 0.0.0.0")
    assert not offenders, "listening on every interface outside the container files:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------------------------ (c) Redis clients

REDIS_BUILDERS = {"connect", "connect_sync", "from_url", "Redis", "StrictRedis", "RedisCluster"}
TLS_AND_AUTH = {"password", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
# Where a Redis client is built on purpose without cfg.redis: the builders themselves, LocalRedis's readiness probe
# of the server it started, and the chaos runner's client of the LocalRedis it started (whose URL carries the
# password; a private local server never uses TLS).
BUILDER_MODULES = {"services/streams.py", "runner/redis_server.py", "runner/chaos.py"}


def test_components_build_redis_clients_only_from_the_run_config() -> None:
    offenders: list[str] = []
    builders = 0
    for path in python_files(COMPONENTS):
        relative = str(path.relative_to(REPO))
        for node in ast.walk(parse(path)):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func).rsplit(".", 1)[-1]
            if name in ("clients_from_config", "async_client_from_config"):
                builders += 1
                argument = ast.unparse(node.args[0]) if node.args else ""
                if not argument.endswith(".redis"):
                    offenders.append(f"{relative}:{node.lineno}: {name}({argument})")
            elif name in REDIS_BUILDERS and relative not in BUILDER_MODULES:
                given = {kw.arg for kw in node.keywords}
                if name == "connect" and not node.args:
                    continue  # e.g. socket.connect(), or a method of something else
                if name in ("connect", "connect_sync", "from_url", "Redis"):
                    builders += 1
                    if not TLS_AND_AUTH <= given:
                        missing = sorted(TLS_AND_AUTH - given)
                        offenders.append(f"{relative}:{node.lineno}: {ast.unparse(node.func)}() without {missing}")
    assert builders >= 4, "the scan found the learner, rollout, reward and panel clients"
    assert not offenders, "Redis clients that ignore cfg.redis's password or TLS options:\n" + "\n".join(offenders)


PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A redis-server with mutual TLS (a private CA, server and client certificates) and requirepass."""
    openssl, server = shutil.which("openssl"), shutil.which("redis-server")
    if openssl is None or server is None:
        pytest.skip("needs openssl and redis-server")
    folder = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=dipo-test-ca")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", "server.crt",
         "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(folder),
         "--logfile", "redis.log"],
        cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    paths = {name: str(folder / f"{name}") for name in ("ca.crt", "client.crt", "client.key")}
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        probe = redis.Redis.from_url(url, password=PASSWORD, ssl_ca_certs=paths["ca.crt"],
                                     ssl_certfile=paths["client.crt"], ssl_keyfile=paths["client.key"],
                                     socket_timeout=1, socket_connect_timeout=1)  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                probe.ping()
                break
            except (rexc.ConnectionError, rexc.TimeoutError):
                assert proc.poll() is None, (folder / "redis.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the TLS redis-server did not answer"
                time.sleep(0.05)
        probe.close()
        yield {"url": url, **paths}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tls_config(server: dict[str, str], *, drop: str | None = None, run: str = "tlsrun") -> RunConfig:
    """A run config reaching the TLS server the way a deployment would: DIPO_REDIS__* environment variables."""
    env = {
        "DIPO_REDIS__URL": server["url"],
        "DIPO_REDIS__PASSWORD": PASSWORD,
        "DIPO_REDIS__TLS_CA_FILE": server["ca.crt"],
        "DIPO_REDIS__TLS_CERT_FILE": server["client.crt"],
        "DIPO_REDIS__TLS_KEY_FILE": server["client.key"],
        "DIPO_REDIS__SOCKET_TIMEOUT_S": "2",
        "DIPO_REDIS__RETRIES": "0",
    }
    if drop is not None:
        del env[drop]
    return load_config(None, [f"name={run}", "reward.verifier_workers=1"], environ=env)


async def test_learner_and_rollout_clients_use_password_and_tls(tls_redis: dict[str, str]) -> None:
    aio, sync = clients_from_config(tls_config(tls_redis).redis)
    try:
        assert await aio.ping() and sync.ping()
    finally:
        await aio.aclose()
        sync.close()


@pytest.mark.parametrize(
    ("drop", "error"),
    [
        ("DIPO_REDIS__PASSWORD", rexc.AuthenticationError),
        ("DIPO_REDIS__TLS_CA_FILE", rexc.ConnectionError),  # the private CA is unknown: verification fails
        ("DIPO_REDIS__TLS_CERT_FILE", rexc.ConnectionError),  # no client certificate: the server refuses
    ],
)
async def test_clients_without_an_option_are_refused(
    tls_redis: dict[str, str], drop: str, error: type[Exception]
) -> None:
    """The negative control: each option is needed, so the passing tests show that each one arrived."""
    cfg = tls_config(tls_redis, drop=drop)
    if drop == "DIPO_REDIS__TLS_CERT_FILE":
        cfg.redis.tls_key_file = None
    aio, sync = clients_from_config(cfg.redis)
    try:
        with pytest.raises(error):
            sync.ping()
        with pytest.raises(error):
            await aio.ping()
    finally:
        await aio.aclose()
        sync.close()


async def test_reward_service_reaches_redis_with_password_and_tls(tls_redis: dict[str, str]) -> None:
    app = create_reward_app(tls_config(tls_redis), run_worker=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
            health = await asyncio.wait_for(client.get("/health"), 60)
    assert health.status_code == 200 and health.json()["ok"] is True, health.text  # /health pings Redis


def test_run_panel_reaches_redis_with_password_and_tls(tls_redis: dict[str, str], tmp_path: Path) -> None:
    cfg = tls_config(tls_redis)
    monitor = RunMonitor(tmp_path, cfg, cfg.redis.url)
    try:
        snapshot = monitor.snapshot()
    finally:
        monitor.close()
    assert snapshot.redis_error is None and set(snapshot.streams) and all(n == 0 for n in snapshot.streams.values())


# ------------------------------------------------------------------------------------------------ (c) deploy files


def _compose_services() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def test_compose_gives_every_redis_client_the_password_and_redis_requirepass() -> None:
    services = _compose_services()
    clients = {name: s for name, s in services.items() if "DIPO_REDIS__URL" in (s.get("environment") or {})}
    assert {"learner", "reward", "rollout"} <= set(clients)
    for name, service in clients.items():
        env = service["environment"]
        url, password = str(env["DIPO_REDIS__URL"]), str(env.get("DIPO_REDIS__PASSWORD", ""))
        assert "@" in url or re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", password), f"{name} has no password"
    redis_service = services["redis"]
    assert "--requirepass" in " ".join(redis_service["command"])
    assert redis_service["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    override = (REPO / "deploy/docker/compose.cpu.yaml").read_text()
    assert "DIPO_REDIS__PASSWORD" not in override and "DIPO_REDIS__URL" not in override  # nothing overridden away


def test_kubernetes_gives_every_redis_client_the_password_and_redis_requirepass() -> None:
    base = REPO / "deploy/k8s/base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    env_maps = {
        generator["name"]: dict(item.split("=", 1) for item in generator.get("literals", []))
        for generator in kustomization.get("configMapGenerator", [])
    }
    workloads = [
        doc
        for path in sorted(base.glob("*.yaml"))
        if path.name not in ("kustomization.yaml", "run.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") in ("Deployment", "StatefulSet")
    ]
    clients = 0
    for workload in workloads:
        name = workload["metadata"]["name"]
        for container in workload["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            maps = [env_maps.get(ref["configMapRef"]["name"], {}) for ref in container.get("envFrom", [])]
            from_maps = {key for literals in maps for key in literals}
            if "DIPO_REDIS__URL" not in env and "DIPO_REDIS__URL" not in from_maps:
                continue
            clients += 1
            secret = env.get("DIPO_REDIS__PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
            assert secret.get("name") and secret.get("key"), f"{name}/{container['name']} gets no Redis password"
        if name == "redis":
            [container] = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"]
            assert '--requirepass "$REDIS_PASSWORD"' in " ".join(container.get("args", []))
            secret = {e["name"]: e for e in container["env"]}["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert secret["key"] == "redis-password"
    assert clients == 3, "learner, reward and rollout talk to Redis"
