"""Alert rules (deploy/prometheus/alerts.yml): `promtool check config` and `check rules` on them and on the Prometheus
Operator's copy, and `promtool test rules` on their unit tests (deploy/prometheus/alerts.test.yml: for each alert,
synthetic series and the moments it must and must not fire) where promtool is installed (`apt-get install
prometheus`); a schema check of the rule-file format otherwise. In both cases: the rules name only series that exist
(the services' registries, the Redis exporter's) and cover every failure the deployment promises to alert on."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_helpers import DEPLOY, K8S
from test_deploy_schemas import REDIS_EXPORTER_SERIES, registered, registered_series  # noqa: F401 - a fixture

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
OPERATOR_RULE = K8S / "components/prometheus-operator/prometheusrule.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
PROMISED = {
    "DipoLearnerNoStep": "dipo_learner_last_step_timestamp_seconds",
    "DipoLearnerDown": "dipo_learner_step",
    "DipoWeightSyncFailures": "dipo_rollout_weight_sync_failures_total",
    "DipoCanaryMismatch": "dipo_learner_canary_mismatches_total",
    "DipoDeadLettersRising": "dipo_reward_dead_lettered_total",
    "DipoVerifierTimeouts": "dipo_reward_responses_total",
    "DipoStreamBacklogGrowing": "redis_stream_group_lag",
    "DipoRedisMemoryNearLimit": "redis_memory_max_bytes",
}
"""Each alert the deployment promises (deploy/README.md#alerts) and a series it must watch."""
COMING: set[str] = set()
"""Series an alert names before a service registers them (none now)."""


def _rules() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}


def _promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_prometheus_config_and_its_rule_file() -> None:
    done = _promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout and "SUCCESS: prometheus.yml is valid" in done.stdout


@needs_promtool
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    done = _promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert tested == set(_rules()), "every alert has a unit test"


@needs_promtool
def test_promtool_accepts_the_prometheus_operators_copy(tmp_path: Path) -> None:
    (rule,) = yaml.safe_load_all(OPERATOR_RULE.read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = _promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert done.returncode == 0 and f"SUCCESS: {len(_rules())} rules found" in done.stdout, done.stdout + done.stderr


@functools.cache
def _rule_file_schema() -> jsonschema.protocols.Validator:
    """The rule-file format: the `spec` of the PrometheusRule schema of deploy/k8s/schemas/ (groups of rules)."""
    schema = json.loads((K8S / "schemas/monitoring.coreos.com_v1_prometheusrule.json").read_text())
    spec = schema["properties"]["spec"]
    return jsonschema.Draft202012Validator(spec)


def test_the_rule_file_has_the_rule_file_format() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert [e.message for e in _rule_file_schema().iter_errors(document)] == []
    broken = {"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "up", "fro": "5m"}]}]}
    assert any("'fro' was unexpected" in e.message for e in _rule_file_schema().iter_errors(broken))


def test_the_prometheus_operators_copy_holds_the_same_rules() -> None:
    (rule,) = yaml.safe_load_all(OPERATOR_RULE.read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "copy the groups of deploy/prometheus/alerts.yml into the PrometheusRule"
    )


def test_every_promised_alert_exists_and_watches_its_series() -> None:
    rules = _rules()
    unwatched = {name: series for name, series in PROMISED.items() if series not in rules.get(name, {}).get("expr", "")}
    assert unwatched == {}
    assert all(rule["labels"]["severity"] in ("critical", "warning", "info") for rule in rules.values())
    assert all(rule["annotations"]["summary"] and rule["annotations"]["description"] for rule in rules.values())


def test_rules_name_only_series_that_exist(registered: dict[str, str]) -> None:  # noqa: F811 - the fixture
    named = {name for rule in _rules().values() for name in re.findall(r"\b(?:dipo|redis)_[a-z_]+", rule["expr"])}
    known = registered_series(registered) | REDIS_EXPORTER_SERIES | COMING
    assert sorted(named - known) == []
    # the threshold of the learner's stall alert is the learner's own /health stall threshold
    from services.config import LearnerConfig

    assert f"> {LearnerConfig().health_stall_s:.0f}" in _rules()["DipoLearnerNoStep"]["expr"]
