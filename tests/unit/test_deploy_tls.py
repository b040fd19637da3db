"""Redis over mutual TLS in the deployments: the Compose override and the Kubernetes overlay, checked end to end.

What is checked, for ``deploy/docker/compose.tls.yaml`` merged over ``docker-compose.yml`` (by Compose's own merge
rules, implemented below for the keys the override uses) and for ``deploy/k8s/overlays/tls`` as rendered:

- every service or pod that has ``DIPO_REDIS__URL`` gets a ``rediss://`` URL, and the CA, certificate and key files
  its ``DIPO_REDIS__TLS_*`` variables name lie inside a read-only mount of the client certificates;
- Redis has no plaintext port (``--port 0``), listens with TLS on 6379, requires client certificates and keeps
  ``requirepass`` and its append-only file; its healthcheck or probes speak TLS;
- the merged and rendered files validate against the Compose Specification and the Kubernetes schemas, like the
  plain ones in ``test_deploy_schemas.py`` (with the renderer and validators of ``tests/deploy_helpers.py``);
- and for real: ``deploy/tls/make-certs.sh`` makes certificates into a temporary folder, a local ``redis-server``
  runs the override's exact command line on them (only paths and the port mapped), the override's healthcheck
  passes, and clients built by ``services.streams.clients_from_config`` from the override's environment talk to it,
  while a client without a certificate, a plaintext client and a wrong server name are refused.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from deploy_helpers import by_kind_and_name, compose_errors, interpolate, kustomize_build, pod_specs
from deploy_helpers import load_compose as _load
from deploy_helpers import merged_compose as _merged
from deploy_helpers import render as _render
from test_deploy_schemas import K8S_VERSIONS

from runner.redis_server import free_port
from services.config import load_config
from services.streams import clients_from_config, connect_sync

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO / "deploy/docker/compose.cpu.yaml"
COMPOSE_TLS_FILE = REPO / "deploy/docker/compose.tls.yaml"
MAKE_CERTS = REPO / "deploy/tls/make-certs.sh"
K8S_BASE = REPO / "deploy/k8s/base"
K8S_GPU = REPO / "deploy/k8s/overlays/gpu"
K8S_TLS = REPO / "deploy/k8s/overlays/tls"

TLS_ENV = ("DIPO_REDIS__TLS_CA_FILE", "DIPO_REDIS__TLS_CERT_FILE", "DIPO_REDIS__TLS_KEY_FILE")
CERT_FILES = {"ca.crt", "tls.crt", "tls.key"}
CERTS_DIR = "./deploy/tls/"  # where the Compose mounts take their folders (relative to the repository root)
SERVER_SECRET, CLIENT_SECRET = "dipo-redis-tls", "dipo-redis-client-tls"
PASSWORD = "secret-value"  # what the helpers' interpolation gives every required ${VAR:?} secret


# --- Compose: the override merged the way `docker compose -f A -f B` merges it ----------------------------------------


def _redis_clients(document: dict[str, Any]) -> list[str]:
    return sorted(name for name, service in document["services"].items()
                  if "DIPO_REDIS__URL" in service.get("environment", {}))  # fmt: skip


def _mount_of(service: dict[str, Any], path: str) -> dict[str, Any]:
    """The long-syntax bind mount of `service` that holds the container path `path` (fails if there is none)."""
    for volume in service["volumes"]:
        if isinstance(volume, dict) and path.startswith(volume["target"].rstrip("/") + "/"):
            return volume
    raise AssertionError(f"{path} is in no bind mount of the service")


def _host_path(mount: dict[str, Any], path: str, certs: Path) -> Path:
    """Where `path` inside the container is on the host, with the certificates folder moved to `certs`."""
    source = mount["source"]
    assert source.startswith(CERTS_DIR), f"{source}: certificates come from {CERTS_DIR}"
    return certs / source.removeprefix(CERTS_DIR) / os.path.relpath(path, mount["target"])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The certificates deploy/tls/make-certs.sh makes, in a temporary folder laid out like deploy/tls/."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("tls") / "tls"
    subprocess.run(["sh", str(MAKE_CERTS), str(out)], check=True, capture_output=True, timeout=60)
    return out


@pytest.mark.parametrize("interpolated", [False, True], ids=["raw", "interpolated"])
@pytest.mark.parametrize("files", [["tls"], ["compose", "tls"], ["compose", "cpu", "tls"]], ids="+".join)
def test_tls_override_validates_against_the_compose_spec(files: list[str], interpolated: bool) -> None:
    paths = {"cpu": COMPOSE_CPU_FILE, "tls": COMPOSE_TLS_FILE}
    document = _load(COMPOSE_TLS_FILE) if files == ["tls"] else _merged(*(paths[name] for name in files[1:]))
    assert compose_errors(interpolate(document) if interpolated else document) == []


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_every_redis_client_service_connects_with_tls_and_a_client_certificate(cpu: bool, certs: Path) -> None:
    base = _load(COMPOSE_FILE)
    merged = _merged(*([COMPOSE_CPU_FILE] if cpu else []), COMPOSE_TLS_FILE)
    clients = _redis_clients(base)
    assert clients == _redis_clients(merged) and {"learner", "reward", "rollout"} <= set(clients)
    for name in clients:
        service = interpolate(merged["services"][name])
        env = service["environment"]
        assert env["DIPO_REDIS__URL"] == "rediss://redis:6379/0", name
        for variable in TLS_ENV:
            mount = _mount_of(service, env[variable])
            assert mount["read_only"] is True and mount["bind"]["create_host_path"] is False
            assert mount["source"] == f"{CERTS_DIR}client", f"{name} mounts the client certificate only"
            assert _host_path(mount, env[variable], certs).is_file(), f"{name}: make-certs.sh makes no {variable}"
        # The mounts of docker-compose.yml are still there, next to the certificates.
        assert [v for v in base["services"][name]["volumes"] if v not in service["volumes"]] == []
        cfg = load_config(REPO / "configs/compose.yaml", environ={k: str(v) for k, v in env.items()})
        assert cfg.redis.url == "rediss://redis:6379/0" and cfg.redis.password == PASSWORD
        files = (cfg.redis.tls_ca_file, cfg.redis.tls_cert_file, cfg.redis.tls_key_file)
        assert files == tuple(env[variable] for variable in TLS_ENV)
    # Nothing else changes (Redis and its exporter have tests of their own below).
    plain = _merged(*([COMPOSE_CPU_FILE] if cpu else []))
    others = set(merged["services"]) - set(clients) - {"redis", "redis-exporter"}
    assert {name: merged["services"][name] for name in others} == {name: plain["services"][name] for name in others}


def test_the_redis_exporter_connects_with_tls_and_the_server_certificate(certs: Path) -> None:
    exporter = interpolate(_merged(COMPOSE_TLS_FILE)["services"]["redis-exporter"])
    env = exporter["environment"]
    assert env["REDIS_ADDR"] == "rediss://redis:6379" and env["REDIS_PASSWORD"] == PASSWORD
    for variable in ("REDIS_EXPORTER_TLS_CA_CERT_FILE", "REDIS_EXPORTER_TLS_CLIENT_CERT_FILE",
                     "REDIS_EXPORTER_TLS_CLIENT_KEY_FILE"):  # fmt: skip
        mount = _mount_of(exporter, env[variable])
        assert mount["source"] == f"{CERTS_DIR}redis" and mount["read_only"] is True
        assert _host_path(mount, env[variable], certs).is_file()


def _redis_command(merged: dict[str, Any]) -> str:
    command = merged["services"]["redis"]["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    return str(command[2])


def test_redis_serves_only_tls_with_client_certificates_and_keeps_its_password(certs: Path) -> None:
    merged = _merged(COMPOSE_TLS_FILE)
    redis_service = merged["services"]["redis"]
    args = shlex.split(_redis_command(merged))
    assert args[:2] == ["exec", "redis-server"]
    options = dict(zip(args[2::2], args[3::2], strict=True))
    assert options["--port"] == "0" and options["--tls-port"] == "6379" and options["--tls-auth-clients"] == "yes"
    assert options["--requirepass"] == "$$REDIS_PASSWORD" and options["--appendonly"] == "yes"
    for option in ("--tls-ca-cert-file", "--tls-cert-file", "--tls-key-file"):
        mount = _mount_of(redis_service, options[option])
        assert mount["source"] == f"{CERTS_DIR}redis" and mount["read_only"] is True
        assert _host_path(mount, options[option], certs).is_file()
    assert "redis-data:/data" in redis_service["volumes"]
    kind, check = redis_service["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and check.startswith("redis-cli --tls ") and check.endswith("ping | grep -q PONG")
    for path in re.findall(r"--(?:cacert|cert|key) (\S+)", check):
        assert _mount_of(redis_service, path)["source"] == f"{CERTS_DIR}redis"
    # The client side keeps the password out of the URL, as docker-compose.yml does.
    assert re.search(r"rediss?://[^@\s]*@", COMPOSE_TLS_FILE.read_text()) is None


def test_make_certs_gives_the_client_key_to_the_images_user_only_through_the_mount(certs: Path) -> None:
    assert {p.name for p in (certs / "redis").iterdir()} == {p.name for p in (certs / "client").iterdir()} == CERT_FILES
    assert certs.stat().st_mode & 0o777 == 0o700, "other users of the host cannot reach any key"
    assert (certs / "redis/tls.key").stat().st_mode & 0o777 == 0o600
    assert (certs / "client/tls.key").stat().st_mode & 0o004, "uid 10001 in the containers reads the client key"


# --- Compose, for real: the override's redis-server command line and a client built from its environment ----------


@pytest.fixture(scope="module")
def tls_redis(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A local redis-server running the override's command line (paths and port mapped), stopped by its pid."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server is not installed")
    data, port = tmp_path_factory.mktemp("redis-data"), free_port()
    command = interpolate(_redis_command(_merged(COMPOSE_TLS_FILE)))
    command = command.replace("/etc/redis-tls", str(certs / "redis")).replace("--dir /data", f"--dir {data}")
    command = command.replace("--tls-port 6379", f"--tls-port {port}") + " --bind 127.0.0.1 --save ''"
    log = (data / "redis.log").open("wb")
    server = subprocess.Popen(["sh", "-c", command], env={**os.environ, "REDIS_PASSWORD": PASSWORD},
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not _healthcheck(certs, port):
            log_text = (data / "redis.log").read_text()
            assert server.poll() is None and time.monotonic() < deadline, f"redis-server is not healthy: {log_text}"
            time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=15)
        log.close()


def _healthcheck(certs: Path, port: int) -> bool:
    """The override's healthcheck command, run against the local server."""
    _, check = _merged(COMPOSE_TLS_FILE)["services"]["redis"]["healthcheck"]["test"]
    check = check.replace("/etc/redis-tls", str(certs / "redis")).replace("redis-cli ", f"redis-cli -p {port} ", 1)
    env = {**os.environ, "REDISCLI_AUTH": PASSWORD}
    return subprocess.run(["sh", "-c", check], env=env, capture_output=True, timeout=30).returncode == 0


