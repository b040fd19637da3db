"""The learner SIGKILLed between checkpoints and restarted with --resume: no prompt used twice, none skipped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner.data import EpochOrder, load_items
from runner.redis_server import LocalRedis
from services.config import load_config
from services.ledger import check_ledger, read_ledger

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _learner_pids(launcher_log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"started learner(?: \(restart \d+\))?, pid (\d+)", launcher_log.read_text())]


# slow: tests/chaos covers learner kills (in checkpoints and broadcasts too) with the ledger audit in CI
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_learner_killed_between_checkpoints_resumes_exactly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "name=resume", f"learner.steps={STEPS}", "learner.checkpoint_every=2",
                 "sampling.max_new_tokens=32", "streams.visibility_timeout_s=20"]  # fmt: skip
    with LocalRedis(tmp_path / "redis") as server:
        argv = [sys.executable, "-m", "runner.cli", "run", "configs/quickstart.yaml", "--no-panel"]
        for item in [f"redis.url={server.url}", *overrides]:
            argv += ["--set", item]
        log_path = tmp_path / "dipo-run.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        metrics = run_dir / "metrics.jsonl"
        try:
            # kill the learner after step 3: its update is past the step-2 checkpoint and not yet in any checkpoint
            deadline = time.monotonic() + 900
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "training never reached step 3"
                time.sleep(0.5)
            first = _learner_pids(run_dir / "logs" / "launcher.log")[0]
            os.kill(first, signal.SIGKILL)
            assert proc.wait(900) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

    pids = _learner_pids(run_dir / "logs" / "launcher.log")
    assert len(pids) == 2, "the launcher restarted the learner once, with --resume"
    assert "--resume" in (run_dir / "logs" / "learner.log").read_text()
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3, 4]  # step 3 was redone from the step-2 checkpoint
    # v3 was published before the crash: the resumed learner skips it (versions never go backwards on the servers)
    assert [line["version"] for line in lines] == [1, 2, 3, 5, 6]

    state = json.loads((sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "trainer_state.json").read_text())
    assert state["step"] == STEPS
    used = state["assembler"]["seen_ids"]
    assert len(used) == len(set(used)) == STEPS * 4  # no prompt used in two updates
    feeder = state["feeder"]
    cfg = load_config(REPO / "configs/quickstart.yaml", overrides, environ={})
    items = load_items(cfg.data)
    order = EpochOrder(len(items), cfg.data.seed)
    released = [f"{items[order.item_index(*divmod(k, len(items)))].item_id}@{k // len(items)}"
                for k in range(feeder["released"])]  # fmt: skip
    assert set(used) <= set(released)
    # no gap: every released prompt was used, given back as dropped, or is still in flight (the ledger)
    assert len(used) + feeder["returned"] + len(feeder["ledger"]) == feeder["released"]
    assert not set(used) & {released[k] for k in feeder["ledger"]}
    # the run's ledger tells the same story: one rollback of one step, 16 prompts used once each
    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert (ledger.starts, ledger.rollbacks, ledger.discarded_steps) == (2, 1, 1)
    # (Redis is gone by now, so prompts still in flight cannot be told from lost ones: allow_lost)
    check = check_ledger(ledger, allow_lost=True)
    assert check.ok, check.problems
    assert (check.used, check.doubled, check.steps) == (STEPS * 4, 0, STEPS)
