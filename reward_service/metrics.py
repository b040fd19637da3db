"""Prometheus metrics of the reward service (``dipo_reward_*``)."""

from __future__ import annotations

from services.metrics import ComponentMetrics

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RewardMetrics:
    """Every metric the reward service exports, on its own registry."""

    def __init__(self) -> None:
        m = ComponentMetrics("reward")
        self.component = m
        self.groups = m.counter("groups", "Groups scored, by task kind, group kind and BRR action.",
                                ["task_kind", "group_kind", "action"])  # fmt: skip
        self.responses = m.counter("responses", "Responses verified, by task kind and verifier status.",
                                   ["task_kind", "status"])  # fmt: skip
        self.dropped = m.counter("dropped_groups", "Groups marked for dropping, by reason.", ["reason"])
        self.dead_lettered = m.counter("dead_lettered", "Rollout entries moved to the dead-letter stream.")
        self.claimed = m.counter("claimed", "Rollout entries claimed from dead replicas.")
        self.verify_seconds = m.histogram("verify_seconds", "Latency of one verification.", ["task_kind"],
                                          buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.group_seconds = m.histogram("group_seconds", "Time from read to scored write of one group.",
                                         buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.tau = m.gauge("tau", "tau* of the fit in force, by task kind.", ["task_kind"])
        self.gate_open = m.gauge("gate_open", "1 when the DiPO gate of the fit in force is open.", ["task_kind"])
        self.window_items = m.gauge("window_items", "Items the fit in force saw.", ["task_kind"])
        self.window_error_rate = m.gauge("window_error_rate", "err(tau*) / window size of the fit.", ["task_kind"])
        self.ppl = m.histogram("perplexity", "Response perplexity by correctness.", ["correct"],
                               buckets=(1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0))  # fmt: skip
        self.failure_rate = m.gauge("verifier_failure_rate", "Share of timeout+error among recent verifications.")
        self.worker_restarts = m.gauge("verifier_worker_restarts", "Verifier processes replaced (kills, crashes).")
