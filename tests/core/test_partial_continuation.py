"""Continuing a recorded partial rollout (a resumed run): the response is its kept tokens, log-probs
and versions followed by the new ones; the oldest version stays the kept prefix's; the streaming
HF engine reports each chunk (what the record is built from); the queue keeps a handed-back record
until a newer one and counts what was continued; a checkpoint asks every listening rollout replica
for its records. No Ray: the engine runs in-process and QueueActor is plain asyncio."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from relaxrl.engines.base import SamplingParams
from relaxrl.partial import PartialGroup, PartialResponse, continuation, finished, joined
from relaxrl.queue import QueueActor, StalenessQueue, group_name
from relaxrl.sample import Sample

from tests.engines.contract.conftest import base_model, model_dir, other_model, prompts, tokenizer  # noqa: F401 (fixtures)
from tests.engines.contract.helpers import TOL, max_diff, reference_logprobs

FIELDS = ("response_ids", "behaviour_logprobs", "reward")


def kept_response() -> PartialResponse:
    r = PartialResponse(index=1)
    r.extend([11, 12], [-0.5, -0.6], version=2)
    r.extend([13], [-0.7], version=3)  # an update landed mid-generation before the checkpoint
    return r


def test_a_continuation_is_the_kept_tokens_then_the_new_ones_and_the_prefix_stays_the_oldest():
    from relaxrl.services.rollout import as_generation, with_token_versions

    kept = kept_response()
    prompt, left = continuation(kept, [5, 6], max_new_tokens=8)
    assert (prompt, left) == ([5, 6, 11, 12, 13], 5)  # prompt + kept ids as the prompt, the limit reduced
    whole = joined(kept, [21, 22], [-0.1, -0.2], [3, 4], "stop")
    assert whole.response_ids == [11, 12, 13, 21, 22]
    assert whole.behaviour_logprobs == [-0.5, -0.6, -0.7, -0.1, -0.2]
    assert whole.token_versions == [2, 2, 3, 3, 4] and whole.finish_reason == "stop"
    assert kept.response_ids == [11, 12, 13] and not kept.done  # the record itself is not changed
    gen = as_generation(whole)
    sample = with_token_versions(Sample(uid="g0/1", group_id="g0", index=1, prompt_ids=[5, 6],
                                        response_ids=gen.response_ids, behaviour_logprobs=gen.logprobs), gen)
    assert sample.oldest_version == sample.policy_version == 2  # the kept prefix's, not the new tokens'
    assert sample.token_versions == [2, 2, 3, 3, 4]

    with pytest.raises(ValueError, match="version 1 after version 3"):  # new tokens older than the kept ones
        joined(kept, [21], [-0.1], [1], "stop")
    with pytest.raises(ValueError, match="1 versions for 2"):
        joined(kept, [21, 22], [-0.1, -0.2], [3], "stop")
    with pytest.raises(ValueError, match="finish reason"):
        joined(kept, [21], [-0.1], [3], "")
    with pytest.raises(ValueError, match="exceed max_new_tokens=2"):
        continuation(kept, [5], max_new_tokens=2)


def test_a_record_with_nothing_left_to_generate_is_the_response_itself():
    kept = kept_response()
    assert continuation(kept, [5], max_new_tokens=3) is None  # at the limit before its last chunk was reported
    assert finished(kept).finish_reason == "length" and finished(kept).response_ids == [11, 12, 13]
    kept.finish_reason = "stop"
    assert continuation(kept, [5], max_new_tokens=8) is None and finished(kept).finish_reason == "stop"


def test_the_streaming_engine_reports_every_chunk_and_a_continuation_is_scored_by_the_model(base_model, tokenizer,
                                                                                            prompts):
    """Chunks reported through ``on_tokens`` add up to the returned generation; going on from a
    record of its first tokens gives log-probs equal to the model's on the whole response (the kept
    tokens are context, as in an uninterrupted generation)."""
    from relaxrl.engines.hf_generation import HFGenerationEngine, StreamingHFEngine

    engine = StreamingHFEngine(HFGenerationEngine(copy.deepcopy(base_model), tokenizer), chunk_tokens=3)
    try:
        record = PartialGroup("g0")

        def on_tokens(i, ids, logprobs, version, finish):
            record.response(i).extend(ids, logprobs, version)
            record.response(i).finish_reason = finish

        params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
        gens = asyncio.run(engine.agenerate(prompts[:2], params, on_tokens=on_tokens))
        for i, g in enumerate(gens):
            r = record.response(i)
            assert (r.response_ids, r.behaviour_logprobs, r.token_versions, r.finish_reason) == \
                (g.response_ids, g.logprobs, g.token_versions, g.finish_reason)

        # A record cut after its first chunk (as a checkpoint may find it), continued.
        long = max(range(2), key=lambda i: len(gens[i].response_ids))
        assert len(gens[long].response_ids) > 3, "the tiny model stopped within one chunk: pick another seed"
        kept = PartialResponse(index=0)
        kept.extend(gens[long].response_ids[:3], gens[long].logprobs[:3], version=0)
        prompt, left = continuation(kept, prompts[long], params.max_new_tokens)
        [rest] = engine.generate([prompt], SamplingParams(1.0, 1.0, left, 9))
        whole = joined(kept, rest.response_ids, rest.logprobs, rest.token_versions, rest.finish_reason)
        assert whole.response_ids[:3] == gens[long].response_ids[:3] and len(whole.response_ids) <= 12
        from relaxrl.services.rollout import as_generation

        gen = as_generation(whole)
        assert max_diff([gen], reference_logprobs(base_model, [prompts[long]], [gen], 1.0)) < TOL
    finally:
        engine.close()


def sample_group(seq, size, record: PartialGroup):
    gid = group_name(seq)
    out = []
    for i in range(size):
        r = record.response(i)
        r.finish_reason = r.finish_reason or "length"
        out.append(Sample(uid=f"{gid}/{i}", group_id=gid, index=i, prompt_ids=[5], reward=1.0, **r.sample_fields()))
    return out


def test_a_handed_back_record_stays_in_checkpoints_until_a_newer_one_and_the_identity_holds_throughout():
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    q.admit(), q.admit()
    pg = PartialGroup("g1")
    pg.response(0).extend([3, 4], [-0.1, -0.2], version=0)
    assert q.record_partials([pg]) == 1
    q.check_accounting()
    snap = json.loads(json.dumps(q.snapshot()))

    r = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    r.restore(snap)
    assert r.admit_up_to(2) == [0, 1]
    back = r.take_partial("g1")
    assert back == pg and r.take_partial("g1") is None  # handed out once
    # A checkpoint taken before the rollout records the continuation still has the kept tokens.
    assert json.loads(json.dumps(r.snapshot()))["partials"] == {"1": pg.to_json()}
    newer = PartialGroup.from_json(pg.to_json())
    newer.response(0).extend([5], [-0.3], version=1)
    newer.response(1).extend([8], [-0.4], version=1)
    r.record_partials([newer])
    assert r.snapshot()["partials"] == {"1": newer.to_json()}
    r.note_partials(continued=1, discarded=0)
    r.note_partials(0, 0, regenerated=3)  # a replica started three generations again in place
    r.check_accounting()
    m = r.metrics()
    assert (m["partials_continued"], m["partials_discarded"], m["partial_regenerated"], m["in_flight_groups"]) == (
        1, 0, 3, 2)
    r.put(sample_group(0, 2, PartialGroup("g0", [PartialResponse(0, [7], [-0.1], [0]),
                                                 PartialResponse(1, [7], [-0.1], [0])])))
    r.put(sample_group(1, 2, newer))
    r.check_accounting()
    assert [s.uid for s in r.take(1)] == ["g0/0", "g0/1"]
    assert r.snapshot()["partials"] == {"1": newer.to_json()}  # delivered, not trained: kept till trained
    r.set_version(1)
    batch = r.take(1)
    assert [s.oldest_version for s in batch] == [0, 1] and r.snapshot()["partials"] == {}
    r.check_accounting(trained_by_actor=4)
    again = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=1, required_fields=FIELDS)
    again.restore(json.loads(json.dumps(r.snapshot())))
    assert (again.metrics()["partials_continued"], again.metrics()["partial_regenerated"]) == (1, 3)  # kept across a checkpoint
    with pytest.raises(Exception, match="counts >= 0"):
        r.note_partials(-1, 0)


def test_a_checkpoint_asks_every_listening_rollout_replica_and_waits_for_their_records():
    """``collect_partials`` wakes each replica's long poll and returns once every replica that
    listens has recorded (their records are what the snapshot then carries); one that does not
    answer costs only the timeout."""

    async def main():
        actor = QueueActor(groups_per_step=1, group_size=1, max_staleness=0)
        assert await actor.admit_many(1) == [(0, 0)]
        # A replica's first poll answers at once (epoch 0): it registers and records nothing asked.
        assert await actor.partials_wanted("a", -1, 5.0) == 0
        poll = asyncio.ensure_future(actor.partials_wanted("a", 0, 5.0))
        await asyncio.sleep(0.01)
        assert not poll.done()  # nothing asked yet: it waits

        async def replica_a():
            epoch = await poll
            pg = PartialGroup("g0")
            pg.response(0).extend([3], [-0.1], version=0)
            return actor.record_partials([pg.to_json()], epoch, "a")

        answering = asyncio.ensure_future(replica_a())
        got = await asyncio.wait_for(actor.collect_partials(5.0), 5.0)
        assert got == {"asked": 1, "answered": 1, "recorded": 1} and await answering == 1
        assert actor.snapshot()["partials"]["0"]["responses"][0]["response_ids"] == [3]

        assert await actor.partials_wanted("b", -1, 5.0) == 1  # a second replica, which will not answer
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await actor.collect_partials(0.3)
        assert got["asked"] == 2 and got["answered"] == 0 and 0.3 <= loop.time() - t0 < 3.0
        actor.record_partials([], 1, "a")  # a late answer for an epoch that is over: not counted anywhere
        assert actor._answers == {}

    asyncio.run(main())


def rollout_role(model_dir, max_new_tokens, **kwargs):
    """The streaming rollout role's own class (``.func_or_class``), in-process, without a weight
    store: it keeps the engine's weights and version."""
    from relaxrl.services.rollout import Rollout

    return Rollout.func_or_class(model_dir, sampling={"temperature": 1.0, "top_p": 1.0,
                                                      "max_new_tokens": max_new_tokens},
                                 streaming=True, stream_chunk_tokens=1, **kwargs)


