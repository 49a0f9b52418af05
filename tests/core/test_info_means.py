from relaxrl.metrics import info_means


def test_info_means_averages_numeric_values_over_all_samples():
    infos = [{"valid": 1.0, "correct": 1.0}, {"valid": 0.0, "correct": 0.0}, {"error": "verifier_timeout"}, {}]
    # every sample counts in the denominator: a sample without the key contributes 0
    assert info_means(infos) == {"info/valid": 0.25, "info/correct": 0.25}
    assert info_means([]) == {}
    assert info_means([{"flag": True}]) == {}  # booleans are not metrics
