"""The staleness-bounded queue: admission, group completeness, staleness, accounting."""

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaxrl.queue import QueueActor, QueueError, StalenessQueue, group_name
from relaxrl.sample import Sample


def make_group(seq: int, size: int, version: int, reward: float = 1.0) -> list[Sample]:
    gid = group_name(seq)
    return [
        Sample(uid=f"{gid}/{i}", group_id=gid, index=i, prompt_ids=[5, 6], response_ids=[7, 1],
               behaviour_logprobs=[-0.1, -0.2], policy_version=version, reward=reward)
        for i in range(size)
    ]


FIELDS = ("response_ids", "behaviour_logprobs", "reward")


def test_admission_capacity_follows_version():
    q = StalenessQueue(groups_per_step=2, group_size=3, max_staleness=1)
    assert [q.admit() for _ in range(4)] == [0, 1, 2, 3]  # (0 + 1 + 1) * 2 = 4 groups at v0
    assert not q.can_admit()
    with pytest.raises(QueueError, match="capacity 4"):
        q.admit()
    q.set_version(1)
    assert q.capacity() == 6 and q.can_admit()


def test_sync_mode_admits_one_step_at_a_time():
    q = StalenessQueue(groups_per_step=2, group_size=2, max_staleness=0)
    q.admit(), q.admit()
    assert not q.can_admit()
    q.put(make_group(0, 2, 0) + make_group(1, 2, 0))
    batch = q.take(2)
    assert [s.uid for s in batch] == ["g0/0", "g0/1", "g1/0", "g1/1"]
    assert not q.can_admit()  # not before the trainer publishes version 1
    q.set_version(1)
    assert q.can_admit()


def test_only_whole_groups_are_handed_out():
    q = StalenessQueue(groups_per_step=1, group_size=3, max_staleness=1)
    q.admit()
    q.put(make_group(0, 3, 0)[:2])
    assert q.take(1) is None
    q.put(make_group(0, 3, 0)[2:])
    assert len(q.take(1)) == 3


def test_incomplete_fields_drop_the_group_and_count_it():
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    q.admit()
    group = make_group(0, 2, 0)
    group[1] = group[1].replace(reward=None)
    q.put(group)
    assert q.take(1) is None
    m = q.metrics()
    assert m["dropped_by_reason"] == {"missing_reward": 2} and m["dropped_groups"] == 1
    assert q.can_admit()  # a dropped group gives its admission slot back
    q.check_accounting()


def test_stale_group_is_dropped_never_trained():
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1)
    q.admit(), q.admit()
    q.put(make_group(0, 2, 0))
    q.set_version(2)  # group 0 (v0) would be trained at staleness 2 > 1
    q.put(make_group(1, 2, 2))
    batch = q.take(1)
    assert {s.group_id for s in batch} == {"g1"}
    assert q.metrics()["dropped_by_reason"] == {"stale": 2}
    assert q.metrics()["staleness_hist"] == {0: 2}


def test_late_arrival_beyond_staleness_is_dropped_on_put():
    q = StalenessQueue(groups_per_step=1, group_size=1, max_staleness=0)
    q.admit()
    q.set_version(1)
    q.put(make_group(0, 1, 0))
    assert q.metrics()["dropped_by_reason"] == {"stale": 1}


def test_oldest_version_first_and_staleness_histogram():
    q = StalenessQueue(groups_per_step=1, group_size=1, max_staleness=2)
    for _ in range(3):
        q.admit()
    q.put(make_group(2, 1, 0))
    q.put(make_group(0, 1, 0))
    q.put(make_group(1, 1, 0))
    q.set_version(1)
    assert q.take(1)[0].group_id == "g0"  # same version: admission order breaks the tie
    assert q.metrics()["staleness_hist"] == {1: 1}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.replace(group_id="g99"), "not admitted"),
        (lambda s: s.replace(index=5, uid="g0/5"), "outside group"),
    ],
)
def test_contract_violations_are_errors(mutate, message):
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=0)
    q.admit()
    with pytest.raises(QueueError, match=message):
        q.put([mutate(make_group(0, 2, 0)[0])])


