"""No length bias (issue 24 item 4): on long-tailed response lengths (10% of prompts 8x longer)
the lengths trained on match the lengths generated (two-sample KS test), at max_staleness 1 and 4,
with partial rollouts continued or aborted; the hand-out this replaced (ready groups oldest first,
too-stale ones dropped) fails the same test, so it can fail."""

import math
from typing import Optional

import pytest

from relaxrl.ks import kolmogorov_q, ks_2samp, ks_statistic
from relaxrl.queue import StalenessQueue
from relaxrl.sample import Sample
from tests.reliability.sim import Sim, SimConfig, failures, long_tail_lengths

pytestmark = pytest.mark.fault


def test_ks_against_known_values():
    # The Kolmogorov distribution's upper critical values (tables): 10%, 5%, 1%; and Q(1) = 0.2700.
    for lam, p in ((1.2238, 0.10), (1.3581, 0.05), (1.6276, 0.01), (1.0, 0.2700)):
        assert kolmogorov_q(lam) == pytest.approx(p, abs=2e-4)
    assert kolmogorov_q(0.1) == 1.0 and kolmogorov_q(5.0) < 1e-20
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert ks_statistic([1, 1, 2, 2], [1, 2, 2, 2]) == 0.25  # ties: both ECDFs step at once
    d, p = ks_2samp(list(range(100)), list(range(50, 150)))
    en = math.sqrt(50)
    assert d == 0.5 and p == pytest.approx(2 * math.exp(-2 * ((en + 0.12 + 0.11 / en) * 0.5) ** 2), rel=1e-9)
    assert ks_2samp(list(range(200)), list(range(200)))[1] == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        ks_2samp([], [1.0])


class DropStaleQueue(StalenessQueue):
    """The hand-out before deadlines: complete groups oldest version first, and a group too stale
    for the batch's version dropped; the trainer never waits for a slow group."""

    def take(self, num_groups: int, train_version: Optional[int] = None) -> Optional[list[Sample]]:
        v = self.version if train_version is None else train_version
        for gid in [g for g, grp in self._groups.items() if grp.complete]:
            if v - self._groups[gid].min_version() > self.max_staleness:
                self._drop(gid, "stale")
        ready = sorted((g.min_version(), g.seq, gid) for gid, g in self._groups.items() if g.complete)
        if len(ready) < num_groups:
            return None
        batch = []
        for _, _, gid in ready[:num_groups]:
            group = self._groups.pop(gid)
            batch += [group.samples[i] for i in sorted(group.samples)]
            self.consumed_groups += 1
        for s in batch:
            self.staleness_hist[v - s.oldest_version] += 1
        self.consumed_samples += len(batch)
        return batch


def _run(max_staleness: int, partial: str, queue_cls: type = StalenessQueue, per_attempt: bool = False) -> Sim:
    # Steps a little faster than a short generation (4 decode events of 4 tokens at rate 4 per time
    # unit, against 2 steps per time unit), so a long one spans several steps.
    sim = Sim(SimConfig(max_staleness=max_staleness, groups_per_step=4, group_size=2, producers=16, admit_ahead=1,
                        partial=partial, seed=7, step_rate=2.0, fail=failures(error=0.0, nan=0.0),
                        length=long_tail_lengths(per_attempt=per_attempt), queue_cls=queue_cls), checks=False)
    sim.step(6_000)
    return sim


def _lengths(sim: Sim) -> tuple[list[int], list[int]]:
    """(the lengths of the first generation of every group closed by the end (trained or dropped):
    the policy's distribution over the prompts the run used up, the lengths trained on)."""
    open_ = set(sim.q.snapshot()["in_flight"])
    policy = [n for seq, lengths in sim.first_lengths.items() if seq not in open_ for n in lengths]
    return policy, sim.trained_lengths


def _long(xs: list[int]) -> float:
    return sum(n >= 64 for n in xs) / len(xs)


@pytest.mark.parametrize("max_staleness", [1, 4])
@pytest.mark.parametrize("partial", ["continue", "abort"])
def test_lengths_trained_on_match_lengths_generated(max_staleness, partial):
    """Against both references: every response generated to its end, and the policy's first
    generation of every prompt used up (which also counts what an abort threw away). Lengths
    belong to the prompt here, so an aborted group's next generation is as long (``continue``
    never aborts, so the same holds for it whatever decides a length)."""
    sim = _run(max_staleness, partial)
    policy, trained = _lengths(sim)
    _, p_gen = ks_2samp(sim.generated_lengths, trained)
    d, p = ks_2samp(policy, trained)
    print(f"max_staleness={max_staleness} partial={partial}: trained={len(trained)} "
          f"p(generated)={p_gen:.3f} D(policy)={d:.4f} p(policy)={p:.3f} long share {_long(policy):.3f} -> "
          f"{_long(trained):.3f} aborted={sim.q.metrics()['partial_aborted']}")
    assert len(trained) > 1000 and p_gen > 0.05 and p > 0.05
    assert sim.q.metrics()["dropped_samples"] == 0


@pytest.mark.parametrize("max_staleness", [1, 4])
def test_drop_stale_hand_out_fails_the_same_test(max_staleness):
    """Long responses finish too stale more often and were dropped: the trained lengths lose the tail."""
    sim = _run(max_staleness, "off", DropStaleQueue)
    policy, trained = _lengths(sim)
    _, p_gen = ks_2samp(sim.generated_lengths, trained)
    d, p = ks_2samp(policy, trained)
    print(f"drop-stale max_staleness={max_staleness}: p(generated)={p_gen:.2e} D(policy)={d:.4f} p(policy)={p:.2e} "
          f"long share {_long(policy):.3f} -> {_long(trained):.3f} dropped={sim.q.metrics()['dropped_by_reason']}")
    assert p_gen < 0.05 and p < 0.05 and sim.q.metrics()["dropped_by_reason"].get("stale", 0) > 0


@pytest.mark.parametrize("max_staleness", [4])
def test_abort_biases_lengths_short_when_a_regenerated_response_is_a_fresh_draw(max_staleness):
    """``rollout.partial=abort`` throws away the generations a weight update lands on, and long ones
    span more updates: when the group's next generation draws its length afresh (a model under new
    weights), the trained lengths lose the tail. ``continue`` (above) does not; this is why it is
    the mode that keeps the length distribution (docs/design.md)."""
    sim = _run(max_staleness, "abort", per_attempt=True)
    policy, trained = _lengths(sim)
    d, p = ks_2samp(policy, trained)
    print(f"abort per_attempt max_staleness={max_staleness}: D(policy)={d:.4f} p={p:.2e} long share "
          f"{_long(policy):.3f} -> {_long(trained):.3f} aborted={sim.q.metrics()['partial_aborted']}")
    assert p < 0.05 and _long(trained) < _long(policy)