def _client_environment(certs: Path, port: int) -> dict[str, str]:
    """The rollout service's merged environment, with the certificate folder and Redis address of this machine."""
    env = interpolate(_merged(COMPOSE_TLS_FILE)["services"]["rollout"]["environment"])
    env = {key: str(value).replace("/etc/redis-tls", str(certs / "client")) for key, value in env.items()}
    env["DIPO_REDIS__URL"] = env["DIPO_REDIS__URL"].replace("redis:6379", f"localhost:{port}")
    return env


async def test_clients_from_the_override_environment_talk_to_the_tls_redis(tls_redis: int, certs: Path) -> None:
    cfg = load_config(REPO / "configs/compose.yaml", environ=_client_environment(certs, tls_redis))
    assert cfg.redis.url is not None and cfg.redis.url.startswith("rediss://localhost:")
    async_client, sync_client = clients_from_config(cfg.redis)
    try:
        assert await async_client.ping() is True
        await async_client.xadd("tls-check", {"k": "v"})
        assert sync_client.xlen("tls-check") == 1
    finally:
        await async_client.aclose()
        sync_client.close()


def test_tls_redis_refuses_plaintext_and_clients_without_a_certificate(tls_redis: int, certs: Path) -> None:
    no_cert = connect_sync(f"rediss://localhost:{tls_redis}/0", retries=0, password=PASSWORD,
                           ssl_ca_certs=str(certs / "client/ca.crt"))  # fmt: skip
    plaintext = connect_sync(f"redis://localhost:{tls_redis}/0", retries=0, password=PASSWORD, timeout_s=5)
    for client in (no_cert, plaintext):
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        client.close()


