"""The contracts every process of a run agrees on: the run folder's layout, the Redis keys and consumer groups, the
fields of the learner's policy hash, and the keys of ``metrics.jsonl``.

Writers and readers import these names instead of spelling strings: the learner writes ``metrics.jsonl`` and the
policy hash, the rollout servers read the hash, and the ``dipo`` tooling (panel, report, chaos, experiment) reads
all of it. docs/RUNNING.md describes the run folder, docs/PROTOCOL.md the streams and docs/METRICS.md every metric.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------------- run folder

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LEDGER_FILE = "ledger.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
PORTS_DIR = "ports"
REPORT_DIR = "report"
REDIS_DIR = "redis"
FINGERPRINT_FILE = "fingerprint"
"""In every checkpoint folder: the fingerprint of the weights it holds (written by the learner before it
publishes the folder; a rollout server that loads the folder labels its weights with it)."""


@dataclass(frozen=True)
class RunFolder:
    """The files and folders of one run folder (``<run_dir>``)."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved config, secrets masked."""
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        """One JSON line per optimizer step (keys: :class:`MetricKey`)."""
        return self.root / METRICS_FILE

    @property
    def ledger(self) -> Path:
        """Every prompt released and the update that used or dropped it (services/ledger.py)."""
        return self.root / LEDGER_FILE

    @property
    def checkpoints(self) -> Path:
        """``step-NNNNNN`` checkpoint folders and the ``latest`` pointer."""
        return self.root / CHECKPOINTS_DIR

    @property
    def logs(self) -> Path:
        """One log per process."""
        return self.root / LOGS_DIR

    @property
    def ports(self) -> Path:
        """The HTTP port each child bound, one file per child."""
        return self.root / PORTS_DIR

    @property
    def report(self) -> Path:
        """The run report (report.html and its plots)."""
        return self.root / REPORT_DIR

    @property
    def redis(self) -> Path:
        """The private redis-server's folder (append-only file, log) when `dipo run` started one."""
        return self.root / REDIS_DIR


# ---------------------------------------------------------------------------------------------------- Redis keys

KEY_PREFIX = "dipo"
"""Every key of run ``r`` is ``dipo:{r}:{name}``."""

PROMPTS = "prompts"
ROLLOUTS = "rollouts"
SCORED = "scored"
DEADLETTER = "deadletter"
PPL_WINDOW = "ppl_window"
POLICY = "policy"
"""Hash: the learner's policy version, newest checkpoint and weight-sync endpoint (fields: :class:`PolicyField`)."""
ROLLOUT_VERSIONS = "rollout_versions"
"""Hash: rollout server consumer name -> the policy version it generates with."""
FEEDER = "feeder"
"""Hash: the feeder's release count and the token of its last release."""
WEIGHTS = "weights"
"""Hash: policy version -> the fingerprint of the weights the learner published as that version."""
CANARIES = "canaries"
"""Hash: canary scorings, ``ref:{v}`` by the learner and ``{server}:{v}`` by each rollout server (services/canary)."""
QUARANTINE = "quarantine"
"""Hash: rollout server consumer name -> the version whose canary failed; the server reloads a checkpoint."""

ROLLOUT_GROUP = "rollout"
REWARD_GROUP = "reward"
LEARNER_GROUP = "learner"
CONSUMER_GROUPS: dict[str, str | None] = {
    PROMPTS: ROLLOUT_GROUP,
    ROLLOUTS: REWARD_GROUP,
    SCORED: LEARNER_GROUP,
    DEADLETTER: None,
}
"""Each work stream and the consumer group that reads it (the dead-letter stream has none)."""
WORK_STREAMS = tuple(CONSUMER_GROUPS)

LEARNER_CONSUMER = "learner-0"
"""The learner's consumer name in ``scored``: fixed, so a restarted learner re-reads what it had pending."""


def consumer_name(component: str) -> str:
    """A consumer name unique to this process: component, host and pid (``rollout-host-1234``)."""
    return f"{component}-{socket.gethostname()}-{os.getpid()}"


class PolicyField:
    """Field names of the policy hash (all values are strings)."""

    VERSION = "version"
    """The policy version rollout servers should generate with."""
    STEP = "step"
    STATUS = "status"
    """``starting | running | done | stopped | failed``."""
    PHASE = "phase"
    """What the learner is doing: ``wait`` (for a batch), ``train``, ``sync`` (weight broadcast), ``checkpoint``."""
    CHECKPOINT = "checkpoint"
    """Newest complete checkpoint: a Hugging Face folder a late joiner loads first."""
    CHECKPOINT_VERSION = "checkpoint_version"
    SYNC_ENDPOINT = "sync_endpoint"
    """host:port of the weight-sync rendezvous store."""
    SYNC_SECRET = "sync_secret"
    """The secret receivers prove their membership events with (fresh at every learner start)."""
    UPDATED_AT = "updated_at"


