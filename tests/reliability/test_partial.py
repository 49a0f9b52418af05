"""relaxrl.partial: the continue/abort decision on a weight update and the partial-rollout records."""

import json

import pytest

from relaxrl.partial import (Decision, PartialGroup, PartialResponse, check_token_versions, deadline,
                             on_weight_update, trainable)


def test_continue_keeps_a_partial_while_a_step_can_still_train_it_abort_never_mixes_versions():
    # oldest token at version 3, max_staleness 2: steps updating weights 3, 4, 5 may train it.
    assert deadline(3, 2) == 5 and trainable(3, 2, 5) and not trainable(3, 2, 6)
    for new in (4, 5):
        assert on_weight_update(3, new, max_staleness=2, mode="continue") is Decision.CONTINUE
        assert on_weight_update(3, new, max_staleness=2, mode="abort") is Decision.ABORT
    # Past its deadline no step can train it: aborted whatever the mode, not finished and dropped.
    for mode in ("continue", "abort"):
        assert on_weight_update(3, 6, max_staleness=2, mode=mode) is Decision.ABORT
        assert on_weight_update(None, 9, max_staleness=0, mode=mode) is Decision.CONTINUE  # nothing to keep
        assert on_weight_update(4, 4, max_staleness=0, mode=mode) is Decision.CONTINUE  # same weights
    assert on_weight_update(3, 4, max_staleness=0, mode="continue") is Decision.ABORT  # synchronous
    with pytest.raises(ValueError, match="expected one of"):
        on_weight_update(3, 4, max_staleness=1, mode="drop")
    with pytest.raises(ValueError, match="backwards"):
        on_weight_update(3, 2, max_staleness=1, mode="continue")


def test_token_versions_are_per_token_and_never_decrease():
    check_token_versions(3, [])  # empty: every token at policy_version
    check_token_versions(3, [1, 1, 2])
    with pytest.raises(ValueError, match="2 token versions for 3"):
        check_token_versions(3, [1, 2])
    with pytest.raises(ValueError, match="decrease at token 2"):
        check_token_versions(3, [1, 2, 1])


def test_a_partial_group_extends_under_new_weights_and_round_trips_through_json():
    g = PartialGroup("g7")
    g.response(0).extend([11, 12], [-0.5, -0.25], version=2)
    g.response(1)  # not started
    assert g.oldest_version == 2 and g.tokens == 2
    g.response(0).extend([13], [-1.0], version=3)  # continued under newer weights
    with pytest.raises(ValueError, match="version 2 after version 3"):
        g.response(0).extend([14], [-1.0], version=2)
    g.response(0).finish_reason = "stop"
    with pytest.raises(ValueError, match="finished"):
        g.response(0).extend([14], [-1.0], version=3)
    fields = g.response(0).sample_fields()
    assert fields == {"response_ids": [11, 12, 13], "behaviour_logprobs": [-0.5, -0.25, -1.0],
                      "token_versions": [2, 2, 3], "policy_version": 2, "finish_reason": "stop"}
    back = PartialGroup.from_json(json.loads(json.dumps(g.to_json())))
    assert back == g
    bad = g.to_json()
    bad["responses"][0]["token_versions"] = [3, 2, 3]
    with pytest.raises(ValueError, match="decrease"):
        PartialGroup.from_json(bad)
    bad["responses"][0]["token_versions"] = [2, 3]
    with pytest.raises(ValueError, match="2 token versions for 3"):
        PartialGroup.from_json(bad)


def test_the_run_summary_counts_aborted_generations():
    from relaxrl.driver import RunResult

    assert RunResult(queue={"partial_aborted": 3}).summary()["partial_aborted"] == 3
    assert RunResult().summary()["partial_aborted"] == 0
