"""Deployment files against external schemas and against the code.

- ``docker-compose.yml``, the CPU override and the GPU layouts (alone and merged) validate against the Compose
  Specification's JSON schema, the copy vendored by the ``check-jsonschema`` package (no network).
- Every kustomization renders, with ``kubectl kustomize`` where kubectl is installed and otherwise with the kustomize
  subset of ``tests/deploy_helpers.py``, and every rendered built-in manifest validates against the Kubernetes JSON
  schemas that the ``kubernetes-validate`` package ships (strict: an unknown field is an error); custom resources
  (KEDA, Prometheus Operator) are checked in ``test_deploy_k8s_extras.py``. Where kubectl is installed the Python
  renderer is also checked to produce what kubectl produces.
- Every ``dipo_*`` series the Grafana dashboards query is one the code registers, every ``redis_*`` one the Redis
  exporter serves, and ``docs/METRICS.md`` lists exactly the metrics of the three services' registries.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    DEPLOY,
    GPU_LAYOUTS,
    K8S,
    REPO,
    by_kind_and_name,
    compose_errors,
    config_map_refs,
    interpolate,
    kubectl_build,
    kustomize_build,
    load_compose,
    merged_compose,
    pod_specs,
    render,
)

K8S_BASE = K8S / "base"
OVERLAYS = {"base": K8S_BASE, "gpu": K8S / "overlays/gpu", "keda": K8S / "overlays/keda"}
DASHBOARDS = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor", "PrometheusRule"}
"""Kinds kubernetes-validate does not know (CRDs): deploy/k8s/schemas/ holds theirs."""
REDIS_EXPORTER_SERIES = {"redis_up", "redis_memory_used_bytes", "redis_memory_max_bytes", "redis_stream_length",
                         "redis_stream_group_lag", "redis_stream_group_messages_pending"}  # fmt: skip
"""The redis_exporter (v1.88) series the dashboards and alerts use (its exporter/streams.go and exporter/info.go)."""

# The oldest Kubernetes deploy/README.md supports (kubectl 1.27+, kustomize v5) and the newest the package knows.
K8S_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]


# --- Compose ----------------------------------------------------------------------------------------------------------


def _compose_documents() -> dict[str, Any]:
    documents = {"compose": load_compose(COMPOSE_FILE), "cpu-override": load_compose(COMPOSE_CPU_FILE),
                 "compose+cpu": merged_compose(COMPOSE_CPU_FILE)}  # fmt: skip
    for gpus, path in GPU_LAYOUTS.items():
        documents[f"layout-{gpus}gpu"] = load_compose(path)
        documents[f"compose+{gpus}gpu"] = merged_compose(path)
    return documents


@pytest.mark.parametrize("interpolated", [False, True], ids=["raw", "interpolated"])
@pytest.mark.parametrize("name", sorted(_compose_documents()))
def test_compose_files_validate_against_the_compose_spec(name: str, interpolated: bool) -> None:
    document = _compose_documents()[name]
    assert compose_errors(interpolate(document) if interpolated else document) == []


def test_cpu_override_merge_drops_the_gpu_reservations() -> None:
    services = _compose_documents()["compose+cpu"]["services"]
    assert "deploy" not in services["learner"] and "deploy" not in services["rollout"]
    assert "deploy" not in services["gpu-layout"] and services["gpu-layout"]["command"] == ["gpu-layout", "--cpu"]
    assert services["reward"]["deploy"]["replicas"] == 2
    assert services["rollout"]["environment"]["DIPO_ROLLOUT__BACKEND"] == "hf"
    assert services["rollout"]["environment"]["DIPO_REDIS__URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("services", "redis", "helthcheck"), {}, "'helthcheck' was unexpected"),
        (("services", "redis", "healthcheck", "interval"), 5, "is not of type 'string'"),
        (("services", "rollout", "deploy", "resources", "reservations", "devices"), {}, "is not of type 'array'"),
    ],
)
def test_compose_schema_rejects_a_broken_file(path: tuple[str, ...], value: Any, message: str) -> None:
    document = copy.deepcopy(_compose_documents()["compose"])
    parent = functools.reduce(lambda node, key: node[key], path[:-1], document)
    parent[path[-1]] = value
    assert any(message in error for error in compose_errors(document))


# --- Kubernetes -------------------------------------------------------------------------------------------------------


@functools.cache
def _rendered(overlay: str) -> list[dict[str, Any]]:
    return render(OVERLAYS[overlay])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kustomizations_render(overlay: str) -> None:
    docs = _rendered(overlay)
    config_maps = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "ConfigMap"}
    images, refs = {}, {}
    for doc in docs:
        for pod in pod_specs(doc):
            images[doc["metadata"]["name"]] = pod["containers"][0]["image"]
            refs[doc["metadata"]["name"]] = {ref["name"] for ref in config_map_refs(pod)}
    assert {name for name, used in refs.items() if not used <= config_maps} == set(), "a missing ConfigMap"
    assert all(len(refs[name]) == 2 for name in ("learner", "reward", "rollout")), "run config and environment"
    assert all(doc["metadata"].get("namespace") == "dipo" for doc in docs if doc["kind"] != "Namespace")
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dipo" for doc in docs)
    tag = "cpu" if overlay == "base" else "gpu"
    assert images["learner"] == images["rollout"] == f"dipo:{tag}" and images["reward"] == "dipo-reward:latest"
    assert images["redis"].startswith("redis:7")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    docs = _rendered(overlay)
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment", "NetworkPolicy"} <= kinds
    assert ("HorizontalPodAutoscaler" in kinds) == (overlay != "keda"), "KEDA replaces the reward HPA"
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises with the path of the first bad field


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_secret_template_validates_against_the_kubernetes_schemas(version: str) -> None:
    (template,) = yaml.safe_load_all((K8S_BASE / "secret.template.yaml").read_text())
    kubernetes_validate.validate(template, version, strict=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(imagePullPolicyy="Always"), "'imagePullPolicyy' was unexpected"),
        (lambda c: c["ports"][0].update(containerPort="8000"), "'8000' is not of type 'integer'"),
        (lambda c: c.pop("name"), "'name' is a required property"),
    ],
    ids=["unknown-field", "wrong-type", "missing-name"],
)
def test_kubernetes_schemas_reject_a_broken_container(change: Any, message: str) -> None:
    rollout = copy.deepcopy(by_kind_and_name(_rendered("gpu"))["Deployment", "rollout"])
    change(rollout["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(message)):
        kubernetes_validate.validate(rollout, K8S_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: nothing to compare with")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_python_kustomize_subset_renders_what_kubectl_renders(overlay: str) -> None:
    ours = by_kind_and_name(kustomize_build(OVERLAYS[overlay]))
    theirs = by_kind_and_name(kubectl_build(OVERLAYS[overlay]))
    assert sorted(ours) == sorted(theirs)
    assert [key for key in ours if ours[key] != theirs[key]] == []


def test_python_kustomize_subset_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {team: a}\n")
    with pytest.raises(NotImplementedError, match="commonLabels"):
        kustomize_build(tmp_path)


# --- metrics ----------------------------------------------------------------------------------------------------------

# Series a family of each type exposes (prometheus_client names a counter's family without its `_total`).
_SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


@pytest.fixture(scope="module")
def registered() -> dict[str, str]:
    """Family name -> type of every metric the reward service, rollout server and learner register."""
    from learner.metrics import LearnerMetrics
    from reward_service.metrics import RewardMetrics
    from rollout_server.metrics import RolloutMetrics

    registries = [RewardMetrics().component.registry, RolloutMetrics().component.registry]
    registries.append(LearnerMetrics().component.registry)
    return {family.name: family.type for registry in registries for family in registry.collect()}


def registered_series(registered: dict[str, str]) -> set[str]:
    """Every series name the registries expose."""
    return {family + suffix for family, kind in registered.items() for suffix in _SERIES_SUFFIXES[kind]}


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `(dipo_[a-z_]+)` \| (\w+) \|", (REPO / "docs/METRICS.md").read_text(), re.MULTILINE)
    families = {}
    for name, kind in rows:
        suffix = _SERIES_SUFFIXES[kind][0] if kind == "counter" else ""
        assert name.endswith(suffix), f"docs/METRICS.md: write the counter {name} as it is exposed, with {suffix}"
        families[name.removesuffix(suffix)] = kind
    return families


def test_registries_use_only_the_documented_naming(registered: dict[str, str]) -> None:
    assert len(registered) > 40
    assert all(re.fullmatch(r"dipo_(learner|reward|rollout)_[a-z_]+", name) for name in registered)
    assert set(registered.values()) <= set(_SERIES_SUFFIXES)


def test_metrics_doc_lists_exactly_the_registered_metrics(registered: dict[str, str]) -> None:
    documented = _documented()
    assert {n: k for n, k in documented.items() if registered.get(n) != k} == {}, "documented but not registered"
    assert {n: k for n, k in registered.items() if documented.get(n) != k} == {}, "registered but not documented"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_query_only_registered_metrics(path: Path, registered: dict[str, str]) -> None:
    panels = json.loads(path.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    queried = {name for expr in exprs for name in re.findall(r"\b(?:dipo|redis)_[a-z_]+", expr)}
    assert len(queried) >= 10
    assert sorted(queried - registered_series(registered) - REDIS_EXPORTER_SERIES) == []
    assert "redis_stream_group_lag" in queried or path.name != "system.json", "the backlog panel"
