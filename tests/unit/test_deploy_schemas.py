"""Deployment files against external schemas and against the code.

- ``docker-compose.yml`` (and the CPU override, alone and merged) validates against the Compose Specification's JSON
  schema, the copy vendored by the ``check-jsonschema`` package (no network).
- Both kustomizations render, with ``kubectl kustomize`` where kubectl is installed and otherwise with the small
  kustomize subset below, and every rendered manifest validates against the Kubernetes JSON schemas that the
  ``kubernetes-validate`` package ships (strict: an unknown field is an error). Where kubectl is installed the Python
  renderer is also checked to produce what kubectl produces.
- Every ``dipo_*`` series the Grafana dashboards query is one the code registers, and ``docs/METRICS.md`` lists exactly
  the metrics of the three services' registries.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.resources
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_CPU_FILE = DEPLOY / "docker/compose.cpu.yaml"
K8S_BASE = DEPLOY / "k8s/base"
K8S_GPU = DEPLOY / "k8s/overlays/gpu"
OVERLAYS = {"base": K8S_BASE, "gpu": K8S_GPU}
DASHBOARDS = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))

# The oldest Kubernetes deploy/README.md supports (kubectl 1.27+, kustomize v5) and the newest the package knows.
K8S_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]


# --- Compose ----------------------------------------------------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """Safe loader that reads Compose's `!reset` merge tag as None (the override file uses it)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


@functools.cache
def _compose_validator() -> jsonschema.protocols.Validator:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _compose_errors(document: Any) -> list[str]:
    errors = _compose_validator().iter_errors(document)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def _interpolated(node: Any) -> Any:
    """Apply Compose interpolation the way `docker compose config` would with only the required secrets set."""
    if isinstance(node, dict):
        return {key: _interpolated(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(item) for item in node]
    if not isinstance(node, str):
        return node
    pattern = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}"
    resolved = re.sub(pattern, lambda m: "secret-value" if m.group(2) == "?" else m.group(3) or "", node)
    return resolved.replace("$$", "$")


def _compose_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge of an override file for mappings; `!reset` (None) removes the key."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _compose_merge(base[key], value)
        else:
            # Compose merges some sequences (ports, volumes) field by field; this helper does not know those rules.
            assert not isinstance(value, list), f"override sets the sequence {key!r}: extend _compose_merge first"
            merged[key] = value
    return merged


def _compose_documents() -> dict[str, Any]:
    base = yaml.safe_load(COMPOSE_FILE.read_text())
    override = yaml.load(COMPOSE_CPU_FILE.read_text(), Loader=_ComposeLoader)
    return {"compose": base, "cpu-override": override, "compose+cpu": _compose_merge(base, override)}


@pytest.mark.parametrize("interpolate", [False, True], ids=["raw", "interpolated"])
@pytest.mark.parametrize("name", ["compose", "cpu-override", "compose+cpu"])
def test_compose_files_validate_against_the_compose_spec(name: str, interpolate: bool) -> None:
    document = _compose_documents()[name]
    assert _compose_errors(_interpolated(document) if interpolate else document) == []


def test_cpu_override_merge_drops_the_gpu_reservations() -> None:
    services = _compose_documents()["compose+cpu"]["services"]
    assert "deploy" not in services["learner"] and "deploy" not in services["rollout"]
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
    assert any(message in error for error in _compose_errors(document))


# --- a pure-Python subset of kustomize --------------------------------------------------------------------------------

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images",
                         "patches"}  # fmt: skip
# patchMergeKey of the pod-spec lists that a strategic-merge patch merges item by item (k8s.io/api core/v1 types).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}  # fmt: skip
_CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                   "PriorityClass", "CustomResourceDefinition"}  # fmt: skip


