"""Exactly-once accounting: per-stage counts, the identity, checkpoints of the queue, and a long
random-timing property test of the staleness bound."""

import heapq
import itertools
import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaxrl import checkpoint
from relaxrl.driver import TaskStream
from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.queue import QueueError, StalenessQueue, group_name
from relaxrl.sample import Sample

pytestmark = pytest.mark.fault
FIELDS = ("response_ids", "behaviour_logprobs", "reward")


def group(seq, size, version, reward=1.0):
    gid = group_name(seq)
    return [Sample(uid=f"{gid}/{i}", group_id=gid, index=i, prompt_ids=[5], response_ids=[7],
                   behaviour_logprobs=[-0.1], policy_version=version, reward=reward) for i in range(size)]


def test_stage_counts_and_identity_and_violations_stop_the_run():
    q = StalenessQueue(groups_per_step=2, group_size=2, max_staleness=1, required_fields=FIELDS)
    for _ in range(4):
        q.admit()
    q.put(group(0, 2, 0) + group(1, 2, 0))
    q.abandon(group_name(2), "verifier_error", generated=2, rewarded=1)
    assert len(q.take(2)) == 4
    m = q.metrics()
    assert (m["admitted_samples"], m["generated_samples"], m["rewarded_samples"], m["trained_samples"],
            m["dropped_samples"], m["in_flight_samples"]) == (8, 6, 5, 4, 2, 2)
    q.check_accounting(trained_by_actor=4)
    with pytest.raises(QueueError, match="actor trained 8 samples, the queue handed out 4"):
        q.check_accounting(trained_by_actor=8)  # e.g. a batch trained twice
    q.consumed_groups += 1  # a lost group: the identity no longer holds
    with pytest.raises(QueueError, match="admitted 4 groups != trained 3"):
        q.check_accounting()
    with pytest.raises(QueueError, match="accounting broken"):
        q.snapshot()  # and no checkpoint is written from a broken state


def test_snapshot_restore_reissues_in_flight_groups_with_their_sequence_numbers():
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    for _ in range(2):
        q.admit()
    q.put(group(0, 2, 0))
    q.take(1)
    q.set_version(1)
    q.admit()  # g2
    q.put(group(1, 2, 0))  # ready, but not yet trained: in flight at the checkpoint
    q.put(group(2, 2, 1)[:1])  # half generated
    snap = json.loads(json.dumps(q.snapshot()))  # what a checkpoint stores
    assert snap["in_flight"] == [1, 2] and snap["generated"] == 2  # partial samples not counted

    r = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    r.restore(snap)
    assert r.version == 1 and r.metrics()["in_flight_samples"] == 4
    assert [r.admit(), r.admit()] == [1, 2]  # the same groups again (same task, same seed) ...
    assert not r.can_admit()  # ... already counted: capacity at version 1 is 3 groups
    r.put(group(1, 2, 1) + group(2, 2, 1))
    assert [s.uid for s in r.take(1)] == ["g1/0", "g1/1"]
    r.set_version(2)
    assert r.admit() == 3  # then new ones
    r.check_accounting(trained_by_actor=4)
    with pytest.raises(QueueError, match="fresh queue"):
        r.restore(snap)


def test_task_stream_resumes_at_its_data_position():
    env = ArithmeticEnv()
    fresh = TaskStream(env, seed=5)
    tasks = [fresh.get(k) for k in range(12)]
    resumed = TaskStream(env, seed=5, start=8, keep=(6, 7))
    assert [resumed.get(k) for k in (6, 7, 8, 9, 10, 11)] == tasks[6:]


