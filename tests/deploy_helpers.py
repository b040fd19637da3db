"""What the deployment tests share (importable as ``deploy_helpers`` from any test folder): Compose files loaded,
interpolated and merged by Compose's rules, validated against the Compose Specification; kustomizations rendered
with ``kubectl kustomize`` or, where kubectl is missing, with a small Python subset of kustomize v5 (checked against
kubectl's output where both exist); and small accessors of rendered manifests."""

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
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_CPU_FILE = DEPLOY / "docker/compose.cpu.yaml"
COMPOSE_TLS_FILE = DEPLOY / "docker/compose.tls.yaml"
GPU_LAYOUTS = {n: DEPLOY / f"docker/gpus/compose.{n}gpu.yaml" for n in (4, 8)}
"""GPU count -> its layout file (2 GPUs: docker-compose.yml as it is)."""
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker/Dockerfile"
SECRET_VALUE = "secret-value"
"""What every required `${VAR:?}` secret interpolates to here."""


# --- Compose ----------------------------------------------------------------------------------------------------------


class Override:
    """A value under Compose's `!override` tag: it replaces what the files before set, instead of merging."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Override) and self.value == other.value

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Override({self.value!r})"


class ComposeLoader(yaml.SafeLoader):
    """A safe loader that knows Compose's merge tags: `!reset` (None: remove the key) and `!override`."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def load_compose_all(text: str) -> list[Any]:
    """Every document of a Compose file, merge tags included (the loader is a SafeLoader)."""
    return list(yaml.load_all(text, Loader=ComposeLoader))


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    """A Compose file as written (merge tags as None / Override)."""
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def interpolate(node: Any) -> Any:
    """Compose's interpolation the way `docker compose config` does it with only the required secrets set:
    `${VAR:-default}` is its default, `${VAR:?message}` a dummy secret, `$$` a `$`."""
    if isinstance(node, dict):
        return {key: interpolate(value) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item) for item in node]
    if isinstance(node, Override):
        return Override(interpolate(node.value))
    if not isinstance(node, str):
        return node
    pattern = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}"
    resolved = re.sub(pattern, lambda m: SECRET_VALUE if m.group(2) == "?" else m.group(3) or "", node)
    return resolved.replace("$$", "$")


def mount_target(volume: str | dict[str, Any]) -> str:
    """The container path of a short- or long-syntax volume."""
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def compose_merge(base: dict[str, Any], override: dict[str, Any], key: str = "") -> dict[str, Any]:
    """Compose's merge of an override file, for what the shipped overrides use: mappings merge, `!reset` removes,
    `!override` replaces, a service's `volumes` merge by target path, `command` and `healthcheck.test` are replaced;
    any other sequence is refused (extend this first, with Compose's rule for it)."""
    merged = dict(base)
    for name, value in override.items():
        old = base.get(name)
        if value is None:
            merged.pop(name, None)
        elif isinstance(value, Override):
            merged[name] = copy.deepcopy(value.value)
        elif isinstance(value, dict) and isinstance(old, dict):
            merged[name] = compose_merge(old, value, name)
        elif name == "volumes" and isinstance(value, list) and isinstance(old, list):
            targets = {mount_target(volume) for volume in value}
            merged[name] = [volume for volume in old if mount_target(volume) not in targets] + value
        else:
            replaceable = name in ("command", "test") or not isinstance(value, list) or old is None
            assert replaceable, f"{key}.{name}: Compose merges this sequence by its own rule; extend compose_merge"
            merged[name] = copy.deepcopy(value)
    return merged


def merged_compose(*overrides: Path) -> dict[str, Any]:
    """docker-compose.yml with `overrides` merged over it, in order (as `docker compose -f A -f B ...`)."""
    document = load_compose(COMPOSE_FILE)
    for path in overrides:
        document = compose_merge(document, load_compose(path))
    return document


def active_services(document: dict[str, Any]) -> dict[str, Any]:
    """The services `docker compose up` starts without --profile (those without profiles)."""
    return {name: service for name, service in document["services"].items() if not service.get("profiles")}


@functools.cache
def _compose_validator() -> jsonschema.protocols.Validator:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _plain(node: Any) -> Any:
    """A document with Override markers replaced by their values (what the schema sees after Compose's merge)."""
    if isinstance(node, Override):
        return _plain(node.value)
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    return node


def compose_errors(document: Any) -> list[str]:
    """Every error of a Compose document against the Compose Specification's JSON schema (vendored, offline)."""
    errors = _compose_validator().iter_errors(_plain(document))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


# --- a pure-Python subset of kustomize --------------------------------------------------------------------------------

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "components", "configMapGenerator",
                         "images", "patches"}  # fmt: skip
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
        for pod in pod_specs(doc):
            for ref in config_map_refs(pod):
                ref["name"] = renames.get(ref["name"], ref["name"])
    return docs


