"""The staleness-bounded queue between producers (rollout → reward → teacher) and the trainer.

``StalenessQueue`` is the plain, synchronous logic (tested directly); ``QueueActor`` is its async
twin that runs as a Ray actor (``ray.remote(QueueActor)``) so producers and the trainer can wait on
it. Neither imports Ray.

Staleness of a sample = version of the weights it is trained on − version that generated it.
It is bounded in two ways (AReaL-style):

* admission: by trainer version ``v`` at most ``(v + max_staleness + 1) * groups_per_step`` prompt
  groups are ever admitted (dropped groups give their slot back), so the rollout never generates
  what would go stale;
* hand-out by deadline: a sample's staleness counts its oldest token (``Sample.oldest_version``:
  a partial rollout continued under newer weights keeps the versions of its first tokens), and a
  group admitted at level ``L`` has no token older than ``L``, so it can be trained by every step
  up to its deadline ``L + max_staleness``. The trainer never takes a batch that would leave an
  in-flight group past its deadline (it waits for it instead), so the bound holds without dropping
  anything for staleness, and slow (long) responses are not dropped in favour of fast ones;
* a late group whose staleness still exceeds ``max_staleness`` when it arrives or when it would be
  trained (a producer that broke the contract above) is dropped and counted, never trained on.

A generation a weight update made untrainable, or that ``rollout.partial=abort`` stops, is
re-queued (``requeue``: the same group, task and seed, counted); a checkpoint keeps the partial
rollouts the rollout recorded (``record_partials``) and a resumed run continues them
(``take_partial``): see ``relaxrl.partial``.

With ``admit_ahead`` steps, groups up to that many steps past the bound are admitted early, each
tagged with the weight version it needs (``need``): the rollout holds it until that version is
published, then generates at once, so the next step's generation never waits for a round trip
through the driver. A group takes the lowest version level that has room, so a dropped group's
slot goes back to the level it came from and the trainer's next batch can always fill.

``max_staleness = 0`` is synchronous on-policy training through the same code path.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from relaxrl.partial import PartialGroup
from relaxrl.sample import Packed, Sample

log = logging.getLogger(__name__)


@dataclass
class _Group:
    seq: int  # admission order
    need: int = 0  # the weight version its generation must wait for
    # Its admission level: no token of it is older (the rollout waits for ``need`` >= level), so a
    # step updating weights <= level + max_staleness may train it: its deadline.
    level: int = 0
    samples: dict[int, Sample] = field(default_factory=dict)
    complete: bool = False
    delivered: int = 0  # samples put into it: more than it holds means one can never complete
    oldest: Optional[int] = None  # its samples' oldest token version (kept by put: it is read per take)

    def stuck(self, group_size: int) -> bool:
        """True if this group can never be trained: a put counted more samples than it holds, or it
        is full and neither ready nor dropped."""
        return self.delivered != len(self.samples) or (len(self.samples) == group_size and not self.complete)

    def min_version(self) -> int:
        """Its oldest token's version: what the staleness bound counts."""
        return self.oldest


@dataclass(frozen=True)
class BatchRequest:
    """What the trainer asks the queue for, for one step: ``QueueActor.get_batch``'s arguments."""

    num_groups: int
    timeout_s: Optional[float] = None
    train_version: Optional[int] = None


@dataclass
class TrainBatch:
    """A step's batch as the trainer gets it (``QueueActor.get_train_batch``): the samples, and the
    queue's ``closed_below`` right after they were taken, so the trainer's record of what it trained
    can forget every group below it (``relaxrl.ledger``)."""

    samples: Sequence[Sample]  # sent as ``Packed``: the trainer receives the plain list
    closed_below: int


class QueueError(RuntimeError):
    """A producer broke the queue's contract (unknown group, duplicate uid, ...)."""