def test_checkpoints_are_complete_or_ignored(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        tmp = checkpoint.partial_dir(str(ckpts / f"step_{step}"))
        os.makedirs(tmp)
        checkpoint.finish(tmp, str(ckpts / f"step_{step}"), {"step": step}, str(tmp_path))
    os.makedirs(ckpts / "step_6.partial")  # killed while saving
    os.makedirs(ckpts / "step_8")  # no meta.json: incomplete
    assert checkpoint.latest(str(ckpts)) == str(ckpts / "step_4")
    assert checkpoint.resolve_resume("true", str(tmp_path)) == str(ckpts / "step_4")
    assert checkpoint.resolve_resume(str(tmp_path), "/elsewhere") == str(ckpts / "step_4")
    assert checkpoint.resolve_resume(str(ckpts / "step_2"), "/elsewhere") == str(ckpts / "step_2")
    assert checkpoint.resolve_resume(None, str(tmp_path)) is None


def test_a_checkpoint_holds_the_train_log_length_not_a_copy_and_resume_cuts_the_log_back(tmp_path):
    """The train log lists every trained uid: copied into each checkpoint it made checkpoints grow
    with the run (13 MB at 10,000 quickstart steps). A checkpoint records its length instead."""
    run = tmp_path / "run"
    log = run / checkpoint.TRAIN_LOG
    os.makedirs(run / "checkpoints")

    def line(step):
        return json.dumps({"step": step, "version": step, "samples": [[f"g{step}/0", step - 1]]}) + "\n"

    log.write_text(line(1) + line(2))
    final = str(run / "checkpoints" / "step_2")
    tmp = checkpoint.partial_dir(final)
    os.makedirs(tmp)
    checkpoint.finish(tmp, final, {"step": 2}, str(run))
    assert not os.path.exists(os.path.join(final, checkpoint.TRAIN_LOG))  # no per-sample uid list in it
    assert checkpoint.load_meta(final)["train_log_bytes"] == len(line(1) + line(2))
    with open(log, "a") as f:  # the run goes on (or is lost) after the checkpoint
        f.write(line(3))
    checkpoint.restore_run_files(final, str(run))
    assert log.read_text() == line(1) + line(2)
    other = tmp_path / "other"  # resume=PATH into another run directory: the same log there
    os.makedirs(other)
    checkpoint.restore_run_files(final, str(other))
    assert (other / checkpoint.TRAIN_LOG).read_text() == line(1) + line(2)
    log.write_text(line(1) + line(5))  # not the log this checkpoint was taken from
    with pytest.raises(checkpoint.CheckpointError, match="is not step 2"):
        checkpoint.restore_run_files(final, str(other))
    log.write_text(line(1))
    with pytest.raises(checkpoint.CheckpointError, match="needs the first"):
        checkpoint.restore_run_files(final, str(other))


@settings(max_examples=5, deadline=None)
@given(max_staleness=st.integers(0, 3), groups_per_step=st.integers(1, 4), group_size=st.integers(1, 3),
       producers=st.integers(1, 12), admit_ahead=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_random_timings_never_exceed_the_bound_or_lose_a_sample(max_staleness, groups_per_step, group_size,
                                                                 producers, admit_ahead, seed):
    """A discrete-event simulation of >= 10,000 events: producers with random generation times
    (and random failures) generate with the weights published when they start (a group admitted
    ahead waits for the version it needs), the trainer takes random step times and bumps the
    version; the queue must never hand out a sample staler than the bound, never hand one out
    twice, never stall (every event is reached), and account for every admitted sample."""
    rng = random.Random(seed)
    q = StalenessQueue(groups_per_step=groups_per_step, group_size=group_size, max_staleness=max_staleness,
                       required_fields=FIELDS, admit_ahead=admit_ahead)
    events, tie = [], itertools.count()
    idle = producers  # producers waiting for admission
    waiting: list[tuple[int, int]] = []  # (seq, version needed): admitted ahead, waiting for weights
    trainer_busy = False
    trained: set[str] = set()
    n_events = 0
    now = 0.0
    while n_events < 10_000:
        # Start whatever may start now: producers on admitted groups, the trainer on a full batch.
        while idle and q.can_admit():
            idle -= 1
            seq = q.admit()
            waiting.append((seq, q.need(seq)))
        for seq, need in [w for w in waiting if w[1] <= q.version]:
            waiting.remove((seq, need))
            heapq.heappush(events, (now + rng.expovariate(1.0), next(tie), "done", (seq, q.version)))
        if not trainer_busy:
            batch = q.take(groups_per_step)
            if batch is not None:
                assert all(q.version - s.policy_version <= max_staleness for s in batch)
                uids = {s.uid for s in batch}
                assert len(uids) == len(batch) and not uids & trained
                trained |= uids
                trainer_busy = True
                heapq.heappush(events, (now + rng.expovariate(2.0), next(tie), "step", None))
        if not events:
            break
        now, _, kind, data = heapq.heappop(events)
        n_events += 1
        if kind == "step":
            trainer_busy = False
            q.set_version(q.version + 1)
        else:
            seq, version = data
            idle += 1
            outcome = rng.random()
            if outcome < 0.05:
                q.abandon(group_name(seq), "error_test")
            elif outcome < 0.08:  # a non-finite reward must never be trained
                q.put(group(seq, group_size, version, reward=float("nan")))
            else:
                q.put(group(seq, group_size, version))
        q.check_accounting(trained_by_actor=len(trained))
    assert n_events == 10_000
    m = q.metrics()
    assert m["max_staleness_seen"] <= max_staleness and m["version"] > 0
    assert m["admitted_samples"] == len(trained) + m["dropped_samples"] + m["in_flight_samples"]
    assert set(m["dropped_by_reason"]) <= {"error_test", "reward_nonfinite", "stale"}
