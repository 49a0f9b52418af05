"""The two loops of a run, as asyncio tasks calling the role deployments.

    produce:  admit a prompt group → rollout.generate → reward.score → (teacher.score) → queue.put
    train:    queue.get_batch → actor.train_step (publishes weights v+1) → queue.set_version(v+1)

Several ``produce`` tasks run at once; the queue's admission gate bounds how far ahead of the
trainer they may get, so with ``max_staleness >= 1`` generation overlaps training and with 0 it
alternates with it. The driver never holds a batch: samples flow between roles as object refs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig

from relaxrl.envs.base import Task
from relaxrl.launch import Roles
from relaxrl.metrics import first_last_mean, overlap_length, total_length
from relaxrl.monitor import Monitor
from relaxrl.queue import group_name
from relaxrl.groups import GroupRequest

log = logging.getLogger(__name__)


class TaskStream:
    """Task ``k`` of the env's train stream for admitted group ``k``: deterministic per seed."""

    def __init__(self, env: Any, seed: int) -> None:
        self._it = env.tasks("train", seed)
        self._cache: dict[int, Task] = {}
        self._next = 0

    def get(self, k: int) -> Task:
        while self._next <= k:
            self._cache[self._next] = next(self._it)
            self._next += 1
        return self._cache.pop(k)


@dataclass
class RunResult:
    steps: int = 0
    wall_s: float = 0.0
    rewards: list[float] = field(default_factory=list)
    # Busy intervals (wall clock) per stage: gen, weights (rollout load), reward, teacher, train, publish.
    stage_intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    queue: dict = field(default_factory=dict)
    producer_errors: int = 0
    checkpoint: Optional[str] = None
    published: Any = None  # relaxrl.weights.Published of the last weight version

    def summary(self) -> dict:
        first, last = first_last_mean(self.rewards)
        gen_iv, train_iv = self.stage_intervals.get("gen", []), self.stage_intervals.get("train", [])
        gen, train = total_length(gen_iv), total_length(train_iv)
        both = overlap_length(gen_iv, train_iv)
        wall = max(self.wall_s, 1e-9)
        steps = max(self.steps, 1)
        return {
            "steps": self.steps,
            "wall_s": self.wall_s,
            "reward_first": first,
            "reward_last": last,
            "max_staleness_seen": self.queue.get("max_staleness_seen", 0),
            "dropped": self.queue.get("dropped_samples", 0),
            "dropped_by_reason": self.queue.get("dropped_by_reason", {}),
            "gen_busy_frac": gen / wall,
            "train_busy_frac": train / wall,
            "overlap_frac": both / wall,
            # Seconds each stage was busy per step (union of its intervals), for the benchmarks.
            "stage_s_per_step": {k: total_length(v) / steps for k, v in sorted(self.stage_intervals.items())},
            "staleness_hist": self.queue.get("staleness_hist", {}),
            "checkpoint": self.checkpoint,
            "producer_errors": self.producer_errors,
            "weights_kind": getattr(self.published, "kind", None),
            "weights_nbytes": getattr(self.published, "nbytes", 0),
        }


async def produce(roles: Roles, tasks: TaskStream, cfg: DictConfig, prompt_ids: Any, stats: RunResult) -> None:
    """Keep generating admitted groups until the queue closes."""
    r = cfg.rollout
    while (seq := await roles.queue.admit.remote()) is not None:
        task, gid = tasks.get(seq), group_name(seq)
        request = GroupRequest(group_id=gid, prompt_ids=prompt_ids(task.prompt), n=r.group_size,
                               domain=task.domain, env=cfg.env.name, answer=task.answer,
                               seed=cfg.seed * 1_000_003 + seq)
        try:
            # Serve resolves a response passed to another handle, and Ray an ObjectRef passed to an
            # actor, so samples go rollout → reward → (teacher) → queue without passing through here.
            samples = roles.reward.score.remote(roles.rollout.generate.remote(request), task)
            if roles.teacher is not None:
                samples = roles.teacher.score.remote(samples)
            await roles.queue.put.remote(await samples._to_object_ref())
        except Exception as e:  # a failed role call drops the group, counted; never silently
            stats.producer_errors += 1
            log.warning("group %s failed: %s", gid, e)
            await roles.queue.abandon.remote(gid, f"error_{type(e).__name__}")


async def train(roles: Roles, cfg: DictConfig, monitor: Monitor, stats: RunResult, t0: float) -> None:
    """One optimizer step per batch of ``groups_per_step`` complete, fresh groups."""
    tr = cfg.trainer
    for step in range(1, tr.steps + 1):
        batch_ref = roles.queue.get_batch.remote(cfg.rollout.groups_per_step, tr.get_batch_timeout_s)
        metrics = await roles.actor.train_step.remote([batch_ref])
        await roles.queue.set_version.remote(metrics["version"])
        stats.steps = step
        stats.rewards.append(metrics["reward_mean"])
        for stage in ("train", "publish"):
            stats.stage_intervals.setdefault(stage, []).append((metrics[f"{stage}_start"], metrics[f"{stage}_end"]))
        elapsed = time.time() - t0
        metrics["samples_per_s"] = step * cfg.rollout.groups_per_step * cfg.rollout.group_size / elapsed
        metrics["wall_s"] = elapsed
        monitor.log(step, metrics)
        if tr.checkpoint_every and step % tr.checkpoint_every == 0:
            stats.checkpoint = await roles.actor.save_checkpoint.remote(f"{cfg.run_dir}/checkpoints/step_{step}")


async def run(roles: Roles, cfg: DictConfig, env: Any, prompt_ids: Any, monitor: Monitor) -> RunResult:
    stats = RunResult()
    tasks = TaskStream(env, cfg.seed)
    r = cfg.rollout
    inflight = r.max_inflight_groups or r.groups_per_step * (r.max_staleness + 1)
    t0 = time.time()
    producers = [asyncio.create_task(produce(roles, tasks, cfg, prompt_ids, stats)) for _ in range(inflight)]
    try:
        await train(roles, cfg, monitor, stats, t0)
    finally:
        stats.wall_s = time.time() - t0
        await roles.queue.close.remote()
        await asyncio.gather(*producers, return_exceptions=True)
    if cfg.trainer.save_final:
        stats.checkpoint = await roles.actor.save_checkpoint.remote(f"{cfg.run_dir}/checkpoints/final")
    stats.queue = await roles.queue.metrics.remote()
    stats.stage_intervals.update(await roles.queue.stage_intervals.remote())
    stats.published = await roles.weights.info.remote()
    await roles.queue.check_accounting.remote()
    return stats