def test_the_rollout_records_a_group_in_flight_and_continues_a_record_from_its_kept_tokens(model_dir, prompts):
    from relaxrl.engines.payload import pack_weights
    from relaxrl.groups import GroupRequest

    role = rollout_role(model_dir, 40, max_staleness=1, partial="continue")
    try:
        request = GroupRequest(group_id="g0", prompt_ids=list(prompts[0]), n=2, seed=7)

        async def in_flight():  # what a checkpoint finds: a prefix of what the group ends with
            task = asyncio.ensure_future(role.generate([request]))
            for _ in range(5000):
                if (records := role.records()) and not task.done():
                    break
                await asyncio.sleep(0.001)
            return records, await task

        records, samples = asyncio.run(in_flight())
        assert [r["group_id"] for r in records] == ["g0"] and role.records() == []  # none once it is done
        for r in records[0]["responses"]:
            s = samples[r["index"]]
            n = len(r["response_ids"])
            assert 0 < n and (s.response_ids[:n], s.behaviour_logprobs[:n]) == (r["response_ids"],
                                                                               r["behaviour_logprobs"])

        kept = PartialGroup("g0")
        kept.response(0).extend([11, 12, 13], [-0.5, -0.6, -0.7], version=0)
        kept.response(1).extend([21, 22], [-0.2, -0.3], version=0)
        kept.response(1).finish_reason = "stop"
        samples = asyncio.run(role.generate([request], partials={"g0": kept.to_json()}))
        a, b = samples
        assert a.response_ids[:3] == [11, 12, 13] and a.behaviour_logprobs[:3] == [-0.5, -0.6, -0.7]
        assert 3 < len(a.response_ids) <= 40 and a.policy_version == a.oldest_version == 0
        assert (b.response_ids, b.behaviour_logprobs, b.finish_reason) == ([21, 22], [-0.2, -0.3], "stop")
        assert b.prompt_ids == list(prompts[0]) and a.uid == "g0/0"  # the group's own prompt, not the continuation's
        assert role.stats()["partials_continued"] == 1 and role.stats()["partials_discarded"] == 0

        # Weights 2 loaded since: a version-0 prefix is past max_staleness=1, so the bound refuses it.
        state = {k: v.clone() for k, v in role.engine.model.state_dict().items()}
        role.engine.load_weights(pack_weights(state, version=2, kind="full"))
        samples = asyncio.run(role.generate([request], partials={"g0": kept.to_json()}))
        assert all(s.policy_version == 2 and not s.token_versions for s in samples)  # generated afresh
        assert samples[0].response_ids[:3] != [11, 12, 13] or samples[1].response_ids != [21, 22]
        assert role.stats()["partials_discarded"] == 1
    finally:
        role.engine.close()


