"""The trainer's record of what it has trained, for exactly-once with memory that does not grow
with the run.

A queue sample's uid is ``g<seq>/<index>``. Instead of every uid ever trained, ``TrainedLedger``
keeps

* ``closed_below``: every group with a lower sequence number is closed — trained, or dropped by
  the queue — so a sample of it is refused. It comes from the queue with each batch
  (``queue.TrainBatch.closed_below``: the oldest group still open there);
* per open group at or above it, a bit mask of the indices trained so far.

So its size is bounded by the groups in flight, not the steps run: a checkpoint of a
million-step run holds a few dozen integers. Uids of another form (a driver that makes its own,
e.g. the episodic one) are kept as they are, in ``other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

_UID = re.compile(r"g(\d+)/(\d+)")


@dataclass
class TrainedLedger:
    closed_below: int = 0
    groups: dict[int, int] = field(default_factory=dict)  # seq -> bit mask of trained indices
    other: set[str] = field(default_factory=set)
    count: int = 0  # distinct samples recorded

    def _seen(self, uid: str) -> bool:
        m = _UID.fullmatch(uid)
        if m is None:
            return uid in self.other
        seq, index = int(m[1]), int(m[2])
        return seq < self.closed_below or bool(self.groups.get(seq, 0) >> index & 1)

    def duplicates(self, uids: Iterable[str]) -> list[str]:
        """The uids among ``uids`` trained before (or of a closed group), or named twice in them."""
        out, here = [], set()
        for uid in uids:
            if uid in here or self._seen(uid):
                out.append(uid)
            here.add(uid)
        return out

    def record(self, uids: Iterable[str], closed_below: Optional[int] = None) -> None:
        """Add a step's uids (checked with ``duplicates`` first), then forget every group below the
        queue's ``closed_below`` taken right after this batch (None: a batch not from the queue)."""
        for uid in uids:
            m = _UID.fullmatch(uid)
            if m is None:
                self.other.add(uid)
            else:
                seq = int(m[1])
                self.groups[seq] = self.groups.get(seq, 0) | 1 << int(m[2])
            self.count += 1
        if closed_below is not None and closed_below > self.closed_below:
            self.closed_below = closed_below
            self.groups = {s: mask for s, mask in self.groups.items() if s >= closed_below}

    def state(self) -> dict:
        """Plain JSON for a checkpoint."""
        return {"closed_below": self.closed_below, "groups": {str(s): m for s, m in sorted(self.groups.items())},
                "other": sorted(self.other), "count": self.count}

    @classmethod
    def from_state(cls, state: dict) -> "TrainedLedger":
        ledger = cls(int(state["closed_below"]), {int(s): int(m) for s, m in state["groups"].items()},
                     set(state["other"]), int(state["count"]))
        return ledger

    @classmethod
    def from_uids(cls, uids: Iterable[str]) -> "TrainedLedger":
        """From a checkpoint written before the ledger (its list of every trained uid)."""
        ledger = cls()
        ledger.record(uids)
        return ledger
