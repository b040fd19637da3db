"""GPUs with Compose: every layout (docker-compose.yml for 2 GPUs, deploy/docker/gpus/ for 4 and 8) gives the
learner and each rollout server GPUs of their own, reserves one GPU per learner rank, and tells the gpu-layout check
exactly what it reserves; the check itself (deploy/docker/gpu_layout.py) runs against a host whose GPUs a stand-in
``nvidia-smi`` lists, and refuses a one-GPU host, a shared GPU, a missing GPU and NPROC without as many GPUs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import DEPLOY, GPU_LAYOUTS, active_services, interpolate, merged_compose

CHECK = DEPLOY / "docker/gpu_layout.py"
LAYOUTS = {2: (), 4: (GPU_LAYOUTS[4],), 8: (GPU_LAYOUTS[8],)}
"""GPUs on the host -> the override files of its layout."""


def _layout(gpus: int) -> dict[str, Any]:
    return interpolate(merged_compose(*LAYOUTS[gpus]))


def _reserved(service: dict[str, Any]) -> list[int]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert all("count" not in d for d in devices), "a count gives the first GPUs: reserve devices by id"
    return [int(gpu) for device in devices for gpu in device["device_ids"]]


def _nproc(learner: dict[str, Any]) -> int:
    command = learner["command"]
    return int(command[command.index("--nproc-per-node") + 1])


@pytest.mark.parametrize("gpus", sorted(LAYOUTS))
def test_each_process_gets_gpus_of_its_own_and_the_layout_uses_every_gpu(gpus: int) -> None:
    services = active_services(_layout(gpus))
    rollouts = {name: _reserved(s) for name, s in services.items() if name.startswith("rollout")}
    learner = _reserved(services["learner"])
    assert all(len(reserved) == 1 for reserved in rollouts.values()), "one GPU per rollout server"
    every = learner + [gpu for reserved in rollouts.values() for gpu in reserved]
    assert sorted(every) == list(range(gpus)), "no GPU shared, none left idle"
    expected_learner = {2: 1, 4: 1, 8: 4}[gpus]
    assert len(learner) == expected_learner == _nproc(services["learner"]), "one GPU per torchrun rank"
    assert int(services["learner"]["environment"]["NPROC"]) == expected_learner


@pytest.mark.parametrize("gpus", sorted(LAYOUTS))
def test_the_gpu_layout_check_is_told_what_the_services_reserve(gpus: int) -> None:
    services = active_services(_layout(gpus))
    check = services["gpu-layout"]
    env = check["environment"]
    rollouts = sorted(gpu for name, s in services.items() if name.startswith("rollout") for gpu in _reserved(s))
    assert [int(g) for g in env["LEARNER_GPUS"].split(",")] == _reserved(services["learner"])
    assert sorted(int(g) for g in env["ROLLOUT_GPUS"].split(",")) == rollouts
    assert int(env["NPROC"]) == _nproc(services["learner"])
    assert check["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all", "it must see every GPU"
    for name in ("learner", *(n for n in services if n.startswith("rollout"))):
        assert services[name]["depends_on"]["gpu-layout"] == {"condition": "service_completed_successfully"}


def test_layout_files_change_only_devices_and_ranks() -> None:
    base = _layout(2)["services"]
    for gpus in (4, 8):
        services = _layout(gpus)["services"]
        learner = services["learner"]
        command = list(base["learner"]["command"])
        command[command.index("--nproc-per-node") + 1] = str(_nproc(learner))
        assert learner["command"] == command, "the layout's learner command is docker-compose.yml's"
        for name, service in services.items():
            if name.startswith("rollout"):
                assert {k: v for k, v in service.items() if k not in ("deploy", "profiles")} == {
                    k: v for k, v in base["rollout"].items() if k not in ("deploy", "profiles")
                }, name


def test_extra_rollout_servers_join_the_rollout_name_that_prometheus_scrapes() -> None:
    services = _layout(8)["services"]
    assert all(services[f"rollout-{i}"]["networks"]["default"]["aliases"] == ["rollout"] for i in (2, 3, 4))
    text = (DEPLOY / "docker/Dockerfile").read_text()
    assert text.count("COPY --chmod=0755 deploy/docker/gpu_layout.py /usr/local/bin/dipo-gpu-layout") == 2


# --- the check, run against a stand-in nvidia-smi ---------------------------------------------------------------------


def _check(tmp_path: Path, host_gpus: int | None, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """deploy/docker/gpu_layout.py with `host_gpus` GPUs listed by nvidia-smi (None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if host_gpus is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in range(host_gpus)))
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    path = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    full = {"PATH": path, **{k: v for k, v in env.items() if k in ("LEARNER_GPUS", "ROLLOUT_GPUS", "NPROC")}}
    return subprocess.run([sys.executable, str(CHECK), *args], env=full, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("gpus", sorted(LAYOUTS))
def test_each_layout_passes_on_its_host_and_is_refused_on_a_smaller_one(gpus: int, tmp_path: Path) -> None:
    env = active_services(_layout(gpus))["gpu-layout"]["environment"]
    done = _check(tmp_path, gpus, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("GPU layout: learner on GPU(s) [")
    smaller = _check(tmp_path, gpus // 2, env)
    assert smaller.returncode == 1 and "refused" in smaller.stderr
    assert "GPU(s)" in smaller.stderr or "cannot share" in smaller.stderr


def test_a_one_gpu_host_is_refused_with_the_way_out(tmp_path: Path) -> None:
    done = _check(tmp_path, 1, {"LEARNER_GPUS": "0", "ROLLOUT_GPUS": "1", "NPROC": "1"})
    assert done.returncode == 1
    assert "1 GPU(s), and the learner and a rollout server cannot share one" in done.stderr
    assert "compose.cpu.yaml" in done.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LEARNER_GPUS": "0", "ROLLOUT_GPUS": "0"}, "share GPU(s) [0]"),
        ({"LEARNER_GPUS": "0", "ROLLOUT_GPUS": "1,1"}, "names a GPU twice"),
        ({"LEARNER_GPUS": "0", "ROLLOUT_GPUS": "5"}, "needs GPU(s) [5]"),
        ({"LEARNER_GPUS": "0", "ROLLOUT_GPUS": "1", "NPROC": "2"}, "NPROC=2 learner ranks but the learner reserves 1"),
        ({"LEARNER_GPUS": "zero", "ROLLOUT_GPUS": "1"}, "not a comma list"),
        ({"LEARNER_GPUS": "0", "ROLLOUT_GPUS": "1", "NPROC": "-1"}, "not a positive number"),
    ],
    ids=["shared", "twice", "missing", "nproc", "garbage", "negative-nproc"],
)
def test_bad_layouts_are_refused_with_the_reason(env: dict[str, str], message: str, tmp_path: Path) -> None:
    done = _check(tmp_path, 4, env)
    assert done.returncode == 1 and message in done.stderr, done.stderr


def test_without_nvidia_smi_the_check_says_so_and_the_cpu_override_skips_it(tmp_path: Path) -> None:
    done = _check(tmp_path, None, {"LEARNER_GPUS": "0", "ROLLOUT_GPUS": "1"})
    assert done.returncode == 1 and "cannot run nvidia-smi" in done.stderr
    cpu = _check(tmp_path, None, {}, "--cpu")
    assert cpu.returncode == 0 and cpu.stdout.strip() == "GPU layout: none (CPU run)"
