"""Prometheus metrics of the rollout server (``dipo_rollout_*``, docs/METRICS.md)."""

from __future__ import annotations

from services.metrics import ComponentMetrics

_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class RolloutMetrics:
    """Every metric the rollout server exports, on its own registry."""

    def __init__(self) -> None:
        m = ComponentMetrics("rollout")
        self.component = m
        self.tokens = m.counter("tokens", "Response tokens generated.")
        self.groups = m.counter("groups", "Groups produced to the rollouts stream.")
        self.tokens_per_second = m.gauge("tokens_per_second", "Generation throughput of the last batch.")
        self.batch_size = m.gauge("batch_size", "Prompts in the last batch.")
        self.queue_wait = m.histogram("queue_wait_seconds", "Age of a prompt task when it was picked up.",
                                      buckets=_WAIT_BUCKETS)  # fmt: skip
        self.generate_seconds = m.histogram("generate_seconds", "Duration of one generation batch.",
                                            buckets=_SECONDS_BUCKETS)  # fmt: skip
        self.version_lag = m.gauge("version_lag", "Learner version minus the version this server generates with.")
        self.policy_version = m.gauge("policy_version", "Policy version loaded.")
        self.weight_sync_seconds = m.histogram("weight_sync_seconds", "Time to receive and apply one weight update.",
                                               buckets=_SECONDS_BUCKETS)  # fmt: skip
        self.weight_sync_failures = m.counter("weight_sync_failures", "Rejected or failed weight updates, by reason.",
                                              ["reason"])  # fmt: skip
        self.abandoned = m.counter("abandoned", "Prompts abandoned on shutdown (left pending to be claimed).")
