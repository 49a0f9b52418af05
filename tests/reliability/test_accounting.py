"""Exactly-once accounting: per-stage counts, the identity, checkpoints of the queue, and a long
random-timing property test of the staleness bound."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaxrl import checkpoint
from relaxrl.driver import TaskStream
from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.partial import PartialGroup
from relaxrl.queue import QueueError, StalenessQueue, group_name
from relaxrl.sample import Sample
from tests.reliability.sim import Sim, SimConfig

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


def test_a_checkpoint_on_disk_carries_the_partial_rollouts_in_flight(tmp_path):
    """meta.json holds the queue's snapshot: the recorded partial rollouts come back from disk."""
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    q.admit()
    pg = PartialGroup("g0")
    pg.response(1).extend([4, 5, 6], [-0.1, -0.2, -0.3], version=0)
    q.record_partials([pg])
    final = str(tmp_path / "checkpoints" / "step_1")
    tmp = checkpoint.partial_dir(final)
    os.makedirs(tmp)
    checkpoint.finish(tmp, final, {"step": 1, "queue": q.snapshot()}, str(tmp_path))
    meta = checkpoint.load_meta(final)
    assert checkpoint.partial_rollouts(meta) == {"g0": pg}
    assert checkpoint.partial_rollouts({"step": 1, "queue": {}}) == {}  # a checkpoint from before them
    r = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    r.restore(meta["queue"])
    assert r.admit() == 0 and r.take_partial("g0") == pg


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


