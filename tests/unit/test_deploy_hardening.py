"""The deployments' containment (issue 16.4), checked on the rendered files: Compose services without capabilities,
privilege gain or a writable root, with memory limits, Redis not as root; Kubernetes pods without a service-account
token, read-only roots with scratch volumes, and NetworkPolicies that open each port only to what needs it."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_helpers import COMPOSE_CPU_FILE, COMPOSE_TLS_FILE, K8S, by_kind_and_name, merged_compose, pod_specs, render

SERVICES_WITHOUT_WRITABLE_ROOT = {"redis", "redis-exporter", "gpu-layout", "learner", "reward", "rollout", "prometheus",
                                  "grafana"}  # fmt: skip


@pytest.mark.parametrize("overrides", [(), (COMPOSE_CPU_FILE,), (COMPOSE_TLS_FILE,)], ids=["gpu", "cpu", "tls"])
def test_every_compose_service_is_contained(overrides: tuple) -> None:
    services = merged_compose(*overrides)["services"]
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("mem_limit"), f"{name} has no memory limit"
        if name in SERVICES_WITHOUT_WRITABLE_ROOT:
            assert service.get("read_only") is True, name
    assert services["redis"]["user"] == "redis"  # its `sh -c` command would otherwise keep it root
    for name in ("learner", "reward", "rollout"):
        env = services[name]["environment"]
        assert any(str(t).startswith("/tmp") for t in services[name]["tmpfs"]), name
        assert env["HOME"] == "/tmp" and env["TORCHINDUCTOR_CACHE_DIR"].startswith("/data/"), name


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    return by_kind_and_name(render(K8S / "base"))


def test_no_pod_mounts_a_service_account_token_or_writes_its_root(base: dict[tuple[str, str], Any]) -> None:
    workloads = [doc for (kind, _), doc in base.items() if kind in ("Deployment", "StatefulSet")]
    assert {doc["metadata"]["name"] for doc in workloads} == {"learner", "reward", "rollout", "redis"}
    for doc in workloads:
        for pod in pod_specs(doc):
            assert pod["automountServiceAccountToken"] is False, doc["metadata"]["name"]
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, container["name"]
                assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            if doc["metadata"]["name"] in ("learner", "rollout"):
                (tmp,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in volumes[tmp["name"]]


def _rules(policy: dict[str, Any]) -> list[tuple[set[str], set[int] | None]]:
    """(the pod names or 'prometheus'/'dipo' a rule admits, its ports or None for every port)."""
    out = []
    for rule in policy["spec"]["ingress"]:
        peers = set()
        for peer in rule["from"]:
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            peers.add(labels.get("app.kubernetes.io/name") or ("dipo" if labels else "anyone"))
        ports = {p["port"] for p in rule["ports"]} if "ports" in rule else None
        out.append((peers, ports))
    return out


def test_network_policies_open_each_port_only_to_what_needs_it(base: dict[tuple[str, str], Any]) -> None:
    learner = _rules(base["NetworkPolicy", "learner"])
    assert learner == [({"rollout"}, None), ({"prometheus"}, {8002})]  # weight sync: rollout servers only
    assert _rules(base["NetworkPolicy", "rollout"]) == [({"learner"}, None), ({"dipo", "prometheus"}, {8000})]
    assert _rules(base["NetworkPolicy", "reward"]) == [({"dipo", "prometheus"}, {8001})]
    for name in ("learner", "rollout", "reward"):
        policy = base["NetworkPolicy", name]
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
