"""Generations split back into per-request sample groups."""

import pytest

from relaxrl.engines.base import Generation
from relaxrl.groups import GroupRequest, prompts_of, samples_from_generations


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
    assert groups[0][0].timings is not groups[0][1].timings  # each sample owns its timings


def test_generation_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 generations for 3"):
        samples_from_generations([GroupRequest("g0", [1], n=3)], [Generation([1], [0.0], "length")] * 2,
                                 _Tok(), 0, {})
