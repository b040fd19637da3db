"""A learner under torchrun, supervised by the launcher: a stop reaches every rank, a kill leaves none behind.

torchrun passes the launcher's SIGTERM on to every rank and waits for them (up to ``TORCHRUN_SHUTDOWN_S``), so rank 0
can checkpoint with the others still in the group before it releases them. torchrun starts each rank in a session of
its own, so the launcher's SIGKILL of torchrun's process group misses the ranks: ``learner.distributed.die_with_parent``
has the kernel kill them with torchrun. Real processes: torchrun with two gloo ranks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.launcher import torchrun_argv
from runner.supervisor import ChildSpec, Supervisor

pytestmark = pytest.mark.timeout(240)

RANK = """
import os, signal, sys, time
from pathlib import Path
from learner.distributed import init_distributed
from services.config import load_config

dist = init_distributed(load_config(None, ["learner.dist_timeout_s=60"], environ={}))
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank that does not stop on torchrun's SIGTERM
Path(sys.argv[1], f"rank{dist.rank}.pid").write_text(str(os.getpid()))
time.sleep(600)
"""

ORDERLY_RANK = """
import os, signal, sys, time
from pathlib import Path
from learner.distributed import init_distributed
from services.config import load_config

dist = init_distributed(load_config(None, ["learner.dist_timeout_s=60"], environ={}))
out = Path(sys.argv[1])
if dist.rank == 0:  # rank 0 owns the shutdown: it "checkpoints", then releases the others
    def stop(signum, frame):
        time.sleep(2)
        (out / "released").write_text("")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
(out / f"rank{dist.rank}.pid").write_text(str(os.getpid()))
while not (out / "released").exists():
    time.sleep(0.1)
(out / f"rank{dist.rank}.done").write_text("")
"""


def _alive(pid: int) -> bool:
    """Running (a zombie left to a container's init that does not reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


def _supervise_torchrun(tmp_path: Path, rank_script: str, stop_grace_s: float) -> tuple[Supervisor, Path, Path]:
    """Start ``rank_script`` as 2 torchrun ranks under a Supervisor; the supervisor, the ranks' out folder, the log."""
    script = tmp_path / "rank.py"
    script.write_text(rank_script)
    out = tmp_path / "out"
    out.mkdir()
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [*torchrun_argv(sys.executable, 2), str(script), str(out)]
    supervisor = Supervisor([ChildSpec("learner", argv, env, stop_grace_s=stop_grace_s)], tmp_path / "logs")
    supervisor.start()
    return supervisor, out, tmp_path / "logs" / "learner.log"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_killing_a_torchrun_learner_that_ignores_sigterm_kills_every_rank(tmp_path: Path) -> None:
    supervisor, out, log = _supervise_torchrun(tmp_path, RANK, stop_grace_s=3.0)
    ranks: list[int] = []
    try:
        pid_files = [out / "rank0.pid", out / "rank1.pid"]
        assert _wait_for(lambda: all(p.exists() for p in pid_files), 150), log.read_text()[-3000:]
        torchrun = supervisor.children[0].proc
        assert torchrun is not None
        ranks += [int(p.read_text()) for p in pid_files]
        assert all(_alive(pid) for pid in ranks)
        # why killing torchrun's group is not enough: every rank leads a session of its own
        assert all(os.getsid(pid) == pid != torchrun.pid for pid in ranks)

        started = time.monotonic()
        supervisor.stop_children()  # SIGTERM (ignored by the ranks), then SIGKILL of torchrun's group after 3 s
        assert supervisor.children[0].state == "stopped" and not _alive(torchrun.pid)
        assert time.monotonic() - started < 30
        assert _wait_for(lambda: not any(_alive(pid) for pid in ranks), 10), "torchrun's ranks outlived it"
    finally:
        supervisor.force = True
        supervisor.stop_children()
        for pid in ranks:  # only after a failure: the test's own ranks, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_torchrun_passes_the_stop_on_and_waits_for_rank_0_to_release_the_others(tmp_path: Path) -> None:
    supervisor, out, log = _supervise_torchrun(tmp_path, ORDERLY_RANK, stop_grace_s=60.0)
    try:
        assert _wait_for(lambda: all((out / f"rank{r}.pid").exists() for r in (0, 1)), 150), log.read_text()[-3000:]
        started = time.monotonic()
        supervisor.stop_children()
        elapsed = time.monotonic() - started
        assert supervisor.children[0].state == "stopped"
        assert not (out / "rank0.done").exists()  # rank 0 left from its handler
        assert (out / "released").exists() and (out / "rank1.done").exists(), log.read_text()[-3000:]
        assert 2 <= elapsed < 30
    finally:
        supervisor.force = True
        supervisor.stop_children()
