"""The learner's main loop: feed prompts, assemble batches, train, publish weights, checkpoint, ack.

Rank 0 talks to Redis (feeder, batch assembly, policy hash, weight broadcast, metrics); every rank trains. Per step
rank 0 broadcasts the step's samples to the other ranks as msgpack bytes (never pickles), all ranks run the same
``Trainer.train_step``, and rank 0 then publishes version v+1. Under FSDP each rank holds only shards, so whenever
rank 0 needs the full weights (to publish, to checkpoint) it first tells the others to join the gather. The control
messages: ``{"op": "step", "samples": ...}``, ``{"op": "gather", "optimizer": bool}``, ``{"op": "stop"}``.

Scored entries are acknowledged only after a checkpoint that contains their update is on disk, so a crash at any
point resumes exactly: the entries consumed after the last checkpoint are still pending for this consumer and are
read again first (see LEARNER_DATAFLOW.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgpack
import numpy as np
import redis
import redis.asyncio as aioredis
import torch

from learner.app import LearnerServer, Progress
from learner.batch import AssemblerState, BatchAssembler, StepBatch, decode_samples, encode_samples
from learner.canary import score_tokens
from learner.checkpoint import (
    FullState,
    gather_full_state,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_checkpoint_sharded,
)
from learner.data import load_items
from learner.distributed import DistInfo, broadcast_bytes
from learner.feeder import FeederState, PromptFeeder
from learner.metrics import LearnerMetrics
from learner.policy import PolicyPublisher
from learner.provenance import Provenance
from learner.publication import Publication
from learner.trackers import Trackers
from learner.train import Trainer
from learner.weight_sync import WeightBroadcaster
from services.config import RunConfig
from services.contracts import FINGERPRINT_FILE, LEARNER_CONSUMER, RUNNING, PolicyField, RunFolder
from services.contracts import MetricKey as K
from services.ledger import LedgerWriter
from services.modeling.canary import canary_token_ids
from services.modeling.loading import load_model, load_tokenizer, resolve_model_path, torch_dtype
from services.streams import clients_from_config

log = logging.getLogger(__name__)

JOINER_POLL_S = 2.0
"""How often the learner, while it waits for a batch, looks for rollout servers that need the current weights."""


class RunFolderInUse(RuntimeError):
    """A fresh run was asked for in a folder that already holds checkpoints."""


def checkpoint_root(cfg: RunConfig) -> Path:
    """Where the run's checkpoints live."""
    return RunFolder(cfg.resolved_run_dir).checkpoints


def fsdp_choice(cfg: RunConfig, dist: DistInfo) -> bool | None:
    """``Trainer``'s use_fsdp for ``learner.fsdp``: auto decides there (CUDA with >1 rank); always shards whenever
    there is more than one rank, gloo included; off never shards."""
    if cfg.learner.fsdp == "auto":
        return None
    return cfg.learner.fsdp == "always" and dist.distributed


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class _Run:
    """What rank 0's loop holds while it runs: clients, publisher, ledger, metrics, feeder, assembler, broadcaster."""

    stop: asyncio.Event
    aredis: aioredis.Redis
    sredis: redis.Redis
    publisher: PolicyPublisher
    ledger: LedgerWriter
    metrics: LearnerMetrics
    progress: Progress
    server: LearnerServer
    feeder: PromptFeeder
    feeding: asyncio.Task[None]
    assembler: BatchAssembler
    broadcaster: WeightBroadcaster
    provenance: Provenance
    publication: Publication
    trackers: Trackers
    metrics_file: TextIO
    pending_acks: list[str] = field(default_factory=list)
    """Scored entries trained on since the last checkpoint: acknowledged once a checkpoint holds their update."""
    started: float = field(default_factory=time.monotonic)
    last_step_end: float = field(default_factory=time.monotonic)

    def phase(self, phase: str) -> None:
        """Tell watchers (panel, chaos runner, /health) what the learner does now."""
        self.progress.phase = phase
        self.publisher.publish_phase(phase)


