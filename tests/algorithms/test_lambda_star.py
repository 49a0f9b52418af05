"""λ*(p, b, c): closed form vs direct substitution, infinite cases, the online estimator, the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from relaxrl.algorithms.lambda_star import (
    ClassStats,
    LambdaStarTracker,
    class_stats,
    clip_region,
    fixed_point_q,
    get_lambda_star,
    lambda_star,
    logit,
    register_lambda_star,
    schedule_lambda,
    structural_mask,
    tail_ratio,
)

# ----------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("p,b,c", [(0.9, 0.6, 2.0), (0.99, 0.9, 1.2), (0.7, 0.5, 1.5), (0.999, 0.3, 3.0)])
def test_teacher_sharper_tail_ratio_lands_on_one_over_c(p, b, c):
    lam = lambda_star(p, b, c)
    assert 0 < lam < math.inf
    assert tail_ratio(p, b, lam) == pytest.approx(1.0 / c, rel=1e-9)
    # inside the region just below λ*, outside just above
    assert tail_ratio(p, b, lam * 0.99) > 1.0 / c > tail_ratio(p, b, lam * 1.01)


@pytest.mark.parametrize("p,b,c", [(0.95, 0.98, 2.0), (0.6, 0.9, 1.2), (0.9, 0.995, 1.5), (0.3, 0.7, 2.0)])
def test_base_sharper_tail_ratio_lands_on_c(p, b, c):
    lam = lambda_star(p, b, c)
    assert 0 < lam < math.inf
    assert tail_ratio(p, b, lam) == pytest.approx(c, rel=1e-9)
    assert tail_ratio(p, b, lam * 0.99) < c < tail_ratio(p, b, lam * 1.01)


def test_hand_computed_values():
    # p > b: ln(1 + (2-1)/0.6) / ln(0.9*0.4 / (0.6*0.1)) = ln(2.6667) / ln(6) = 0.980829 / 1.791759
    assert lambda_star(0.9, 0.6, 2.0) == pytest.approx(0.547411, abs=1e-6)
    # p < b: ln((1 - 2*0.02) / (2*0.98)) / ln(0.95*0.02 / (0.98*0.05)) = ln(0.489796) / ln(0.387755)
    #      = -0.713766 / -0.947381 = 0.753410
    assert lambda_star(0.95, 0.98, 2.0) == pytest.approx(0.753410, abs=1e-6)
    # λ = 1 is the teacher itself: q*(1) = p; λ = 0 the base
    assert fixed_point_q(0.95, 0.98, 1.0) == pytest.approx(0.95)
    assert fixed_point_q(0.95, 0.98, 0.0) == pytest.approx(0.98)


def test_infinite_only_when_lambda_has_no_effect():
    assert lambda_star(0.7, 0.7, 2.0) == math.inf  # p = b: λ has no effect
    # p < b with c(1 - b) >= 1: the tail-only reduction said ∞; the per-token clip on the modal
    # token (q/b >= 1/c) is still reached at a finite λ
    for b in (0.4, 0.5):
        lam = lambda_star(0.2, b, 2.0)
        assert math.isfinite(lam) and fixed_point_q(0.2, b, lam) == pytest.approx(b / 2.0, rel=1e-9)
    assert schedule_lambda(3.0, math.inf, 0.1) == 3.0


def test_clip_region_holds_both_ratios_to_the_clip():
    # b = 0.99875 (the toy's base at `}`), c = 2: the tail ratio binds on both sides
    assert clip_region(0.99875, 2.0) == pytest.approx((1 - 2 * 0.00125, 1 - 0.00125 / 2), abs=1e-12)
    assert clip_region(0.6, 2.0) == pytest.approx((0.3, 0.8))  # low side: q/b = 1/2; high: tail ratio 1/2
    assert clip_region(0.2, 2.0) == pytest.approx((0.1, 0.4))  # low: q/b = 1/2; high: q/b = 2
    for b, c in ((0.99875, 2.0), (0.6, 2.0), (0.2, 3.0), (0.5, 1.5)):
        for q in clip_region(b, c):
            for ratio in (q / b, (1 - q) / (1 - b)):
                assert 1 / c - 1e-12 <= ratio <= c + 1e-12


@pytest.mark.parametrize("p,b,c,edge", [
    (0.1, 0.6, 2.0, "low"), (0.3, 0.6, 2.0, "low"), (0.2, 0.7, 4.0, "low"),  # b < c/(c+1): q/b reaches 1/c
    (0.9, 0.2, 2.0, "high"), (0.99, 0.1, 4.0, "high"),  # b < 1/(c+1): q/b reaches c
])
def test_flat_base_the_modal_ratio_binds(p, b, c, edge):
    lam = lambda_star(p, b, c)
    lo, hi = clip_region(b, c)
    assert fixed_point_q(p, b, lam) == pytest.approx(lo if edge == "low" else hi, rel=1e-9)
    assert lo < fixed_point_q(p, b, 0.99 * lam) < hi  # inside just below λ*, outside just above
    assert not lo <= fixed_point_q(p, b, 1.01 * lam) <= hi


def test_modal_branch_hand_computed():
    # p < b, b = 0.6 < 2/3: ln((1 - 0.6) / (2 - 0.6)) / (ℓ(0.1) − ℓ(0.6)) = ln(0.285714) / (-2.197225 - 0.405465)
    #      = -1.252763 / -2.602690 = 0.481334   (the tail-only form: c(1-b) = 0.8, ln(0.2/1.2)/... = 0.688)
    assert lambda_star(0.1, 0.6, 2.0) == pytest.approx(0.481334, abs=1e-6)
    # p > b, b = 0.2 < 1/3: ln(2 * 0.8 / (1 - 0.4)) / ln(0.9 * 0.8 / (0.2 * 0.1)) = ln(2.666667) / ln(36)
    #      = 0.980829 / 3.583519 = 0.273706
    assert lambda_star(0.9, 0.2, 2.0) == pytest.approx(0.273706, abs=1e-6)


@pytest.mark.parametrize("p,b,c", [(0.0, 0.5, 2.0), (0.5, 1.0, 2.0), (0.5, 0.5, 1.0), (0.5, 0.5, 0.5)])
def test_rejects_bad_inputs(p, b, c):
    with pytest.raises(ValueError):
        lambda_star(p, b, c)


def test_schedule_is_min_of_target_and_margin():
    assert schedule_lambda(4.0, 2.0, 0.1) == pytest.approx(1.8)
    assert schedule_lambda(1.5, 2.0, 0.1) == 1.5


def test_estimators_are_pluggable():
    @register_lambda_star("test_constant")
    def constant(p, b, c):
        return 1.25

    assert get_lambda_star("test_constant") is constant
    tracker = LambdaStarTracker(c=2.0, estimator="test_constant", min_count=1)
    assert tracker.update({7: ClassStats(logit(0.9), logit(0.99), 3)})["lambda_star"] == 1.25
    with pytest.raises(ValueError, match="closed_form"):
        get_lambda_star("nope")


# ----------------------------------------------------------------------------- online estimate


def _synthetic_batch(p_by_token: dict[int, float], b_by_token: dict[int, float], n: int, seed: int):
    """Rows of 3 columns; each column's target is a structural token of known p (teacher) and b (base),
    or a content token (id 50) whose teacher prob varies. The student's samples hit the modal token."""
    g = torch.Generator().manual_seed(seed)
    toks = list(p_by_token)
    targets = torch.tensor([[toks[(i + j) % len(toks)] for j in range(3)] for i in range(n)])
    content = torch.rand((n, 3), generator=g) < 0.3
    targets = torch.where(content, torch.full_like(targets, 50), targets)
    p = torch.tensor([[p_by_token[int(t)] if int(t) in p_by_token else 0.0 for t in row] for row in targets])
    b = torch.tensor([[b_by_token[int(t)] if int(t) in b_by_token else 0.0 for t in row] for row in targets])
    p = torch.where(content, 0.3 + 0.69 * torch.rand((n, 3), generator=g), p)  # content: any confidence
    b = torch.where(content, 0.2 + 0.5 * torch.rand((n, 3), generator=g), b)
    input_ids = torch.cat([torch.zeros((n, 1), dtype=torch.long), targets], dim=1)
    return input_ids, p.log(), b.log(), torch.ones((n, 3))


