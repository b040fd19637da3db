"""The learner's container command lines, run for real: docker-compose.yml's (with the CPU override), the Kubernetes
StatefulSet's (base, `$(VAR)` expanded as the kubelet does) and the image entrypoint's `learner` role. Each is started
twice against one run folder, as a restart policy does: the first start finds no checkpoint and trains a fresh run,
the second (after an edit of the run config, which in Kubernetes rolls the pod) resumes from the checkpoint instead
of refusing the folder, and a third start of the finished run exits at once. The old command line, without
`--resume auto`, is shown to refuse the folder.

Only what must map a container path or address to this machine changes: /etc/dipo/run.yaml and /data become temp
folders, Redis a private redis-server with the deployments' password, 0.0.0.0 and the fixed ports loopback and free
ports. The run config is the deployment's own, with a tiny model and one prompt per step so that a step is quick; the
test plays the rollout and reward services, answering each released prompt with a scored group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml
from deploy_helpers import (
    COMPOSE_CPU_FILE,
    DEPLOY,
    K8S,
    REPO,
    SECRET_VALUE,
    by_kind_and_name,
    container_env,
    expand,
    interpolate,
    merged_compose,
    pod_specs,
    render,
)
from factories import response
from model_factories import save_tiny_llama

from runner.redis_server import LocalRedis, free_port
from services.canary import reference_field, server_field
from services.contracts import CANARIES, POLICY, PROMPTS, ROLLOUT_GROUP, SCORED, WEIGHTS, PolicyField
from services.protocol import PromptTask, RolloutGroup, ScoredGroup
from services.streams import DATA_FIELD, run_key

pytestmark = pytest.mark.timeout(900)

CONTAINER_CONFIG = "/etc/dipo/run.yaml"
ENTRYPOINT = DEPLOY / "docker/entrypoint.sh"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden_size=32, intermediate_size=64)


def _compose() -> tuple[list[str], dict[str, str], Path]:
    learner = interpolate(merged_compose(COMPOSE_CPU_FILE))["services"]["learner"]
    mount = next(v for v in learner["volumes"] if v.endswith(f":{CONTAINER_CONFIG}:ro"))
    return list(learner["command"]), dict(learner["environment"]), REPO / mount.split(":")[0]


def _kubernetes() -> tuple[list[str], dict[str, str], Path]:
    named = by_kind_and_name(render(K8S / "base"))
    (pod,) = pod_specs(named["StatefulSet", "learner"])
    (container,) = pod["containers"]
    env = container_env(container, list(named.values()), secrets={"dipo-secrets/redis-password": SECRET_VALUE},
                        fields={"status.podIP": "127.0.0.1"})  # fmt: skip
    argv = [expand(part, env) for part in [*container["command"], *container["args"]]]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(CONTAINER_CONFIG).parent))
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]["name"] == "dipo-run-config"
    return argv, env, K8S / "base/run.yaml"  # the ConfigMap dipo-run-config is generated from it


def _entrypoint() -> tuple[list[str], dict[str, str], Path]:
    _, env, config = _compose()
    return ["sh", str(ENTRYPOINT), "learner"], env, config


DEPLOYMENTS = {"compose": _compose, "kubernetes": _kubernetes, "entrypoint": _entrypoint}


def _localised(env: dict[str, str], root: Path, redis_url: str) -> dict[str, str]:
    """The container environment with its paths under `root`, its Redis the local one and its addresses loopback."""
    mapped = {}
    for key, value in env.items():
        value = str(value)
        if value.startswith("/data/") or value == "/data":
            value = str(root) + value
        mapped[key] = value
    ports = {"8002": str(free_port()), "29600": str(free_port())}
    for key in ("DIPO_LEARNER__SERVER__PORT", "DIPO_LEARNER__WEIGHT_SYNC_PORT"):
        mapped[key] = ports[mapped[key]]
    for key in ("DIPO_LEARNER__SERVER__HOST", "DIPO_LEARNER__WEIGHT_SYNC_HOST", "DIPO_LEARNER__WEIGHT_SYNC_ADVERTISE"):
        mapped[key] = "127.0.0.1"
    mapped["DIPO_REDIS__URL"] = redis_url
    mapped["DIPO_LEARNER__TORCH_THREADS"] = "1"  # this machine's 2 cores are shared
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("DIPO_", "RANK", "WORLD_SIZE", "MASTER_"))}
    # torchrun and python3 are the image's; here they are the virtualenv's
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return outside | {"PATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | mapped


def _write_config(source: Path, target: Path, model: Path, steps: int) -> str:
    """The deployment's run config with a tiny model and one prompt per step; returns the run name."""
    cfg = yaml.safe_load(source.read_text())
    cfg["model"] = {"name_or_path": str(model)}
    cfg.setdefault("data", {})["size"] = 8
    cfg["sampling"] = {**cfg.get("sampling", {}), "n": 2, "max_new_tokens": 8}
    cfg["learner"] = {**cfg.get("learner", {}), "steps": steps, "prompts_per_step": 1, "checkpoint_every": 1,
                      "dynamic_sampling": False, "micro_batch_tokens": 256}  # fmt: skip
    target.write_text(yaml.safe_dump(cfg))
    return str(cfg["name"])


