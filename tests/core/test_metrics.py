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
