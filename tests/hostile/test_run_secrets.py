"""Secrets of a run (issue 16.2, 16.3): generated when left out, handed over through the environment only, never
written where other users or logs can read them, and no service listening beyond loopback without a token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runner.launcher import API_TOKEN_FILE, build_child_specs, fill_run_secrets, prepare_run_dir
from services.config import dump_config, is_secret_key, load_config, mask_url, redact_overrides, split_secret_overrides

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs/quickstart.yaml"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cr3t@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("redis://:pa/ss@w/rd@redis:6379/0", "redis://***@redis:6379/0"),  # a password holding '/' and '@'
        ("redis://dipo:p4ss@redis:6379/0", "redis://dipo:***@redis:6379/0"),
        ("redis://redis:6379/0?password=s3cr3t&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("rediss://redis:6380/0", "rediss://redis:6380/0"),
    ],
)
def test_redis_urls_are_masked_whatever_their_password_holds(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    cfg = load_config(None, [f"redis.url={url}"], environ={})
    written = dump_config(cfg)
    assert masked in written and ("s3cr3t" not in written and "pa/ss" not in written and "p4ss" not in written)


def test_secret_overrides_move_to_the_environment_and_are_redacted() -> None:
    overrides = ["learner.steps=3", "redis.password=pw", "reward.server.api_token=t0k", "redis.url=redis://:x@h:1/0"]
    plain, env = split_secret_overrides(overrides)
    assert plain == ["learner.steps=3"]
    assert env == {"DIPO_REDIS__PASSWORD": "pw", "DIPO_REWARD__SERVER__API_TOKEN": "t0k",
                   "DIPO_REDIS__URL": "redis://:x@h:1/0"}  # fmt: skip
    assert redact_overrides(overrides) == ["learner.steps=3", "redis.password=***", "reward.server.api_token=***",
                                           "redis.url=***"]  # fmt: skip
    assert is_secret_key("learner.server.api_token") and not is_secret_key("learner.steps")
    # what the environment layer makes of them is what --set made of them
    assert load_config(None, [], environ=env).reward.server.api_token == "t0k"


def test_no_child_command_line_holds_a_secret(tmp_path: Path) -> None:
    overrides = [f"run_dir={tmp_path}/run", "redis.password=pw-secret", "rollout.server.api_token=tok-secret"]
    cfg = load_config(QUICKSTART, overrides, environ={})
    specs = build_child_specs(cfg, QUICKSTART, overrides, redis_url="redis://:pw-secret@127.0.0.1:7777/0")
    for spec in specs:
        assert not any("secret" in arg for arg in spec.argv), spec.argv
        assert spec.env["DIPO_REDIS__PASSWORD"] == "pw-secret"
        assert spec.env["DIPO_ROLLOUT__SERVER__API_TOKEN"] == "tok-secret"


def test_a_run_gets_a_redis_password_and_an_api_token_when_it_has_none(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}/run"], environ={})
    run_dir = prepare_run_dir(cfg, resume=False)
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert fill_run_secrets(cfg, run_dir) == ["a Redis password", "an API token"]
    assert cfg.redis.password and len(cfg.redis.password) >= 32
    token = (run_dir / API_TOKEN_FILE).read_text().strip()
    assert cfg.rollout.server.api_token == cfg.reward.server.api_token == token and len(token) >= 32
    assert (run_dir / API_TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    again = load_config(QUICKSTART, [f"run_dir={tmp_path}/run", "reward.server.api_token=mine"], environ={})
    assert fill_run_secrets(again, run_dir) == ["a Redis password", "an API token"]  # rollout's is still unset
    assert again.reward.server.api_token == "mine" and again.rollout.server.api_token != "mine"
    given = [f"run_dir={tmp_path}/run", "redis.url=redis://r:1/0", "rollout.server.api_token=a",
             "reward.server.api_token=b"]  # fmt: skip
    external = load_config(QUICKSTART, given, environ={})
    assert fill_run_secrets(external, run_dir) == [] and external.redis.password is None  # not ours to set


@pytest.mark.parametrize("component", ["rollout_server", "reward_service"])
def test_a_service_refuses_to_listen_beyond_loopback_without_a_token(component: str) -> None:
    section = "rollout" if component == "rollout_server" else "reward"
    result = subprocess.run(
        [sys.executable, "-m", component, "--config", str(QUICKSTART), "--set", f"{section}.server.host=0.0.0.0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{section}.server.host=0.0.0.0 listens beyond loopback without an API token" in result.stderr
    assert f"DIPO_{section.upper()}__SERVER__API_TOKEN" in result.stderr