def _only(fields: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise NotImplementedError(f"{where}: {sorted(unknown)} is beyond this kustomize subset (extend it)")


def kustomize_build(folder: Path) -> list[dict[str, Any]]:
    """Render a kustomization like `kubectl kustomize`, for the subset of kustomize v5 that deploy/k8s uses."""
    docs, generated = _build(folder)
    renames = {}
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "ConfigMap" and name in generated:
            # A content hash in the name makes a changed ConfigMap roll the pods (kustomize's own hash differs).
            digest = hashlib.sha256(json.dumps([name, doc["data"]], sort_keys=True).encode()).hexdigest()
            renames[name] = doc["metadata"]["name"] = f"{name}-{digest[:10]}"
    for doc in docs:
        for pod in _pod_specs(doc):
            for ref in _config_map_refs(pod):
                ref["name"] = renames.get(ref["name"], ref["name"])
    return docs


def _build(folder: Path) -> tuple[list[dict[str, Any]], set[str]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    _only(kustomization, _KUSTOMIZATION_FIELDS, str(folder))
    docs: list[dict[str, Any]] = []
    generated: set[str] = set()
    for ref in kustomization.get("resources", []):
        if (folder / ref).is_dir():
            sub_docs, sub_generated = _build(folder / ref)
            docs, generated = docs + sub_docs, generated | sub_generated
        else:
            docs += [doc for doc in yaml.safe_load_all((folder / ref).read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        _generate(folder, generator, docs)
        generated.add(generator["name"])
    for patch in kustomization.get("patches", []):
        _only(patch, {"path"}, f"{folder}: patches")
        for change in yaml.safe_load_all((folder / patch["path"]).read_text()):
            key = (change["kind"], change["metadata"]["name"])
            targets = [doc for doc in docs if (doc["kind"], doc["metadata"]["name"]) == key]
            assert len(targets) == 1, f"{patch['path']}: {key} matches {len(targets)} resources"
            _strategic_merge(targets[0], change)
    for doc in docs:
        if "namespace" in kustomization and doc["kind"] not in _CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kustomization["namespace"]
        for label in kustomization.get("labels", []):
            _only(label, {"pairs", "includeSelectors"}, f"{folder}: labels")
            if label.get("includeSelectors"):
                raise NotImplementedError("labels.includeSelectors is beyond this kustomize subset")
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
        for image in kustomization.get("images", []):
            _set_image(doc, image)
    return docs, generated


def _generate(folder: Path, generator: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    _only(generator, {"name", "files", "literals", "behavior"}, f"{folder}: configMapGenerator")
    data = {Path(file).name: (folder / file).read_text() for file in generator.get("files", [])}
    data |= dict(literal.split("=", 1) for literal in generator.get("literals", []))
    name, behavior = generator["name"], generator.get("behavior", "create")
    existing = [doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name]
    if behavior == "create":
        assert not existing, f"{folder}: ConfigMap {name} exists; use behavior merge or replace"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
        return
    assert len(existing) == 1 and behavior in ("merge", "replace"), f"{folder}: {behavior} of {name}"
    existing[0]["data"] = existing[0]["data"] | data if behavior == "merge" else data


def _strategic_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise NotImplementedError(f"patch directive {key} is beyond this kustomize subset")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _strategic_merge(target[key], value)
        elif isinstance(value, list) and key in _MERGE_KEYS and isinstance(target.get(key), list):
            old_items = {item[_MERGE_KEYS[key]]: item for item in target[key]}
            merged = []
            for item in value:
                old = old_items.pop(item[_MERGE_KEYS[key]], None)
                if old is not None:
                    _strategic_merge(old, item)
                merged.append(item if old is None else old)
            target[key] = merged + list(old_items.values())  # kustomize's order: the patch's items first
        else:
            target[key] = value


def _set_image(doc: dict[str, Any], image: dict[str, Any]) -> None:
    _only(image, {"name", "newName", "newTag"}, "images")
    for pod in _pod_specs(doc):
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            name, tag = _split_image(container["image"])
            if name == image["name"]:
                tag = f":{image['newTag']}" if "newTag" in image else tag
                container["image"] = image.get("newName", name) + tag


def _split_image(image: str) -> tuple[str, str]:
    """`registry:5000/dipo:gpu` -> (`registry:5000/dipo`, `:gpu`); the tag part keeps its `:` or `@`."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, f"@{digest}"
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > image.rfind("/") else (image, "")


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    spec = doc.get("spec")
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template") if isinstance(spec, dict) else None
    return [template["spec"]] if isinstance(template, dict) and "spec" in template else []


def _config_map_refs(pod: dict[str, Any]) -> list[dict[str, Any]]:
    refs = [volume["configMap"] for volume in pod.get("volumes", []) if "configMap" in volume]
    for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
        refs += [source["configMapRef"] for source in container.get("envFrom", []) if "configMapRef" in source]
        refs += [env["valueFrom"]["configMapKeyRef"] for env in container.get("env", [])
                 if "configMapKeyRef" in env.get("valueFrom", {})]  # fmt: skip
    return refs


# --- Kubernetes -------------------------------------------------------------------------------------------------------


def _kubectl_build(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@functools.cache
def _rendered(overlay: str) -> list[dict[str, Any]]:
    """The overlay as kubectl renders it, or as the Python subset does where kubectl is not installed."""
    folder = OVERLAYS[overlay]
    return _kubectl_build(folder) if shutil.which("kubectl") else kustomize_build(folder)


def _by_kind_and_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Documents keyed by (kind, name), with generated names' hash suffixes removed everywhere."""
    text = json.dumps(docs, sort_keys=True)
    for doc in docs:
        hashed = re.fullmatch(r"(.+)-[a-z0-9]{10}", doc["metadata"]["name"])
        if doc["kind"] == "ConfigMap" and hashed:
            text = text.replace(f'"{hashed.group(0)}"', f'"{hashed.group(1)}"')
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in json.loads(text)}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kustomizations_render(overlay: str) -> None:
    docs = _rendered(overlay)
    config_maps = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "ConfigMap"}
    images, refs = {}, {}
    for doc in docs:
        for pod in _pod_specs(doc):
            images[doc["metadata"]["name"]] = pod["containers"][0]["image"]
            refs[doc["metadata"]["name"]] = {ref["name"] for ref in _config_map_refs(pod)}
    assert {name for name, used in refs.items() if not used <= config_maps} == set(), "a missing ConfigMap"
    assert all(len(refs[name]) == 2 for name in ("learner", "reward", "rollout")), "run config and environment"
    assert all(doc["metadata"].get("namespace") == "dipo" for doc in docs if doc["kind"] != "Namespace")
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dipo" for doc in docs)
    tag = "gpu" if overlay == "gpu" else "cpu"
    assert images["learner"] == images["rollout"] == f"dipo:{tag}" and images["reward"] == "dipo-reward:latest"
    assert images["redis"].startswith("redis:7")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    docs = _rendered(overlay)
    assert {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment", "HorizontalPodAutoscaler"} <= {
        doc["kind"] for doc in docs
    }
    for doc in docs:
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
    rollout = copy.deepcopy(_by_kind_and_name(_rendered("gpu"))["Deployment", "rollout"])
    change(rollout["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(message)):
        kubernetes_validate.validate(rollout, K8S_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: nothing to compare with")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_python_kustomize_subset_renders_what_kubectl_renders(overlay: str) -> None:
    ours = _by_kind_and_name(kustomize_build(OVERLAYS[overlay]))
    theirs = _by_kind_and_name(_kubectl_build(OVERLAYS[overlay]))
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
    series = {family + suffix for family, kind in registered.items() for suffix in _SERIES_SUFFIXES[kind]}
    panels = json.loads(path.read_text())["panels"]
    queried = {name for panel in panels for target in panel.get("targets", [])
               for name in re.findall(r"dipo_[a-z_]+", target["expr"])}  # fmt: skip
    assert len(queried) >= 10
    assert sorted(queried - series) == []
