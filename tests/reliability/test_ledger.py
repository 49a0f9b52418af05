"""The trainer's ledger of trained samples: exactly-once in memory bounded by the groups in flight."""

import json
import os
import sys

import pytest

from relaxrl.ledger import TrainedLedger

pytestmark = pytest.mark.fault
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))


def test_refuses_what_was_trained_or_closed_and_forgets_closed_groups():
    ledger = TrainedLedger()
    ledger.record(["g1/0", "g1/1", "g3/0"], closed_below=None)  # no queue floor yet: g0 and g2 still open
    assert ledger.duplicates(["g1/1", "g1/2", "g0/0", "g3/0", "g1/2"]) == ["g1/1", "g3/0", "g1/2"]
    ledger.record(["g0/0", "g0/1"], closed_below=3)  # g2 was dropped by the queue, g3 is still open
    assert ledger.groups == {3: 0b1} and ledger.count == 5
    assert ledger.duplicates(["g2/0", "g0/1", "g3/0", "g3/1"]) == ["g2/0", "g0/1", "g3/0"]
    ledger.record(["g9/0"], closed_below=2)  # a lower floor (a stale one) never reopens a group
    assert ledger.closed_below == 3
    back = TrainedLedger.from_state(json.loads(json.dumps(ledger.state())))  # as a checkpoint holds it
    assert back == ledger and back.duplicates(["g1/0", "g3/0", "g3/1"]) == ["g1/0", "g3/0"]


def test_uids_of_another_form_are_kept_as_they_are():
    ledger = TrainedLedger.from_uids(["a@1", "g0/0"])  # also how a checkpoint's old uid list is read
    assert ledger.duplicates(["a@1", "a@2", "g0/0"]) == ["a@1", "g0/0"] and ledger.count == 2


def test_a_long_quickstart_size_run_keeps_a_checkpoint_of_constant_size():
    """Queue and ledger driven through quickstart-size steps (8 groups of 8, staleness 2, some groups
    late or dropped): the actor state a checkpoint holds stays a few integers, however long the run."""
    from checkpoint_size import simulate

    short, long = simulate(100, old_format=False), simulate(1000, old_format=True)
    assert long["trained_samples"] == 1000 * 64
    assert long["ledger_groups_held_max"] <= 24  # at most the groups in flight: (2 + 1) * 8
    assert long["actor_state_bytes"] <= 400 and long["actor_state_bytes"] - short["actor_state_bytes"] < 20
    assert long["old_actor_state_bytes"] > 600_000  # what a uid per trained sample weighed
    assert long["queue_memory_pickled_bytes"] - short["queue_memory_pickled_bytes"] < 2_000
