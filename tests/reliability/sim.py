"""A discrete-event simulation of the producers, a streaming rollout and the trainer around the
real ``StalenessQueue``: no Ray, no model, so thousands of events run in a second.

Generation is token-level: a group's responses grow by ``chunk`` tokens per decode event, each
token tagged with the weight version loaded when it was generated, and weight updates land between
decode events (mid-generation). At each update every generation in flight asks
``relaxrl.partial.on_weight_update`` whether to continue under the new weights or abort (re-queued
with its prompt). ``partial="off"`` is the engine before partial rollouts: a generation keeps the
weights it started with. The trainer takes random step times and, with ``prefetch``, asks for the
next step's batch while it trains (as the driver does). Everything random is drawn from ``seed``;
what a group generates (lengths, tokens, failures) depends only on its sequence number, so a
resumed run generates the same groups as an uninterrupted one.

Used by ``test_accounting.py`` (the bound, the accounting identity, resume) and
``test_partial_lengths.py`` (length bias).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from relaxrl.partial import Decision, PartialGroup, on_weight_update
from relaxrl.queue import StalenessQueue, group_name
from relaxrl.sample import Sample

FIELDS = ("response_ids", "behaviour_logprobs", "reward")


def long_tail_lengths(base: int = 8, long_frac: float = 0.1, factor: int = 8,
                      per_attempt: bool = False) -> Callable[[int, int, int], int]:
    """Response length of sample ``index`` of group ``seq`` at its ``attempt``-th generation:
    ``long_frac`` of the prompts are ``factor`` times longer, each response varies by up to
    ``base`` tokens around its prompt's. ``per_attempt``: every generation draws afresh (10% of
    attempts long), as a model does when an aborted group is generated again under new weights."""
    def length(seq: int, index: int, attempt: int) -> int:
        key = seq * 1_000_003 + (attempt if per_attempt else 0)
        long = random.Random(key * 7919).random() < long_frac
        return base * (factor if long else 1) + random.Random(key * 104729 + index).randrange(base)
    return length


def failures(error: float = 0.05, nan: float = 0.03) -> Callable[[int], Optional[str]]:
    """What befalls group ``seq`` when it finishes: an error (abandoned), a NaN reward, or nothing."""
    def fail(seq: int) -> Optional[str]:
        u = random.Random(seq * 31337 + 1).random()
        return "error" if u < error else "nan" if u < error + nan else None
    return fail


@dataclass
class SimConfig:
    max_staleness: int
    groups_per_step: int
    group_size: int
    producers: int
    admit_ahead: int = 0
    partial: str = "continue"  # continue | abort (relaxrl.partial) | off (no weight update mid-generation)
    seed: int = 0
    chunk: int = 4  # tokens per decode event
    decode_rate: float = 4.0  # decode events per time unit, per group
    step_rate: float = 1.0  # steps per time unit (exponential step times)
    prefetch: bool = True  # the trainer asks for step k+1's batch while it trains step k
    length: Callable[[int, int, int], int] = field(default_factory=long_tail_lengths)
    fail: Callable[[int], Optional[str]] = field(default_factory=failures)
    queue_cls: type = StalenessQueue


@dataclass
class _Gen:
    seq: int
    pg: PartialGroup
    lengths: list[int]
    epoch: int  # invalidates its pending decode event once aborted


class Sim:
    """One run. ``step(n_events)`` advances it; ``checkpoint()`` records partials and snapshots the
    queue; ``Sim.resumed(cfg, ckpt)`` is a fresh run from such a checkpoint."""

    def __init__(self, cfg: SimConfig, checks: bool = True) -> None:
        self.cfg, self.checks = cfg, checks
        self.rng = random.Random(cfg.seed)
        self.q = cfg.queue_cls(groups_per_step=cfg.groups_per_step, group_size=cfg.group_size,
                               max_staleness=cfg.max_staleness, required_fields=FIELDS, admit_ahead=cfg.admit_ahead)
        self.events: list = []
        self.tie = itertools.count()
        self.now = 0.0
        self.n_events = 0
        self.idle = cfg.producers
        self.gens: dict[int, _Gen] = {}  # generating
        self.waiting: list[int] = []  # admitted ahead: waiting for the weights they need
        self.epochs = itertools.count()
        self.training: Optional[int] = None  # the train version of the step in progress
        self.prefetched: Optional[list[Sample]] = None
        self.hold_at: Optional[int] = None  # take no batch once this many are taken (a checkpoint is due)
        self.log: list[tuple[int, list[tuple[str, tuple[int, ...]]]]] = []  # (train version, [(uid, versions)])
        self.trained: set[str] = set()
        self.generated_lengths: list[int] = []  # every response generated to the end
        # Each group's lengths at its first generation: what the policy generates for the prompts
        # admitted, and what a synchronous run would train on.
        self.first_lengths: dict[int, list[int]] = {}
        self.attempts: dict[int, int] = {}
        self.trained_lengths: list[int] = []
        self.tokens_generated = 0
        self.resumed_tokens = 0  # tokens a resumed run did not generate again (continued partials)
        self.max_seen = 0  # max over trained samples of train version - oldest token version
        self.changed = True  # the queue changed since the trainer last asked: ask again (saves time)

    # --- the run ---------------------------------------------------------------------------------
    def step(self, n_events: int, until_steps: Optional[int] = None) -> None:
        stop = self.n_events + n_events
        while self.n_events < stop and (until_steps is None or len(self.log) < until_steps):
            self._start_what_can_start()
            if not self.events:
                raise AssertionError(f"stalled after {self.n_events} events at version {self.q.version}: "
                                     f"{self.q.metrics()}")
            self.now, _, kind, data = heapq.heappop(self.events)
            self.n_events += 1
            if kind == "step":
                self._step_done()
            elif kind == "decode":
                self._decode(*data)
            if self.checks:
                self.q.check_accounting(trained_by_actor=len(self.trained))
        self._start_what_can_start()

    def _start_what_can_start(self) -> None:
        q = self.q
        while self.idle and q.can_admit():
            self.idle -= 1
            seq = q.admit()
            pg = q.take_partial(group_name(seq))
            if pg is not None and self.cfg.partial != "off" and on_weight_update(
                    pg.oldest_version, q.version, max_staleness=self.cfg.max_staleness,
                    mode=self.cfg.partial) is Decision.ABORT:  # resumed under newer weights: the same rule
                assert q.requeue(group_name(seq), "partial_aborted", pg.tokens)
                self.idle += 1
                continue
            if pg is not None:
                self.resumed_tokens += pg.tokens
            attempt = self.attempts[seq] = self.attempts.get(seq, -1) + 1
            gen = _Gen(seq, pg or PartialGroup(group_name(seq)),
                       [self.cfg.length(seq, i, attempt) for i in range(self.cfg.group_size)], next(self.epochs))
            self.first_lengths.setdefault(seq, gen.lengths)
            if q.need(seq) > q.version:
                self.waiting.append(seq)
            self.gens[seq] = gen
            if seq not in self.waiting:
                self._schedule(gen)
        for seq in [s for s in self.waiting if q.need(s) <= q.version]:
            self.waiting.remove(seq)
            self._schedule(self.gens[seq])
        changed, self.changed = self.changed, False
        if self.training is None:
            if self.prefetched is not None:
                self._train(q.version)
            elif changed and not self._held() and (batch := q.take(self.cfg.groups_per_step)) is not None:
                self._record(batch, q.version)
                self._train(q.version)
        if (changed and self.training is not None and self.cfg.prefetch and self.prefetched is None
                and not self._held()):
            batch = q.take(self.cfg.groups_per_step, train_version=self.training + 1)
            if batch is not None:
                self.prefetched = batch
                self._record(batch, self.training + 1)

    def _held(self) -> bool:
        """No new batch is taken: a checkpoint is due after the steps taken so far."""
        return self.hold_at is not None and len(self.log) >= self.hold_at

    def _schedule(self, gen: _Gen) -> None:
        heapq.heappush(self.events, (self.now + self.rng.expovariate(self.cfg.decode_rate), next(self.tie),
                                     "decode", (gen.seq, gen.epoch)))

    def _decode(self, seq: int, epoch: int) -> None:
        gen = self.gens.get(seq)
        if gen is None or gen.epoch != epoch:
            return  # aborted meanwhile
        version = self.q.version  # the weights loaded now (published before the queue learns them)
        for i, n in enumerate(gen.lengths):
            r = gen.pg.response(i)
            todo = min(self.cfg.chunk, n - len(r.response_ids))
            if todo > 0:
                at = len(r.response_ids)
                ids = [(seq * 31 + i * 7 + at + j) % 1000 for j in range(todo)]
                r.extend(ids, [-0.001 * (at + j) - 0.01 * version for j in range(todo)],
                         r.token_versions[-1] if self.cfg.partial == "off" and r.token_versions else version)
                self.tokens_generated += todo
                if len(r.response_ids) == n:
                    r.finish_reason = "length"
        if not all(gen.pg.response(i).done for i in range(self.cfg.group_size)):
            self._schedule(gen)
            return
        del self.gens[seq]
        self.idle += 1
        self.changed = True
        outcome = self.cfg.fail(seq)
        if outcome == "error":
            self.q.abandon(group_name(seq), "error_test")
            return
        samples = []
        for i in range(self.cfg.group_size):
            f = gen.pg.response(i).sample_fields()
            self.generated_lengths.append(len(f["response_ids"]))
            samples.append(Sample(uid=f"{group_name(seq)}/{i}", group_id=group_name(seq), index=i, prompt_ids=[5],
                                  reward=float("nan") if outcome == "nan" else 1.0, **f))
        self.q.put(samples)

    def _train(self, version: int) -> None:
        self.prefetched = None
        self.training = version
        heapq.heappush(self.events, (self.now + self.rng.expovariate(self.cfg.step_rate), next(self.tie),
                                     "step", None))

    def _record(self, batch: list[Sample], version: int) -> None:
        stale = [(s.uid, version - s.oldest_version) for s in batch
                 if version - s.oldest_version > self.cfg.max_staleness]
        assert not stale, f"trained past the bound at version {version}: {stale}"
        uids = [s.uid for s in batch]
        assert len(set(uids)) == len(uids) and not set(uids) & self.trained, f"trained twice: {uids}"
        self.trained |= set(uids)
        self.trained_lengths += [len(s.response_ids) for s in batch]
        self.max_seen = max([self.max_seen] + [version - s.oldest_version for s in batch])
        self.log.append((version, [(s.uid, tuple(s.token_versions)) for s in batch]))

    def _step_done(self) -> None:
        new = self.training + 1
        self.training = None
        self.changed = True
        self.q.set_version(new)  # the weights were published first: the next decode uses them
        if self.cfg.partial == "off":
            return
        for seq, gen in list(self.gens.items()):
            if seq in self.waiting:
                continue
            decision = on_weight_update(gen.pg.oldest_version, new, max_staleness=self.cfg.max_staleness,
                                        mode=self.cfg.partial)
            if decision is Decision.ABORT:
                assert self.q.requeue(group_name(seq), "partial_aborted", gen.pg.tokens)
                del self.gens[seq]
                self.idle += 1

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """What a checkpoint taken now holds: the rollout records its partials first, then the queue
        snapshot (JSON round trip) and the train log so far. The trainer must be idle."""
        assert self.training is None and self.prefetched is None
        self.q.record_partials(self.checkpoint_partials())
        return {"queue": json.loads(json.dumps(self.q.snapshot())), "log": list(self.log),
                "trained": sorted(self.trained)}

    @classmethod
    def resumed(cls, cfg: SimConfig, ckpt: dict, checks: bool = True) -> "Sim":
        sim = cls(cfg, checks)
        sim.q.restore(ckpt["queue"])
        sim.log = list(ckpt["log"])
        sim.trained = set(ckpt["trained"])
        return sim

    def run_with_checkpoint(self, after_steps: int, delay_events: int,
                            when: Callable[["Sim"], bool] = lambda sim: True) -> dict:
        """Run until ``after_steps`` steps are trained, let generation go on for ``delay_events``
        events with the trainer held (the checkpoint being saved), and take the checkpoint; if
        ``when(sim)`` is False then, go on to the next step and try again."""
        self.hold_at = after_steps
        for _ in range(1000):
            while len(self.log) < self.hold_at or self.training is not None or self.prefetched is not None:
                self.step(1)
            self.step(delay_events)
            if when(self):
                break
            self.hold_at += 1
        else:
            raise AssertionError(f"no step from {after_steps} to {self.hold_at} met the checkpoint's condition")
        ckpt = self.checkpoint()
        self.hold_at = None
        return ckpt

    def checkpoint_partials(self) -> list[PartialGroup]:
        """What the rollout records before a checkpoint: its generations in flight with tokens."""
        return [copy.deepcopy(g.pg) for s, g in self.gens.items() if s not in self.waiting and g.pg.tokens]

    def partials_older_than_now(self) -> list[PartialGroup]:
        """Generations in flight holding tokens of weights older than the current version."""
        return [g.pg for s, g in self.gens.items() if s not in self.waiting
                and g.pg.oldest_version is not None and g.pg.oldest_version < self.q.version]
