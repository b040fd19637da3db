"""Deployment artifacts (deploy/, docker-compose.yml): parsed and cross-checked against the code and the docs.

No Docker engine runs here, so the images are not built; these tests read the files the way a reviewer would and
check that they agree with each other, with ``services/config.py`` and ``pyproject.toml``. The checks against
external schemas (Compose Specification, Kubernetes) and against the metrics the code registers are in
``test_deploy_schemas.py``.
"""

from __future__ import annotations

import ast
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import dockerfile_stages, load_compose_all

from services.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_CPU_FILE = DEPLOY / "docker/compose.cpu.yaml"
DOCKERFILE = DEPLOY / "docker/Dockerfile"
ENTRYPOINT = DEPLOY / "docker/entrypoint.sh"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
K8S_GPU = K8S / "overlays/gpu"
DASHBOARDS = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))

# Service name -> (python module, HTTP port) of the service contract.
SERVICES = {"learner": ("learner", 8002), "reward": ("reward_service", 8001), "rollout": ("rollout_server", 8000)}
TORCH_STACK = {"torch", "transformers", "vllm", "accelerate", "safetensors", "gguf", "reasoning_gym", "matplotlib"}


COMPOSE_OVERRIDES = {COMPOSE_CPU_FILE, DEPLOY / "docker/compose.tls.yaml", *(DEPLOY / "docker/gpus").glob("*.yaml")}
"""Compose files merged over docker-compose.yml: the only ones that may use Compose's merge tags."""


def _yaml_files() -> list[Path]:
    return sorted({*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), COMPOSE_FILE})


def _load_all(path: Path) -> list[Any]:
    text = path.read_text()
    docs = load_compose_all(text) if path in COMPOSE_OVERRIDES else list(yaml.safe_load_all(text))
    return [doc for doc in docs if doc is not None]


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _interpolate(value: Any) -> str:
    """Resolve Compose `${VAR:-default}` to its default and `${VAR:?msg}` (a required secret) to a dummy value."""

    def resolve(match: re.Match[str]) -> str:
        op, arg = match.group(2), match.group(3)
        if op == "?":
            return "secret-value"
        return arg if op == "-" else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}", resolve, str(value)).replace("$$", "$")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of `environment` so overrides merge"
    return {key: _interpolate(value) for key, value in env.items()}


def _k8s_docs(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(folder.rglob("*.yaml")):
        if path.name in ("kustomization.yaml", "run.yaml") or path.name.endswith(".values.yaml"):
            continue  # kustomize's own files, the run config, Helm values: not manifests
        for doc in _load_all(path):
            yield path, doc


def _workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_docs(K8S_BASE) if doc["kind"] in ("Deployment", "StatefulSet")]


def _workload(name: str) -> dict[str, Any]:
    return next(doc for doc in _workloads() if doc["metadata"]["name"] == name)


def _kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _env_literals(folder: Path, name: str = "dipo-env") -> dict[str, str]:
    generator = next(g for g in _kustomization(folder)["configMapGenerator"] if g["name"] == name)
    return dict(item.split("=", 1) for item in generator["literals"])


