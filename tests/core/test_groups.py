"""Generations split back into per-request sample groups."""

import pytest

from relaxrl.engines.base import Generation
from relaxrl.groups import GroupRequest, groups_per_request, prompts_of, samples_from_generations


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def test_groups_keep_request_order_and_strip_eos_from_text():
    reqs = [GroupRequest("g0", [9, 9], n=2, answer="x"), GroupRequest("g1", [8], n=1, domain="d")]
    assert prompts_of(reqs) == [[9, 9], [9, 9], [8]]
    gens = [Generation([0, 7], [-0.1, -0.2], "stop"), Generation([1], [-0.3], "length"),
            Generation([2, 3], [-0.4, -0.5], "length")]
    groups = samples_from_generations(reqs, gens, _Tok(), version=3, timings={"gen_start": 1.0, "gen_end": 2.0})
    assert [[s.uid for s in g] for g in groups] == [["g0/0", "g0/1"], ["g1/0"]]
    first = groups[0][0]
    assert first.response_text == "a"  # EOS (7) not shown to the verifier
    assert first.response_ids == [0, 7] and first.loss_mask == [1, 1]  # but trained on
    assert groups[1][0].response_text == "cd" and groups[1][0].domain == "d"
    assert {s.policy_version for g in groups for s in g} == {3}
    # One timings dict for the call and one prompt list per group, so a batch pickles each once.
    assert groups[0][0].timings is groups[1][0].timings == {"gen_start": 1.0, "gen_end": 2.0}
    assert groups[0][0].prompt_ids is groups[0][1].prompt_ids and groups[0][0].prompt_ids is not reqs[0].prompt_ids


def test_generation_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 generations for 3"):
        samples_from_generations([GroupRequest("g0", [1], n=3)], [Generation([1], [0.0], "length")] * 2,
                                 _Tok(), 0, {})


@pytest.mark.parametrize("configured, batch_max, per_step, replicas, expected", [
    (0, 8, 8, 1, 8),  # one request per step keeps the single replica's generate call full
    (0, 8, 8, 4, 2),  # enough requests to reach every replica
    (0, 4, 8, 1, 4),  # never more than one generate call may hold
    (0, 1, 8, 1, 1),  # batch_max_groups=1: one group per call (reproducible seeds)
    (3, 8, 8, 1, 3),  # set explicitly
])
def test_groups_per_request(configured, batch_max, per_step, replicas, expected):
    assert groups_per_request(configured, batch_max, per_step, replicas) == expected


def test_groups_per_request_rejects_what_no_generate_call_can_hold():
    with pytest.raises(ValueError, match="groups_per_request=9 exceeds rollout.batch_max_groups=8"):
        groups_per_request(9, 8, 8, 1)
    with pytest.raises(ValueError, match="groups_per_request >= 0"):
        groups_per_request(-1, 8, 8, 1)