RUNNING = "running"
"""The policy hash's status while the learner trains (and weight-sync rounds happen)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class PolicyView:
    """What a reader (a rollout server, the learner on resume, the tooling) sees of the policy hash."""

    version: int
    checkpoint: str | None
    checkpoint_version: int
    status: str
    sync_endpoint: str | None
    sync_secret: str = ""

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> PolicyView:
        """Parse HGETALL output; missing fields take the learner's initial values."""
        data = {_text(k): _text(v) for k, v in raw.items()}
        return cls(
            version=int(data.get(PolicyField.VERSION) or 0),
            checkpoint=data.get(PolicyField.CHECKPOINT) or None,
            checkpoint_version=int(data.get(PolicyField.CHECKPOINT_VERSION) or -1),
            status=data.get(PolicyField.STATUS) or "starting",
            sync_endpoint=data.get(PolicyField.SYNC_ENDPOINT) or None,
            sync_secret=data.get(PolicyField.SYNC_SECRET) or "",
        )


# ---------------------------------------------------------------------------------------------------- metrics.jsonl


class MetricKey:
    """Keys of a ``metrics.jsonl`` line (docs/METRICS.md gives each one's meaning)."""

    STEP = "step"
    VERSION = "version"
    TIME = "time"
    ELAPSED_S = "elapsed_s"
    # what was trained on
    REWARD_MEAN = "reward_mean"
    ACCURACY = "accuracy"
    TOKENS = "tokens"
    SEQUENCES = "sequences"
    GROUPS_USED = "groups_used"
    GROUPS_CONSUMED = "groups_consumed"
    STALENESS_MEAN = "staleness_mean"
    STALENESS_MAX = "staleness_max"
    GEN_TOKENS = "gen_tokens"
    GEN_TOKENS_PER_S = "gen_tokens_per_s"
    PROMPTS_RELEASED = "prompts_released"
    # the reward service's view of the consumed groups
    TAU = "tau"
    GATE_OPEN_RATIO = "gate_open_ratio"
    KIND_EASY = "kind_easy"
    KIND_NORMAL = "kind_normal"
    KIND_HARD = "kind_hard"
    REALLOC_REWARD = "realloc_reward"
    REALLOC_PENALTY = "realloc_penalty"
    PPL_CORRECT = "ppl_correct"
    PPL_WRONG = "ppl_wrong"
    QUAD_CL = "quad_CL"
    QUAD_CH = "quad_CH"
    QUAD_EL = "quad_EL"
    QUAD_EH = "quad_EH"
    DROPPED_STALE = "dropped_stale"
    DROPPED_NO_SIGNAL = "dropped_no_signal"
    DROPPED_DUPLICATE = "dropped_duplicate"
    DROPPED_PROVENANCE = "dropped_provenance"
    """Groups dead-lettered because their weights were not the learner's (fingerprint or canary), cumulative."""
    # the optimizer step
    LOSS = "loss"
    GRAD_NORM = "grad_norm"
    LR = "lr"
    ENTROPY = "entropy"
    CLIP_LOW = "clip_low"
    CLIP_HIGH = "clip_high"
    IS_WEIGHT_MEAN = "is_weight_mean"
    IS_WEIGHT_MAX = "is_weight_max"
    RATIO_MEAN = "ratio_mean"
    RATIO_MAX = "ratio_max"
    KL_BEHAVIOUR = "kl_behaviour"
    KL_REF = "kl_ref"
    SKIPPED = "skipped"
    # timings, seconds
    STEP_SECONDS = "step_seconds"
    FORWARD_BACKWARD_SECONDS = "forward_backward_seconds"
    PROXIMAL_SECONDS = "proximal_seconds"
    WAIT_SECONDS = "wait_seconds"
    GATHER_SECONDS = "gather_seconds"
    SYNC_SECONDS = "sync_seconds"
    """Duration of the previous version's publication (broadcast + record), which overlapped this step's wait."""
    SYNC_WAIT_SECONDS = "sync_wait_seconds"
    """How long this step blocked on that publication after its batch was ready (the sync's cost to the learner)."""
    CHECKPOINT_SECONDS = "checkpoint_seconds"
    # the optimizer updates of a step (learner.minibatches x learner.epochs)
    UPDATES = "updates"
    SKIPPED_NONFINITE_LOSS = "skipped_nonfinite_loss"
    SKIPPED_NONFINITE_GRAD = "skipped_nonfinite_grad"

    @staticmethod
    def kind(group_kind: str) -> str:
        """``kind_<easy|normal|hard>``: share of that group kind among the consumed groups."""
        return f"kind_{group_kind}"

    @staticmethod
    def realloc(action: str) -> str:
        """``realloc_<reward|penalty>``: reallocations of that action among the consumed groups."""
        return f"realloc_{action}"

    @staticmethod
    def quadrant(name: str) -> str:
        """``quad_<CL|CH|EL|EH>``: share of responses in that correctness x perplexity quadrant."""
        return f"quad_{name}"

    @staticmethod
    def dropped(reason: str) -> str:
        """``dropped_<stale|no_signal|duplicate>``: cumulative groups dropped for that reason."""
        return f"dropped_{reason}"
