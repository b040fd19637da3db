"""Chaos: SIGKILL rollout servers, reward replicas, the learner and Redis during training; nothing is lost or doubled.

The runs use the quick-start config with a tiny random model (its steps take a second or two on CPU, so a dozen
kills fit in CI). A random model is never right, so every group is all-wrong: ``learner.dynamic_sampling=false``
lets the learner train on them anyway (zero advantages, but real optimizer steps, checkpoints and broadcasts),
which is all the fault paths need. The weight-sync timeout is short so that a rollout server killed between
rounds is dropped from the next one quickly. ``dipo chaos configs/quickstart.yaml --kills 100`` (``make chaos``)
is the same with the real default model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from model_factories import save_tiny_llama

from runner.chaos import ChaosPlan, run_chaos

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


def _overrides(model: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        "name=chaos",
        "learner.dynamic_sampling=false",
        "learner.checkpoint_every=2",
        "sampling.max_new_tokens=16",
        "rollout.weight_sync_timeout_s=8",
    ]


def _accounted(summary: dict[str, Any]) -> int:
    ledger = summary["ledger"]
    dropped = sum(v for k, v in ledger["dropped"].items() if k != "duplicate_deliveries")
    return int(ledger["used"] + dropped + ledger["dead_lettered"] + ledger["in_flight"] + ledger["lost"])


def _check(summary: dict[str, Any], kills: int, targets: tuple[str, ...]) -> None:
    assert summary["ok"], json.dumps(summary["problems"], indent=1)
    assert summary["kills"] == kills and summary["recoveries"] == kills
    assert set(summary["kills_by_target"]) == set(targets)
    assert summary["lost"] == 0 and summary["doubled"] == 0
    assert summary["versions_only_increase"]
    assert summary["ledger"]["released"] == _accounted(summary) > 0
    assert summary["ledger"]["used"] > 0
    final = summary["final_checkpoint"]
    assert "error" not in final and final["step"] == summary["ledger"]["final_step"]


@pytest.mark.timeout(1200)
def test_short_chaos_run_loses_and_doubles_nothing(tmp_path: Path, tiny_model: Path) -> None:
    plan = ChaosPlan(kills=12, seed=7, gap_s=(0.5, 2.0), appendfsync="always")
    result = run_chaos(QUICKSTART, _overrides(tiny_model), plan, tmp_path / "run")
    summary = json.loads(result.path.read_text())
    _check(summary, 12, ("rollout", "reward", "learner", "redis"))
    assert result.exit_code == 0
    # the learner was killed at least once, and each kill made it resume from a checkpoint
    assert summary["learner_starts"] == summary["kills_by_target"]["learner"] + 1


@pytest.mark.timeout(900)
def test_redis_crashes_under_everysec_are_accounted_for(tmp_path: Path, tiny_model: Path) -> None:
    """With appendfsync everysec a Redis crash may lose its last second of writes; whatever the audit cannot find
    is reported as lost (allowed), and everything else is still accounted for exactly once."""
    plan = ChaosPlan(kills=3, seed=3, targets=("redis",), gap_s=(0.5, 2.0), appendfsync="everysec")
    result = run_chaos(QUICKSTART, _overrides(tiny_model), plan, tmp_path / "run")
    summary = json.loads(result.path.read_text())
    assert summary["ok"], summary["problems"]
    assert summary["kills_by_target"] == {"redis": 3} and summary["recoveries"] == 3
    assert summary["doubled"] == 0
    assert summary["ledger"]["released"] == _accounted(summary)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_long_chaos_run_with_100_kills(tmp_path: Path, tiny_model: Path) -> None:
    plan = ChaosPlan(kills=100, seed=0, gap_s=(0.5, 3.0), appendfsync="always")
    result = run_chaos(QUICKSTART, _overrides(tiny_model), plan, tmp_path / "run")
    summary = json.loads(result.path.read_text())
    _check(summary, 100, ("rollout", "reward", "learner", "redis"))
    assert set(summary["kills_by_moment"]) >= {"any", "broadcast", "checkpoint"}


@pytest.mark.timeout(900)
def test_a_restarted_rollout_server_far_behind_gets_the_current_weights(tmp_path: Path, tiny_model: Path) -> None:
    """The only rollout server restarts from a checkpoint many versions older than the staleness bound allows:
    every group it makes would be stale, so the learner must send it the current weights while it waits."""
    plan = ChaosPlan(kills=2, seed=1, targets=("rollout",), gap_s=(3.0, 5.0), recover_timeout_s=240)
    overrides = [*_overrides(tiny_model), "learner.checkpoint_every=50", "learner.max_staleness=1"]
    result = run_chaos(QUICKSTART, overrides, plan, tmp_path / "run")
    summary = json.loads(result.path.read_text())
    assert summary["ok"], summary["problems"]
    assert summary["recoveries"] == 2 and summary["lost"] == 0 and summary["doubled"] == 0