def test_duplicate_put_is_an_error():
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=0)
    q.admit()
    q.put(make_group(0, 2, 0)[:1])
    with pytest.raises(QueueError, match="put twice"):
        q.put(make_group(0, 2, 0)[:1])


def test_version_cannot_go_backwards():
    q = StalenessQueue(groups_per_step=1, group_size=1, max_staleness=0)
    q.set_version(3)
    with pytest.raises(QueueError, match="backwards"):
        q.set_version(2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_staleness >= 0"):
        StalenessQueue(groups_per_step=1, group_size=1, max_staleness=-1)


@settings(max_examples=60, deadline=None)
@given(
    max_staleness=st.integers(0, 3),
    groups_per_step=st.integers(1, 3),
    group_size=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_random_interleavings_keep_staleness_and_accounting(max_staleness, groups_per_step, group_size, seed):
    """Producers generate with the version current at admission, finish in random order and
    sometimes fail; the trainer steps whenever it can. Staleness never exceeds the bound, every
    uid is trained at most once, and admitted == consumed + dropped + in flight."""
    rng = random.Random(seed)
    q = StalenessQueue(groups_per_step=groups_per_step, group_size=group_size, max_staleness=max_staleness,
                       required_fields=FIELDS)
    pending: list[tuple[int, int]] = []  # (seq, generating version)
    trained: set[str] = set()
    steps = 0
    for _ in range(200):
        action = rng.random()
        if action < 0.4 and q.can_admit():
            # Weights may lag the trainer by a published version at most (set_version after publish).
            pending.append((q.admit(), q.version))
        elif action < 0.75 and pending:
            seq, version = pending.pop(rng.randrange(len(pending)))
            if rng.random() < 0.1:
                q.abandon(group_name(seq), "error_test")
            else:
                q.put(make_group(seq, group_size, version))
        else:
            batch = q.take(groups_per_step)
            if batch is not None:
                assert len(batch) == groups_per_step * group_size
                assert all(q.version - s.policy_version <= max_staleness for s in batch)
                uids = {s.uid for s in batch}
                assert not uids & trained
                trained |= uids
                steps += 1
                q.set_version(steps)
        q.check_accounting()
    assert q.metrics()["max_staleness_seen"] <= max_staleness
    assert q.consumed_samples == len(trained)


def test_queue_actor_under_real_ray_with_random_timings(ray_local):
    """Concurrent producers with random delays against the async actor on a real local Ray."""
    ray = ray_local
    G, N, S, steps = 2, 2, 1, 6
    actor = ray.remote(QueueActor).options(max_concurrency=100).remote(
        groups_per_step=G, group_size=N, max_staleness=S, required_fields=FIELDS)
    version = {"v": 0}

    async def producer(rng: random.Random):
        while (seq := await actor.admit.remote()) is not None:
            v = version["v"]
            await asyncio.sleep(rng.uniform(0, 0.05))
            await actor.put.remote(make_group(seq, N, v))

    async def main():
        tasks = [asyncio.create_task(producer(random.Random(i))) for i in range(4)]
        seen = []
        for step in range(steps):
            batch = await actor.get_batch.remote(G, 30.0)
            seen.extend(step - s.policy_version for s in batch)
            await asyncio.sleep(random.Random(step).uniform(0, 0.03))
            version["v"] = step + 1
            await actor.set_version.remote(step + 1)
        await actor.close.remote()
        await asyncio.gather(*tasks)
        return seen

    staleness = asyncio.run(main())
    metrics = ray.get(actor.metrics.remote())
    assert len(staleness) == steps * G * N and max(staleness) <= S
    assert metrics["consumed_groups"] == steps * G
    assert metrics["max_staleness_seen"] <= S
    ray.get(actor.check_accounting.remote())
    ray.kill(actor)


def test_stale_drop_while_trainer_waits_wakes_blocked_producers(ray_local):
    """A group dropped as stale inside ``get_batch`` frees an admission slot: a producer blocked in
    ``admit`` must be woken then, or trainer and producers would wait on each other for ever."""
    ray = ray_local
    actor = ray.remote(QueueActor).options(max_concurrency=100).remote(
        groups_per_step=1, group_size=1, max_staleness=0, required_fields=FIELDS)

    async def main():
        assert await actor.admit.remote() == 0
        await actor.put.remote(make_group(0, 1, version=0))
        await actor.set_version.remote(1)  # g0 is now one version too old for max_staleness=0
        assert await actor.admit.remote() == 1  # capacity (1+0+1)*1 = 2 groups: full
        blocked = asyncio.ensure_future(actor.admit.remote())
        batch = asyncio.ensure_future(actor.get_batch.remote(1, 30.0))  # drops g0 as stale
        assert await asyncio.wait_for(blocked, 10.0) == 2
        await actor.put.remote(make_group(1, 1, version=1))
        assert [s.uid for s in await batch] == ["g1/0"]
        await actor.close.remote()

    asyncio.run(main())
    assert ray.get(actor.metrics.remote())["dropped_by_reason"] == {"stale": 1}
    ray.get(actor.check_accounting.remote())
    ray.kill(actor)


def test_groups_admitted_ahead_carry_the_version_they_need():
    """With admit_ahead=1 the next step's groups are admitted at once, tagged with the version
    whose weights they must be generated by; the staleness bound itself does not move."""
    q = StalenessQueue(groups_per_step=2, group_size=1, max_staleness=0, admit_ahead=1)
    seqs = q.admit_up_to(8)
    assert seqs == [0, 1, 2, 3] and [q.need(s) for s in seqs] == [0, 0, 1, 1]
    assert q.capacity() == 2 and not q.can_admit()
    q.set_version(1)
    assert [q.need(s) for s in q.admit_up_to(8)] == [2, 2]
    with pytest.raises(ValueError, match="admit_ahead >= 0"):
        StalenessQueue(groups_per_step=2, group_size=1, max_staleness=0, admit_ahead=-1)


def test_a_dropped_group_gives_its_slot_back_at_its_own_level():
    """A group dropped from the current step is replaced by one that need not wait: were it tagged
    for the next version, the current step could never fill and the run would stall."""
    q = StalenessQueue(groups_per_step=2, group_size=1, max_staleness=0, admit_ahead=1)
    q.admit_up_to(4)  # needs 0, 0, 1, 1
    q.abandon("g1", "error_test")
    (seq,) = q.admit_up_to(8)
    assert q.need(seq) == 0
    q.abandon("g2", "error_test")
    (seq,) = q.admit_up_to(8)
    assert q.need(seq) == 1
    q.check_accounting()


def test_a_resumed_queue_keeps_the_version_groups_admitted_ahead_wait_for():
    """Groups admitted ahead and in flight at a checkpoint wait for the same weights after a
    resume, so the resumed run generates them as the uninterrupted one would."""
    q = StalenessQueue(groups_per_step=2, group_size=1, max_staleness=0, admit_ahead=1)
    q.admit_up_to(4)  # needs 0, 0, 1, 1
    for seq in (0, 1):
        q.put(make_group(seq, 1, 0))
    q.take(2)
    q.set_version(1)
    q.admit_up_to(8)  # g4, g5 need 2
    snap = q.snapshot()
    r = StalenessQueue(groups_per_step=2, group_size=1, max_staleness=0, admit_ahead=1)
    r.restore(snap)
    assert [(seq, r.need(seq)) for seq in r.admit_up_to(8)] == [(2, 1), (3, 1), (4, 2), (5, 2)]
    assert not r.can_admit()  # the four in flight fill both levels
    r.check_accounting()


def test_admit_up_to_stops_at_capacity():
    q = StalenessQueue(groups_per_step=2, group_size=1, max_staleness=1)
    assert q.admit_up_to(3) == [0, 1, 2]
    assert q.admit_up_to(3) == [3]  # capacity (0 + 1 + 1) * 2 = 4
    assert q.admit_up_to(3) == []


def test_actor_admits_many_and_abandons_many(ray_local):
    """One call admits a request's groups; one call gives a failed request's groups back."""
    ray = ray_local
    actor = ray.remote(QueueActor).options(max_concurrency=100).remote(
        groups_per_step=2, group_size=1, max_staleness=0, required_fields=FIELDS)

    async def main():
        assert await actor.admit_many.remote(8) == [(0, 0), (1, 0)]  # capacity 2 at version 0
        blocked = asyncio.ensure_future(actor.admit_many.remote(8))
        await actor.abandon_many.remote(["g0", "g1"], "error_test")  # both slots come back
        assert await asyncio.wait_for(blocked, 10.0) == [(2, 0), (3, 0)]
        await actor.put.remote(make_group(2, 1, 0) + make_group(3, 1, 0))  # two groups, one call
        assert [s.uid for s in await actor.get_batch.remote(2, 10.0)] == ["g2/0", "g3/0"]
        waiting = asyncio.ensure_future(actor.admit_many.remote(8))
        await actor.set_version.remote(1)  # opens capacity
        assert await asyncio.wait_for(waiting, 10.0) == [(4, 1), (5, 1)]
        batch = asyncio.ensure_future(actor.get_batch.remote(2, 10.0))
        await actor.put.remote(make_group(4, 1, 1) + make_group(5, 1, 1))
        assert len(await batch) == 2
        with pytest.raises(ray.exceptions.RayTaskError, match="n >= 1"):
            await actor.admit_many.remote(0)
        await actor.close.remote()
        assert await actor.admit_many.remote(2) is None

    asyncio.run(main())
    m = ray.get(actor.metrics.remote())
    assert m["version"] == 1 and m["dropped_by_reason"] == {"error_test": 2} and m["consumed_groups"] == 4
    ray.get(actor.check_accounting.remote())
    ray.kill(actor)


def test_a_batch_asked_one_version_ahead_is_fresh_for_that_version():
    """The trainer asks for step k+1's batch while it trains step k: staleness counts against the
    version that will train it, while admission still follows the published version."""
    q = StalenessQueue(groups_per_step=1, group_size=1, max_staleness=1)
    for v in (0, 0):
        q.put(make_group(q.admit(), 1, v))
    assert not q.can_admit()  # capacity (0 + 1 + 1) * 1 = 2: not raised by asking ahead
    assert [s.uid for s in q.take(1, train_version=1)] == ["g0/0"]
    assert q.staleness_hist == {1: 1}
    assert q.take(1, train_version=2) is None  # g1 (version 0) would be 2 versions stale
    assert q.metrics()["dropped_by_reason"] == {"stale": 1}
    q.set_version(2)
    with pytest.raises(QueueError, match="a batch for version 1 asked at version 2"):
        q.take(1, train_version=1)
    q.check_accounting()


@pytest.mark.parametrize("ahead_first", [False, True])
def test_batch_requests_are_served_in_version_order(ray_local, ahead_first):
    """The trainer's request for step k+1 waits behind step k's, whichever reaches the queue first
    (Ray does not order an async actor's calls): it must neither take nor drop as stale the groups
    step k is still waiting for."""
    ray = ray_local
    actor = ray.remote(QueueActor).options(max_concurrency=100).remote(
        groups_per_step=2, group_size=1, max_staleness=0, required_fields=FIELDS)

    async def main():
        assert await actor.admit_many.remote(2) == [(0, 0), (1, 0)]
        if ahead_first:
            ahead = asyncio.ensure_future(actor.get_batch.remote(2, 30.0, 1))
            await asyncio.sleep(0.2)
            first = asyncio.ensure_future(actor.get_batch.remote(2, 30.0, 0))
        else:
            first = asyncio.ensure_future(actor.get_batch.remote(2, 30.0, 0))
            ahead = asyncio.ensure_future(actor.get_batch.remote(2, 30.0, 1))
        await asyncio.sleep(0.2)
        await actor.put.remote(make_group(0, 1, 0))  # half of step 0's batch: stale for step 1
        await asyncio.sleep(0.2)
        await actor.put.remote(make_group(1, 1, 0))
        assert [s.uid for s in await first] == ["g0/0", "g1/0"]
        await actor.set_version.remote(1)
        assert await actor.admit_many.remote(2) == [(2, 1), (3, 1)]
        await actor.put.remote(make_group(2, 1, 1) + make_group(3, 1, 1))
        assert [s.uid for s in await ahead] == ["g2/0", "g3/0"]

    asyncio.run(main())
    assert ray.get(actor.metrics.remote())["dropped_groups"] == 0
    ray.get(actor.check_accounting.remote())
    ray.kill(actor)


def test_a_retried_request_is_not_queued_twice():
    """The put is the last step of a role chain; a retry (attempt > 0) may reach it after an
    earlier attempt did: what was delivered already, or closed since, is ignored and counted."""
    q = StalenessQueue(groups_per_step=2, group_size=2, max_staleness=1, required_fields=FIELDS)
    g0, g1, g2 = q.admit(), q.admit(), q.admit()
    assert q.put(make_group(g0, 2, 0) + make_group(g1, 2, 0)) == 4  # attempt 0 arrived after all
    assert q.put(make_group(g0, 2, 0) + make_group(g1, 2, 0), attempt=1) == 0  # its retry: ignored
    assert len(q.take(1)) == 2  # g0 trained; a late retry of it is ignored too
    assert q.put(make_group(g0, 2, 0) + make_group(g2, 2, 0), attempt=2) == 2  # g2 is new: queued
    m = q.metrics()
    assert m["redelivered_samples"] == 4 + 2 and m["generated_samples"] == 6
    with pytest.raises(QueueError, match="put twice"):  # a first attempt stays strict
        q.put(make_group(g2, 2, 0))
    q.check_accounting()


def test_a_rejected_put_adds_nothing():
    q = StalenessQueue(groups_per_step=2, group_size=2, max_staleness=0)
    g0, g1 = q.admit(), q.admit()
    bad = make_group(g0, 2, 0) + [make_group(g1, 2, 0)[0].replace(index=5, uid="g1/5")]
    with pytest.raises(QueueError, match="index 5 outside group of 2"):
        q.put(bad)
    assert q.metrics()["generated_samples"] == 0
    assert q.put(make_group(g0, 2, 0)) == 2  # the valid half can still come, once


def test_abandoning_a_delivered_group_keeps_it():
    """A chain can fail after its put (its answer lost): the delivered groups are whole and valid."""
    q = StalenessQueue(groups_per_step=2, group_size=1, max_staleness=0, required_fields=FIELDS)
    g0, g1 = q.admit(), q.admit()
    q.put(make_group(g0, 1, 0))
    q.abandon(group_name(g0), "error_RayActorError")
    q.abandon(group_name(g1), "error_RayActorError")
    assert q.metrics()["dropped_by_reason"] == {"error_RayActorError": 1} and q.ready_groups() == 1
    q.check_accounting()


def test_a_duplicate_index_in_one_put_is_refused_by_name():
    """Two samples with index 0 in one put used to be taken as two: the group held one sample,
    counted two generated, never completed and kept its admission slot for ever."""
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=0, required_fields=FIELDS)
    g0 = q.admit()
    first = make_group(g0, 2, 0)[0]
    with pytest.raises(QueueError, match=r"put twice: \['g0/0'\]"):
        q.put([first, first.replace(uid="g0/0")])
    with pytest.raises(QueueError, match="g0/x: uid is not g0/0"):
        q.put([first, first.replace(uid="g0/x")])  # a uid is its group and index, nothing else
    assert q.metrics()["generated_samples"] == 0  # nothing of a refused put was added
    q.put(make_group(g0, 2, 0))
    assert q.ready_groups() == 1 and len(q.take(1)) == 2
    q.check_accounting(trained_by_actor=2)


def test_the_accounting_check_sees_a_group_that_can_never_complete():
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=0, required_fields=FIELDS)
    q.admit()
    q.put(make_group(0, 2, 0)[:1])
    q.check_accounting()
    q.generated += 1  # counted as put, held nowhere: what the duplicate index above used to do
    with pytest.raises(QueueError, match=r"generated 2 samples != trained 0 \+ dropped 0 \+ held 1"):
        q.check_accounting()
    q.generated -= 1
    q._groups["g0"].delivered += 1  # the same, seen group by group
    with pytest.raises(QueueError, match=r"never complete: \['g0'\]"):
        q.check_accounting()


