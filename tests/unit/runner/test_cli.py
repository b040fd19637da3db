"""The `dipo` command line: `--version`, and `dipo eval` taking `--config` and `--set` like the other commands."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _dipo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_version_prints_the_installed_version() -> None:
    done = _dipo("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"dipo {version('dipo')}"


def test_eval_applies_set_overrides_to_the_run_config() -> None:
    # A bad value reaches the config (and is refused there, exit 2) only if --set is applied to it.
    bad = _dipo("eval", "--config", "configs/quickstart.yaml", "--set", "sampling.n=0", "--limit", "1")
    assert bad.returncode == 2 and "sampling.n" in bad.stderr
    unknown = _dipo("eval", "--config", "configs/quickstart.yaml", "--set", "sampling.nn=4")
    assert unknown.returncode == 2 and "nn" in unknown.stderr
    help_text = _dipo("eval", "--help").stdout
    assert "--set KEY=VALUE" in help_text and "--config" in help_text
