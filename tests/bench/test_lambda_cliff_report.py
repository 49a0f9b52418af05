"""bench/lambda_cliff.py's verdicts on made-up sweeps (no runs): the observed cliff interval, whether
the locked prediction lies in it, and the summary line with the cross-prediction and the clip."""

import itertools
import math

import lambda_cliff
import pytest
from smoke_checks import fields


def sweep(validity: dict[float, float]) -> dict[float, dict]:
    return {lam: {"validity": v} for lam, v in validity.items()}


def test_a_cliff_below_lambda_one_is_found():
    # The prediction's fine grid lies below 1; the old interval only looked at steps ending above 1
    # and reported [1, 4] here.
    res = sweep({0.131: 0.97, 0.147: 0.96, 0.164: 0.80, 0.18: 0.7, 1.0: 0.97, 4.0: 0.5})
    assert lambda_cliff.observed_interval(res, 0.97) == (0.147, 0.164)
    assert lambda_cliff.inside(0.16, (0.147, 0.164)) and not lambda_cliff.inside(0.17, (0.147, 0.164))


def test_no_cliff_and_a_cliff_at_the_first_point():
    lo, hi = lambda_cliff.observed_interval(sweep({0.5: 0.9, 1.0: 0.95, 4.0: 0.88}), 0.95)  # 0.88 > 0.855
    assert math.isnan(lo) and math.isnan(hi) and not lambda_cliff.inside(0.5, (lo, hi))
    assert lambda_cliff.observed_interval(sweep({0.2: 0.5, 1.0: 0.95}), 0.95) == (0.0, 0.2)


def test_fine_grid_resolution_is_a_tenth_of_the_prediction():
    grid = lambda_cliff.make_grid(0.164, [1.0, 4.0])
    fine = [x for x in grid if x < 1.0]
    assert fine == [0.131, 0.148, 0.164, 0.18, 0.197]
    assert max(b - a for a, b in itertools.pairwise(fine)) <= 0.1 * 0.164 + 1e-3  # rounding to 3 decimals


def test_summary_line_carries_the_cross_prediction_and_the_clip():
    res = {"validity": 0.9, "accuracy": 0.5, "lambda_mean": 1.0, "lambda_star_last": 0.2, "samples": 8}
    one = {"results": {"1.0": res}, "scheduler": {**res, "validity": 0.95}, "observed": [1.0, 4.0],
           "predicted": 0.164, "prediction_inside": False, "c": 2.0}
    cross = {**one, "c": 4.0, "predicted": 0.328, "observed": [0.295, 0.328], "prediction_inside": True}
    line = lambda_cliff.summary_line({**one, "cross": cross, "clip_reference": "base"})
    assert line.startswith("lambda_cliff: predicted=0.164 observed_lo=1.000 observed_hi=4.000 ")
    assert line.endswith(" inside=no c=2 cross_c=4 cross_predicted=0.328 cross_observed_lo=0.295 "
                         "cross_observed_hi=0.328 cross_inside=yes clip_reference=base"), line
    f = fields(line)
    assert (f["c"], f["cross_c"], f["scheduler_validity"]) == (2.0, 4.0, pytest.approx(0.95))