class StalenessQueue:
    def __init__(
        self,
        *,
        groups_per_step: int,
        group_size: int,
        max_staleness: int,
        required_fields: Sequence[str] = (),
        admit_ahead: int = 0,
        total_groups: Optional[int] = None,
    ) -> None:
        if groups_per_step < 1 or group_size < 1 or max_staleness < 0 or admit_ahead < 0:
            raise ValueError(
                f"need groups_per_step >= 1, group_size >= 1, max_staleness >= 0, admit_ahead >= 0; got "
                f"{groups_per_step}, {group_size}, {max_staleness}, {admit_ahead}"
            )
        self.admit_ahead = admit_ahead
        # The groups the whole run trains on (steps x groups_per_step): admission stops there (net
        # of dropped groups), so the last steps do not set off generation nothing will train on.
        self.total_groups = total_groups
        self.groups_per_step = groups_per_step
        self.group_size = group_size
        self.max_staleness = max_staleness
        self.required_fields = tuple(required_fields)
        self.version = 0
        self._groups: "OrderedDict[str, _Group]" = OrderedDict()  # admitted, not yet consumed/dropped
        self._ahead: Counter[int] = Counter()  # groups admitted (net of drops) needing a version > self.version
        self.admitted = 0  # groups
        self.consumed_groups = 0
        self.consumed_samples = 0
        self.dropped_groups = 0
        self.dropped: Counter[str] = Counter()  # samples by reason
        self.staleness_hist: Counter[int] = Counter()  # trained samples by staleness
        # Busy intervals per stage ("gen", "reward", ...) from samples' ``<stage>_start/_end`` timings.
        self.stage_intervals: dict[str, list[tuple[float, float]]] = {}
        # Per-stage sample counts (see check_accounting) and role calls retried after a fault.
        self.generated = 0
        self.rewarded = 0
        self.dropped_generated = 0  # generated samples of groups dropped since (generated = these + trained + held)
        self.retried: Counter[str] = Counter()
        self.redelivered = 0  # samples a retried request put again, ignored (see put)
        # Groups in flight when a checkpoint was taken: re-issued first after a resume, same seq.
        self._redo: deque[int] = deque()
        self._redo_need: dict[int, int] = {}  # their weight version, where ahead of the checkpoint's
        self._redo_level: dict[int, int] = {}  # their admission level (deadline - max_staleness)
        # Partial rollouts: the rollout's latest record of groups it is generating (what a checkpoint
        # keeps), and those a restored checkpoint hands back to be continued.
        self._partials: dict[str, PartialGroup] = {}
        self._resume_partials: dict[str, PartialGroup] = {}
        self.requeued: Counter[str] = Counter()  # groups re-queued (aborted generations), by reason
        # Resumed partial rollouts: continued from their kept tokens, or discarded (the bound, or
        # rollout.partial=abort, no longer allowed them under the resumed weights; generated again).
        self.partials_continued = 0
        self.partials_regenerated = 0
        self.partials_discarded = 0
        self.aborted_tokens = 0  # tokens those aborted generations had produced (work thrown away)
        self._open = 0  # the lowest train version whose batch has not been taken
        self.deadline_misses = 0  # batches that had to leave a group past its deadline (versions skipped)

    # --- admission ---------------------------------------------------------------------------
    def capacity(self, version: Optional[int] = None) -> int:
        """Groups that may have been admitted (net of dropped ones) to be generated by weights of at
        most ``version`` (default: the current one)."""
        return ((self.version if version is None else version) + self.max_staleness + 1) * self.groups_per_step

    def _level_with_room(self) -> Optional[int]:
        """The lowest weight version a new group may be admitted for (current ... current +
        ``admit_ahead``), or None if every level is full."""
        net = self.admitted - self.dropped_groups
        if self.total_groups is not None and net >= self.total_groups:
            return None
        # A level whose deadline is before the next batch to be taken could never be trained.
        for level in range(max(self.version, self._open - self.max_staleness), self.version + self.admit_ahead + 1):
            if net - sum(c for lvl, c in self._ahead.items() if lvl > level) < self.capacity(level):
                return level
        return None

    def can_admit(self) -> bool:
        return bool(self._redo) or self._level_with_room() is not None

    def admit(self) -> int:
        """Admit one new prompt group; returns its sequence number (the group's id is ``g<seq>``).

        After a resume, the groups that were in flight at the checkpoint come first, with their old
        sequence numbers (so the same task and seed): they are already counted as admitted."""
        if self._redo:
            seq = self._redo.popleft()
            need = self._redo_need.pop(seq, self.version)
            self._groups[group_name(seq)] = _Group(seq=seq, need=need, level=self._redo_level.pop(seq, need))
            return seq
        level = self._level_with_room()
        if level is None:
            raise QueueError(f"capacity {self.capacity(self.version + self.admit_ahead)} reached at version "
                             f"{self.version}")
        seq = self.admitted
        self._groups[group_name(seq)] = _Group(seq=seq, need=level, level=level)
        if level > self.version:
            self._ahead[level] += 1
        self.admitted += 1
        return seq

    def need(self, seq: int) -> int:
        """The weight version admitted group ``seq`` must be generated by (at least)."""
        return self._groups[group_name(seq)].need

    def admit_up_to(self, n: int) -> list[int]:
        """Admit as many groups as capacity allows, at most ``n``: one call for a rollout request's groups."""
        seqs: list[int] = []
        while len(seqs) < n and self.can_admit():
            seqs.append(self.admit())
        return seqs

    # --- producers -----------------------------------------------------------------------------
    def put(self, samples: Sequence[Sample], attempt: int = 0) -> int:
        """Add samples of admitted groups; a group is ready once all its samples are in. Returns how
        many samples were added. Nothing is added unless every sample is valid.

        ``attempt`` > 0: a producer's retry of a request whose earlier attempt may have been put
        already (its answer was lost, or it timed out after the put). Samples of groups already
        delivered, or closed since, are ignored and counted (``redelivered``): never queued twice."""
        if attempt > 0:
            samples = self._not_yet_delivered(samples)
        self._check_put(samples)
        noted = None
        for s in samples:
            group = self._groups[s.group_id]
            group.samples[s.index] = s
            group.delivered += 1
            oldest = s.oldest_version
            group.oldest = oldest if group.oldest is None else min(group.oldest, oldest)
            self.generated += 1
            self.rewarded += s.reward is not None
            if s.timings is not noted:  # a request's samples share one dict
                self._note_intervals(s.timings)
                noted = s.timings
        for gid in {s.group_id for s in samples}:
            self._maybe_complete(gid)
        return len(samples)

    def _check_put(self, samples: Sequence[Sample]) -> None:
        """Raise ``QueueError`` naming every sample of a put that cannot be added. A uid is
        ``<group_id>/<index>`` and a group takes each index once, so "its group is open and that
        index is still empty" is the whole exactly-once check: no set of seen uids to keep."""
        bad = [f"{s.uid}: uid is not {s.group_id}/{s.index}" for s in samples if s.uid != f"{s.group_id}/{s.index}"]
        bad += [f"{s.uid}: group {s.group_id!r} was not admitted or is closed" for s in samples
                if s.group_id not in self._groups]
        bad += [f"{s.uid}: index {s.index} outside group of {self.group_size}" for s in samples
                if not 0 <= s.index < self.group_size]
        # One version per token. Not required to be non-decreasing: a multi-turn episode's turns may
        # come from rollout replicas a version apart; the bound counts the oldest wherever it is.
        bad += [f"{s.uid}: {len(s.token_versions)} token versions for {len(s.response_ids)} response tokens"
                for s in samples if s.token_versions and len(s.token_versions) != len(s.response_ids)]
        if bad:
            raise QueueError("put refused: " + "; ".join(bad))
        keys = Counter((s.group_id, s.index) for s in samples)
        twice = sorted(f"{g}/{i}" for (g, i), n in keys.items() if n > 1 or i in self._groups[g].samples)
        if twice:
            raise QueueError(f"put refused: samples put twice: {twice}")

    def _not_yet_delivered(self, samples: Sequence[Sample]) -> list[Sample]:
        fresh = [s for s in samples if s.group_id in self._groups and not self._groups[s.group_id].samples]
        if len(fresh) < len(samples):
            self.redelivered += len(samples) - len(fresh)
            log.warning("a retried request re-delivered %d samples already queued (or closed): ignored",
                        len(samples) - len(fresh))
        return fresh

    def abandon(self, group_id: str, reason: str, generated: int = 0, rewarded: int = 0) -> None:
        """A producer gave up on a group (error, timeout): drop it and count why. A group whose
        samples were delivered (a chain that failed after its put) is kept: they are whole and valid.

        ``generated``/``rewarded``: how many of its samples got that far before it was given up."""
        if group_id in self._groups and not self._groups[group_id].samples:
            self.generated += generated
            self.rewarded += rewarded
            self.dropped_generated += generated
            self._drop(group_id, reason)

    def note_retry(self, reason: str) -> None:
        """A producer retried a role call after a fault (counted; the group stays in flight)."""
        self.retried[reason] += 1

    # --- partial rollouts (relaxrl.partial) ------------------------------------------------------
    def requeue(self, group_id: str, reason: str = "partial_aborted", tokens: int = 0) -> bool:
        """The rollout aborted a group's generation (``partial.on_weight_update`` said ABORT): it goes
        back to admission with its prompt (the same sequence number, so the same task and seed),
        ahead of new groups, and keeps its admission level, so its deadline does not move: it stays
        in flight, counted by ``reason`` (``partial_aborted`` in the metrics), never dropped.

        ``tokens``: how many tokens the aborted generation had produced (thrown away, counted).
        Returns False, changing nothing, for a group not in flight or already delivered (a late
        abort of a group whose samples reached the queue: those are whole and valid)."""
        group = self._groups.get(group_id)
        if group is None or group.samples:
            return False
        del self._groups[group_id]
        self._partials.pop(group_id, None)
        self._resume_partials.pop(group_id, None)
        if group.need > self.version:  # still waiting for its weights: keeps its level (and _ahead)
            self._redo_need[group.seq] = group.need
        self._redo_level[group.seq] = group.level
        self._redo = deque(sorted([*self._redo, group.seq],
                                  key=lambda q: (self._redo_level.get(q, self.version), q)))
        self.requeued[reason] += 1
        self.aborted_tokens += int(tokens)
        return True

    def record_partials(self, partials: Sequence[PartialGroup]) -> int:
        """The rollout's record of groups it is generating (tokens, log-probs and versions so far):
        what a checkpoint keeps, so a resumed run continues them instead of generating them again.
        Each record replaces that group's previous one; any prefix of a generation is a valid record.
        Records of groups no longer open for it (delivered, trained, dropped, re-queued) are ignored.
        Returns how many were kept."""
        kept = 0
        for pg in partials:
            if not isinstance(pg, PartialGroup):
                pg = PartialGroup.from_json(pg)  # a plain-JSON record (across processes)
            group = self._groups.get(pg.group_id)
            if group is None or group.samples:
                continue
            bad = [r.index for r in pg.responses if not 0 <= r.index < self.group_size]
            if bad:
                raise QueueError(f"partial record of {pg.group_id}: indices {bad} outside group of {self.group_size}")
            for r in pg.responses:
                r.validate()
            old = pg.oldest_version
            if old is not None and old < group.level:  # the bound's proof needs no token older than that
                raise QueueError(f"partial record of {pg.group_id}: a token of version {old}, older than the "
                                 f"level {group.level} it was admitted at")
            self._partials[pg.group_id] = pg
            kept += 1
        return kept

    def take_partial(self, group_id: str) -> Optional[PartialGroup]:
        """The partial rollout a restored checkpoint recorded for ``group_id`` (once re-issued by
        ``admit``), for the rollout to continue; None if it has none (generate it from scratch)."""
        if group_id not in self._groups:
            return None
        pg = self._resume_partials.pop(group_id, None)
        if pg is not None and group_id not in self._partials:
            # Still its latest record until the rollout records a newer one: a checkpoint taken
            # before the continuation's first record keeps it rather than lose the kept tokens.
            self._partials[group_id] = PartialGroup.from_json(pg.to_json())
        return pg

    def note_partials(self, continued: int, discarded: int, regenerated: int = 0) -> None:
        """The rollout continued ``continued`` handed-back partial rollouts and generated
        ``discarded`` again from their prompts (counted: ``partials_continued``/``partials_discarded``),
        and started ``regenerated`` generations again in place because a weight update aborted them
        (``partial_regenerated``: every replica's, where the rollout's ``stats()`` has one replica's)."""
        if continued < 0 or discarded < 0 or regenerated < 0:
            raise QueueError(f"note_partials needs counts >= 0, got {continued}, {discarded}, {regenerated}")
        self.partials_continued += int(continued)
        self.partials_discarded += int(discarded)
        self.partials_regenerated += int(regenerated)

    def _maybe_complete(self, gid: str) -> None:
        group = self._groups[gid]
        if len(group.samples) < self.group_size:
            return
        # A verifier error or timeout leaves reward None and says why: drop under that reason.
        errors = [s.reward_info["error"] for s in group.samples.values() if s.reward is None and "error" in s.reward_info]
        missing = sorted({f for s in group.samples.values() for f in s.missing(self.required_fields)})
        if errors:
            self._drop(gid, errors[0])
        elif missing:
            self._drop(gid, "missing_" + "_".join(missing))
        elif any(s.reward is not None and not math.isfinite(s.reward) for s in group.samples.values()):
            self._drop(gid, "reward_nonfinite")  # NaN/inf would poison the advantages
        elif self.version - group.min_version() > self.max_staleness:
            self._drop(gid, "stale")
        else:
            group.complete = True

    def _drop(self, gid: str, reason: str) -> None:
        group = self._groups.pop(gid)
        self._partials.pop(gid, None)
        self.dropped_groups += 1
        self.dropped_generated += len(group.samples)
        if group.need > self.version:  # its slot goes back to its own level
            self._ahead[group.need] -= 1
        # Samples never generated still count: the group was admitted for group_size of them.
        self.dropped[reason] += self.group_size
        log.warning("dropped group %s (%s)", gid, reason)

    def _note_intervals(self, timings: dict[str, float]) -> None:
        for key, start in timings.items():
            if key.endswith("_start") and (end := timings.get(key[:-6] + "_end")) is not None:
                seen = self.stage_intervals.setdefault(key[:-6], [])
                if not seen or seen[-1] != (start, end):  # samples of one batch share an interval
                    seen.append((start, end))

    # --- trainer ---------------------------------------------------------------------------------
    def ready_groups(self) -> int:
        return sum(g.complete for g in self._groups.values())

    def take(self, num_groups: int, train_version: Optional[int] = None) -> Optional[list[Sample]]:
        """Complete groups for one step, earliest deadline first; None if the trainer must wait.

        ``train_version``: the policy version the batch will be trained by (default: the current
        version; the trainer asks one step ahead while it still trains the step before).

        Earliest deadline first, and never past one: the batch must hold every in-flight group whose
        deadline is this step, complete or not (the trainer waits for a slow one rather than
        leave it to go stale), and leave what is in flight, plus what admission may still add,
        trainable by the steps after it (``_feasible``). Within that, the oldest admission level
        first, then the oldest token, then admission order. A group still too stale for
        ``train_version`` (a producer generated it with weights older than it was admitted for) is
        dropped here, counted, never returned.
        """
        v = self.version if train_version is None else train_version
        if v < self.version:
            raise QueueError(f"a batch for version {v} asked at version {self.version}")
        for gid in [g for g, grp in self._groups.items() if grp.complete]:
            if v - self._groups[gid].min_version() > self.max_staleness:
                self._drop(gid, "stale")
        # No group due after the horizon is handed out: past it, only admission's bound keeps the
        # deadlines of what is in flight and still to come feasible (``_feasible``).
        horizon = max(v + 1, self.version + self.max_staleness)
        ready = sorted((g.level, g.min_version(), g.seq, gid) for gid, g in self._groups.items()
                       if g.complete and g.level + self.max_staleness <= horizon)
        if len(ready) < num_groups:
            return None
        chosen = ready[:num_groups]
        if not self._feasible(v, horizon, [lvl for lvl, *_ in chosen]):
            pending = sorted([(g.level, g.seq, g.complete) for g in self._groups.values()]
                             + [(self._redo_level.get(seq, self.version), seq, False) for seq in self._redo])
            if not all(done for lvl, _, done in pending[:num_groups] if lvl + self.max_staleness >= v):
                return None  # an earlier group is still being generated: wait for it
            # Even with every earliest group done it does not fit: versions were skipped (no batch
            # taken for some); train what is oldest, the rest goes stale, counted.
            self.deadline_misses += 1
            log.warning("batch for version %d leaves groups past their deadline (versions skipped)", v)
        batch: list[Sample] = []
        for _, _, _, gid in chosen:
            group = self._groups.pop(gid)
            self._partials.pop(gid, None)
            for idx in sorted(group.samples):
                s = group.samples[idx]
                self.staleness_hist[v - s.oldest_version] += 1
                batch.append(s)
            self.consumed_groups += 1
        self.consumed_samples += len(batch)
        self._open = max(self._open, v + 1)
        return batch

    def _feasible(self, v: int, horizon: int, taken_levels: Sequence[int]) -> bool:
        """True if, once a batch of groups with ``taken_levels`` is trained at version ``v``, every
        group still in flight can meet its deadline (level + max_staleness): for each deadline
        ``T`` in ``[v, horizon)``, the groups due by ``T`` fit in the ``T - v`` steps after this
        one. From ``horizon`` on, admission bounds them: the groups ever admitted due by ``T`` are at
        most ``(T + 1) * groups_per_step``, so they fit as long as no batch took a group due later
        than ``horizon`` (``take`` hands out none). Groups already past their deadline (only a broken
        contract makes one) are left out: waiting cannot save them."""
        s, per = self.max_staleness, self.groups_per_step
        due = Counter(g.level + s for g in self._groups.values())
        due.update(self._redo_level.get(seq, self.version) + s for seq in self._redo)
        for lvl in taken_levels:
            due[lvl + s] -= 1
        left = 0  # in flight, due by `deadline`, after this batch
        for deadline in range(v, horizon):
            left += due.get(deadline, 0)
            if left > (deadline - v) * per:
                return False
        return True

    def set_version(self, version: int) -> None:
        if version < self.version:
            raise QueueError(f"version went backwards: {self.version} -> {version}")
        self.version = version
        for level in [lvl for lvl in self._ahead if lvl <= version]:  # no longer ahead
            del self._ahead[level]

    # --- metrics -----------------------------------------------------------------------------------
    def in_flight_groups(self) -> int:
        return len(self._groups) + len(self._redo)

    def closed_below(self) -> int:
        """Every group with a lower sequence number is closed (trained or dropped) and can never be
        handed out again: the trainer's record of what it trained needs nothing below it."""
        return min([g.seq for g in self._groups.values()] + list(self._redo), default=self.admitted)

    def metrics(self) -> dict:
        ready = [g for g in self._groups.values() if g.complete]
        return {
            "version": self.version,
            "capacity": self.capacity(),
            "admit_ahead": self.admit_ahead,
            "admitted_groups": self.admitted,
            "consumed_groups": self.consumed_groups,
            "consumed_samples": self.consumed_samples,
            "dropped_groups": self.dropped_groups,
            "dropped_samples": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "in_flight_groups": self.in_flight_groups(),
            "ready_groups": len(ready),
            "size": sum(len(g.samples) for g in ready),
            "staleness_hist": dict(sorted(self.staleness_hist.items())),
            "max_staleness_seen": max(self.staleness_hist, default=0),
            "admitted_samples": self.admitted * self.group_size,
            "generated_samples": self.generated,
            "rewarded_samples": self.rewarded,
            "trained_samples": self.consumed_samples,
            "in_flight_samples": self.in_flight_groups() * self.group_size,
            "retried_by_reason": dict(self.retried),
            "redelivered_samples": self.redelivered,
            "requeued_by_reason": dict(self.requeued),
            "partial_aborted": self.requeued.get("partial_aborted", 0),
            "aborted_tokens": self.aborted_tokens,
            "partials_recorded": len(self._partials) + len(self._resume_partials),
            "partials_continued": self.partials_continued,
            "partial_regenerated": self.partials_regenerated,
            "partials_discarded": self.partials_discarded,
            "deadline_misses": self.deadline_misses,
        }

    def check_accounting(self, trained_by_actor: Optional[int] = None) -> None:
        """Raises ``QueueError`` unless, in groups and in samples,
        ``admitted == trained + dropped + in flight``; no stage counts more samples than the one before
        it (trained <= generated <= admitted, rewarded <= generated); and the actor trained exactly
        what the queue handed out (when ``trained_by_actor`` is given)."""
        total = self.consumed_groups + self.dropped_groups + self.in_flight_groups()
        if self.admitted != total:
            raise QueueError(
                f"accounting broken: admitted {self.admitted} groups != trained {self.consumed_groups} "
                f"+ dropped {self.dropped_groups} + in flight {self.in_flight_groups()}"
            )
        # The counts metrics() reports, without building it: this runs after every event of the tests.
        m = {"admitted_samples": self.admitted * self.group_size, "generated_samples": self.generated,
             "trained_samples": self.consumed_samples, "rewarded_samples": self.rewarded}
        samples = self.consumed_samples + sum(self.dropped.values()) + self.in_flight_groups() * self.group_size
        if m["admitted_samples"] != samples or self.consumed_samples != self.consumed_groups * self.group_size:
            raise QueueError(f"accounting broken: admitted {m['admitted_samples']} samples != {samples}")
        held = sum(len(g.samples) for g in self._groups.values())
        stuck = [gid for gid, g in self._groups.items() if g.stuck(self.group_size)]
        if stuck or self.generated != self.consumed_samples + self.dropped_generated + held:
            raise QueueError(
                f"accounting broken: generated {self.generated} samples != trained {self.consumed_samples} + "
                f"dropped {self.dropped_generated} + held {held}; groups that can never complete: {stuck}"
            )
        stages = [m[k] for k in ("admitted_samples", "generated_samples", "trained_samples")]
        if stages != sorted(stages, reverse=True) or m["rewarded_samples"] > m["generated_samples"]:
            raise QueueError(
                "accounting broken: stage counts admitted/generated/trained = "
                f"{stages}, rewarded = {m['rewarded_samples']}"
            )
        if trained_by_actor is not None and trained_by_actor != self.consumed_samples:
            raise QueueError(
                f"accounting broken: the actor trained {trained_by_actor} samples, the queue handed out "
                f"{self.consumed_samples}"
            )

    # --- checkpoint -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Plain-JSON state for a checkpoint (accounting checked first). Groups in flight are
        recorded by sequence number only: after a resume they are generated again from scratch, so
        their partial samples are taken out of the stage counts here."""
        self.check_accounting()
        partial = [s for g in self._groups.values() for s in g.samples.values()]
        return {
            "version": self.version,
            "admitted": self.admitted,
            "consumed_groups": self.consumed_groups,
            "consumed_samples": self.consumed_samples,
            "dropped_groups": self.dropped_groups,
            "dropped": dict(self.dropped),
            "staleness_hist": {str(k): v for k, v in self.staleness_hist.items()},
            "generated": self.generated - len(partial),
            "rewarded": self.rewarded - sum(s.reward is not None for s in partial),
            "retried": dict(self.retried),
            "redelivered": self.redelivered,
            "in_flight": sorted([g.seq for g in self._groups.values()] + list(self._redo)),
            # Groups admitted ahead keep the version they wait for, so a resumed run generates them
            # with the same weights as an uninterrupted one.
            "in_flight_need": {str(g.seq): g.need for g in self._groups.values() if g.need > self.version}
                              | {str(k): v for k, v in self._redo_need.items()},
            # Their admission levels keep their deadlines; and the partial rollouts the rollout
            # recorded (tokens, log-probs, versions), which a resumed run continues.
            "in_flight_level": {str(g.seq): g.level for g in self._groups.values()}
                               | {str(k): v for k, v in self._redo_level.items()},
            "partials": {gid[1:]: pg.to_json() for gid, pg in (self._resume_partials | self._partials).items()
                         if gid in self._groups or int(gid[1:]) in self._redo},
            "requeued": dict(self.requeued),
            "aborted_tokens": self.aborted_tokens,
            "partials_continued": self.partials_continued,
            "partial_regenerated": self.partials_regenerated,
            "partials_discarded": self.partials_discarded,
            "group_size": self.group_size,
        }

    def restore(self, snap: dict) -> None:
        """Continue from ``snapshot()``'s output; the in-flight groups will be re-issued by ``admit``."""
        if self._groups or self.admitted:
            raise QueueError("restore() needs a fresh queue")
        if snap["group_size"] != self.group_size:
            raise QueueError(f"checkpoint has group_size {snap['group_size']}, this run {self.group_size}")
        self.version = int(snap["version"])
        self.admitted = int(snap["admitted"])
        self.consumed_groups = int(snap["consumed_groups"])
        self.consumed_samples = int(snap["consumed_samples"])
        self.dropped_groups = int(snap["dropped_groups"])
        self.dropped = Counter(snap["dropped"])
        self.staleness_hist = Counter({int(k): v for k, v in snap["staleness_hist"].items()})
        self.generated, self.rewarded = int(snap["generated"]), int(snap["rewarded"])
        self.dropped_generated = self.generated - self.consumed_samples  # no group holds samples yet
        self.retried = Counter(snap["retried"])
        self.redelivered = int(snap.get("redelivered", 0))  # absent from checkpoints before it was counted
        self._redo = deque(int(x) for x in snap["in_flight"])
        self._redo_need = {int(k): int(v) for k, v in snap.get("in_flight_need", {}).items()}
        self._ahead = Counter(self._redo_need.values())  # already admitted: they hold their levels
        # Checkpoints from before levels were kept: regenerated at >= the checkpoint's version.
        self._redo_level = {int(k): int(v) for k, v in snap.get("in_flight_level", {}).items()}
        self._resume_partials = {group_name(int(k)): PartialGroup.from_json(v)
                                 for k, v in snap.get("partials", {}).items()}
        self.requeued = Counter(snap.get("requeued", {}))
        self.aborted_tokens = int(snap.get("aborted_tokens", 0))
        self.partials_continued = int(snap.get("partials_continued", 0))
        self.partials_regenerated = int(snap.get("partial_regenerated", 0))
        self.partials_discarded = int(snap.get("partials_discarded", 0))
        self._open = self.version  # a checkpoint is taken with no batch of the next step out
        self.check_accounting()


