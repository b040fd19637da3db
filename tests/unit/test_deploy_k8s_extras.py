"""Kubernetes beyond the base: KEDA autoscaling (bounded by the staleness budget, on the run's own streams, with
the Redis password from the secret), the rollout pods' preStop drain, Prometheus-Operator monitors, the
ReadWriteOnce storage component, the documented storage patch, and the run volume's size formula. Custom resources
validate against deploy/k8s/schemas/ (kubernetes-validate does not know CRDs), strictly."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import K8S, by_kind_and_name, container_env, pod_specs, render
from test_deploy_schemas import CUSTOM_KINDS, K8S_VERSIONS

from learner.checkpoint import run_volume_bytes
from services.config import load_config
from services.contracts import PROMPTS, REWARD_GROUP, ROLLOUT_GROUP, ROLLOUTS
from services.streams import run_key

SCHEMAS = K8S / "schemas"
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
GIB = 1024**3


@functools.cache
def _schema(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group, version = api_version.split("/")
    schema = json.loads((SCHEMAS / f"{group}_{version}_{kind.lower()}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _schema(doc["apiVersion"], doc["kind"])
            .iter_errors(doc)]  # fmt: skip


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The GPU overlay with every component, as an operator's own overlay would list them."""
    folder = tmp_path_factory.mktemp("all") / "overlay"
    folder.mkdir()
    relative = os.path.relpath(K8S, folder)  # kustomize takes no absolute path
    components = "".join(f"  - {relative}/components/{name}\n" for name in COMPONENTS)
    (folder / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {relative}/overlays/gpu\n"
        f"components:\n{components}"
    )
    return render(folder)


@pytest.fixture(scope="module")
def keda() -> dict[tuple[str, str], dict[str, Any]]:
    return by_kind_and_name(render(K8S / "overlays/keda"))


def test_every_component_renders_and_validates(everything: list[dict[str, Any]]) -> None:
    assert COMPONENTS == ["keda", "prometheus-operator", "storage-rwo"]
    kinds = {doc["kind"] for doc in everything}
    assert CUSTOM_KINDS <= kinds
    for doc in everything:
        assert doc["metadata"].get("namespace") == "dipo" or doc["kind"] == "Namespace", doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dipo"
        if doc["kind"] in CUSTOM_KINDS:
            assert _errors(doc) == [], doc["metadata"]["name"]
        else:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("ScaledObject", lambda s: s["triggers"][0]["metadata"].update(pendingEntriesCount=8), "is not of type"),
        ("ScaledObject", lambda s: s.update(maxReplicas=4), "'maxReplicas' was unexpected"),
        ("ScaledObject", lambda s: s["triggers"][0]["metadata"].pop("address"), "is not valid under any"),
        ("ScaledObject", lambda s: s["advanced"]["scalingModifiers"].pop("target"), "'target' is a required"),
        ("TriggerAuthentication", lambda s: s["secretTargetRef"][0].update(parameter="pasword"), "is not one of"),
        ("PodMonitor", lambda s: s["podMetricsEndpoints"][0].update(port=8002), "is not of type 'string'"),
        ("PrometheusRule", lambda s: s["groups"][0]["rules"][0].update(four="1m"), "'four' was unexpected"),
    ],
    ids=["count-not-a-string", "hpa-field", "no-address", "no-target", "parameter-typo", "port-number", "rule-typo"],
)
def test_the_crd_schemas_reject_a_broken_resource(
    kind: str, change: Any, message: str, everything: list[dict[str, Any]]
) -> None:
    doc = copy.deepcopy(next(d for d in everything if d["kind"] == kind and d["metadata"]["name"] in ("rollout",
                             "dipo-redis", "dipo")))  # fmt: skip
    change(doc["spec"])
    assert any(message in error for error in _errors(doc)), _errors(doc)


# --- KEDA -------------------------------------------------------------------------------------------------------------


def _k8s_config() -> Any:
    """base/run.yaml as the pods resolve it."""
    return load_config(K8S / "base/run.yaml", environ={"DIPO_REDIS__PASSWORD": "x"})


def _inflight(cfg: Any) -> int:
    """Prompts one rollout server keeps in flight (the field's older name first, while both exist)."""
    rollout = cfg.rollout
    return int(rollout.max_inflight_groups)


