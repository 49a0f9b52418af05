"""What a checkpoint's exactly-once bookkeeping weighs after a long run, without running one.

Drives the queue (``relaxrl.queue.StalenessQueue``) and the trainer's ledger
(``relaxrl.ledger.TrainedLedger``) through ``--steps`` steps of synthetic quickstart-size batches
(``rollout.max_staleness=2``, ``group_size=8``, ``groups_per_step=8``; 1% of groups dropped, so
the record has holes) and prints the JSON bytes of the actor state and the queue snapshot a
checkpoint holds, next to what the code before the ledger wrote (every trained uid, sorted) and the
train log each checkpoint used to copy.

    python bench/checkpoint_size.py --steps 10000
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import random

import common  # noqa: F401  (environment and import path)

from relaxrl.ledger import TrainedLedger
from relaxrl.queue import StalenessQueue, group_name
from relaxrl.sample import Sample

GROUP, GROUPS_PER_STEP, STALENESS = 8, 8, 2


def group(seq: int, version: int) -> list[Sample]:
    gid = group_name(seq)
    return [Sample(uid=f"{gid}/{i}", group_id=gid, index=i, prompt_ids=[1, 2], response_ids=[3],
                   behaviour_logprobs=[-0.5], policy_version=version, reward=1.0) for i in range(GROUP)]


def simulate(steps: int, seed: int = 0, old_format: bool = True) -> dict:
    """Run the bookkeeping for ``steps`` steps; returns the sizes (bytes) a checkpoint would hold."""
    rng = random.Random(seed)
    q = StalenessQueue(groups_per_step=GROUPS_PER_STEP, group_size=GROUP, max_staleness=STALENESS,
                       required_fields=("response_ids", "behaviour_logprobs", "reward"))
    ledger, all_uids, log_bytes, rewards, pending = TrainedLedger(), [], 0, [], []
    held = 0
    for step in range(steps):
        pending += [(step + rng.choice((0, 0, 0, 1, 2)), seq, q.version) for seq in q.admit_up_to(10**6)]
        rng.shuffle(pending)  # groups come back in any order, some a step or two late
        due, pending = [p for p in pending if p[0] <= step], [p for p in pending if p[0] > step]
        for _, seq, version in due:
            if rng.random() < 0.01:
                q.abandon(group_name(seq), "error_timeout")  # a hole below the next closed group
            else:
                q.put(group(seq, version))
        while (batch := q.take(GROUPS_PER_STEP)) is None:  # the late ones are due now
            for _, seq, version in pending:
                q.put(group(seq, version))
            pending = []
        uids = [s.uid for s in batch]
        assert not ledger.duplicates(uids)
        ledger.record(uids, q.closed_below())
        held = max(held, len(ledger.groups))
        if old_format:
            all_uids += uids
        log_bytes += len(json.dumps({"step": step + 1, "version": step + 1,
                                     "samples": [[s.uid, s.policy_version] for s in batch]})) + 1
        rewards.append(rng.random())  # meta.json keeps each step's mean reward (for reward_first/last)
        q.set_version(step + 1)
    q.check_accounting(trained_by_actor=ledger.count)
    out = {"steps": steps, "trained_samples": ledger.count,
           "actor_state_bytes": len(json.dumps({"trained": ledger.state(), "trained_count": ledger.count})),
           "queue_snapshot_bytes": len(json.dumps(q.snapshot())),
           "queue_memory_pickled_bytes": len(pickle.dumps(q.__dict__)),
           "ledger_groups_held_max": held, "train_log_bytes": log_bytes,
           "meta_rewards_bytes": len(json.dumps(rewards))}
    if old_format:
        out["old_actor_state_bytes"] = len(json.dumps({"trained_uids": sorted(all_uids), "trained_count": ledger.count}))
        out["old_queue_seen_uids_pickled_bytes"] = len(pickle.dumps(set(all_uids)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    logging.disable(logging.WARNING)  # one line per dropped group
    print(json.dumps(simulate(p.parse_args().steps, p.parse_args().seed), indent=1))


if __name__ == "__main__":
    main()
