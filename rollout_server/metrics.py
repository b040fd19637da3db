"""Prometheus metrics of the rollout server (``dipo_rollout_*``, docs/METRICS.md)."""

from __future__ import annotations

from services.metrics import ComponentMetrics

_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SPREAD_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)


class RolloutMetrics:
    """Every metric the rollout server exports, on its own registry."""

    def __init__(self) -> None:
        m = ComponentMetrics("rollout")
        self.component = m
        self.tokens = m.counter("tokens", "Response tokens generated.")
        self.groups = m.counter("groups", "Groups produced to the rollouts stream.")
        self.tokens_per_second = m.gauge("tokens_per_second", "Response tokens written per second (last 30 s).")
        self.inflight_groups = m.gauge("inflight_groups", "Groups being generated (admitted or waiting for slots).")
        self.inflight_tokens = m.gauge("inflight_tokens", "Tokens held in the engine's KV cache, padding included.")
        self.occupancy = m.gauge("engine_occupancy", "Decode slots in use / decode slots available.")
        self.queue_wait = m.histogram("queue_wait_seconds", "Age of a prompt task when it was picked up.",
                                      buckets=_WAIT_BUCKETS)  # fmt: skip
        self.generate_seconds = m.histogram("generate_seconds", "Submit-to-finish time of one group.",
                                            buckets=_SECONDS_BUCKETS)  # fmt: skip
        self.version_lag = m.gauge("version_lag", "Learner version minus the oldest version of the last group.")
        self.version_spread = m.histogram("version_spread", "Newest minus oldest policy version within one group.",
                                          buckets=_SPREAD_BUCKETS)  # fmt: skip
        self.policy_version = m.gauge("policy_version", "Policy version loaded.")
        self.weight_sync_seconds = m.histogram("weight_sync_seconds", "Time to receive and verify one weight update.",
                                               buckets=_SECONDS_BUCKETS)  # fmt: skip
        self.swap_seconds = m.histogram("swap_seconds", "Time from a verified delivery to its weights being in use.",
                                        buckets=_SECONDS_BUCKETS)  # fmt: skip
        self.swap_pause = m.histogram("swap_pause_seconds", "How long generation paused to apply one weight swap.",
                                      buckets=_PAUSE_BUCKETS)  # fmt: skip
        self.swaps = m.counter("swaps", "Weight swaps applied (deliveries, checkpoint loads, reloads).")
        self.weight_sync_failures = m.counter("weight_sync_failures", "Rejected or failed weight updates, by reason.",
                                              ["reason"])  # fmt: skip
        self.quarantines = m.counter("canary_mismatches", "Times the learner quarantined this server (bad canary).")
        self.abandoned = m.counter("abandoned", "Prompts abandoned on shutdown (left pending to be claimed).")
        self.write_failures = m.counter("write_failures", "Finished groups whose write to Redis failed (reclaimed).")
