"""The arithmetic the benchmarks report, against hand-computed values."""

import math

import pytest
from async_speedup import mean_curves, overlap_limit, reward_by_policy, sync_stage_times
from common import steady_steps_per_s, window_mean
from role_hops import path_floor


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


def test_critical_path_cuts_a_step_into_its_hops():
    from critical_path import critical_path, hops_of_step

    # Step 0 trains until t=1.00; the rollout loads 1.01-1.02, generates 1.02-1.10, the reward role
    # scores 1.13-1.14 and step 1 trains 1.16-1.50. A second generation before step 0's end is ignored.
    iv = {"train": [(0.5, 1.0), (1.16, 1.5)], "weights": [(0.1, 0.12), (1.01, 1.02)],
          "gen": [(0.12, 0.3), (1.02, 1.10)], "reward": [(0.3, 0.31), (1.13, 1.14)]}
    hops = hops_of_step(iv, 0)
    expected = {"publish_to_rollout": 0.01, "load": 0.01, "generate": 0.08, "to_reward": 0.03, "reward": 0.01,
                "to_trainer": 0.02, "train": 0.34}
    assert hops == pytest.approx(expected)
    assert sum(hops.values()) == pytest.approx(1.5 - 1.0)  # the hops tile the step
    assert critical_path(iv, skip=0)["to_reward"] == [pytest.approx(30.0)]
    with pytest.raises(ValueError, match="no 'weights' intervals"):
        critical_path({**iv, "weights": []}, skip=0)


def test_wire_format_batches_share_what_the_rollout_shares():
    from wire_format import batch

    shared, unshared = batch(2, 3, 4, 5, shared=True), batch(2, 3, 4, 5, shared=False)
    assert shared == unshared  # the same values either way
    assert shared[0].timings is shared[5].timings and shared[0].prompt_ids is shared[2].prompt_ids
    assert shared[0].prompt_ids is not shared[3].prompt_ids  # another group
    assert unshared[0].timings is not unshared[1].timings


def test_path_floor_counts_each_hop_of_a_synchronous_step():
    # weights 5 + the store's notice 2 + rollout -> reward 7 + reward -> queue and queue -> trainer 2 x 4 = 22 ms.
    assert path_floor({"empty_hop": 2.0, "actor_hop": 4.0, "serve_hop": 7.0, "weights_hop": 5.0}) == pytest.approx(22.0)