# --- every file parses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path: Path) -> None:
    if path in COMPOSE_OVERRIDES:
        # Compose's merge tags are rejected by a plain safe loader; nothing but them is allowed here.
        assert set(re.findall(r"!\w+", path.read_text())) <= {"!reset", "!override"}
    else:
        list(yaml.safe_load_all(path.read_text()))
    assert _load_all(path), f"{path} is empty"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_are_valid_json_with_unique_panel_ids(path: Path) -> None:
    board = json.loads(path.read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"].startswith("dipo-")
    assert [p for p in board["panels"] if p["type"] != "row"], "a dashboard without panels"


# --- docker compose -------------------------------------------------------------------------------------------------


def test_compose_has_every_service() -> None:
    assert {"redis", "learner", "reward", "rollout", "prometheus", "grafana"} <= set(_compose()["services"])


def test_redis_keeps_an_append_only_file_and_requires_a_password() -> None:
    redis = _compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and '--requirepass "$$REDIS_PASSWORD"' in command
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_reward_runs_two_replicas_and_learner_and_rollout_reserve_gpus_of_their_own() -> None:
    services = _compose()["services"]
    assert services["reward"]["deploy"]["replicas"] == 2
    devices = {}
    for name in ("learner", "rollout"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        # device_ids, never `count: 1`: Docker gives a count the first GPUs, so every service would get GPU 0
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" not in device
        devices[name] = [_interpolate(gpu) for gpu in device["device_ids"]]
    assert devices == {"learner": ["0"], "rollout": ["1"]}
    # --scale (on CPU) needs the replicas free of fixed names and host ports.
    assert "container_name" not in services["rollout"] and "ports" not in services["rollout"]


def test_every_http_service_has_a_healthcheck() -> None:
    for name, service in _compose()["services"].items():
        if "expose" in service or "ports" in service:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dipo_services_follow_the_contract(name: str) -> None:
    module, port = SERVICES[name]
    service = _compose()["services"][name]
    command = [_interpolate(part) for part in service["command"]]
    start = command.index("-m")
    assert command[start : start + 4] == ["-m", module, "--config", "/etc/dipo/run.yaml"]
    if name == "learner":
        assert command[:start] == ["torchrun", "--standalone", "--nproc-per-node", "1", "--shutdown-timeout", "270"]
        assert command[start + 4 :] == ["--resume", "auto"], "a restarted container resumes its run"
    else:
        assert command[start + 4 :] == []
    env = _environment(service)
    section = module.split("_")[0]
    assert env[f"DIPO_{section.upper()}__SERVER__HOST"] == "0.0.0.0"
    assert env[f"DIPO_{section.upper()}__SERVER__PORT"] == str(port)
    assert str(port) in [str(p) for p in service["expose"]]
    assert service["healthcheck"]["test"][-1] == str(port)
    assert "./configs/compose.yaml:/etc/dipo/run.yaml:ro" in service["volumes"]
    assert any(volume.startswith("dipo-data:") for volume in service["volumes"]) or name == "reward"


def test_compose_secrets_are_required_variables_never_literals() -> None:
    text = COMPOSE_FILE.read_text()
    for key, value in re.findall(r"^\s+([A-Z_]*(?:PASSWORD|TOKEN|REDISCLI_AUTH)[A-Z_]*): (.+)$", text, re.MULTILINE):
        assert value.startswith("${") and ":?" in value, f"{key} must come from a required variable"
    assert re.search(r"redis://[^@\s]*@", text) is None, "no password inside the Redis URL"


@pytest.mark.parametrize("override", [None, COMPOSE_CPU_FILE], ids=["gpu", "cpu"])
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_environment_resolves_to_a_valid_config(name: str, override: Path | None) -> None:
    env = _environment(_compose()["services"][name])
    if override is not None:
        env |= _environment(_load_all(override)[0]["services"].get(name, {}))
    cfg = load_config(REPO / "configs/compose.yaml", environ=env)
    assert cfg.redis.url == "redis://redis:6379/0" and cfg.redis.password == "secret-value"
    assert str(cfg.resolved_run_dir) == "/data/runs/compose"
    if name == "rollout":
        assert cfg.rollout.backend == ("hf" if override else "vllm")
        assert cfg.rollout.device == ("cpu" if override else "cuda")


def test_cpu_override_drops_gpu_reservations_and_uses_the_cpu_image() -> None:
    override = _load_all(COMPOSE_CPU_FILE)[0]["services"]
    for name in ("learner", "rollout"):
        assert override[name]["deploy"] is None
        assert override[name]["build"]["target"] == "cpu"
    assert override["gpu-layout"]["deploy"] is None and override["gpu-layout"]["command"] == ["gpu-layout", "--cpu"]
    gpu_services = [n for n, s in _compose()["services"].items() if "reservations" in str(s.get("deploy", ""))]
    assert sorted(gpu_services) == ["gpu-layout", "learner", "rollout", "rollout-2", "rollout-3", "rollout-4"]
    # the GPU layouts' extra rollout servers stay off unless a layout file turns them on
    assert all(_compose()["services"][f"rollout-{i}"]["profiles"] == ["layout"] for i in (2, 3, 4))


def test_learner_gets_the_time_to_checkpoint_on_a_stop_and_restarts_only_on_failure() -> None:
    learner = _compose()["services"]["learner"]
    # the learner's SIGTERM checkpoint: torchrun gives its ranks 270 s, Docker the container 300 s, as dipo run does
    assert learner["stop_grace_period"] == "300s"
    assert learner["command"][learner["command"].index("--shutdown-timeout") + 1] == "270"
    # a finished run exits 0 and stays down; a crash restarts into --resume auto
    assert learner["restart"] == "on-failure"


# --- images ---------------------------------------------------------------------------------------------------------


def _setup_no_deps_pins() -> list[str]:
    line = next(line for line in (REPO / "scripts/setup.sh").read_text().splitlines() if "--no-deps" in line)
    return re.findall(r'"([a-z0-9-]+==[^"]+)"', line)


def test_dockerfile_builds_cpu_gpu_and_reward_targets() -> None:
    assert {"cpu", "gpu", "reward"} <= set(dockerfile_stages())


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_torch_images_install_the_no_deps_packages_like_setup(stage: str) -> None:
    pins = _setup_no_deps_pins()
    assert len(pins) == 2
    text = dockerfile_stages()[stage]
    lines = [line for line in text.splitlines() if re.search(r"pip install (--system )?--no-deps", line)]
    assert any(all(pin in line for pin in pins) for line in lines), f"{stage} must install {pins} with --no-deps"


def test_images_pin_the_project_torch() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(dep for dep in deps if dep.startswith("torch"))
    stages = dockerfile_stages()
    assert f"pip install --no-deps {torch_pin} --index-url" in stages["cpu"]
    assert "download.pytorch.org/whl/cpu" in stages["cpu"]
    # The gpu image keeps the vLLM base image's torch: the tag whose vLLM pins the project's torch, and lock.sh
    # resolves the gpu lock against exactly that pair.
    assert "ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0" in DOCKERFILE.read_text()
    assert f"printf 'vllm==0.32.0\\n{torch_pin}\\n'" in (DEPLOY / "docker/lock.sh").read_text()
    assert '"/opt/dipo/src[vllm,tracking]"' in stages["gpu"]


def test_dockerfile_never_copies_a_virtualenv_or_the_whole_context() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(("COPY", "ADD")):
            assert ".venv" not in line and not re.match(r"(COPY|ADD)( --\S+)* \. ", line), line
    assert ".venv" in (DEPLOY / "docker/Dockerfile.dockerignore").read_text().split()


def test_reward_image_installs_the_project_without_torch() -> None:
    stage = dockerfile_stages()["reward"]
    installs = [line for line in stage.splitlines() if "pip install" in line]
    assert any("--no-deps /opt/dipo/src" in line for line in installs)
    assert not any("torch" in line for line in installs)


def test_reward_requirements_are_the_pyproject_entries() -> None:
    deps = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    lines = (DEPLOY / "docker/requirements-reward.txt").read_text().splitlines()
    required = [line for line in lines if line and not line.startswith("#")]
    assert required and set(required) <= deps, set(required) - deps
    names = {re.split(r"[\[<>=]", line)[0].replace("-", "_") for line in required}
    assert not names & TORCH_STACK


def _module_path(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import name` may name a submodule: follow it when it is one.
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _third_party_closure(package: str) -> dict[str, str]:
    """Third-party top-level modules reachable from every module of `package` through first-party imports."""
    first_party = {"services", "runner", "learner", "rollout_server", "reward_service"}
    todo = list((REPO / package).rglob("*.py"))
    seen: set[Path] = set()
    found: dict[str, str] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported_modules(path):
            top = module.split(".")[0]
            if top in first_party:
                target = _module_path(module)
                todo += [target] if target is not None else []
            elif top not in sys.stdlib_module_names:
                found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_reward_service_imports_only_what_the_reward_image_installs() -> None:
    imports = _third_party_closure("reward_service")
    heavy = {name: where for name, where in imports.items() if name in TORCH_STACK}
    assert heavy == {}, "the reward image has no torch stack"
    lines = (DEPLOY / "docker/requirements-reward.txt").read_text().splitlines()
    installed = {re.split(r"[\[<>=]", line)[0].replace("-", "_") for line in lines if line and line[0] != "#"}
    aliases = {"yaml": "pyyaml"}
    missing = {name for name in imports if aliases.get(name, name) not in installed}
    assert missing == set(), f"imported by the reward service but not in requirements-reward.txt: {missing}"


# --- entrypoint -----------------------------------------------------------------------------------------------------


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        return


def test_entrypoint_healthcheck_passes_on_200_and_fails_otherwise() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        run = [shutil.which("sh") or "/bin/sh", str(ENTRYPOINT), "healthcheck", port]
        assert subprocess.run(run, capture_output=True, timeout=30).returncode == 0
        assert subprocess.run([*run, "/broken"], capture_output=True, timeout=30).returncode == 1
    finally:
        server.shutdown()
        server.server_close()


def test_entrypoint_runs_other_commands_and_rejects_none() -> None:
    done = subprocess.run(["sh", str(ENTRYPOINT), "echo", "hello"], capture_output=True, text=True, timeout=30)
    assert done.stdout == "hello\n"
    assert subprocess.run(["sh", str(ENTRYPOINT)], capture_output=True, timeout=30).returncode == 2


# --- kubernetes -----------------------------------------------------------------------------------------------------


def test_every_manifest_names_its_api_kind_and_name() -> None:
    docs = list(_k8s_docs(K8S))
    assert len(docs) >= 12
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path


@pytest.mark.parametrize("folder", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomization_references_exist(folder: Path) -> None:
    kustomization = _kustomization(folder)
    paths = [*kustomization.get("resources", []), *(p["path"] for p in kustomization.get("patches", []))]
    paths += [f for g in kustomization.get("configMapGenerator", []) for f in g.get("files", [])]
    assert paths
    for ref in paths:
        assert (folder / ref).exists(), f"{folder.name}: {ref} does not exist"


def test_secrets_are_referenced_never_committed() -> None:
    assert "secret.template.yaml" not in _kustomization(K8S_BASE)["resources"]
    template = _load_all(K8S_BASE / "secret.template.yaml")[0]
    assert set(template["stringData"].values()) == {"CHANGE-ME"}
    refs = []
    for workload in _workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if re.search(r"PASSWORD|TOKEN|AUTH", env["name"]):
                    assert "value" not in env, f"{workload['metadata']['name']}: {env['name']} is inline"
                    ref = env["valueFrom"]["secretKeyRef"]
                    refs.append((ref["name"], ref["key"]))
    assert len(refs) >= 6 and set(refs) == {("dipo-secrets", key) for key in template["stringData"]}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_services_probe_health_and_are_scraped(name: str) -> None:
    _, port = SERVICES[name]
    template = _workload(name)["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "http"] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    annotations = template["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    section = SERVICES[name][0].split("_")[0].upper()
    assert env[f"DIPO_{section}__SERVER__HOST"] == "0.0.0.0" and env[f"DIPO_{section}__SERVER__PORT"] == str(port)


def test_learner_runs_torchrun_in_a_single_pod_statefulset() -> None:
    learner = _workload("learner")
    assert learner["kind"] == "StatefulSet" and learner["spec"]["replicas"] == 1
    (container,) = learner["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["torchrun"]
    assert container["args"] == ["--standalone", "--nproc-per-node", "$(NPROC)", "--shutdown-timeout", "270", "-m",
                                 "learner", "--config", "/etc/dipo/run.yaml", "--resume", "auto"]  # fmt: skip
    # the pod's grace period covers torchrun's shutdown timeout (the learner checkpoints on SIGTERM)
    assert learner["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    names = [e["name"] for e in container["env"]]
    assert "NPROC" in names and names.index("POD_IP") < names.index("DIPO_LEARNER__WEIGHT_SYNC_ADVERTISE")


def test_redis_statefulset_persists_and_requires_the_secret_password() -> None:
    redis = _workload("redis")
    container, exporter = redis["spec"]["template"]["spec"]["containers"]
    assert "--appendonly yes" in container["args"][0] and '--requirepass "$REDIS_PASSWORD"' in container["args"][0]
    assert "--maxmemory 6gb --maxmemory-policy noeviction" in container["args"][0]
    env = {item["name"]: item for item in exporter["env"]}
    assert exporter["name"] == "redis-exporter" and env["REDIS_ADDR"]["value"] == "redis://localhost:6379"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "dipo-secrets", "key": "redis-password"}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_reward_scales_on_cpu_and_rollout_independently() -> None:
    hpa = next(doc for _, doc in _k8s_docs(K8S_BASE) if doc["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "reward" and hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in _workload("reward")["spec"], "the HPA owns the replica count"
    assert _workload("rollout")["kind"] == "Deployment" and _workload("rollout")["spec"]["replicas"] >= 1


@pytest.mark.parametrize("overlay", [None, K8S_GPU], ids=["base", "gpu"])
def test_k8s_run_config_is_valid_with_the_pod_environment(overlay: Path | None) -> None:
    env = _env_literals(K8S_BASE) | (_env_literals(K8S_GPU) if overlay else {})
    env |= {"DIPO_REDIS__PASSWORD": "secret-value", "DIPO_ROLLOUT__SERVER__HOST": "0.0.0.0"}
    cfg = load_config(K8S_BASE / "run.yaml", environ=env)
    assert isinstance(cfg, RunConfig) and cfg.redis.url == "redis://redis:6379/0"
    if overlay:
        assert (cfg.model.dtype, cfg.rollout.backend, cfg.learner.device) == ("bfloat16", "vllm", "cuda")


def test_gpu_overlay_gives_learner_and_rollout_gpus() -> None:
    kustomization = _kustomization(K8S_GPU)
    assert {"name": "dipo", "newTag": "gpu"} in kustomization["images"]
    for patch in kustomization["patches"]:
        spec = _load_all(K8S_GPU / patch["path"])[0]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and spec["tolerations"][0]["key"] == "nvidia.com/gpu" and spec["nodeSelector"]
        if container["name"] == "learner":
            assert {"name": "NPROC", "value": str(gpus)} in container["env"]


# --- prometheus and grafana -----------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, (_, port) in SERVICES.items():
        (target,) = jobs[name]["dns_sd_configs"]
        assert target["names"] == [name] and target["port"] == port and jobs[name]["metrics_path"] == "/metrics"


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    grafana = _compose()["services"]["grafana"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    dashboards_mount = next(v for v in grafana["volumes"] if v.startswith("./deploy/grafana/dashboards:"))
    assert dashboards_mount.split(":")[1] == provider["providers"][0]["options"]["path"]
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def _expressions(path: Path) -> list[str]:
    board = json.loads(path.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    return [t["expr"] for p in panels for t in p["targets"]]


@pytest.mark.parametrize(
    ("name", "required"),
    [
        ("training.json", ["reward_mean", "accuracy", "tau", "gate_open", "group_kind_share", "reallocations",
                           "ppl_mean", "perplexity", "entropy", "clip_fraction", "staleness"]),
        ("system.json", ["stream_length", "stream_pending", "prompts_released_total", "dead_lettered_total",
                         "tokens_total", "groups_total",
                         "verify_seconds", "failure_rate", "weight_sync_seconds", "worker_restarts", "resets("]),
    ],
)  # fmt: skip
def test_dashboards_cover_what_they_promise(name: str, required: list[str]) -> None:
    text = "\n".join(_expressions(DEPLOY / "grafana/dashboards" / name))
    assert [item for item in required if item not in text] == []


# --- shipped configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [*sorted((REPO / "configs").glob("*.yaml")), K8S_BASE / "run.yaml"], ids=lambda p: p.name
)
def test_no_shipped_config_binds_all_interfaces(path: Path) -> None:
    cfg = load_config(path, environ={})
    hosts = {cfg.rollout.server.host, cfg.reward.server.host, cfg.learner.server.host}
    assert hosts.isdisjoint({"0.0.0.0", "::", "[::]"})
    assert "0.0.0.0" not in path.read_text()