def test_estimator_recovers_known_p_and_b_and_picks_the_binding_class():
    p = {11: 0.999, 12: 0.97, 13: 0.95}
    b = {11: 0.999, 12: 0.99, 13: 0.9}  # class 12: base sharper (format-breaking side)
    input_ids, t_lp, b_lp, mask = _synthetic_batch(p, b, n=300, seed=0)
    targets = input_ids[:, 1:]
    sel = structural_mask(t_lp, mask, targets, 0.9, structural_ids=[11, 12, 13])
    assert not sel[targets == 50].any()  # content tokens are never structural with an id list
    stats = class_stats(t_lp, b_lp, targets, sel)
    assert set(stats) == {11, 12, 13}
    for tok in stats:
        assert stats[tok].logit_p == pytest.approx(logit(p[tok]), abs=1e-4)
        assert stats[tok].logit_b == pytest.approx(logit(b[tok]), abs=1e-4)
    est = LambdaStarTracker(c=2.0, ema=0.0).update(stats)
    expected = {tok: lambda_star(p[tok], b[tok], 2.0) for tok in (12, 13)}  # 11: p = b, λ* = ∞
    assert est["binding_class"] == min(expected, key=expected.get)
    assert est["lambda_star"] == pytest.approx(min(expected.values()), rel=1e-3)
    assert est["p"] == pytest.approx(p[int(est["binding_class"])], abs=1e-4)


def test_confidence_rule_without_token_list_drops_unconfident_positions():
    t_lp = torch.tensor([[math.log(0.95), math.log(0.5), math.log(0.92)]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    sel = structural_mask(t_lp, mask, torch.tensor([[3, 4, 5]]), 0.9)
    assert sel.tolist() == [[True, False, False]]  # 0.5 < 0.9; the third is off the loss mask


def test_tracker_smooths_with_ema_and_ignores_thin_classes():
    tr = LambdaStarTracker(c=2.0, ema=0.5, min_count=4)
    assert tr.update({}) is None
    assert tr.update({1: ClassStats(1.0, 3.0, 2)}) is None  # too few positions: no estimate
    tr.update({1: ClassStats(2.0, 4.0, 10)})
    est = tr.update({1: ClassStats(4.0, 4.0, 10)})
    # logits: p: 0.5*2 + 0.5*4 = 3; b: 4
    assert est["p"] == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert est["b"] == pytest.approx(1 / (1 + math.exp(-4.0)))
    pooled = LambdaStarTracker(c=2.0, ema=0.0, aggregate="pooled", min_count=1)
    est = pooled.update({1: ClassStats(2.0, 4.0, 1), 2: ClassStats(5.0, 1.0, 3)})
    assert est["binding_class"] == -1.0
    assert logit(est["p"]) == pytest.approx((2.0 + 15.0) / 4)