@pytest.mark.parametrize("name", ["redis", "redis.dipo.svc.cluster.local", "evil.example"])
def test_server_certificate_names_the_compose_and_kubernetes_hosts(name: str, tls_redis: int, certs: Path) -> None:
    context = ssl.create_default_context(cafile=str(certs / "client/ca.crt"))
    context.load_cert_chain(str(certs / "client/tls.crt"), str(certs / "client/tls.key"))
    with socket.create_connection(("127.0.0.1", tls_redis), timeout=10) as sock:
        if name == "evil.example":
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                context.wrap_socket(sock, server_hostname=name)
            return
        with context.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(b"PING\r\n")
            assert tls.recv(64).startswith(b"-NOAUTH"), "handshake with the client certificate, then requirepass"


# --- Kubernetes -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return _render(K8S_TLS)


@pytest.fixture(scope="module")
def gpu_tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TLS overlay with `../../base` changed to the GPU overlay, as its kustomization.yaml says to do."""
    folder = tmp_path_factory.mktemp("gpu-tls")
    for path in K8S_TLS.iterdir():
        shutil.copy(path, folder / path.name)
    text = (folder / "kustomization.yaml").read_text()
    assert text.count("  - ../../base\n") == 1
    gpu = os.path.relpath(K8S_GPU, folder)  # kustomize takes no absolute path
    (folder / "kustomization.yaml").write_text(text.replace("  - ../../base\n", f"  - {gpu}\n"))
    return folder


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if pod_specs(doc)}


def _container_env(pod: dict[str, Any], container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment from its ConfigMaps and literal values (secret references left out)."""
    maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= maps[source["configMapRef"]["name"]]
    return env | {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _secret_mount(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(secret name, key) that the file `path` of `container` comes from; fails if it is not a secret file."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            assert mount.get("readOnly") is True, mount
            secret = volumes[mount["name"]]["secret"]
            # 0440 and an fsGroup: readable by the pod's user through the group, by no one else.
            assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] > 0
            return secret["secretName"], os.path.relpath(path, mount["mountPath"])
    raise AssertionError(f"{path} is in no volume mount of {container['name']}")


@pytest.mark.parametrize("overlay", ["tls", "gpu+tls"])
def test_every_redis_client_pod_connects_with_tls_and_the_client_secret(overlay: str, gpu_tls: Path) -> None:
    docs = _render(K8S_TLS if overlay == "tls" else gpu_tls)
    base = _workloads(_render(K8S_BASE))
    clients = []
    for name, doc in _workloads(docs).items():
        (pod,) = pod_specs(doc)
        for container in pod["containers"]:
            env = _container_env(pod, container, docs)
            if "DIPO_REDIS__URL" not in env:
                continue
            clients.append(name)
            assert env["DIPO_REDIS__URL"] == "rediss://redis:6379/0", name
            for variable in TLS_ENV:
                secret, key = _secret_mount(pod, container, env[variable])
                assert secret == CLIENT_SECRET and key in CERT_FILES, f"{name}: {variable}"
            # Everything the base mounts is still mounted.
            (base_pod,) = pod_specs(base[name])
            assert {v["name"] for v in base_pod.get("volumes", [])} < {v["name"] for v in pod["volumes"]}
    assert {"learner", "reward", "rollout"} <= set(clients)
    assert "redis://" not in yaml.safe_dump_all(docs), "no plaintext Redis URL left anywhere"
    if overlay == "gpu+tls":
        rollout = pod_specs(_workloads(docs)["rollout"])[0]["containers"][0]
        assert rollout["resources"]["limits"]["nvidia.com/gpu"] == 1 and rollout["image"] == "dipo:gpu"


def _redis_pod(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (pod,) = pod_specs(_workloads(docs)["redis"])
    (container,) = [c for c in pod["containers"] if c["name"] == "redis"]
    return pod, container


def test_redis_pod_serves_only_tls_with_the_server_secret(rendered: list[dict[str, Any]]) -> None:
    pod, container = _redis_pod(rendered)
    assert container["command"] == ["sh", "-c"]
    (line,) = container["args"]
    # The same command line as the Compose override (run for real above), with Kubernetes' `$` for Compose's `$$`.
    compose = interpolate(_redis_command(_merged(COMPOSE_TLS_FILE)))
    assert line.split() == compose.split()
    args = shlex.split(line)
    options = dict(zip(args[2::2], args[3::2], strict=True))
    assert options["--port"] == "0" and options["--tls-port"] == "6379" and options["--tls-auth-clients"] == "yes"
    for option in ("--tls-ca-cert-file", "--tls-cert-file", "--tls-key-file"):
        assert _secret_mount(pod, container, options[option]) == (SERVER_SECRET, Path(options[option]).name)
    _, compose_check = _merged(COMPOSE_TLS_FILE)["services"]["redis"]["healthcheck"]["test"]
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["sh", "-c"] and command[2].split() == compose_check.split(), probe
    assert {"name": "redis", "containerPort": 6379} in container["ports"]
    assert any(env["name"] == "REDIS_PASSWORD" and "secretKeyRef" in env["valueFrom"] for env in container["env"])


def test_k8s_run_config_is_valid_with_the_tls_environment(rendered: list[dict[str, Any]]) -> None:
    env = next(doc["data"] for doc in rendered if doc["metadata"]["name"].startswith("dipo-env"))
    cfg = load_config(K8S_BASE / "run.yaml", environ=env | {"DIPO_REDIS__PASSWORD": PASSWORD})
    assert cfg.redis.url == "rediss://redis:6379/0" and cfg.redis.tls_key_file == "/etc/redis-tls/tls.key"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: nothing to compare with")
def test_python_kustomize_subset_renders_the_tls_overlay_like_kubectl(rendered: list[dict[str, Any]]) -> None:
    ours, theirs = by_kind_and_name(kustomize_build(K8S_TLS)), by_kind_and_name(rendered)
    assert sorted(ours) == sorted(theirs)
    assert [key for key in ours if ours[key] != theirs[key]] == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ["tls", "gpu+tls"])
def test_tls_manifests_validate_against_the_kubernetes_schemas(overlay: str, version: str, gpu_tls: Path) -> None:
    docs = _render(K8S_TLS if overlay == "tls" else gpu_tls)
    assert {"StatefulSet", "Deployment", "ConfigMap"} <= {doc["kind"] for doc in docs}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    templates = list(yaml.safe_load_all((K8S_TLS / "secret.template.yaml").read_text()))
    for template in templates:
        kubernetes_validate.validate(template, version, strict=True)
        assert template["stringData"].keys() == CERT_FILES and set(template["stringData"].values()) == {"CHANGE-ME"}
    mounted = {v["secret"]["secretName"] for d in docs for p in pod_specs(d) for v in p["volumes"] if "secret" in v}
    assert {t["metadata"]["name"] for t in templates} == mounted == {SERVER_SECRET, CLIENT_SECRET}
    kustomization = yaml.safe_load((K8S_TLS / "kustomization.yaml").read_text())
    assert "secret.template.yaml" not in [*kustomization["resources"], *(p["path"] for p in kustomization["patches"])]