class Learner:
    """One rank of the learner."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.dist = dist
        self.is_main = dist.rank == 0
        torch.manual_seed(cfg.learner.seed)
        path = resolve_model_path(cfg.model.name_or_path, Path(cfg.model.cache_dir) if cfg.model.cache_dir else None)
        self.model_path = path
        self.tokenizer = load_tokenizer(path)
        # float32 master weights; the Trainer computes in model.dtype on CUDA (bf16) and publishes in it.
        self.model = load_model(path, "float32", dist.device)
        ref_model = load_model(path, cfg.model.dtype, dist.device) if cfg.learner.kl_beta > 0 else None
        self.step = 0
        self.version = 0
        self.state: dict[str, Any] = {}
        root = checkpoint_root(cfg)
        latest = latest_checkpoint(root)
        if latest is not None and not resume:
            raise RunFolderInUse(f"{root} holds checkpoints: pass --resume to continue, or choose another run_dir")
        if latest is not None:  # full weights go in before FSDP shards them
            load_weights(latest, self.model)
        self.trainer = Trainer(cfg, self.model, dist, ref_model=ref_model, use_fsdp=fsdp_choice(cfg, dist))
        if latest is not None:
            optimizer, scheduler = self.trainer.optimizer, self.trainer.scheduler
            self.state = load_checkpoint(latest, self.model, optimizer, scheduler, weights=False, sharded=self.fsdp)
            self.step, self.version = int(self.state["step"]), int(self.state["version"])
            log.info("resumed from %s at step %d, version %d", latest, self.step, self.version)
        self.latest_checkpoint = latest
        self._checkpoint_version = self.version if latest is not None else -1
        self.canary_ids = canary_token_ids(self.tokenizer)

    @property
    def fsdp(self) -> bool:
        """True when the policy is sharded with FSDP (full weights then need a gather over all ranks)."""
        return self.trainer.fsdp

    # ------------------------------------------------------------------ all ranks

    def train_step(self, samples_bytes: bytes) -> dict[str, float]:
        """Rank 0: hand the step to the other ranks, then train on it."""
        self._tell_followers({"op": "step", "samples": samples_bytes})
        return self.trainer.train_step(decode_samples(samples_bytes))

    def gather(self, *, optimizer: bool = False) -> FullState:
        """Rank 0: the policy's full weights (and optimizer state); under FSDP the other ranks join the gather."""
        if self.fsdp:
            self._tell_followers({"op": "gather", "optimizer": optimizer})
        return gather_full_state(self.model, self.trainer.optimizer if optimizer else None, sharded=self.fsdp)

    def follow(self) -> None:
        """Ranks > 0: train on what rank 0 broadcasts and join its gathers until it says stop."""
        while True:
            message = msgpack.unpackb(broadcast_bytes(None), raw=False)
            op = message["op"]
            if op == "stop":
                return
            if op == "step":
                self.trainer.train_step(decode_samples(message["samples"]))
            elif op == "gather":
                optimizer = self.trainer.optimizer if message["optimizer"] else None
                gather_full_state(self.model, optimizer, sharded=self.fsdp)
            elif op == "canary":
                score_tokens(self.trainer, message["ids"])
            elif op == "checkpoint":
                save_checkpoint_sharded(checkpoint_root(self.cfg), int(message["step"]), self.model,
                                        self.trainer.optimizer, self.trainer.scheduler, {})  # fmt: skip
            else:
                raise ValueError(f"unknown control op {op!r} from rank 0")

    def score_canary(self) -> np.ndarray:
        """Rank 0: the canary's log-probs under the current weights (every rank joins the forward under FSDP)."""
        self._tell_followers({"op": "canary", "ids": self.canary_ids})
        return score_tokens(self.trainer, self.canary_ids)

    def stop_followers(self) -> None:
        """Rank 0: release the other ranks from ``follow``."""
        self._tell_followers({"op": "stop"})

    def _tell_followers(self, message: dict[str, Any]) -> None:
        if self.dist.world_size > 1:
            broadcast_bytes(msgpack.packb(message))

    # ------------------------------------------------------------------ rank 0

    def _published(self, full: FullState) -> list[tuple[str, torch.Tensor]]:
        """The weights as rollout servers hold them: in model.dtype (the learner keeps float32 masters)."""
        dtype = torch_dtype(self.cfg.model.dtype)
        return [(name, t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)) for name, t in
                full.weights.items()]  # fmt: skip

    def write_checkpoint(self, extra: dict[str, Any], full: FullState | None = None) -> Path:
        """Rank 0: checkpoint the current step with `extra` JSON state. Under FSDP every rank writes its own
        optimizer shard (torch.distributed.checkpoint) and rank 0 the Hugging Face weights; otherwise rank 0 writes
        everything, gathering unless `full` holds the optimizer state already."""
        if self.fsdp:
            return self._write_sharded_checkpoint(extra, full)
        if full is None or full.optimizer is None:
            full = self.gather(optimizer=True)
        path = save_checkpoint(
            checkpoint_root(self.cfg),
            self.step,
            self.model,
            self.trainer.optimizer,
            self.trainer.scheduler,
            {"version": self.version, **extra},
            tokenizer=self.tokenizer,
            keep=self.cfg.learner.keep_checkpoints,
            weights=full.checkpoint_weights(),
            optimizer_state=full.optimizer,
        )
        self.latest_checkpoint = path
        return path

    def _write_sharded_checkpoint(self, extra: dict[str, Any], full: FullState | None) -> Path:
        if full is None:
            full = self.gather(optimizer=False)
        self._tell_followers({"op": "checkpoint", "step": self.step})
        path = save_checkpoint_sharded(
            checkpoint_root(self.cfg), self.step, self.model, self.trainer.optimizer, self.trainer.scheduler,
            {"version": self.version, **extra}, tokenizer=self.tokenizer, keep=self.cfg.learner.keep_checkpoints,
            weights=full.checkpoint_weights(),
        )  # fmt: skip
        assert path is not None, "rank 0 gets the checkpoint folder"
        self.latest_checkpoint = path
        return path

    def _metrics_line(self, batch: StepBatch, train: dict[str, float], timings: dict[str, float]) -> dict[str, Any]:
        line: dict[str, Any] = {"step": self.step, "version": self.version, "time": time.time()}
        line |= {k: _finite(float(v)) for k, v in batch.stats.items()}
        line |= {k: _finite(float(v)) for k, v in train.items()}
        line |= timings
        return line

    async def run(self) -> None:
        """Rank 0's loop; returns when training is done or SIGTERM/SIGINT asked to stop (after a checkpoint)."""
        run = await self._setup()
        status = "done"
        try:
            while self.step < self.cfg.learner.steps and not run.stop.is_set():
                if not await self._train_one_step(run):
                    break
            if run.pending_acks:  # stopped early (SIGTERM): what was trained on goes into a checkpoint first
                run.publisher.publish_phase("checkpoint")
                await self._checkpoint_and_ack(run)
        except BaseException:
            status = "failed"
            raise
        finally:
            if self.step < self.cfg.learner.steps and status == "done":
                status = "stopped"
            await self._teardown(run, status)

    async def _setup(self) -> _Run:
        """Connect, restore the feeder and assembler from the checkpoint state, host the weight-sync store, start
        feeding prompts, and publish the policy as running."""
        cfg, lc = self.cfg, self.cfg.learner
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        aredis, sredis = clients_from_config(cfg.redis)
        publisher = PolicyPublisher(sredis, cfg.name)
        self._skip_orphaned_versions(publisher)
        folder = RunFolder(cfg.resolved_run_dir)
        ledger = LedgerWriter(folder.ledger)
        ledger.start(self.step, self.version, resumed=self.latest_checkpoint is not None)
        metrics, progress = LearnerMetrics(), Progress(self.step, self.version)
        feeder_state = FeederState.from_dict(self.state["feeder"]) if "feeder" in self.state else None
        restored = AssemblerState.from_dict(self.state["assembler"]) if "assembler" in self.state else AssemblerState()
        feeder = PromptFeeder(cfg, aredis, load_items(cfg.data), feeder_state)
        feeder.on_release = ledger.release
        # Drops are reported to the feeder as they happen, so their admission slots come back at once.
        provenance = Provenance(cfg, aredis)
        assembler = BatchAssembler(cfg, aredis, LEARNER_CONSUMER, seen_ids=restored.seen_ids, totals=restored.totals,
                                   on_settled=feeder.settle, provenance=provenance)  # fmt: skip
        broadcaster = WeightBroadcaster(
            lc.weight_sync_host, lc.weight_sync_port, backend="nccl" if self.dist.device.type == "cuda" else "gloo",
            timeout_s=cfg.rollout.weight_sync_timeout_s, publish=publisher.publish,
            advertise_host=lc.weight_sync_advertise,
        )  # fmt: skip
        publication = Publication(broadcaster, provenance, publisher, metrics.on_sync)
        checkpoint = self.latest_checkpoint
        publisher.publish({
            PolicyField.VERSION: self.version, PolicyField.STEP: self.step, PolicyField.STATUS: RUNNING,
            PolicyField.CHECKPOINT: str(checkpoint or ""),
            PolicyField.CHECKPOINT_VERSION: self.version if checkpoint else -1,
        })  # fmt: skip
        feeding = asyncio.create_task(feeder.run(lambda: self.version, stop), name="feeder")
        server = LearnerServer(cfg, metrics, progress)
        trackers = Trackers.from_config(cfg, cfg.resolved_run_dir)
        run = _Run(stop, aredis, sredis, publisher, ledger, metrics, progress, server, feeder, feeding, assembler,
                   broadcaster, provenance, publication, trackers, folder.metrics.open("a"))  # fmt: skip
        try:
            await self._publish_current(run)  # the weights rollout servers start from carry a record too
        except BaseException:
            await self._teardown(run, "failed")
            raise
        return run

    async def _publish_current(self, run: _Run) -> None:
        """Publish the weights in place as the current version (at start and on resume)."""
        full = await asyncio.to_thread(self.gather)
        canary = await asyncio.to_thread(self.score_canary)
        run.publication.start(self._published(full), self.version, canary)
        await run.publication.wait()

    async def _train_one_step(self, run: _Run) -> bool:
        """Wait for a batch, train on it, publish the new version and checkpoint when due; False when stopped."""
        wait_start = time.monotonic()
        run.phase("wait")
        batch = await self._next_batch_serving_joiners(run)
        if batch is None:
            return False
        sync_wait_s = await run.publication.wait()  # the previous version's publication overlapped the wait
        wait_s = time.monotonic() - wait_start
        run.phase("train")
        train = await asyncio.to_thread(self.train_step, encode_samples(batch.samples))
        self.step += 1
        self.version += 1
        run.pending_acks += batch.entry_ids
        used = [(g.rollout.task.prompt_id, g.oldest_version) for g in batch.used]
        run.ledger.step(self.step, self.version, used, batch.dropped_ids)
        timings = await self._publish_and_checkpoint(run)
        now = time.monotonic()
        timings |= {
            K.GEN_TOKENS_PER_S: float(batch.stats.get(K.GEN_TOKENS, 0.0)) / max(1e-9, now - run.last_step_end),
            K.ELAPSED_S: now - run.started,
            K.WAIT_SECONDS: wait_s,
            K.SYNC_WAIT_SECONDS: sync_wait_s,
            K.SYNC_SECONDS: run.publication.last_seconds,
            K.PROMPTS_RELEASED: run.feeder.state().released,
        }
        run.last_step_end = now
        run.progress.stepped(self.step, self.version)
        await self._record_step(run, self._metrics_line(batch, train, timings), batch)
        return True

    async def _publish_and_checkpoint(self, run: _Run) -> dict[str, float]:
        """Start publishing the new weights (every ``sync_every`` versions; it runs on while the learner waits for
        the next batch) and checkpoint when due; returns the timings."""
        lc = self.cfg.learner
        sync = self.version % lc.sync_every == 0
        ckpt = self.step % lc.checkpoint_every == 0 or self.step == lc.steps
        gather_start = time.monotonic()
        # One gather serves both the broadcast and the checkpoint (a no-copy view without FSDP).
        full = await asyncio.to_thread(self.gather, optimizer=ckpt and not self.fsdp) if sync or ckpt else None
        timings = {K.GATHER_SECONDS: time.monotonic() - gather_start, K.CHECKPOINT_SECONDS: 0.0}
        if sync and full is not None:
            canary = await asyncio.to_thread(self.score_canary)
            run.phase("sync")
            run.publication.start(self._published(full), self.version, canary)
        run.publisher.publish({PolicyField.STEP: self.step})
        if ckpt:
            await run.publication.wait()  # the checkpoint records the fingerprint the publication computed
            run.phase("checkpoint")
            timings[K.CHECKPOINT_SECONDS] = await self._checkpoint_and_ack(run, full)
        del full  # the publication keeps what it needs; a gathered copy is a full CPU model
        await run.provenance.forget_before(self.version - lc.max_staleness - 2, keep={self._checkpoint_version})
        return timings

    async def _record_step(self, run: _Run, line: dict[str, Any], batch: StepBatch) -> None:
        """One metrics.jsonl line, the Prometheus metrics and a log line for the step just done."""
        run.metrics.on_step(line, batch)
        run.metrics.on_quarantines(run.provenance.quarantined)
        run.metrics.on_rejected_sync_events(run.broadcaster.rejected_events)
        await run.metrics.observe_streams(run.aredis, self.cfg.name)
        await run.metrics.observe_redis_memory(run.aredis)
        run.metrics_file.write(json.dumps(line) + "\n")
        run.metrics_file.flush()
        run.trackers.log_step(line, self.step)
        log.info(
            "step %d  v%d  reward %.3f  acc %.3f  loss %.4f  wait %.1fs", self.step, self.version,
            line.get(K.REWARD_MEAN) or 0.0, line.get(K.ACCURACY) or 0.0, line.get(K.LOSS) or 0.0,
            line[K.WAIT_SECONDS],
        )  # fmt: skip

    async def _teardown(self, run: _Run, status: str) -> None:
        """Stop feeding, publish the final status, release the other ranks and close everything."""
        with contextlib.suppress(Exception):  # a failed final broadcast must not hide why the loop ended
            await run.publication.wait()
        run.stop.set()
        run.feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run.feeding
        run.publisher.publish({PolicyField.STATUS: status})
        self.stop_followers()
        run.broadcaster.close()
        run.metrics_file.close()
        run.ledger.close()
        run.trackers.close(status)
        run.server.close()
        await run.aredis.aclose()
        run.sredis.close()

    async def _next_batch_serving_joiners(self, run: _Run) -> StepBatch | None:
        """Wait for the next batch; meanwhile send the current weights to rollout servers that joined since the
        last round.

        Without this a run can stall: a server that restarts loads the newest checkpoint, which may be more than
        ``max_staleness`` versions old (or, after a learner crash before its first checkpoint, hold orphaned
        weights). If it is the only one, every group it makes is dropped as stale, the learner never completes a
        step, and so never broadcasts the weights that would make its groups fresh again.
        """
        done = asyncio.Event()

        async def serve() -> None:
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), JOINER_POLL_S)
                if done.is_set() or run.publication.busy:
                    continue
                if not await asyncio.to_thread(run.broadcaster.unserved_members):
                    continue
                full = await asyncio.to_thread(self.gather)
                report = await asyncio.to_thread(run.broadcaster.broadcast, self._published(full), self.version)
                del full
                run.metrics.on_sync(report)
                log.info("sent v%d to rollout servers that joined while the learner waited", self.version)

        server = asyncio.create_task(serve(), name="serve-joiners")
        try:
            return await run.assembler.next_batch(self.version, run.stop)
        finally:
            done.set()
            await server  # never cancelled mid-broadcast: it finishes the round it is in, then sees `done`

    def _skip_orphaned_versions(self, publisher: PolicyPublisher) -> None:
        """After a crash, give the resumed weights a version above any the lost learner published.

        A learner that crashed after publishing versions past its newest checkpoint leaves rollout servers holding
        weights that no longer exist. Reusing those version numbers would make versions go backwards on the
        servers; instead the checkpoint's weights are republished as the next unused version, which servers that
        rejoin load from the checkpoint, and groups sampled with the orphaned weights merely look older.
        """
        published = publisher.read().version
        if published > self.version:
            log.warning("versions %d..%d were published after the checkpoint this learner resumed from (v%d); "
                        "continuing as v%d", self.version + 1, published, self.version, published + 1)  # fmt: skip
            self.version = published + 1

    async def _checkpoint_and_ack(self, run: _Run, full: FullState | None = None) -> float:
        """Checkpoint, then acknowledge the scored entries that checkpoint holds; returns the seconds it took."""
        start = time.monotonic()
        extra = {"feeder": run.feeder.state().to_dict(), "assembler": run.assembler.state().to_dict()}
        open_ids = run.feeder.ledger()
        path = await asyncio.to_thread(self.write_checkpoint, extra, full)
        if run.publication.version == self.version and run.publication.fingerprint:
            # before the path is published: a server that loads the checkpoint finds the fingerprint beside it
            (path / FINGERPRINT_FILE).write_text(run.publication.fingerprint)
        self._checkpoint_version = self.version
        run.ledger.checkpoint(self.step, self.version, open_ids)
        await run.assembler.client.ack(run.pending_acks)  # only now: the checkpoint holds these groups' update
        run.publisher.publish({PolicyField.CHECKPOINT: str(path), PolicyField.CHECKPOINT_VERSION: self.version})
        log.info("checkpoint %s (version %d), acknowledged %d scored entries", path, self.version,
                 len(run.pending_acks))  # fmt: skip
        run.pending_acks = []
        return time.monotonic() - start
