"""The learner's Prometheus metrics: duration buckets that reach the measured step times, the correctness x
perplexity quadrant shares of metrics.jsonl as a labelled gauge, and the time of the last step for the alerts."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from learner.batch import StepBatch
from learner.metrics import DURATION_BUCKETS, QUADRANTS, LearnerMetrics
from runner.redis_server import LocalRedis
from services.contracts import MetricKey as K
from services.streams import connect


def _value(metrics: LearnerMetrics, name: str, **labels: str) -> float | None:
    return metrics.component.registry.get_sample_value(name, labels or None)


def _line(step: int, **values: float) -> dict[str, float]:
    line = {K.STEP: step, K.VERSION: step, K.STEP_SECONDS: 54.0, K.WAIT_SECONDS: 5.0}
    line |= {K.quadrant(q): share for q, share in zip(QUADRANTS, (0.5, 0.25, 0.125, 0.125), strict=True)}
    return line | values


def test_duration_buckets_span_gpu_steps_to_cpu_steps_and_checkpoints() -> None:
    assert DURATION_BUCKETS[0] <= 0.05 and DURATION_BUCKETS[-1] >= 1800
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    metrics = LearnerMetrics()
    metrics.on_step(_line(1), StepBatch([], [], [], {}))
    # a 54 s CPU step lands in the 60 s bucket, not past a 10 s top bucket
    assert _value(metrics, "dipo_learner_step_seconds_bucket", le="30.0") == 0.0
    assert _value(metrics, "dipo_learner_step_seconds_bucket", le="60.0") == 1.0
    assert _value(metrics, "dipo_learner_wait_seconds_bucket", le="5.0") == 1.0
    exposed = generate_latest(metrics.component.registry).decode()
    for name in ("step_seconds", "wait_seconds", "weight_sync_seconds", "checkpoint_seconds"):
        assert f'dipo_learner_{name}_bucket{{le="1800.0"}}' in exposed


def test_quadrant_shares_are_a_labelled_gauge() -> None:
    metrics = LearnerMetrics()
    metrics.on_step(_line(1), StepBatch([], [], [], {}))
    shares = {q: _value(metrics, "dipo_learner_quadrant_share", quadrant=q) for q in QUADRANTS}
    assert shares == {"CL": 0.5, "CH": 0.25, "EL": 0.125, "EH": 0.125}
    metrics.on_step(_line(2, quad_CL=0.75), StepBatch([], [], [], {}))
    assert _value(metrics, "dipo_learner_quadrant_share", quadrant="CL") == 0.75


def test_the_last_step_time_starts_at_the_process_start_and_moves_with_each_step() -> None:
    before = time.time()
    metrics = LearnerMetrics()
    started = _value(metrics, "dipo_learner_last_step_timestamp_seconds")
    assert started is not None and before <= started <= time.time()
    time.sleep(0.01)
    metrics.on_step(_line(1), StepBatch([], [], [], {}))
    stepped = _value(metrics, "dipo_learner_last_step_timestamp_seconds")
    assert stepped is not None and stepped > started


async def test_redis_memory_is_exported_and_warned_about_near_the_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with LocalRedis(tmp_path, maxmemory_mb=64) as server:
        redis = connect(server.url, timeout_s=5.0)
        try:
            config = await redis.config_get("maxmemory*")
            assert (config["maxmemory"], config["maxmemory-policy"]) == (str(64 << 20), "noeviction")  # never evict
            metrics = LearnerMetrics()

            def warnings() -> list[logging.LogRecord]:
                return [r for r in caplog.records if r.name == "learner.metrics" and r.levelno >= logging.WARNING]

            with caplog.at_level(logging.WARNING, logger="learner.metrics"):
                await metrics.observe_redis_memory(redis)
                assert not warnings()  # a fresh server is far below 80 % of 64 MiB
                assert _value(metrics, "dipo_learner_redis_memory_bytes", kind="max") == 64 << 20
                used = _value(metrics, "dipo_learner_redis_memory_bytes", kind="used")
                assert used is not None and used > 0
                await redis.config_set("maxmemory", int(used / 0.9))  # now at about 90 %
                await metrics.observe_redis_memory(redis)
                await metrics.observe_redis_memory(redis)  # still near: warned once, not per step
            (record,) = warnings()  # warned once, though the use grew a little meanwhile
            assert record.getMessage().startswith("Redis uses 9") and "of its maxmemory" in record.getMessage()
        finally:
            await redis.aclose()
