"""Config: precedence, strictness, documentation, shipped files, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from services.config import ConfigError, RunConfig, dump_config, load_config, write_resolved_config

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _models(annotation)
    return found


def test_configs_folder_is_not_empty() -> None:
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path, environ={})
    assert isinstance(cfg, RunConfig)
    # Every key in the file is a real field: the file round-trips through the model unchanged.
    dumped = cfg.model_dump(mode="json")
    raw = yaml.safe_load(path.read_text()) or {}

    def check(sub_raw: dict, sub_dumped: dict, where: str) -> None:
        for key, value in sub_raw.items():
            assert key in sub_dumped, f"{where}{key} not in the model"
            if isinstance(value, dict) and isinstance(sub_dumped[key], dict) and key != "dataset_args":
                check(value, sub_dumped[key], f"{where}{key}.")

    check(raw, dumped, "")


def test_every_field_has_a_description() -> None:
    missing = [
        f"{model.__name__}.{name}"
        for model in _models(RunConfig)
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert missing == []


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 1e-5\n  lrr: 2\n")
    with pytest.raises(ValidationError, match="lrr"):
        load_config(path, environ={})


def test_bounds_are_checked() -> None:
    with pytest.raises(ValidationError):
        load_config(None, ["sampling.temperature=0"], environ={})
    with pytest.raises(ValidationError):
        load_config(None, ["learner.max_staleness=-1"], environ={})


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 1.0e-5\n  steps: 7\nsampling:\n  n: 6\n")
    env = {"DIPO_LEARNER__LR": "2e-5", "DIPO_SAMPLING__N": "3", "DIPO_UNRELATED": "x", "HOME": "/root"}
    cfg = load_config(path, ["learner.lr=3e-5"], environ=env)
    assert cfg.learner.lr == pytest.approx(3e-5)  # command line beats environment
    assert cfg.sampling.n == 3  # environment beats file
    assert cfg.learner.steps == 7  # file beats default
    assert cfg.learner.alpha == pytest.approx(0.1)  # default


def test_override_values_are_typed() -> None:
    cfg = load_config(
        None, ["reward.dipo.enable_penalty=false", "sampling.stop=[a, b]", "redis.url=redis://h:1/0"], environ={}
    )
    assert cfg.reward.dipo.enable_penalty is False
    assert cfg.sampling.stop == ["a", "b"]
    assert cfg.redis.url == "redis://h:1/0"


@pytest.mark.parametrize("bad", ["learner.lr", "=3", "learner.lr.x=1"])
def test_malformed_overrides_are_clear_errors(bad: str) -> None:
    with pytest.raises((ConfigError, ValidationError)):
        load_config(None, [bad], environ={})


def test_cross_field_validation_says_how_to_fix() -> None:
    with pytest.raises(ValidationError, match="data.path"):
        load_config(None, ["data.source=jsonl"], environ={})


def test_derived_defaults_follow_the_spec() -> None:
    cfg = load_config(None, ["learner.prompts_per_step=8", "sampling.n=16", "sampling.max_new_tokens=100"], environ={})
    assert cfg.window_size == 2 * 8 * 16
    assert cfg.min_window == 16 * 8
    assert cfg.overlong_buffer == 25


def test_resolved_config_is_written_and_reloads(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["name=unit", f"run_dir={tmp_path}/{{name}}", "redis.url=redis://:secret@h:1/0"], environ={}
    )
    path = write_resolved_config(cfg)
    assert path == tmp_path / "unit" / "config.yaml"
    text = path.read_text()
    assert "secret" not in text
    again = load_config(path, environ={})
    assert again.name == "unit"
    assert again.learner == cfg.learner


def test_dump_masks_tokens() -> None:
    cfg = load_config(None, ["reward.server.api_token=tok123"], environ={})
    assert "tok123" not in dump_config(cfg)


def test_cli_config_show_prints_resolved_config() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.cli",
            "config",
            "show",
            str(REPO / "configs/quickstart.yaml"),
            "--set",
            "learner.steps=3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "steps: 3" in result.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.cli",
            "config",
            "show",
            str(REPO / "configs/quickstart.yaml"),
            "--set",
            "learner.nope=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "nope" in bad.stdout


def test_cli_redis_starts_a_private_server_and_stops_it(tmp_path: Path) -> None:
    import re
    import signal

    import redis

    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "redis", "--data-dir", str(tmp_path), "--password", "pw"],
        stdout=subprocess.PIPE, text=True, env={**__import__("os").environ, "COLUMNS": "300"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"pid (\d+) serving (redis://\S+)", line)
        assert match, line
        pid, url = int(match.group(1)), match.group(2)
        assert ":6379" not in url
        assert redis.Redis.from_url(url, socket_timeout=5).ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        __import__("os").kill(pid, 0)


def test_environment_text_fields_keep_raw_text() -> None:
    env = {"DIPO_REDIS__PASSWORD": "123456", "DIPO_REWARD__SERVER__API_TOKEN": "yes", "DIPO_LEARNER__STEPS": "9"}
    cfg = load_config(None, environ=env)
    assert cfg.redis.password == "123456"
    assert cfg.reward.server.api_token == "yes"
    assert cfg.learner.steps == 9


def test_choice_fields_keep_words_yaml_would_turn_into_booleans() -> None:
    cfg = load_config(None, ["redis.appendfsync=no"], environ={"DIPO_LEARNER__FSDP": "never"})
    assert cfg.learner.fsdp == "never"
    assert cfg.redis.appendfsync == "no"
