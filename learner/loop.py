"""The learner's main loop: feed prompts, assemble batches, train, publish weights, checkpoint, ack.

Rank 0 talks to Redis (feeder, batch assembly, policy hash, weight broadcast, metrics); every rank trains. Per step
rank 0 broadcasts the step's samples to the other ranks as msgpack bytes (never pickles), all ranks run the same
``Trainer.train_step``, and rank 0 then publishes version v+1. Scored entries are acknowledged only after a
checkpoint that contains their update is on disk, so a crash at any point resumes exactly: the entries consumed
after the last checkpoint are still pending for this consumer and are read again first (see LEARNER_DATAFLOW.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

from learner.batch import AssemblerState, BatchAssembler, StepBatch, decode_samples, encode_samples
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.data import load_items
from learner.distributed import DistInfo, broadcast_bytes
from learner.feeder import FeederState, PromptFeeder
from learner.metrics import LearnerMetrics
from learner.policy import CHECKPOINT, CHECKPOINT_VERSION, STATUS, STEP, VERSION, PolicyPublisher
from learner.train import Trainer
from learner.weight_sync import WeightBroadcaster
from services.config import RunConfig
from services.modeling.loading import load_model, load_tokenizer, resolve_model_path
from services.streams import SCORED, StreamClient, StreamSpec, clients_from_config

log = logging.getLogger(__name__)

CONSUMER = "learner-0"


class RunFolderInUse(RuntimeError):
    """A fresh run was asked for in a folder that already holds checkpoints."""


def checkpoint_root(cfg: RunConfig) -> Path:
    """Where the run's checkpoints live."""
    return cfg.resolved_run_dir / "checkpoints"


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


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
        self.model = load_model(path, cfg.model.dtype, dist.device)
        ref_model = load_model(path, cfg.model.dtype, dist.device) if cfg.learner.kl_beta > 0 else None
        self.trainer = Trainer(cfg, self.model, dist, ref_model=ref_model)
        self.step = 0
        self.version = 0
        self.state: dict[str, Any] = {}
        root = checkpoint_root(cfg)
        latest = latest_checkpoint(root)
        if latest is not None and not resume:
            raise RunFolderInUse(f"{root} holds checkpoints: pass --resume to continue, or choose another run_dir")
        if latest is not None:
            self.state = load_checkpoint(latest, self.model, self.trainer.optimizer, self.trainer.scheduler)
            self.step, self.version = int(self.state["step"]), int(self.state["version"])
            log.info("resumed from %s at step %d, version %d", latest, self.step, self.version)
        self.latest_checkpoint = latest

    # ------------------------------------------------------------------ all ranks

    def _train(self, samples_bytes: bytes) -> dict[str, float]:
        """Rank 0: hand the step to the other ranks, then train on it."""
        if self.dist.world_size > 1:
            broadcast_bytes(msgpack.packb({"op": "step", "samples": samples_bytes}))
        return self.trainer.train_step(decode_samples(samples_bytes))

    def follow(self) -> None:
        """Ranks > 0: train on what rank 0 broadcasts until it says stop."""
        while True:
            message = msgpack.unpackb(broadcast_bytes(None), raw=False)
            if message["op"] == "stop":
                return
            self.trainer.train_step(decode_samples(message["samples"]))

    def _stop_followers(self) -> None:
        if self.dist.world_size > 1:
            broadcast_bytes(msgpack.packb({"op": "stop"}))

    # ------------------------------------------------------------------ rank 0

    def _checkpoint(self, feeder: PromptFeeder, assembler: BatchAssembler) -> Path:
        state = {
            "version": self.version,
            "feeder": feeder.state().to_dict(),
            "assembler": assembler.state().to_dict(),
        }
        path = save_checkpoint(
            checkpoint_root(self.cfg),
            self.step,
            self.model,
            self.trainer.optimizer,
            self.trainer.scheduler,
            state,
            tokenizer=self.tokenizer,
            keep=self.cfg.learner.keep_checkpoints,
        )
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
        cfg = self.cfg
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        aredis, sredis = clients_from_config(cfg.redis)
        publisher = PolicyPublisher(sredis, cfg.name)
        metrics = LearnerMetrics(cfg, self)
        feeder_state = FeederState.from_dict(self.state["feeder"]) if "feeder" in self.state else None
        restored = AssemblerState.from_dict(self.state["assembler"]) if "assembler" in self.state else AssemblerState()
        feeder = PromptFeeder(cfg, aredis, load_items(cfg.data), feeder_state)
        # Drops are reported to the feeder as they happen, so their admission slots come back at once.
        assembler = BatchAssembler(
            cfg, aredis, CONSUMER, seen_ids=restored.seen_ids, totals=restored.totals, on_settled=feeder.settle
        )
        scored = StreamClient(aredis, StreamSpec(cfg.name, SCORED), "learner", CONSUMER,
                              timeout_s=cfg.redis.socket_timeout_s, retries=cfg.redis.retries)  # fmt: skip
        lc = cfg.learner
        broadcaster = WeightBroadcaster(
            lc.weight_sync_host,
            lc.weight_sync_port,
            backend="nccl" if self.dist.device.type == "cuda" else "gloo",
            timeout_s=cfg.rollout.weight_sync_timeout_s,
            publish=publisher.publish,
            advertise_host=lc.weight_sync_advertise,
        )
        checkpoint = self.latest_checkpoint
        publisher.publish(
            {
                VERSION: self.version,
                STEP: self.step,
                STATUS: "running",
                CHECKPOINT: str(checkpoint or ""),
                CHECKPOINT_VERSION: self.version if checkpoint else -1,
            }
        )
        metrics_file = (cfg.resolved_run_dir / "metrics.jsonl").open("a")
        pending_acks: list[str] = []
        feeding = asyncio.create_task(feeder.run(lambda: self.version, stop), name="feeder")
        started = last_step_end = time.monotonic()
        status = "done"
        try:
            while self.step < cfg.learner.steps and not stop.is_set():
                wait_start = time.monotonic()
                batch = await assembler.next_batch(self.version, stop)
                if batch is None:
                    break
                wait_s = time.monotonic() - wait_start
                train = await asyncio.to_thread(self._train, encode_samples(batch.samples))
                self.step += 1
                self.version += 1
                pending_acks += batch.entry_ids
                sync_s = 0.0
                if self.version % cfg.learner.sync_every == 0:
                    report = await asyncio.to_thread(broadcaster.broadcast, self.model.named_parameters(), self.version)
                    sync_s = report.seconds
                    metrics.on_sync(report)
                publisher.publish({VERSION: self.version, STEP: self.step})
                ckpt_s = 0.0
                if self.step % cfg.learner.checkpoint_every == 0 or self.step == cfg.learner.steps:
                    ckpt_s = await self._checkpoint_and_ack(feeder, assembler, scored, pending_acks, publisher)
                    pending_acks = []
                now = time.monotonic()
                gen_tokens_per_s = float(batch.stats.get("gen_tokens", 0.0)) / max(1e-9, now - last_step_end)
                last_step_end = now
                timings = {
                    "gen_tokens_per_s": gen_tokens_per_s,
                    "elapsed_s": now - started,
                    "wait_seconds": wait_s,
                    "sync_seconds": sync_s,
                    "checkpoint_seconds": ckpt_s,
                    "prompts_released": feeder.state().released,
                }
                line = self._metrics_line(batch, train, timings)
                metrics.on_step(line, batch)
                await metrics.observe_streams(aredis, cfg.name)
                metrics_file.write(json.dumps(line) + "\n")
                metrics_file.flush()
                log.info(
                    "step %d  v%d  reward %.3f  acc %.3f  loss %.4f  wait %.1fs",
                    self.step,
                    self.version,
                    line.get("reward_mean") or 0.0,
                    line.get("accuracy") or 0.0,
                    line.get("loss") or 0.0,
                    wait_s,
                )
            if pending_acks:  # stopped early (SIGTERM): what was trained on goes into a checkpoint first
                await self._checkpoint_and_ack(feeder, assembler, scored, pending_acks, publisher)
        except BaseException:
            status = "failed"
            raise
        finally:
            stop.set()
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
            if self.step < cfg.learner.steps and status == "done":
                status = "stopped"
            publisher.publish({STATUS: status})
            self._stop_followers()
            broadcaster.close()
            metrics_file.close()
            metrics.close()
            await aredis.aclose()
            sredis.close()

    async def _checkpoint_and_ack(
        self, feeder: PromptFeeder, assembler: BatchAssembler, scored: StreamClient, acks: list[str], publisher: Any
    ) -> float:
        start = time.monotonic()
        path = await asyncio.to_thread(self._checkpoint, feeder, assembler)
        await scored.ack(acks)  # only now: the checkpoint holds these groups' update
        publisher.publish({CHECKPOINT: str(path), CHECKPOINT_VERSION: self.version})
        log.info("checkpoint %s (version %d), acknowledged %d scored entries", path, self.version, len(acks))
        return time.monotonic() - start