def test_the_queue_keeps_no_per_sample_state_for_closed_groups():
    """Exactly-once needs only the open groups (a uid is its group and index): the queue's state
    does not grow with the run (it kept every uid ever put)."""
    import pickle

    q = StalenessQueue(groups_per_step=2, group_size=4, max_staleness=1, required_fields=FIELDS)
    sizes = {}
    for step in range(1, 501):
        while q.can_admit():
            seq = q.admit()
            q.put(make_group(seq, 4, q.version))
        assert len(q.take(2)) == 8
        q.set_version(step)
        if step in (50, 500):
            sizes[step] = len(pickle.dumps(q.__dict__))
    assert sizes[500] - sizes[50] < 200, sizes  # counters grew a few digits; 3,600 more uids would be ~40 KB
    q.check_accounting(trained_by_actor=500 * 8)


def test_closed_below_is_the_oldest_open_group():
    q = StalenessQueue(groups_per_step=1, group_size=1, max_staleness=2, required_fields=FIELDS)
    assert q.closed_below() == 0
    g0, g1, g2 = q.admit(), q.admit(), q.admit()
    q.put(make_group(g1, 1, 0))
    assert q.closed_below() == 0 and [s.uid for s in q.take(1)] == ["g1/0"]
    assert q.closed_below() == 0  # g0 is still open
    q.abandon(group_name(g0), "error_timeout")
    assert q.closed_below() == g2
    q.abandon(group_name(g2), "error_timeout")
    assert q.closed_below() == 3  # nothing open: everything admitted is closed


