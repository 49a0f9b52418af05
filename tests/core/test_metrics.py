from relaxrl.metrics import first_last_mean, merge_intervals, overlap_length, total_length


def test_merge_and_total():
    assert merge_intervals([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert total_length([(0, 1), (0.5, 2), (3, 4)]) == 3


def test_overlap_of_two_busy_sets():
    gen = [(0, 2), (3, 5)]
    train = [(1, 4)]
    assert overlap_length(gen, train) == 2  # [1,2] and [3,4]
    assert overlap_length(gen, []) == 0


def test_first_last_mean_uses_ten_percent():
    values = [0.0] * 10 + [1.0] * 10
    assert first_last_mean(values) == (0.0, 1.0)  # 2 values at each end
    assert first_last_mean([0.5]) == (0.5, 0.5)


def test_clip_intervals_to_window():
    from relaxrl.metrics import clip_intervals

    assert clip_intervals([(0, 2), (3, 5), (6, 9)], 1, 7) == [(1, 2), (3, 5), (6, 7)]
    assert clip_intervals([(0, 1), (8, 9)], 2, 7) == []


def test_busy_fractions_count_only_the_runs_wall_time():
    """Generation that runs on after the last step (or before the loops start) is not busy time of
    the run: gen_busy printed 1.183 before it was cut to the run's window."""
    from relaxrl.driver import RunResult

    r = RunResult(steps=1, t0=100.0, wall_s=10.0,
                  stage_intervals={"gen": [(99.0, 105.0), (108.0, 115.0)], "train": [(100.0, 110.0)]})
    s = r.summary()
    assert s["gen_busy_frac"] == 0.7  # (105 - 100) + (110 - 108) of 10 s
    assert s["train_busy_frac"] == 1.0
    assert s["overlap_frac"] == 0.7
