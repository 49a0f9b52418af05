"""The staleness-bounded queue between producers (rollout → reward → teacher) and the trainer.

``StalenessQueue`` is the plain, synchronous logic (tested directly); ``QueueActor`` is its async
twin that runs as a Ray actor (``ray.remote(QueueActor)``) so producers and the trainer can wait on
it. Neither imports Ray.

Staleness of a sample = version of the weights it is trained on − version that generated it.
It is bounded in two ways (AReaL-style):

* admission: by trainer version ``v`` at most ``(v + max_staleness + 1) * groups_per_step`` prompt
  groups are ever admitted (dropped groups give their slot back), so the rollout never generates
  what would go stale;
* a late group whose staleness still exceeds ``max_staleness`` when it arrives or when it would be
  trained is dropped and counted, never trained on.

``max_staleness = 0`` is synchronous on-policy training through the same code path.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from relaxrl.sample import Sample

log = logging.getLogger(__name__)


@dataclass
class _Group:
    seq: int  # admission order
    samples: dict[int, Sample] = field(default_factory=dict)
    complete: bool = False

    def min_version(self) -> int:
        return min(s.policy_version for s in self.samples.values())


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
    ) -> None:
        if groups_per_step < 1 or group_size < 1 or max_staleness < 0:
            raise ValueError(
                f"need groups_per_step >= 1, group_size >= 1, max_staleness >= 0; got "
                f"{groups_per_step}, {group_size}, {max_staleness}"
            )
        self.groups_per_step = groups_per_step
        self.group_size = group_size
        self.max_staleness = max_staleness
        self.required_fields = tuple(required_fields)
        self.version = 0
        self._groups: "OrderedDict[str, _Group]" = OrderedDict()  # admitted, not yet consumed/dropped
        self._seen_uids: set[str] = set()
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
        self.retried: Counter[str] = Counter()
        # Groups in flight when a checkpoint was taken: re-issued first after a resume, same seq.
        self._redo: deque[int] = deque()

    # --- admission ---------------------------------------------------------------------------
    def capacity(self) -> int:
        """Groups that may have been admitted (net of dropped ones) at the current version."""
        return (self.version + self.max_staleness + 1) * self.groups_per_step

    def can_admit(self) -> bool:
        return bool(self._redo) or self.admitted - self.dropped_groups < self.capacity()

    def admit(self) -> int:
        """Admit one new prompt group; returns its sequence number (the group's id is ``g<seq>``).

        After a resume, the groups that were in flight at the checkpoint come first, with their old
        sequence numbers (so the same task and seed): they are already counted as admitted."""
        if self._redo:
            seq = self._redo.popleft()
            self._groups[group_name(seq)] = _Group(seq=seq)
            return seq
        if not self.can_admit():
            raise QueueError(f"capacity {self.capacity()} reached at version {self.version}")
        seq = self.admitted
        self._groups[group_name(seq)] = _Group(seq=seq)
        self.admitted += 1
        return seq

    def admit_up_to(self, n: int) -> list[int]:
        """Admit as many groups as capacity allows, at most ``n``: one call for a rollout request's groups."""
        seqs: list[int] = []
        while len(seqs) < n and self.can_admit():
            seqs.append(self.admit())
        return seqs

    # --- producers -----------------------------------------------------------------------------
    def put(self, samples: Sequence[Sample]) -> None:
        """Add samples of admitted groups; a group is ready once all its samples are in."""
        for s in samples:
            group = self._groups.get(s.group_id)
            if group is None:
                raise QueueError(f"sample {s.uid}: group {s.group_id!r} was not admitted or is closed")
            if s.uid in self._seen_uids or s.index in group.samples:
                raise QueueError(f"sample {s.uid} was put twice")
            if not 0 <= s.index < self.group_size:
                raise QueueError(f"sample {s.uid}: index {s.index} outside group of {self.group_size}")
            self._seen_uids.add(s.uid)
            group.samples[s.index] = s
            self.generated += 1
            self.rewarded += s.reward is not None
            self._note_intervals(s.timings)
        for gid in {s.group_id for s in samples}:
            self._maybe_complete(gid)

    def abandon(self, group_id: str, reason: str, generated: int = 0, rewarded: int = 0) -> None:
        """A producer gave up on a group (error, timeout): drop it and count why.

        ``generated``/``rewarded``: how many of its samples got that far before it was given up."""
        if group_id in self._groups:
            self.generated += generated
            self.rewarded += rewarded
            self._drop(group_id, reason)

    def note_retry(self, reason: str) -> None:
        """A producer retried a role call after a fault (counted; the group stays in flight)."""
        self.retried[reason] += 1

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
        self.dropped_groups += 1
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
        """Up to-date complete groups for one step, oldest policy version first; None if too few.

        ``train_version``: the policy version the batch will be trained by (default: the current
        version; the trainer asks one step ahead while it still trains the step before). Groups
        staler than ``max_staleness`` relative to it are dropped here, never returned.
        """
        v = self.version if train_version is None else train_version
        if v < self.version:
            raise QueueError(f"a batch for version {v} asked at version {self.version}")
        for gid in [g for g, grp in self._groups.items() if grp.complete]:
            if v - self._groups[gid].min_version() > self.max_staleness:
                self._drop(gid, "stale")
        ready = [(g.min_version(), g.seq, gid) for gid, g in self._groups.items() if g.complete]
        if len(ready) < num_groups:
            return None
        batch: list[Sample] = []
        for _, _, gid in sorted(ready)[:num_groups]:
            group = self._groups.pop(gid)
            for idx in sorted(group.samples):
                s = group.samples[idx]
                self.staleness_hist[v - s.policy_version] += 1
                batch.append(s)
            self.consumed_groups += 1
        self.consumed_samples += len(batch)
        return batch

    def set_version(self, version: int) -> None:
        if version < self.version:
            raise QueueError(f"version went backwards: {self.version} -> {version}")
        self.version = version

    # --- metrics -----------------------------------------------------------------------------------
    def in_flight_groups(self) -> int:
        return len(self._groups) + len(self._redo)

    def metrics(self) -> dict:
        ready = [g for g in self._groups.values() if g.complete]
        return {
            "version": self.version,
            "capacity": self.capacity(),
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
        m = self.metrics()
        samples = m["trained_samples"] + m["dropped_samples"] + m["in_flight_samples"]
        if m["admitted_samples"] != samples or self.consumed_samples != self.consumed_groups * self.group_size:
            raise QueueError(f"accounting broken: admitted {m['admitted_samples']} samples != {samples}")
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
            "in_flight": sorted([g.seq for g in self._groups.values()] + list(self._redo)),
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
        self.retried = Counter(snap["retried"])
        self._redo = deque(int(x) for x in snap["in_flight"])
        self.check_accounting()


def group_name(seq: int) -> str:
    return f"g{seq}"


class QueueActor:
    """Async wrapper run as a Ray actor: producers wait in ``admit``, the trainer in ``get_batch``.

    Two conditions, so a put wakes only the trainer and a version bump only the producers: with
    many producers a shared one would wake every waiter on every put.
    """

    def __init__(self, **kwargs) -> None:
        self.q = StalenessQueue(**kwargs)
        self._capacity = asyncio.Condition()  # producers waiting for admission
        self._ready = asyncio.Condition()  # the trainer waiting for a batch
        self._taking = asyncio.Lock()  # batch requests are served one at a time, oldest first
        self._closed = False

    @staticmethod
    async def _wake(cond: asyncio.Condition) -> None:
        async with cond:
            cond.notify_all()

    async def admit(self) -> Optional[int]:
        """Wait for capacity; returns the group's sequence number, or None once closed."""
        seqs = await self.admit_many(1)
        return None if seqs is None else seqs[0]

    async def admit_many(self, n: int) -> Optional[list[int]]:
        """Wait for capacity; returns 1 to ``n`` admitted sequence numbers (as many as capacity
        allows now), or None once closed. One call admits a whole rollout request's groups."""
        if n < 1:
            raise ValueError(f"admit_many needs n >= 1, got {n}")
        async with self._capacity:
            await self._capacity.wait_for(lambda: self._closed or self.q.can_admit())
            return None if self._closed else self.q.admit_up_to(n)

    async def put(self, samples: list[Sample]) -> None:
        dropped = self.q.dropped_groups
        self.q.put(samples)
        if self.q.dropped_groups != dropped:  # a dropped group gives its admission slot back
            await self._wake(self._capacity)
        await self._wake(self._ready)

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

    async def get_batch(self, num_groups: int, timeout_s: Optional[float] = None,
                        train_version: Optional[int] = None) -> Optional[list[Sample]]:
        """Wait until ``num_groups`` complete groups fresh for ``train_version`` (default: the
        current version) are ready; None once closed."""
        batch: Optional[list[Sample]] = None

        def ready() -> bool:
            nonlocal batch
            if self._closed:
                return True
            dropped = self.q.dropped_groups
            batch = self.q.take(num_groups, train_version)
            if self.q.dropped_groups != dropped:  # stale groups dropped in take() free admission slots
                asyncio.get_running_loop().create_task(self._wake(self._capacity))
            return batch is not None

        # In order: a request one step ahead must not take, or drop as stale, what the one before waits for.
        async with self._taking:
            async with self._ready:
                await asyncio.wait_for(self._ready.wait_for(ready), timeout_s)
        return batch

    async def set_version(self, version: int) -> None:
        self.q.set_version(version)
        await self._wake(self._capacity)

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