def test_reset_restores_a_checkpoint_in_the_same_queue_and_answers_the_lost_trainers_request():
    import pickle

    async def main():
        actor = QueueActor(groups_per_step=1, group_size=2, max_staleness=0, required_fields=FIELDS)
        (seq, _), = await actor.admit_many(1)
        snap = actor.snapshot()  # g0 in flight
        await actor.put(make_group(seq, 2, 0))
        lost = asyncio.ensure_future(actor.get_train_batch(2, 30.0))  # the lost trainer's request waits
        await asyncio.sleep(0.01)
        await actor.close()
        await actor.reset(snap)
        assert await lost is None  # answered, never served from the restored queue
        assert await actor.admit_many(1) == [(0, 0)]  # g0 again: same task and seed
        await actor.put(make_group(0, 2, 0))
        batch = pickle.loads(pickle.dumps(await actor.get_train_batch(1, 30.0)))  # as Ray sends it
        assert [s.uid for s in batch.samples] == ["g0/0", "g0/1"] and batch.closed_below == 1
        actor.check_accounting(trained_by_actor=2)

    asyncio.run(main())


def test_closed_below_comes_with_its_own_batch_when_the_next_step_is_asked_ahead():
    """The trainer asks for step k+1's batch while step k trains. ``closed_below`` read after step
    k's call returned already counted step k+1's batch (taken meanwhile), so the trainer's ledger
    refused step k+1 as trained (seen in a Serve run: "samples trained twice: ['g2/0', ...]")."""
    import pickle

    from relaxrl.ledger import TrainedLedger

    async def main():
        actor = QueueActor(groups_per_step=2, group_size=2, max_staleness=1, required_fields=FIELDS)
        seqs = [seq for seq, _ in await actor.admit_many(4)]
        first = asyncio.ensure_future(actor.get_train_batch(2, 30.0, 0))
        ahead = asyncio.ensure_future(actor.get_train_batch(2, 30.0, 1))
        await asyncio.sleep(0.01)
        await actor.put([s for seq in seqs for s in make_group(seq, 2, 0)])  # both batches can go now
        return [pickle.loads(pickle.dumps(b)) for b in await asyncio.gather(first, ahead)]

    ledger = TrainedLedger()
    for batch in asyncio.run(main()):
        uids = [s.uid for s in batch.samples]
        assert ledger.duplicates(uids) == []
        ledger.record(uids, batch.closed_below)
    assert ledger.count == 8


def test_admission_stops_at_the_runs_total_and_a_drop_gives_the_slot_back():
    """The last steps must not set off generation that nothing will train on (16 of 40 samples in
    one run were generated and never trained before admission stopped at the run's total)."""
    q = StalenessQueue(groups_per_step=2, group_size=1, max_staleness=4, total_groups=3)
    assert q.capacity() == 10  # the staleness bound alone would admit 10
    seqs = q.admit_up_to(10)
    assert seqs == [0, 1, 2] and not q.can_admit()
    q.abandon(group_name(1), "error_test")
    assert q.can_admit() and q.admit_up_to(10) == [3]
