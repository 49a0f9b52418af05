r"""DAgger for multi-turn agents: teacher labels on the states the student visits.

Ross, Gordon & Bagnell (2011), applied per turn to LM agents: each turn is acted by the teacher
with probability ``beta_i`` (iteration ``i``), by the student otherwise, and *every* visited state
is labelled with the teacher's action. The student minimises cross-entropy on the teacher's tokens
over the aggregated dataset of all labelled states collected so far:

    L_ce = - sum_{labelled tokens} log pi(teacher token | state) / #labelled tokens

Optionally a GRPO outcome loss on the student's own episode tokens is added with weight
``grpo_weight`` (``L = ce_weight * L_ce + grpo_weight * L_grpo``). Rows are told apart by
``policy_version``: a label's response is the teacher's, which no student version produced (-1);
an episode row carries the student's version.

Special cases of the same code: behaviour cloning is ``beta = 1`` throughout (teacher-only
episodes); outcome-only GRPO is ``teacher = none, ce_weight = 0, grpo_weight = 1``.

Temperatures: a label is a target, not a sample, so ``L_ce`` is taken at T=1, while the GRPO
ratio compares with behaviour log-probs taken at the rollout's temperature. The trainer engine
computes one temperature per step, so ``DAgger.logprob_temperature`` names it (and refuses the mix
of both terms at a rollout temperature other than 1).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from relaxrl.algorithms.grpo import OFF_POLICY_MODES, group_advantages, policy_loss
from relaxrl.algorithms.registry import register_algorithm
from relaxrl.sample import Sample, TensorBatch

BETA_SCHEDULES = ("constant", "linear", "exponential")
TEACHERS = ("expert", "checkpoint", "none")


def beta_at(iteration: int, schedule: str, start: float, end: float, decay_iters: int, rate: float) -> float:
    """Teacher probability at collection ``iteration`` (0-based).

    constant: ``start``; linear: ``start -> end`` over ``decay_iters`` iterations, then ``end``;
    exponential: ``max(end, start * rate**iteration)`` (Ross et al.'s ``beta_i = p^i`` with a floor).
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if schedule == "constant":
        return start
    if schedule == "linear":
        frac = min(1.0, iteration / decay_iters) if decay_iters > 0 else 1.0
        return start + (end - start) * frac
    if schedule == "exponential":
        return max(end, start * rate**iteration)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


@dataclass
class DAggerConfig:
    name: str = "dagger"
    teacher: str = "expert"  # expert: the env's programmatic expert | checkpoint | none (outcome-only)
    teacher_checkpoint: Optional[str] = None  # local model dir acting greedily, for teacher=checkpoint
    beta_schedule: str = "linear"  # constant | linear | exponential
    beta_start: float = 1.0
    beta_end: float = 0.0
    beta_decay_iters: int = 8  # linear: iterations from beta_start to beta_end
    beta_decay_rate: float = 0.5  # exponential: beta_i = max(beta_end, beta_start * rate**i)
    beta_hold_iters: int = 0  # iterations at beta_start before the schedule starts (a teacher-only warm start)
    buffer_size: int = 4096  # aggregated labels kept; when full the oldest are evicted first (FIFO)
    label_budget: int = 0  # teacher labels collected in total; 0: unlimited. Training goes on after it
    ce_weight: float = 1.0
    grpo_weight: float = 0.0  # > 0: add the outcome-reward GRPO loss on the student's episode tokens
    clip_low: float = 0.2
    clip_high: float = 0.28
    off_policy: str = "none"  # GRPO term: none (PPO ratio to the behaviour policy) | decoupled
    is_cap: float = 0.0  # decoupled: cap on the behaviour importance weight (truncated); 0 = uncapped
    episodes_per_iter: int = 16  # episodes collected per iteration (seeds * group_size)
    group_size: int = 1  # episodes per seed (the GRPO group)
    steps_per_iter: int = 4  # optimizer steps between collections
    batch_size: int = 64  # labels per optimizer step, drawn uniformly from the aggregated buffer
    eval_episodes: int = 64  # held-out seeds, student alone
    eval_every: int = 0  # evaluate every eval_every * steps_per_iter steps; 0: only at the end

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.teacher == "checkpoint" and not self.teacher_checkpoint:
            raise ValueError("teacher=checkpoint needs teacher_checkpoint (a local model directory)")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        for f in ("beta_start", "beta_end"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"{f} must be in [0, 1], got {getattr(self, f)}")
        if self.teacher == "none" and (self.beta_start > 0 or self.beta_end > 0 or self.ce_weight > 0):
            raise ValueError("teacher=none needs beta_start = beta_end = 0 and ce_weight = 0 (no labels)")
        if not 0.0 < self.beta_decay_rate <= 1.0:
            raise ValueError(f"beta_decay_rate must be in (0, 1], got {self.beta_decay_rate}")
        if self.ce_weight < 0 or self.grpo_weight < 0 or self.ce_weight + self.grpo_weight == 0:
            raise ValueError("ce_weight and grpo_weight must be >= 0 and not both 0")
        if self.off_policy not in OFF_POLICY_MODES:
            raise ValueError(f"off_policy must be one of {OFF_POLICY_MODES}, got {self.off_policy!r}")
        for f in ("buffer_size", "episodes_per_iter", "group_size", "steps_per_iter", "batch_size", "eval_episodes"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.episodes_per_iter % self.group_size:
            raise ValueError(f"episodes_per_iter={self.episodes_per_iter} must be a multiple of group_size")
        if self.label_budget < 0 or self.eval_every < 0 or self.beta_decay_iters < 0 or self.beta_hold_iters < 0:
            raise ValueError("label_budget, eval_every, beta_decay_iters and beta_hold_iters must be >= 0")

    def beta(self, iteration: int) -> float:
        """``beta_start`` for the first ``beta_hold_iters`` iterations, then the schedule from its start."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return beta_at(max(0, iteration - self.beta_hold_iters), self.beta_schedule, self.beta_start, self.beta_end,
                       self.beta_decay_iters, self.beta_decay_rate)


class LabelBuffer:
    """The aggregated dataset of labelled states, bounded: first in, first evicted.

    FIFO keeps the labels of the most recent student policies, whose state distribution is the
    one DAgger wants to fit; every eviction is counted.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[Sample] = deque()
        self.added = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, samples: Sequence[Sample]) -> int:
        """Append ``samples``; returns how many old ones were evicted to make room."""
        before = self.evicted
        for s in samples:
            if len(self._items) == self.capacity:
                self._items.popleft()
                self.evicted += 1
            self._items.append(s)
            self.added += 1
        return self.evicted - before

    def draw(self, n: int, rng: random.Random) -> list[Sample]:
        """``n`` labels uniformly without replacement (all of them when fewer are held)."""
        items = list(self._items)
        return items if n >= len(items) else rng.sample(items, n)


def _label_row(s: Sample) -> dict:
    return {"uid": s.uid, "prompt_ids": s.prompt_ids, "response_ids": s.response_ids, "reward": s.reward,
            "env": s.env}


def _label_sample(d: dict) -> Sample:
    n = len(d["response_ids"])
    return Sample(uid=d["uid"], group_id=d["uid"], index=0, prompt_ids=list(d["prompt_ids"]), env=d["env"],
                  response_ids=list(d["response_ids"]), loss_mask=[1] * n, behaviour_logprobs=[0.0] * n,
                  policy_version=-1, reward=d["reward"])


@register_algorithm("dagger", DAggerConfig)
class DAgger:
    """Cross-entropy on teacher labels, plus an optional GRPO term on the student's own tokens.

    In a run the algorithm also holds DAgger's aggregated dataset (``training_rows``): the queue
    hands the actor each step's episodes once (exactly-once accounting), their labels join the
    buffer here, and the step trains on labels drawn from all collected so far. The buffer is the
    actor's state, saved with its checkpoints (``state_dict``)."""

    name = "dagger"
    required_fields: tuple[str, ...] = ("response_ids", "reward")

    def __init__(self, config: DAggerConfig | None = None) -> None:
        self.config = config if config is not None else DAggerConfig()
        self.buffer = LabelBuffer(self.config.buffer_size)
        self.labels = 0  # labels taken into the buffer (at most label_budget)
        self.labels_dropped = 0  # labels past the budget, not used (counted, never silent)
        self.steps = 0  # training_rows calls: one per optimizer step
        self._rng = random.Random("dagger-draw")

    def beta_at_version(self, version: int) -> float:
        """The teacher probability of episodes generated for weight ``version``: collection
        iteration ``version // steps_per_iter`` of the schedule (one version per optimizer step)."""
        return self.config.beta(max(version, 0) // self.config.steps_per_iter)

    def training_rows(self, samples: Sequence[Sample]) -> list[Sample]:
        """The rows a step trains on, given the queue's batch (episode trajectories): their labels
        join the aggregated buffer (up to ``label_budget``), ``batch_size`` labels are drawn from it,
        and with ``grpo_weight > 0`` the trajectories the student acted in are added."""
        from relaxrl.envs.episodes import labels_of

        cfg = self.config
        new = [lab for s in samples for lab in labels_of(s)]
        if cfg.label_budget and self.labels + len(new) > cfg.label_budget:
            keep = max(0, cfg.label_budget - self.labels)
            self.labels_dropped += len(new) - keep
            new = new[:keep]
        self.labels += len(new)
        self.buffer.add(new)
        self.steps += 1
        rows = self.buffer.draw(cfg.batch_size, self._rng) if cfg.ce_weight > 0 else []
        # A label trained at several steps gets a uid per use.
        rows = [s.replace(uid=f"{s.uid}@{self.steps}") for s in rows]
        if cfg.grpo_weight > 0:
            rows += [s for s in samples if any(s.loss_mask)]
        if not rows:
            raise RuntimeError("no training data: the teacher gave no labels and the GRPO term is off")
        return rows

    def state_dict(self) -> dict:
        """The aggregated labels and counters, JSON-able (the actor's checkpoint holds it)."""
        return {"labels": self.labels, "labels_dropped": self.labels_dropped, "steps": self.steps,
                "added": self.buffer.added, "evicted": self.buffer.evicted,
                "buffer": [_label_row(s) for s in self.buffer._items],
                "rng": [list(x) if isinstance(x, tuple) else x for x in self._rng.getstate()]}

    def load_state_dict(self, state: dict) -> None:
        self.labels, self.labels_dropped, self.steps = state["labels"], state["labels_dropped"], state["steps"]
        self.buffer = LabelBuffer(self.config.buffer_size)
        self.buffer.add([_label_sample(d) for d in state["buffer"]])
        self.buffer.added, self.buffer.evicted = state["added"], state["evicted"]
        version, inner, gauss = state["rng"]
        self._rng.setstate((version, tuple(inner), gauss))

    def logprob_temperature(self, rollout_temperature: float) -> float:
        """The temperature the trainer must take this loss's log-probs at: 1 for the cross-entropy
        on teacher labels (a target's likelihood), the rollout's for the GRPO term alone (its ratio
        is to behaviour log-probs sampled at that temperature; <= 0, greedy, means 1)."""
        rollout_t = rollout_temperature if rollout_temperature > 0 else 1.0
        cfg = self.config
        if cfg.ce_weight > 0 and cfg.grpo_weight > 0 and rollout_t != 1.0:
            raise ValueError(
                f"algorithm=dagger with ce_weight={cfg.ce_weight} and grpo_weight={cfg.grpo_weight} needs "
                f"rollout.temperature=1 (got {rollout_temperature}): its cross-entropy is taken at T=1 and its "
                "GRPO ratio at the rollout temperature, and the trainer takes one temperature per step")
        return 1.0 if cfg.ce_weight > 0 else rollout_t

    def prepare(self, batch: TensorBatch) -> TensorBatch:
        label_rows = (batch.policy_versions < 0).float()[:, None]
        ce_mask = batch.loss_mask * label_rows
        rl_mask = batch.loss_mask * (1 - label_rows)
        batch.extras["ce_mask"] = ce_mask
        batch.extras["rl_mask"] = rl_mask
        # Labels are singleton groups, so only episode groups get a non-zero advantage.
        adv = group_advantages(batch.rewards.float(), batch.group_index, True, 1e-6)
        batch.extras["advantages"] = adv[:, None] * rl_mask
        batch.scalars.update(
            ce_tokens=max(float(ce_mask.sum()), 1.0),
            rl_tokens=max(float(rl_mask.sum()), 1.0),
            label_rows=float(label_rows.sum()),
            episode_rows=float((1 - label_rows).sum()),
            reward_mean=float(batch.rewards.float().mean()),
            labels=float(self.labels),
            labels_dropped=float(self.labels_dropped),
            buffer=float(len(self.buffer)),
        )
        return batch

    def loss(self, logprobs: torch.Tensor, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if "ce_mask" not in batch.extras:
            raise ValueError("DAgger.loss needs prepare() on the whole batch first")
        logprobs = logprobs.float()
        ce_mask, rl_mask = batch.extras["ce_mask"], batch.extras["rl_mask"]
        ce = -(logprobs * ce_mask).sum() / batch.scalars["ce_tokens"]
        total = cfg.ce_weight * ce
        metrics = {}
        with torch.no_grad():
            n = ce_mask.sum()
            if n > 0:
                metrics["teacher_token_logprob"] = float((logprobs * ce_mask).sum() / n)
        if cfg.grpo_weight > 0:
            per_token, stats = policy_loss(logprobs, batch.behaviour_logprobs, batch.extras["advantages"], rl_mask,
                                           cfg.clip_low, cfg.clip_high, cfg.off_policy, cfg.is_cap)
            total = total + cfg.grpo_weight * (per_token * rl_mask).sum() / batch.scalars["rl_tokens"]
            metrics.update({f"grpo_{k}": v for k, v in stats.items()})
        return total, metrics