def test_a_broadcast_load_is_a_decision_point_for_the_generations_in_flight(model_dir, other_model, prompts):
    """With weight_sync.method=broadcast the receiver thread loads each version; the streaming
    rollout must then decide what its generations in flight do, as the object-store follower does
    (``partial=abort``: the group an update lands on is generated again, under the new weights).
    The receiver here is a stand-in holding the hook the rollout sets; the load is the engine's."""
    import threading
    import types

    from relaxrl.engines.payload import pack_weights
    from relaxrl.groups import GroupRequest

    role = rollout_role(model_dir, 200, max_staleness=1, partial="abort")
    role.receiver = types.SimpleNamespace(on_loaded=None, check=lambda: None)  # check: no receiver error
    try:
        request = GroupRequest(group_id="g0", prompt_ids=list(prompts[0]), n=2, seed=7)

        def receive():  # what BroadcastReceiver._run does for a version: load it, then call the hook
            role.engine.load_weights(pack_weights(other_model.state_dict(), version=1, kind="full"))
            if role.receiver.on_loaded is not None:
                role.receiver.on_loaded(1)

        async def in_flight():
            task = asyncio.ensure_future(role.generate([request]))
            for _ in range(5000):
                if role.records() and not task.done():
                    break
                await asyncio.sleep(0.001)
            assert not task.done(), "the group finished before the update could land"
            thread = threading.Thread(target=receive)
            thread.start()
            samples = await task
            thread.join()
            return samples

        samples = asyncio.run(in_flight())
        assert role.partial_aborted == 1
        assert all(s.policy_version == 1 and not s.token_versions for s in samples)  # all under the new weights
    finally:
        role.engine.close()


def test_a_streaming_generation_that_runs_past_the_hang_timeout_fails_the_health_check(model_dir, prompts):
    """The batch path's hang watch (``faults.hang_timeout_s``: Serve restarts a replica whose
    health check raises) covers the streaming path too: each group's generation is tracked."""
    from relaxrl.groups import GroupRequest

    role = rollout_role(model_dir, 200, hang_timeout_s=0.05)
    try:
        request = GroupRequest(group_id="g0", prompt_ids=list(prompts[0]), n=2, seed=7)

        async def in_flight():
            task = asyncio.ensure_future(role.generate([request]))
            await asyncio.sleep(0.3)
            assert not task.done(), "the group finished before the hang timeout"
            with pytest.raises(RuntimeError, match="replica hung"):
                role.check_health()
            await task
            role.check_health()  # nothing in flight: healthy again

        asyncio.run(in_flight())
    finally:
        role.engine.close()