def group_name(seq: int) -> str:
    return f"g{seq}"


# A streaming rollout replica's long poll for partial-rollout requests lasts this long, and one that
# has not polled for this long plus the grace is no longer asked (it is gone).
PARTIALS_POLL_S = 10.0
PARTIALS_LISTENER_GRACE_S = 5.0


class QueueActor:
    """Async wrapper run as a Ray actor: producers wait in ``admit``, the trainer in ``get_batch``.

    Two conditions, so a put wakes only the trainer, never the producers waiting for admission:
    with many producers a shared one would wake every waiter on every put.
    """

    def __init__(self, **kwargs) -> None:
        self._kwargs = kwargs
        self.q = StalenessQueue(**kwargs)
        self._epoch = 0  # bumped by reset(): a batch request of the lost trainer is answered None, never served
        self._capacity = asyncio.Condition()  # producers waiting for admission
        self._ready = asyncio.Condition()  # the trainer waiting for a batch
        self._served_next = 0  # batch requests are served in train-version order: this one's turn is next
        self._closed = False
        # Partial rollouts for a checkpoint: each streaming rollout replica long-polls
        # partials_wanted; collect_partials asks them all (a new epoch) and waits for their records.
        self._partials_epoch = 0
        self._partials_asked = asyncio.Event()  # set (and replaced) when an epoch begins
        self._listeners: dict[str, float] = {}  # rollout replica -> when it last polled (monotonic)
        self._answers: dict[int, set[str]] = {}  # epoch -> replicas that recorded for it

    @staticmethod
    async def _wake(cond: asyncio.Condition) -> None:
        async with cond:
            cond.notify_all()

    async def admit(self) -> Optional[int]:
        """Wait for capacity; returns the group's sequence number, or None once closed."""
        admitted = await self.admit_many(1)
        return None if admitted is None else admitted[0][0]

    async def admit_many(self, n: int) -> Optional[list[tuple[int, int]]]:
        """Wait for capacity; returns 1 to ``n`` admitted groups as ``(sequence number, weight
        version needed)`` (as many as capacity allows now), or None once closed. One call admits a
        whole rollout request's groups."""
        if n < 1:
            raise ValueError(f"admit_many needs n >= 1, got {n}")
        async with self._capacity:
            await self._capacity.wait_for(lambda: self._closed or self.q.can_admit())
            return None if self._closed else [(seq, self.q.need(seq)) for seq in self.q.admit_up_to(n)]

    async def put(self, samples: list[Sample], attempt: int = 0) -> int:
        dropped = self.q.dropped_groups
        added = self.q.put(samples, attempt)
        if self.q.dropped_groups != dropped:  # a dropped group gives its admission slot back
            await self._wake(self._capacity)
        await self._wake(self._ready)
        return added

    async def abandon(self, group_id: str, reason: str, generated: int = 0, rewarded: int = 0) -> None:
        self.q.abandon(group_id, reason, generated, rewarded)
        await self._wake(self._capacity)

    async def abandon_many(self, group_ids: list[str], reason: str) -> None:
        """``abandon`` for every group of a failed rollout request, in one call."""
        for gid in group_ids:
            self.q.abandon(gid, reason)
        await self._wake(self._capacity)

    def note_retry(self, reason: str) -> None:
        self.q.note_retry(reason)

    async def requeue_many(self, group_ids: list[str], reason: str = "partial_aborted",
                           tokens: Optional[list[int]] = None) -> int:
        """``requeue`` for each aborted group (``tokens``: each one's tokens thrown away); returns
        how many went back to admission. Producers waiting for admission get them first."""
        n = sum(self.q.requeue(gid, reason, t) for gid, t in zip(group_ids, tokens or [0] * len(group_ids)))
        await self._wake(self._capacity)
        return n

    def record_partials(self, partials: list, epoch: Optional[int] = None, replica: Optional[str] = None) -> int:
        """``StalenessQueue.record_partials`` (``PartialGroup``s or their ``to_json()``); with
        ``epoch``/``replica``: ``replica``'s answer to ``collect_partials``' request ``epoch``."""
        if epoch is not None and replica is not None and epoch == self._partials_epoch:
            # It answered even if a record is refused below (the error goes back to it): the
            # checkpoint need not wait out its timeout for it.
            self._answers.setdefault(epoch, set()).add(replica)
        return self.q.record_partials(partials)

    async def partials_wanted(self, replica: str, seen: int, timeout_s: float = PARTIALS_POLL_S) -> int:
        """A streaming rollout replica's long poll: returns the current request epoch once it is
        past ``seen`` (``collect_partials`` asked: the replica records its partial rollouts for that
        epoch), or after ``timeout_s`` (the replica polls again). A replica counts as listening for
        ``timeout_s`` plus a grace after its last poll began."""
        self._listeners[replica] = time.monotonic()
        if self._partials_epoch <= seen:
            try:
                await asyncio.wait_for(self._partials_asked.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self._partials_epoch

    async def collect_partials(self, timeout_s: float) -> dict:
        """Before a checkpoint's snapshot: ask every listening rollout replica for its partial
        rollouts in flight and wait until each has recorded them, at most ``timeout_s`` (a replica
        that does not answer only costs its groups' kept tokens: a resumed run generates them again).
        Returns how many replicas were asked and answered, and the records kept."""
        self._partials_epoch += 1
        epoch = self._partials_epoch
        asked, self._partials_asked = self._partials_asked, asyncio.Event()
        asked.set()
        now = time.monotonic()
        live = {r for r, t in self._listeners.items() if now - t <= PARTIALS_POLL_S + PARTIALS_LISTENER_GRACE_S}
        self._listeners = {r: t for r, t in self._listeners.items() if r in live}  # gone replicas are forgotten
        deadline = now + timeout_s
        while not live <= self._answers.get(epoch, set()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        answered = self._answers.pop(epoch, set()) & live
        if len(answered) < len(live):
            log.warning("partial rollouts: %d of %d rollout replicas answered within %.0f s; the groups of the "
                        "others are generated again after a resume", len(answered), len(live), timeout_s)
        return {"asked": len(live), "answered": len(answered), "recorded": self.q.metrics()["partials_recorded"]}

    def note_partials(self, continued: int, discarded: int, regenerated: int = 0) -> None:
        self.q.note_partials(continued, discarded, regenerated)

    def take_partials(self, group_ids: list[str]) -> dict[str, dict]:
        """The recorded partial rollouts, as ``PartialGroup.to_json()``, of those of ``group_ids``
        a restored checkpoint holds one for (one call per rollout request)."""
        out = {}
        for gid in group_ids:
            pg = self.q.take_partial(gid)
            if pg is not None:
                out[gid] = pg.to_json()
        return out

    async def get_batch(self, num_groups: int, timeout_s: Optional[float] = None,
                        train_version: Optional[int] = None) -> Optional[Packed]:
        """Wait until ``num_groups`` complete groups fresh for ``train_version`` (default: the
        current version) are ready (as ``Packed``: the caller unpickles a plain list); None once closed.

        Requests are served in train-version order, whatever order they arrive in (Ray does not
        order an async actor's calls): a request one step ahead must neither take, nor drop as
        stale, the groups the one before it waits for."""
        batch, _ = await self._serve(num_groups, timeout_s, train_version)
        return None if batch is None else Packed(batch)

    async def get_train_batch(self, num_groups: int, timeout_s: Optional[float] = None,
                              train_version: Optional[int] = None) -> Optional[TrainBatch]:
        """``get_batch``, with the queue's ``closed_below`` right after the take (what the trainer asks)."""
        batch, closed_below = await self._serve(num_groups, timeout_s, train_version)
        return None if batch is None else TrainBatch(Packed(batch), closed_below)

    async def _serve(self, num_groups: int, timeout_s: Optional[float],
                     train_version: Optional[int]) -> tuple[Optional[list[Sample]], int]:
        """The batch, and ``closed_below`` taken with it: read later, it could already count the
        next step's batch (taken meanwhile), and the trainer would refuse that batch as trained."""
        batch: Optional[list[Sample]] = None
        closed_below = 0
        version = self.q.version if train_version is None else train_version
        epoch = self._epoch

        def ready() -> bool:
            nonlocal batch, closed_below
            if self._closed or self._epoch != epoch:
                return True
            if version > max(self.q.version, self._served_next):  # the step before is not served yet
                return False
            dropped = self.q.dropped_groups
            batch = self.q.take(num_groups, train_version)
            closed_below = self.q.closed_below()
            if self.q.dropped_groups != dropped:  # stale groups dropped in take() free admission slots
                asyncio.get_running_loop().create_task(self._wake(self._capacity))
            return batch is not None

        async def served() -> None:
            async with self._ready:
                await self._ready.wait_for(ready)
                if batch is not None:
                    self._served_next = max(self._served_next, version + 1)
                    self._ready.notify_all()  # the next version's request may go now

        await asyncio.wait_for(served(), timeout_s)
        return batch, closed_below

    async def set_version(self, version: int) -> None:
        self.q.set_version(version)
        await self._wake(self._capacity)
        await self._wake(self._ready)  # a batch request for this version may be next now

    async def close(self) -> None:
        self._closed = True
        await self._wake(self._capacity)
        await self._wake(self._ready)

    def metrics(self) -> dict:
        return self.q.metrics()

    def stage_intervals(self) -> dict[str, list[tuple[float, float]]]:
        return self.q.stage_intervals

    def check_accounting(self, trained_by_actor: Optional[int] = None) -> None:
        self.q.check_accounting(trained_by_actor)

    def snapshot(self) -> dict:
        return self.q.snapshot()

    async def restore(self, snap: dict) -> None:
        self.q.restore(snap)
        await self._wake(self._capacity)

    async def reset(self, snap: dict) -> None:
        """Start over from a checkpoint's ``snapshot()`` in the same run (the trainer was lost and
        restored): a fresh queue restored from it, open again. Call it once every producer has
        stopped; batch requests still waiting (the lost trainer's) are answered None."""
        fresh = StalenessQueue(**self._kwargs)
        fresh.restore(snap)
        fresh.stage_intervals = self.q.stage_intervals  # the run's timeline goes on
        self.q, self._epoch, self._served_next, self._closed = fresh, self._epoch + 1, 0, False
        self._listeners = {}  # the rollout replicas were replaced: the new ones register as they start
        await self._wake(self._ready)
        await self._wake(self._capacity)