@settings(max_examples=5, deadline=None, derandomize=True)
@given(max_staleness=st.integers(0, 4), groups_per_step=st.integers(1, 4), group_size=st.integers(1, 3),
       producers=st.integers(1, 12), admit_ahead=st.integers(0, 2), partial=st.sampled_from(["continue", "abort", "off"]),
       prefetch=st.booleans(), step_rate=st.floats(0.2, 5.0), chunk=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_random_timings_never_exceed_the_bound_or_lose_a_sample(max_staleness, groups_per_step, group_size,
                                                                 producers, admit_ahead, partial, prefetch,
                                                                 step_rate, chunk, seed):
    """A discrete-event simulation of 10,000 events (tests/reliability/sim.py): producers generate
    long-tailed responses token by token (10% of prompts 8x longer), weight updates land
    mid-generation and each generation in flight continues or aborts as relaxrl.partial decides,
    groups fail at random (errors, NaN rewards), and the trainer takes random step times, asking
    for the next batch while it trains. After every event the accounting identity holds; no sample
    is ever trained with ``train version - oldest token version > max_staleness`` or twice (checked
    per batch); the run never stalls; and nothing is dropped for staleness: the trainer waits for a
    group at its deadline. ``continue`` never has to abort (the queue keeps every partial trainable);
    ``off`` is an engine that keeps a generation's weights to its end (today's HF engine)."""
    sim = Sim(SimConfig(max_staleness=max_staleness, groups_per_step=groups_per_step, group_size=group_size,
                        producers=producers, admit_ahead=admit_ahead, partial=partial, prefetch=prefetch,
                        step_rate=step_rate, chunk=chunk, seed=seed))
    sim.step(10_000)
    assert sim.n_events == 10_000
    m = sim.q.metrics()
    assert sim.max_seen <= max_staleness and m["max_staleness_seen"] <= max_staleness and m["version"] > 0
    assert m["admitted_samples"] == len(sim.trained) + m["dropped_samples"] + m["in_flight_samples"]
    assert set(m["dropped_by_reason"]) <= {"error_test", "reward_nonfinite"} and m["deadline_misses"] == 0
    if partial != "abort":
        assert m["partial_aborted"] == 0


def test_weight_updates_land_mid_generation_and_continue_keeps_each_tokens_version():
    """The simulation does what the property test claims to cover: responses trained with tokens of
    several versions (continue), aborted generations re-queued and trained later (abort)."""
    cfg = dict(max_staleness=2, groups_per_step=2, group_size=2, producers=8, seed=3)
    cont = Sim(SimConfig(partial="continue", **cfg))
    cont.step(5_000)
    mixed = [v for _, batch in cont.log for _, v in batch if len(set(v)) > 1]
    assert len(mixed) > 100 and cont.q.metrics()["partial_aborted"] == 0
    ab = Sim(SimConfig(partial="abort", **cfg))
    ab.step(5_000)
    m = ab.q.metrics()
    assert m["partial_aborted"] > 50 and m["aborted_tokens"] > 0 and m["dropped_by_reason"].get("stale", 0) == 0
    assert not [v for _, batch in ab.log for _, v in batch if len(set(v)) > 1]  # abort never mixes versions


def _sim_cfg(max_staleness, **kw):
    return SimConfig(max_staleness=max_staleness, groups_per_step=2, group_size=2, producers=8, chunk=2,
                     admit_ahead=1, step_rate=4.0, **kw)


def test_resume_with_partial_rollouts_in_flight_trains_what_an_uninterrupted_run_trains():
    """max_staleness=0: a checkpoint taken while the next step's groups are being generated records
    their partial rollouts; the resumed run continues them (it does not generate those tokens
    again) and its (uid, token versions) training log equals the uninterrupted run's."""
    steps = 40
    whole = Sim(_sim_cfg(0, seed=11))
    whole.step(100_000, until_steps=steps)
    first = Sim(_sim_cfg(0, seed=11))
    ckpt = first.run_with_checkpoint(after_steps=15, delay_events=7)
    partials = ckpt["queue"]["partials"]
    assert partials and all(r["token_versions"] for p in partials.values() for r in p["responses"])
    resumed = Sim.resumed(_sim_cfg(0, seed=99), ckpt)  # other timings after the resume
    resumed.step(100_000, until_steps=steps)
    assert resumed.log[:steps] == whole.log[:steps]
    recorded = sum(len(r["response_ids"]) for p in partials.values() for r in p["responses"])
    assert resumed.resumed_tokens == recorded > 0


@pytest.mark.parametrize("partial", ["continue", "abort"])
def test_resume_with_partial_rollouts_in_flight_loses_and_duplicates_nothing(partial):
    """max_staleness=2: the resumed run continues the recorded partial rollouts (their old tokens
    keep their versions, and the bound still holds), trains no uid twice, and every group admitted
    is trained, dropped for a reason the run gave it, or still in flight."""
    first = Sim(_sim_cfg(2, seed=5, partial=partial))
    # The first checkpoint from step 30 on with generations in flight (with continue: some since
    # before the last update; abort lets none live through an update).
    def due(sim):
        return sim.partials_older_than_now() if partial == "continue" else len(sim.checkpoint_partials()) > 1
    ckpt = first.run_with_checkpoint(after_steps=30, delay_events=3, when=due)
    partials = {gid: PartialGroup.from_json(p) for gid, p in ckpt["queue"]["partials"].items()}
    assert partial == "abort" or any(pg.oldest_version < ckpt["queue"]["version"] for pg in partials.values())
    resumed = Sim.resumed(_sim_cfg(2, seed=6, partial=partial), ckpt)
    resumed.step(5_000)
    uids = [uid for _, batch in resumed.log for uid, _ in batch]
    assert len(uids) == len(set(uids)) and len(resumed.log) > 60  # none twice (also checked per batch)
    q, cfg = resumed.q, resumed.cfg
    trained_groups = {uid.split("/")[0] for uid in uids}
    in_flight = set(q.snapshot()["in_flight"])
    for seq in range(q.admitted):
        expected = "in flight" if seq in in_flight else "dropped" if cfg.fail(seq) else "trained"
        got = ("in flight" if seq in in_flight else "trained" if group_name(seq) in trained_groups else "dropped")
        assert got == expected, f"g{seq}: {got}, expected {expected}"
    # A continued partial trains with its recorded tokens and their versions first.
    versions = {uid: v for _, batch in resumed.log for uid, v in batch}
    continued = [(seq, r) for seq, pg in partials.items() for r in pg.responses if f"g{seq}/{r.index}" in versions]
    assert continued
    for seq, r in continued:
        assert list(versions[f"g{seq}/{r.index}"][:len(r.token_versions)]) == r.token_versions
    q.check_accounting(trained_by_actor=len(resumed.trained))
