"""GPU pinning of `dipo run`'s children: the config lists, the default layout, the argv and environment built."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from torch.distributed.run import get_args_parser

from runner.gpus import GpuLayout, count_gpus, plan_gpus, visible_gpus
from runner.launcher import LaunchError, build_child_specs, launch
from runner.supervisor import TORCHRUN_SHUTDOWN_S, ChildSpec
from services.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CUDA = ["learner.device=cuda", "rollout.backend=vllm", "rollout.device=cuda", "model.dtype=bfloat16"]


def _cfg(*overrides: str) -> RunConfig:
    return load_config(QUICKSTART, list(overrides), environ={})


def _gpus(count: int) -> list[str]:
    return visible_gpus({}, count=lambda: count)


def _specs(cfg: RunConfig, visible: list[str], *, resume: bool = False) -> dict[str, ChildSpec]:
    specs = build_child_specs(cfg, QUICKSTART, [], redis_url="redis://h:1/0", resume=resume, list_gpus=lambda: visible)
    return {s.name: s for s in specs}


def _no_lister() -> list[str]:
    raise AssertionError("the GPUs must not be looked up when nothing runs on a plain cuda device")


def _torchrun_args(argv: list[str]) -> tuple[int, str, list[str]]:
    """torchrun's own parser over the learner's argv: (ranks, module, the module's arguments)."""
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(argv[3:])
    assert args.standalone and args.module and args.shutdown_timeout == TORCHRUN_SHUTDOWN_S
    return int(args.nproc_per_node), args.training_script, list(args.training_script_args)


# ---------------------------------------------------------------------------------------------------------------------
# the default layout


def test_default_split_of_8_gpus_gives_4_rollout_workers_one_each_and_the_learner_4_torchrun_ranks() -> None:
    specs = _specs(_cfg(*CUDA, "rollout.workers=4", "reward.replicas=2"), _gpus(8))

    learner = specs["learner"]
    assert learner.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    ranks, module, args = _torchrun_args(learner.argv)
    assert (ranks, module) == (4, "learner")
    assert f"--config={QUICKSTART.resolve()}" in args and "--resume" not in args
    assert [specs[f"rollout-{i}"].env["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["4", "5", "6", "7"]
    assert all(specs[f"rollout-{i}"].argv[1:3] == ["-m", "rollout_server"] for i in range(4))
    assert "CUDA_VISIBLE_DEVICES" not in specs["reward-0"].env and "CUDA_VISIBLE_DEVICES" not in specs["reward-1"].env


def test_torchrun_learner_restarts_and_resumes_under_torchrun() -> None:
    cfg = _cfg(*CUDA, "rollout.workers=2")
    fresh, resumed = _specs(cfg, _gpus(4))["learner"], _specs(cfg, _gpus(4), resume=True)["learner"]

    restart = fresh.restart_policy.restart_argv
    assert restart is not None
    ranks, module, args = _torchrun_args(list(restart))
    assert (ranks, module, args[-1]) == (2, "learner", "--resume")
    assert list(restart) == fresh.argv + ["--resume"]
    assert resumed.argv[-1] == "--resume" and _torchrun_args(resumed.argv)[0] == 2
    assert fresh.env["CUDA_VISIBLE_DEVICES"] == resumed.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_learner_left_one_gpu_runs_as_a_plain_process() -> None:
    specs = _specs(_cfg(*CUDA, "rollout.workers=1"), _gpus(2))
    assert specs["learner"].argv[:3] == [sys.executable, "-m", "learner"]
    assert specs["learner"].env["CUDA_VISIBLE_DEVICES"] == "0"
    assert specs["rollout-0"].env["CUDA_VISIBLE_DEVICES"] == "1"


def test_parent_cuda_visible_devices_names_the_gpus_children_get() -> None:
    visible = visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5,7"}, count=lambda: pytest.fail("the list is given"))
    specs = _specs(_cfg(*CUDA, "rollout.workers=1"), visible)
    assert specs["learner"].env["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert _torchrun_args(specs["learner"].argv)[0] == 2
    assert specs["rollout-0"].env["CUDA_VISIBLE_DEVICES"] == "7"

    explicit = _specs(_cfg(*CUDA, "rollout.workers=1", "learner.gpus=[5]", "rollout.gpus=[3]"), visible)
    assert explicit["learner"].env["CUDA_VISIBLE_DEVICES"] == "5"
    assert explicit["rollout-0"].env["CUDA_VISIBLE_DEVICES"] == "3"
    with pytest.raises(LaunchError, match=r"name GPU\(s\) 0,1, but the launcher sees 3 GPU\(s\) \(3,5,7\)"):
        _specs(_cfg(*CUDA, "rollout.workers=1", "learner.gpus=[0]", "rollout.gpus=[1]"), visible)


def test_explicit_lists_are_taken_as_they_are() -> None:
    specs = _specs(_cfg(*CUDA, "rollout.workers=2", "learner.gpus=[6, 7]", "rollout.gpus=[2, 0]"), _gpus(8))
    assert specs["learner"].env["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert _torchrun_args(specs["learner"].argv)[0] == 2
    assert [specs[f"rollout-{i}"].env["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["2", "0"]


def test_one_explicit_side_leaves_the_other_the_remaining_gpus() -> None:
    learner_fixed = plan_gpus(_cfg(*CUDA, "rollout.workers=2", "learner.gpus=[3]"), lambda: _gpus(6))
    assert learner_fixed == GpuLayout(learner=("3",), rollout=("4", "5"))
    rollout_fixed = plan_gpus(_cfg(*CUDA, "rollout.workers=2", "rollout.gpus=[0, 5]"), lambda: _gpus(6))
    assert rollout_fixed == GpuLayout(learner=("1", "2", "3", "4"), rollout=("0", "5"))


def test_only_the_rollout_workers_on_cuda() -> None:
    layout = plan_gpus(_cfg("rollout.device=cuda", "rollout.workers=2"), lambda: _gpus(4))
    assert layout == GpuLayout(learner=(), rollout=("2", "3"))
    specs = _specs(_cfg("rollout.device=cuda", "rollout.workers=2"), _gpus(4))
    assert "CUDA_VISIBLE_DEVICES" not in specs["learner"].env
    assert specs["learner"].argv[:3] == [sys.executable, "-m", "learner"]


def test_too_few_gpus_is_a_launch_error_that_says_what_was_found_and_asked() -> None:
    with pytest.raises(LaunchError) as caught:
        _specs(_cfg(*CUDA, "rollout.workers=4"), _gpus(4))
    message = str(caught.value)
    assert "one GPU for each of the 4 rollout workers and at least one for the learner: 5 free GPUs" in message
    assert "the launcher sees 4 GPU(s) (0,1,2,3)" in message
    assert "learner.gpus=[...]" in message and "rollout.gpus=[...]" in message and "rollout.workers" in message

    with pytest.raises(LaunchError, match=r"sees 0 GPU\(s\) \(none\)"):
        _specs(_cfg("learner.device=cuda", "rollout.workers=0"), [])
    with pytest.raises(LaunchError, match="2 of them taken by learner.gpus"):
        _specs(_cfg(*CUDA, "rollout.workers=2", "learner.gpus=[0, 1]"), _gpus(3))


def test_cpu_runs_are_unchanged_and_do_not_look_for_gpus() -> None:
    for overrides in ((), ("rollout.workers=3",), ("learner.device=cuda:1", "rollout.device=cuda:0")):
        specs = build_child_specs(_cfg(*overrides), QUICKSTART, [], redis_url="redis://h:1/0", list_gpus=_no_lister)
        assert all("CUDA_VISIBLE_DEVICES" not in s.env for s in specs)
        assert specs[0].argv[:3] == [sys.executable, "-m", "learner"]
    assert plan_gpus(_cfg("rollout.device=cuda", "rollout.workers=0"), _no_lister) == GpuLayout()


def test_layout_description_for_the_log() -> None:
    assert GpuLayout(("0", "1"), ("2", "3")).describe() == (
        "learner: GPUs 0,1 (torchrun, 2 ranks); rollout-0: GPU 2; rollout-1: GPU 3"
    )
    assert GpuLayout(("4",)).describe() == "learner: GPU 4"
    assert GpuLayout().describe() == "no GPUs pinned"


# ---------------------------------------------------------------------------------------------------------------------
# discovery


def test_visible_gpus_reads_cuda_visible_devices_before_counting() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 1, 2 ,"}, count=lambda: 8) == ["1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=lambda: 8) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, count=lambda: 8) == ["GPU-aa", "GPU-bb"]
    assert visible_gpus({"PATH": "/bin"}, count=lambda: 3) == ["0", "1", "2"]


def _executable(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_count_gpus_reads_nvidia_smi_else_asks_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    listing = "GPU 0: H100 (UUID: GPU-a)\\n  MIG 1g.10gb Device 0: (UUID: MIG-b)\\nGPU 1: H100 (UUID: GPU-c)"
    _executable(bin_dir / "nvidia-smi", f'printf "{listing}\\n"')
    fake_python = _executable(tmp_path / "python", 'echo "a warning"; echo 3')
    monkeypatch.setenv("PATH", str(bin_dir))
    assert count_gpus(str(fake_python)) == 2

    (bin_dir / "nvidia-smi").unlink()
    assert count_gpus(str(fake_python)) == 3
    assert count_gpus(str(_executable(tmp_path / "broken", "exit 1"))) == 0


def test_launch_refuses_a_node_without_enough_gpus_before_starting_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    for key in [k for k in os.environ if k.startswith("DIPO_")]:
        monkeypatch.delenv(key)
    overrides = [*CUDA, "rollout.workers=1", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(LaunchError, match=r"sees 1 GPU\(s\) \(0\)"):
        launch(QUICKSTART, overrides, panel=False)
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "redis").exists()


# ---------------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.device=cuda", "learner.gpus=[0, -1]"], "greater than or equal to 0"),
        (["learner.device=cuda", "learner.gpus=[1, 2, 1]"], r"learner.gpus lists GPU\(s\) \[1\] more than once"),
        (["learner.device=cuda", "learner.gpus=[]"], "learner.gpus is empty"),
        (["learner.gpus=[0]"], "learner.gpus is set but learner.device='cpu': set learner.device=cuda"),
        (["learner.device=cuda:1", "learner.gpus=[1]"], "learner.device='cuda:1'"),
        (["rollout.device=cuda", "rollout.workers=2", "rollout.gpus=[4]"], "lists 1 GPUs for 2 rollout.workers"),
        (["rollout.device=cuda", "rollout.workers=2", "rollout.gpus=[4, 4]"], r"rollout.gpus lists GPU\(s\) \[4\]"),
        (["rollout.workers=1", "rollout.gpus=[3]"], "rollout.gpus is set but rollout.device='cpu'"),
        ([*CUDA, "rollout.workers=2", "learner.gpus=[0, 1, 2]", "rollout.gpus=[2, 1]"], r"share GPU\(s\) \[1, 2\]"),
    ],
)
def test_invalid_gpu_lists_are_refused_with_a_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _cfg(*overrides)


def test_gpu_lists_load_from_yaml_environment_and_command_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  device: cuda\n  gpus: [0, 1]\nrollout:\n  device: cuda\n  workers: 2\n")
    cfg = load_config(path, ["rollout.gpus=[2, 3]"], environ={"DIPO_LEARNER__GPUS": "[0, 4]"})
    assert cfg.learner.gpus == [0, 4] and cfg.rollout.gpus == [2, 3]
    assert _cfg().learner.gpus is None and _cfg().rollout.gpus is None
