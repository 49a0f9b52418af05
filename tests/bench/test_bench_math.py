"""The arithmetic the benchmarks report, against hand-computed values."""

import math

import pytest
from async_speedup import mean_curves, overlap_limit, reward_by_policy, sync_stage_times
from common import steady_steps_per_s, window_mean


def test_overlap_limit_is_sum_over_max_stage():
    # 0.1 + 0.2 + 0.4 + 0.1 = 0.8 s per step; the slowest stage (0.4 s) bounds the pipeline: 2x.
    assert overlap_limit({"gen": 0.1, "reward": 0.2, "train": 0.4, "sync": 0.1}) == pytest.approx(2.0)
    assert overlap_limit({"gen": 1.0}) == 1.0


def test_weight_sync_is_publication_plus_load():
    st = sync_stage_times({"stage_s_per_step": {"gen": 0.1, "reward": 0.2, "train": 0.3,
                                                "publish": 0.02, "weights": 0.01}})
    assert st == {"gen": 0.1, "reward": 0.2, "train": 0.3, "sync": pytest.approx(0.03)}


def test_steady_rate_skips_start_up():
    # Step 1 took 10 s (start-up); then one step per 0.5 s. Skipping the first 10% keeps only those.
    recs = [{"step": 1, "wall_s": 10.0}] + [{"step": k, "wall_s": 10.0 + 0.5 * (k - 1)} for k in range(2, 11)]
    assert steady_steps_per_s(recs, skip_frac=0.1) == pytest.approx(2.0)


def test_window_mean_clips_at_start():
    assert window_mean([1, 2, 3, 4], end=4, width=2) == 3.5
    assert window_mean([1, 2, 3, 4], end=1, width=3) == 1.0
    assert math.isnan(window_mean([], end=0, width=2))


def test_batch_reward_is_indexed_by_the_policy_that_generated_it():
    # max_staleness=2: steps 1-3 train batches of policy 0 (staleness 0, 1, 2), then step t trains
    # policy t-3's. Step t's record has version t (after the step) and reward t / 10.
    recs = [{"version": t, "staleness_mean": min(t - 1, 2), "reward_mean": t / 10} for t in range(1, 8)]
    assert reward_by_policy(recs) == pytest.approx([0.2, 0.4, 0.5, 0.6, 0.7])
    # A batch mixing policies 1 and 2 (mean 1.6 -> 2) leaves no batch of policy 1: it repeats policy 0's.
    mixed = [{"version": 1, "staleness_mean": 0.0, "reward_mean": 0.3},
             {"version": 4, "staleness_mean": 1.4, "reward_mean": 0.5}]
    assert reward_by_policy(mixed) == pytest.approx([0.3, 0.3, 0.5])


def test_mean_curves_stop_at_the_shortest():
    assert mean_curves([[1.0, 2.0, 3.0], [3.0, 4.0]]) == [2.0, 3.0]