def _scored(task: PromptTask, version: int, weights: str) -> ScoredGroup:
    """What the reward service would write for `task`: one right and one wrong response, by policy `version`
    (whose weights have fingerprint `weights`)."""
    answers = [task.ground_truth, "-1"] * task.n
    responses = [response(f"\\boxed{{{a}}}", 0.5, length=4, version=version, seed=i, weights=weights) for i, a in
                 enumerate(answers[: task.n])]  # fmt: skip
    correct = np.array([i % 2 == 0 for i in range(task.n)], dtype=np.uint8)
    rollout = RolloutGroup(task, np.arange(1, 6, dtype=np.uint32), responses, "test", time.time(), 0.1)
    return ScoredGroup(
        rollout=rollout, status=["correct" if c else "wrong" for c in correct], correct=correct,
        reward=correct.astype(np.float32), realloc_reward=np.zeros(task.n, dtype=np.float32),
        perplexity=np.full(task.n, 1.6, dtype=np.float32), group_kind="normal", action="none", tau=1.8,
        gate_open=False, fit_window=0, fit_at=0.0, signal=True, scorer_id="test", scored_at=time.time(),
    )  # fmt: skip


class _Services(threading.Thread):
    """The rollout and reward services, played by the test: every released prompt gets a scored group."""

    def __init__(self, url: str, run: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, password=SECRET_VALUE, socket_timeout=5)
        self.run_name, self.stop, self.answered = run, threading.Event(), 0

    def run(self) -> None:  # noqa: D102 - threading.Thread's entry point
        prompts = run_key(self.run_name, PROMPTS)
        try:
            self.client.xgroup_create(prompts, ROLLOUT_GROUP, id="0", mkstream=True)
        except redis.ResponseError:  # the learner's feeder created it first
            pass
        while not self.stop.is_set():
            for _, entries in self.client.xreadgroup(ROLLOUT_GROUP, "test", {prompts: ">"}, count=8, block=200) or []:
                for entry_id, fields in entries:
                    task = PromptTask.from_bytes(fields[DATA_FIELD.encode()])
                    version = int(self.client.hget(run_key(self.run_name, POLICY), PolicyField.VERSION) or 0)
                    group = _scored(task, version, self._weights_of(version))
                    self.client.xadd(run_key(self.run_name, SCORED), {DATA_FIELD: group.to_bytes()})
                    self.client.xack(prompts, ROLLOUT_GROUP, entry_id)
                    self.answered += 1

    def _weights_of(self, version: int) -> str:
        """What a rollout server does on loading `version` (docs/WEIGHT_SYNC.md, "Provenance"): its fingerprint is
        the one the learner published, and it publishes its canary scoring, here the learner's own."""
        weights, canaries = run_key(self.run_name, WEIGHTS), run_key(self.run_name, CANARIES)
        deadline = time.monotonic() + 60
        while True:
            fingerprint = self.client.hget(weights, str(version))
            reference = self.client.hget(canaries, reference_field(version))
            if fingerprint is not None and reference is not None:
                self.client.hset(canaries, server_field("test", version), reference)
                return fingerprint.decode()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the learner published no weights record of v{version}")
            time.sleep(0.05)


def _start(argv: list[str], env: dict[str, str], log: Path, services: _Services) -> int:
    """One start of the learner: until it exits (the run's steps done), with the services answering meanwhile."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT)
    try:
        return proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _in_container(argv: list[str], config: Path) -> list[str]:
    return [str(config) if part == CONTAINER_CONFIG else part for part in argv]


@pytest.mark.parametrize("deployment", sorted(DEPLOYMENTS))
def test_the_container_command_resumes_its_run_after_a_restart(
    deployment: str, tiny_model: Path, tmp_path: Path
) -> None:
    argv, env, source = DEPLOYMENTS[deployment]()
    command = ENTRYPOINT.read_text() if deployment == "entrypoint" else " ".join(argv)
    assert "--resume auto" in command, "the container restarts into a resume"
    config = tmp_path / "run.yaml"
    run = _write_config(source, config, tiny_model, steps=1)
    with LocalRedis(tmp_path / "redis", password=SECRET_VALUE) as server:
        env = _localised(env, tmp_path, server.url) | {"DIPO_CONFIG": str(config)}  # the entrypoint's config path
        argv = _in_container(argv, config)
        log = tmp_path / "learner.log"
        services = _Services(server.url, run)
        services.start()
        try:
            assert _start(argv, env, log, services) == 0, log.read_text()[-4000:]
            run_dir = tmp_path / "data/runs" / run
            assert (run_dir / "checkpoints/step-000001/trainer_state.json").is_file()
            assert "--resume auto: no checkpoint" in log.read_text(), "the first start is a fresh run"

            if deployment == "compose":  # the command line before --resume auto: every restart fails (torchrun
                old = argv[: argv.index("--resume")]  # reports its rank's exit 2 as a failure), a restart loop
                refused = subprocess.run(old, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
                assert refused.returncode != 0 and "holds checkpoints" in refused.stdout + refused.stderr

            _write_config(source, config, tiny_model, steps=2)  # an edit of the run config restarts the container
            assert _start(argv, env, log, services) == 0, log.read_text()[-4000:]
            # a finished run restarted (a StatefulSet restarts every exit) exits at once, training nothing
            assert _start(argv, env, log, services) == 0, log.read_text()[-4000:]
        finally:
            services.stop.set()
            services.join(timeout=30)
    text = log.read_text()
    assert "--resume auto: resuming from" in text and "resumed from" in text and "at step 1" in text
    assert "holds step 2 of learner.steps=2: the run is complete" in text
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2], "step 2 continued the run, step 1 was not redone"
    state: dict[str, Any] = json.loads((run_dir / "checkpoints/step-000002/trainer_state.json").read_text())
    assert state["step"] == 2 and services.answered >= 2
