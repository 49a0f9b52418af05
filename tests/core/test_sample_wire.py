"""Samples as they travel between roles: ``Packed`` pickles them column by column and unpickles a
plain list; a request's samples share one timings dict, which no role changes in place."""

import asyncio
import pickle

import ray.cloudpickle
from relaxrl.envs.base import Task
from relaxrl.sample import Packed, Sample, _unpack
from relaxrl.services.reward import Reward


def _samples() -> list[Sample]:
    timings = {"gen_start": 1.0, "gen_end": 2.0}
    prompt = [5, 6, 7]
    return [Sample(uid=f"g0/{k}", group_id="g0", index=k, prompt_ids=prompt, env="arithmetic", answer="3",
                   response_ids=[1, 2][: k + 1], loss_mask=[1] * (k + 1), behaviour_logprobs=[-0.5] * (k + 1),
                   policy_version=4, finish_reason="stop", response_text="3" if k else "1+", reward=None if k else 0.0,
                   reward_info={"error": "x"} if k else {}, teacher_topk_ids=[[1, 2]] if k else None, timings=timings)
            for k in range(2)]


def test_packed_unpickles_as_the_plain_list_it_packed():
    samples = _samples()
    for dumps in (pickle.dumps, ray.cloudpickle.dumps):  # Ray pickles call arguments with cloudpickle
        back = pickle.loads(dumps(Packed(samples)))
        assert type(back) is list and back == samples
        assert all(type(s) is Sample for s in back)
        # What the samples shared, they still share, so it was pickled once.
        assert back[0].timings is back[1].timings and back[0].prompt_ids is back[1].prompt_ids


def test_packed_is_smaller_than_the_list_it_packs():
    samples = [s.replace(uid=f"g{k}/{s.index}", group_id=f"g{k}", response_ids=list(s.response_ids),
                         behaviour_logprobs=list(s.behaviour_logprobs), loss_mask=list(s.loss_mask))
               for k in range(64) for s in _samples()]
    assert len(pickle.dumps(Packed(samples))) < len(pickle.dumps(samples))


def test_unpack_from_a_sender_with_other_fields_builds_through_init():
    """A sender whose Sample has fewer fields (other code): the rest take their defaults."""
    back = _unpack(("uid", "group_id", "index", "prompt_ids"), [["g0/0"], ["g0"], [0], [[1]]])
    assert back == [Sample(uid="g0/0", group_id="g0", index=0, prompt_ids=[1])]


def test_reward_role_stamps_a_new_shared_timings_dict_and_leaves_the_input_alone():
    reward = Reward.func_or_class({"name": "arithmetic"}, max_workers=1)
    samples = _samples()
    shared = samples[0].timings
    task = Task(task_id="t0", prompt="1+2", answer="3")
    scored = asyncio.run(reward.score(samples, {"g0": task}))
    assert shared == {"gen_start": 1.0, "gen_end": 2.0}  # never changed in place
    assert scored[0].timings is scored[1].timings is not shared
    assert scored[0].timings["reward_start"] <= scored[0].timings["reward_end"]
    assert scored[0].timings["gen_start"] == 1.0
