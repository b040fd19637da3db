"""End to end: `dipo run` on the quick-start config with the real default model, real Redis and real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from runner.redis_server import LocalRedis
from services.protocol import RolloutGroup

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.mark.timeout(900)
def test_quickstart_pipeline_trains_and_accounts_for_every_group(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with LocalRedis(tmp_path / "redis") as server:
        overrides = [
            f"redis.url={server.url}",
            f"run_dir={run_dir}",
            "name=e2e",
            f"learner.steps={STEPS}",
            "learner.checkpoint_every=2",
            "rollout.workers=2",
            "sampling.max_new_tokens=48",
        ]
        argv = [sys.executable, "-m", "runner.cli", "run", "configs/quickstart.yaml", "--no-panel"]
        for item in overrides:
            argv += ["--set", item]
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=840, check=False,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "logs").glob("*.log")))
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"

        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
        assert [line["version"] for line in lines] == list(range(1, STEPS + 1))  # the version advanced every step

        client = redis.Redis.from_url(server.url, decode_responses=True)
        policy = client.hgetall("dipo:e2e:policy")
        assert policy["status"] == "done" and int(policy["version"]) == STEPS
        assert Path(policy["checkpoint"]).is_dir() and int(policy["checkpoint_version"]) == STEPS

        # Every scored group the learner read was used or dropped with a reason, and all were acknowledged.
        groups = {g["name"]: g for g in client.xinfo_groups("dipo:e2e:scored")}
        learner = groups["learner"]
        assert learner["pending"] == 0
        last = lines[-1]
        used = sum(line["groups_used"] for line in lines)
        dropped = last["dropped_stale"] + last["dropped_no_signal"] + last["dropped_duplicate"]
        consumed = sum(line["groups_consumed"] for line in lines)
        assert used == STEPS * 4
        assert consumed == used + dropped
        assert learner["entries-read"] >= consumed
        # both rollout workers produced, and the weights they generated with advanced during the run
        raw = redis.Redis.from_url(server.url)
        rollouts = [RolloutGroup.from_bytes(f[b"d"]) for _, f in raw.xrange("dipo:e2e:rollouts")]
        assert len({g.worker_id for g in rollouts}) == 2
        assert max(g.oldest_version for g in rollouts) >= 1

    # the run folder is complete
    for name in ("config.yaml", "metrics.jsonl", "report/report.html"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "report").glob("*.png"))) >= 5
    assert {p.name for p in (run_dir / "logs").glob("*.log")} >= {"learner.log", "reward-0.log", "rollout-0.log"}
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "model.safetensors").is_file()