def test_rollout_autoscaling_is_bounded_by_the_staleness_budget(keda: dict[tuple[str, str], Any]) -> None:
    cfg = _k8s_config()
    scaled = keda["ScaledObject", "rollout"]["spec"]
    outstanding = (cfg.learner.max_staleness + 1) * cfg.learner.prompts_per_step
    assert scaled["maxReplicaCount"] == math.ceil(outstanding / _inflight(cfg)) == 10
    modifiers = scaled["advanced"]["scalingModifiers"]
    names = {trigger["name"] for trigger in scaled["triggers"]}
    assert set(re.findall(r"[a-z]+", modifiers["formula"])) == names == {"pending", "unread"}
    assert modifiers["formula"].replace(" ", "") in ("pending+unread", "unread+pending")
    assert int(modifiers["target"]) == _inflight(cfg), "one full set of groups in flight per server"
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]


@pytest.mark.parametrize(("name", "stream", "group"), [("rollout", PROMPTS, ROLLOUT_GROUP),
                                                       ("reward", ROLLOUTS, REWARD_GROUP)])  # fmt: skip
def test_scalers_read_the_runs_own_stream_group_with_the_secret_password(
    name: str, stream: str, group: str, keda: dict[tuple[str, str], Any]
) -> None:
    cfg = _k8s_config()
    scaled = keda["ScaledObject", name]["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert (("Deployment", name)) in keda
    redis_port = keda["Service", "redis"]["spec"]["ports"][0]["port"]
    streams = [t for t in scaled["triggers"] if t["type"] == "redis-streams"]
    assert {t["name"] for t in streams} == {"pending", "unread"}
    for trigger in streams:
        meta = trigger["metadata"]
        assert meta["stream"] == run_key(cfg.name, stream) and meta["consumerGroup"] == group
        assert meta["address"] == f"redis.dipo.svc.cluster.local:{redis_port}"
        assert ("pendingEntriesCount" in meta) == (trigger["name"] == "pending")
        assert ("lagCount" in meta) == (trigger["name"] == "unread")
        auth = keda["TriggerAuthentication", trigger["authenticationRef"]["name"]]["spec"]
        assert auth["secretTargetRef"] == [{"parameter": "password", "name": "dipo-secrets", "key": "redis-password"}]


def test_keda_takes_over_the_replica_counts(keda: dict[tuple[str, str], Any]) -> None:
    base = by_kind_and_name(render(K8S / "overlays/gpu"))
    assert "replicas" not in keda["Deployment", "rollout"]["spec"], "KEDA owns it; a re-apply must not reset it"
    assert ("HorizontalPodAutoscaler", "reward") not in keda and ("HorizontalPodAutoscaler", "reward") in base
    hpa = base["HorizontalPodAutoscaler", "reward"]["spec"]
    reward = keda["ScaledObject", "reward"]["spec"]
    (cpu,) = [t for t in reward["triggers"] if t["type"] == "cpu"]
    # the reward replicas keep their CPU autoscaling, with the backlog of `rollouts` added
    assert int(cpu["metadata"]["value"]) == hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
    assert (reward["minReplicaCount"], reward["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    others = {key: doc for key, doc in keda.items() if key[0] not in CUSTOM_KINDS | {"NetworkPolicy", "Deployment"}}
    assert others == {key: base[key] for key in others}, "nothing else changes"


def test_the_keda_operator_may_reach_redis(keda: dict[tuple[str, str], Any]) -> None:
    base = by_kind_and_name(render(K8S / "overlays/gpu"))["NetworkPolicy", "redis"]["spec"]["ingress"]
    rules = keda["NetworkPolicy", "redis"]["spec"]["ingress"]
    assert rules[: len(base)] == base, "the base's rules stay"
    (operator,) = rules[len(base) :]
    (source,) = operator["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert source["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keda-operator"}
    assert operator["ports"] == [{"port": 6379, "protocol": "TCP"}]


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/keda"])
def test_a_rollout_pod_drains_before_it_stops(overlay: str) -> None:
    named = by_kind_and_name(render(K8S / overlay))
    docs = list(named.values())
    (pod,) = pod_specs(named["Deployment", "rollout"])
    (container,) = pod["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["dipo-entrypoint", "drain", "8000"]
    env = container_env(container, docs)
    # the drain and then the server's own 20 s on SIGTERM fit in the grace period
    assert float(env["DIPO_DRAIN_TIMEOUT_S"]) + 20 < pod["terminationGracePeriodSeconds"]
    assert "DIPO_ROLLOUT__SERVER__API_TOKEN" in {item["name"] for item in container["env"]}, "the drain's token"


# --- Prometheus Operator ----------------------------------------------------------------------------------------------


def test_pod_monitors_scrape_every_service_on_a_port_it_names(everything: list[dict[str, Any]]) -> None:
    docs = by_kind_and_name(everything)
    scraped = {}
    for (kind, _), monitor in docs.items():
        if kind != "PodMonitor":
            continue
        spec = monitor["spec"]
        assert spec["jobLabel"] == "app.kubernetes.io/name", "jobs named as in Compose: learner, reward, ..."
        for (_, name), doc in docs.items():
            for pod in pod_specs(doc):
                labels = doc["spec"]["template"]["metadata"]["labels"]
                if _selects(spec["selector"], labels):
                    ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
                    assert {e["port"] for e in spec["podMetricsEndpoints"]} <= ports, name
                    scraped[name] = [e["port"] for e in spec["podMetricsEndpoints"]]
    assert scraped == {"learner": ["http"], "reward": ["http"], "rollout": ["http"], "redis": ["metrics"]}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", "extend _selects"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_the_helm_values_select_the_components_monitors_and_rules() -> None:
    values = yaml.safe_load((K8S / "monitoring/kube-prometheus-stack.values.yaml").read_text())
    spec = values["prometheus"]["prometheusSpec"]
    assert spec["podMonitorSelectorNilUsesHelmValues"] is False and spec["ruleSelectorNilUsesHelmValues"] is False
    assert spec["podMonitorNamespaceSelector"] == {} and spec["ruleNamespaceSelector"] == {}
    sidecar = values["grafana"]["sidecar"]["dashboards"]
    assert sidecar["enabled"] is True and sidecar["label"] == "grafana_dashboard" and sidecar["labelValue"] == "1"


# --- storage ----------------------------------------------------------------------------------------------------------


def test_the_rwo_component_puts_the_rollout_pods_on_the_learners_node(everything: list[dict[str, Any]]) -> None:
    docs = by_kind_and_name(everything)
    assert docs["PersistentVolumeClaim", "dipo-data"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    (term,) = pod_specs(docs["Deployment", "rollout"])[0]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term == {"labelSelector": {"matchLabels": {"app.kubernetes.io/name": "learner"}},
                    "topologyKey": "kubernetes.io/hostname"}  # fmt: skip
    learner = docs["StatefulSet", "learner"]["spec"]["template"]["metadata"]["labels"]
    assert learner["app.kubernetes.io/name"] == "learner"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="the documented JSON patch needs kubectl's kustomize")
def test_the_documented_storage_patch_sets_class_and_size(tmp_path: Path) -> None:
    text = (K8S / "base/storage.yaml").read_text()
    snippet = "\n".join(line[2:] for line in text.splitlines() if line.startswith("#   ") or line == "#   patches:")
    relative = os.path.relpath(K8S / "base", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources:\n  - {relative}\n" + snippet.replace("  patches:",
                                                 "patches:", 1).replace("\n  ", "\n") + "\n")  # fmt: skip
    claim = by_kind_and_name(render(tmp_path))["PersistentVolumeClaim", "dipo-data"]["spec"]
    assert claim["storageClassName"] == "nfs-client" and claim["resources"]["requests"]["storage"] == "400Gi"


def test_the_run_volume_formula_and_the_default_size() -> None:
    # 12 bytes per parameter per checkpoint, keep + 1 of them at once, plus the base model in fp32
    assert run_volume_bytes(1_000_000, keep=3) == 4 * 12 * 1_000_000 + 4 * 1_000_000
    cfg = _k8s_config()
    requested = by_kind_and_name(render(K8S / "base"))["PersistentVolumeClaim", "dipo-data"]["spec"]
    size = int(requested["resources"]["requests"]["storage"].removesuffix("Gi")) * GIB
    smollm2 = 134_515_008  # SmolLM2-135M-Instruct, the default model of base/run.yaml
    assert run_volume_bytes(smollm2, keep=cfg.learner.keep_checkpoints) < size
    assert run_volume_bytes(4_022_468_096, keep=3) > size, "Qwen3-4B needs a bigger volume, as the docs say"