def _build(folder: Path, docs: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], set[str]]:
    """Resources, then components (applied to them, in order), then this kustomization's generators, patches and
    transformers; a Component (`docs` given) works on the resources of the kustomization that lists it."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    _only(kustomization, _KUSTOMIZATION_FIELDS, str(folder))
    docs = [] if docs is None else docs
    generated: set[str] = set()
    for ref in kustomization.get("resources", []):
        if (folder / ref).is_dir():
            sub_docs, sub_generated = _build(folder / ref)
            docs += sub_docs
            generated |= sub_generated
        else:
            docs += [doc for doc in yaml.safe_load_all((folder / ref).read_text()) if doc]
    for ref in kustomization.get("components", []):
        component = folder / ref
        assert yaml.safe_load((component / "kustomization.yaml").read_text())["kind"] == "Component", component
        docs, sub_generated = _build(component, docs)
        generated |= sub_generated
    for generator in kustomization.get("configMapGenerator", []):
        _generate(folder, generator, docs)
        generated.add(generator["name"])
    for patch in kustomization.get("patches", []):
        _only(patch, {"path"}, f"{folder}: patches")
        for change in yaml.safe_load_all((folder / patch["path"]).read_text()):
            _patch(docs, change, patch["path"])
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


def _patch(docs: list[dict[str, Any]], change: dict[str, Any], where: str) -> None:
    key = (change["kind"], change["metadata"]["name"])
    targets = [i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"]) == key]
    assert len(targets) == 1, f"{where}: {key} matches {len(targets)} resources"
    directive = change.pop("$patch", None)
    if directive == "delete":
        del docs[targets[0]]
    elif directive is None:
        _strategic_merge(docs[targets[0]], change)
    else:
        raise NotImplementedError(f"$patch: {directive} is beyond this kustomize subset")


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
    for pod in pod_specs(doc):
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


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec of a workload (empty for other kinds)."""
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    spec = doc.get("spec")
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template") if isinstance(spec, dict) else None
    return [template["spec"]] if isinstance(template, dict) and "spec" in template else []


def config_map_refs(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Every reference of a pod to a ConfigMap (volumes, envFrom, env valueFrom)."""
    refs = [volume["configMap"] for volume in pod.get("volumes", []) if "configMap" in volume]
    for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
        refs += [source["configMapRef"] for source in container.get("envFrom", []) if "configMapRef" in source]
        refs += [env["valueFrom"]["configMapKeyRef"] for env in container.get("env", [])
                 if "configMapKeyRef" in env.get("valueFrom", {})]  # fmt: skip
    return refs


# --- Kubernetes -------------------------------------------------------------------------------------------------------


def kubectl_build(folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize FOLDER`, parsed."""
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render(folder: Path) -> list[dict[str, Any]]:
    """A kustomization as kubectl renders it, or as the Python subset does where kubectl is not installed."""
    return kubectl_build(folder) if shutil.which("kubectl") else kustomize_build(folder)


def by_kind_and_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Documents keyed by (kind, name), with generated names' hash suffixes removed everywhere."""
    text = json.dumps(docs, sort_keys=True)
    for doc in docs:
        hashed = re.fullmatch(r"(.+)-[a-z0-9]{10}", doc["metadata"]["name"])
        if doc["kind"] == "ConfigMap" and hashed:
            text = text.replace(f'"{hashed.group(0)}"', f'"{hashed.group(1)}"')
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in json.loads(text)}


def container_env(
    container: dict[str, Any],
    docs: list[dict[str, Any]],
    secrets: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
) -> dict[str, str]:
    """A container's environment as the kubelet builds it: its ConfigMaps (envFrom), then its `env` in order with
    `$(VAR)` references expanded; secret and field references resolve from `secrets` (`name/key`) and `fields`."""
    maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= maps[source["configMapRef"]["name"]]
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "secretKeyRef" in item.get("valueFrom", {}) and secrets is not None:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[f"{ref['name']}/{ref['key']}"]
        elif "fieldRef" in item.get("valueFrom", {}) and fields is not None:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in a command, argument or env value (an unknown name stays as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def dockerfile_stages() -> dict[str, str]:
    """The images' Dockerfile split into its stages, by stage name (every stage must be named)."""
    stages: dict[str, str] = {}
    for block in re.split(r"^(?=FROM )", DOCKERFILE.read_text(), flags=re.MULTILINE)[1:]:
        match = re.match(r"FROM \S+ AS (\S+)", block)
        assert match, f"every stage is named: {block.splitlines()[0]}"
        stages[match.group(1)] = block
    return stages
