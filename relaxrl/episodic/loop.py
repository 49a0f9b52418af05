"""The in-process DAgger loop (bench/dagger_vs_bc.py, fast tests), written against three callables.

Runs are not made here: ``python -m relaxrl.train`` runs multi-turn episodes through the one
driver and queue (relaxrl/driver.py, the episode rollout role). This loop alternates collection and
training in one process, with the same episodes, samples and DAgger loss.

    every steps_per_iter steps (while labels remain in the budget):
        beta = schedule(iteration)
        episodes = collect(seeds, beta)          # per-turn teacher/student mixture, teacher labels
        buffer.add(label samples)                # aggregation, FIFO-bounded
    each step: train(draw(buffer) + this iteration's student episodes if grpo_weight > 0)
    evaluate(held-out seeds): the student alone

Train seeds are ``[0, EVAL_SEED_BASE)``, held-out seeds start at ``EVAL_SEED_BASE``: no episode
evaluated was ever trained on.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence

from relaxrl.algorithms.dagger import DAggerConfig, LabelBuffer
from relaxrl.envs.episodes import EVAL_SEED_BASE, STUDENT, Episode, eval_seeds, label_samples, train_seeds
from relaxrl.envs.episodes import trajectory_sample
from relaxrl.sample import Sample

log = logging.getLogger(__name__)
__all__ = ["EVAL_SEED_BASE", "LoopResult", "dagger_loop", "eval_seeds", "train_seeds"]

Collect = Callable[[Sequence[int], float, str], Awaitable[list[Episode]]]  # (seeds, beta, prefix)
Train = Callable[[list[Sample]], Awaitable[dict]]
Evaluate = Callable[[Sequence[int]], Awaitable[dict]]  # -> {"success": ..., ...}


@dataclass
class LoopResult:
    steps: int = 0
    labels: int = 0  # teacher labels collected (and trained on)
    labels_dropped: int = 0  # labels past the budget, not used (counted, never silent)
    episodes: int = 0
    train_success: list[float] = field(default_factory=list)  # per collection, student-acted success
    curve: list[dict] = field(default_factory=list)  # {"step", "labels", "episodes", "success", ...}
    evicted: int = 0
    last_metrics: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.curve[-1] if self.curve else {}


async def dagger_loop(
    cfg: DAggerConfig,
    *,
    total_steps: int,
    collect: Collect,
    train: Train,
    evaluate: Evaluate,
    tokenizer: Any,
    seed: int = 0,
    on_step: Optional[Callable[[int, dict], None]] = None,
) -> LoopResult:
    res = LoopResult()
    buffer = LabelBuffer(cfg.buffer_size)
    rng = random.Random(f"dagger-draw:{seed}")
    held_out = eval_seeds(cfg.eval_episodes)
    budget = cfg.label_budget or None
    trajectories: list[Sample] = []
    iteration = 0
    for step in range(1, total_steps + 1):
        if (step - 1) % cfg.steps_per_iter == 0:
            if budget is None or res.labels < budget or cfg.grpo_weight > 0:
                trajectories = await _collect(cfg, collect, iteration, seed, tokenizer, buffer, budget, res)
                iteration += 1
        # Every eval_every collection periods, also after the label budget has stopped collection.
        if cfg.eval_every and (step - 1) % (cfg.eval_every * cfg.steps_per_iter) == 0:
            await _evaluate(evaluate, held_out, step - 1, res)
        batch = buffer.draw(cfg.batch_size, rng) if cfg.ce_weight > 0 else []
        if cfg.grpo_weight > 0:
            batch = batch + trajectories
        if not batch:
            raise RuntimeError("no training data: the teacher gave no labels and the GRPO term is off")
        # A sample trained at several steps gets a uid per use (the actor refuses a uid twice).
        metrics = await train([s.replace(uid=f"{s.uid}@{step}") for s in batch])
        res.steps, res.last_metrics = step, metrics
        if on_step is not None:
            on_step(step, {**metrics, "labels": res.labels, "buffer": len(buffer)})
    res.evicted = buffer.evicted
    await _evaluate(evaluate, held_out, total_steps, res)
    return res


async def _collect(cfg, collect, iteration, seed, tokenizer, buffer, budget, res) -> list[Sample]:
    beta = cfg.beta(iteration)
    seeds = train_seeds(iteration, cfg.episodes_per_iter // cfg.group_size, seed)
    episodes = await collect(seeds, beta, f"it{iteration}")
    labels = [s for e in episodes for s in label_samples(e, tokenizer)]
    if budget is not None and res.labels + len(labels) > budget:
        keep = max(0, budget - res.labels)
        res.labels_dropped += len(labels) - keep
        labels = labels[:keep]
    res.labels += len(labels)
    res.episodes += len(episodes)
    buffer.add(labels)
    acted = [e for e in episodes if any(t.actor == STUDENT for t in e.turns)]
    res.train_success.append(sum(e.success for e in episodes) / max(len(episodes), 1))
    trajectories = [trajectory_sample(e, tokenizer, index=i) for i, e in enumerate(acted)]
    log.info("iteration %d: beta=%.3f episodes=%d labels=%d (total %d) buffer=%d", iteration, beta,
             len(episodes), len(labels), res.labels, len(buffer))
    return trajectories


async def _evaluate(evaluate, held_out, step, res) -> None:
    out = await evaluate(held_out)
    res.curve.append({"step": step, "labels": res.labels, "episodes": res.episodes, **out})
