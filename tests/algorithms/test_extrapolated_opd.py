"""Extrapolated OPD: hand-computed advantages and clipped loss, λ = 1 is plain OPD, the scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from relaxrl.algorithms import make_algorithm
from relaxrl.algorithms.extrapolated_opd import (
    ExtrapolatedOPDConfig,
    clipped_surrogate,
    extrapolated_advantages,
)
from relaxrl.algorithms.lambda_star import fixed_point_q, lambda_star
from relaxrl.sample import Sample, collate

LN = math.log


def test_advantage_hand_computed_and_lambda_one_is_plain_opd():
    lp = torch.tensor([[LN(0.5), LN(0.2)]])
    t = torch.tensor([[LN(0.8), LN(0.1)]])
    b = torch.tensor([[LN(0.4), LN(0.4)]])
    # λ = 2: 2 (ln .8 - ln .4) - (ln .5 - ln .4) = 2 ln 2 - ln 1.25 = 1.386294 - 0.223144 = 1.163151
    #        2 (ln .1 - ln .4) - (ln .2 - ln .4) = 2 ln .25 - ln .5 = -2.772589 + 0.693147 = -2.079442
    assert extrapolated_advantages(lp, t, b, 2.0)[0].tolist() == pytest.approx([1.163151, -2.079442], abs=1e-5)
    # λ = 1: log π_T − log π (reverse-KL on-policy distillation), whatever the base
    assert torch.allclose(extrapolated_advantages(lp, t, b, 1.0), t - lp, atol=1e-6)


def test_clipped_surrogate_hand_computed():
    # ratios e^{ln 3} = 3 and e^{ln 0.25} = 0.25 with c = 2: clipped to 2 and 0.5
    lp = torch.tensor([[LN(0.6), LN(0.05)]])
    behaviour = torch.tensor([[LN(0.2), LN(0.2)]])
    adv = torch.tensor([[1.0, -1.0]])
    per_token, clipped = clipped_surrogate(lp, behaviour, adv, torch.ones(1, 2), 2.0)
    # token 0: min(3*1, 2*1) = 2 -> -2 (clipped); token 1: min(0.25*-1, 0.5*-1) = -0.5 -> 0.5 (clipped)
    assert per_token[0].tolist() == pytest.approx([-2.0, 0.5], abs=1e-6)
    assert clipped.tolist() == [[1.0, 1.0]]


def test_base_clip_hand_computed():
    # c = 2; the bounds on ρ = π/π_behaviour are [1/c, c]·π_B/π_behaviour, so π/π_B is held to [1/2, 2]
    lp = torch.tensor([[LN(0.6), LN(0.05), LN(0.3)]])
    behaviour = torch.tensor([[LN(0.5), LN(0.1), LN(0.3)]])
    base = torch.tensor([[LN(0.2), LN(0.2), LN(0.25)]])
    adv = torch.tensor([[1.0, -1.0, 0.5]])
    per_token, clipped = clipped_surrogate(lp, behaviour, adv, torch.ones(1, 3), 2.0, base)
    # token 0: ρ = 1.2, bounds [0.2, 0.8] -> 0.8; min(1.2, 0.8) = 0.8 -> -0.8 (π/π_B = 3 > 2)
    # token 1: ρ = 0.5, bounds [1, 4] -> 1; min(-0.5, -1) = -1 -> 1 (π/π_B = 0.25 < 1/2)
    # token 2: ρ = 1, bounds [0.41667, 1.66667]: inside; -0.5
    assert per_token[0].tolist() == pytest.approx([-0.8, 1.0, -0.5], abs=1e-6)
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]
    # the same tokens clipped against the behaviour policy: ρ in [1/2, 2] everywhere, nothing binds
    per_token, clipped = clipped_surrogate(lp, behaviour, adv, torch.ones(1, 3), 2.0)
    assert per_token[0].tolist() == pytest.approx([-1.2, 0.5, -0.5], abs=1e-6)
    assert clipped.tolist() == [[0.0, 0.0, 0.0]]


def test_base_clip_binds_on_fresh_samples_in_the_loss():
    # Fresh samples (π = π_behaviour): the behaviour clip never binds; the base clip zeroes the
    # gradient of the token whose π/π_B = 0.9/0.3 = 3 exceeds c = 2 in the advantage's direction.
    lp_values = [LN(0.9), LN(0.5)]
    samples = [Sample(uid="u", group_id="g", index=0, prompt_ids=[5], response_ids=[9, 4],
                      behaviour_logprobs=lp_values, reward=0.0, teacher_logprobs=[LN(0.95), LN(0.5)],
                      ref_logprobs=[LN(0.3), LN(0.4)])]
    grads, fracs = {}, {}
    for ref in ("behaviour", "base"):
        algo = make_algorithm({"name": "extrapolated_opd", "lam": 2.0, "clip_reference": ref})
        batch = algo.prepare(collate(samples, pad_id=0))
        logprobs = torch.tensor([lp_values], requires_grad=True)
        loss, metrics = algo.loss(logprobs, batch)
        loss.backward()
        grads[ref], fracs[ref] = logprobs.grad[0].tolist(), metrics["clip_frac"]
    # A_0 = 2 ln(.95/.3) - ln(.9/.3) = 1.206...; A_1 = 2 ln(.5/.4) - ln(.5/.4) = 0.223144; loss = -mean ρA
    a0 = 2 * LN(0.95 / 0.3) - LN(0.9 / 0.3)
    assert grads["behaviour"] == pytest.approx([-a0 / 2, -0.223144 / 2], abs=1e-5) and fracs["behaviour"] == 0.0
    assert grads["base"] == pytest.approx([0.0, -0.223144 / 2], abs=1e-5) and fracs["base"] == 0.5


def _samples(t_lps, b_lps, tokens, n_rows=1):
    out = []
    for i in range(n_rows):
        out.append(Sample(uid=f"g/{i}", group_id="g", index=i, prompt_ids=[5, 6], response_ids=list(tokens),
                          behaviour_logprobs=[LN(0.5)] * len(tokens), reward=1.0,
                          teacher_logprobs=list(t_lps), ref_logprobs=list(b_lps)))
    return out


def test_scheduler_sets_lambda_from_the_binding_class_and_fixed_still_logs_it():
    p, b = 0.95, 0.99  # base sharper at the structural token 9: λ* = ln((1-2*.01)/(2*.99)) / ln(...)
    samples = _samples([LN(p), LN(0.3)], [LN(b), LN(0.3)], [9, 4], n_rows=10)
    batch = collate(samples, pad_id=0)
    sched = make_algorithm({"name": "extrapolated_opd", "lam": 4.0, "schedule": "lambda_star", "ema": 0.0,
                            "structural_token_ids": [9]})
    out = sched.prepare(batch).scalars
    expected = lambda_star(p, b, 2.0)
    assert out["lambda_star"] == pytest.approx(expected, rel=1e-4)
    assert out["lambda"] == pytest.approx(0.9 * expected, rel=1e-4)
    assert out["binding_class"] == 9.0 and out["structural_positions"] == 10.0
    fixed = make_algorithm({"name": "extrapolated_opd", "lam": 4.0, "ema": 0.0, "structural_token_ids": [9]})
    out = fixed.prepare(collate(samples, pad_id=0)).scalars
    assert out["lambda"] == 4.0 and out["lambda_star"] == pytest.approx(expected, rel=1e-4)


def test_no_structural_position_falls_back_and_loss_runs():
    samples = _samples([LN(0.3), LN(0.3)], [LN(0.3), LN(0.3)], [9, 4], n_rows=2)
    algo = make_algorithm({"name": "extrapolated_opd", "lam": 3.0, "schedule": "lambda_star"})
    batch = algo.prepare(collate(samples, pad_id=0))
    assert batch.scalars["lambda"] == 1.0 and math.isnan(batch.scalars["lambda_star"])
    logprobs = torch.full(batch.loss_mask.shape, LN(0.5), requires_grad=True)
    loss, metrics = algo.loss(logprobs, batch)
    loss.backward()
    # fresh samples (ratio 1), A = 1 * 0 - (ln .5 - ln .3) on each of 4 tokens: loss = -A
    assert float(loss.detach()) == pytest.approx(LN(0.5) - LN(0.3), abs=1e-5)
    assert metrics["clip_frac"] == 0.0 and logprobs.grad is not None


def _bandit(p: float, b: float, lam: float, clip_reference: str) -> float:
    """A one-position Bernoulli bandit trained with the loss on fresh samples; the final modal prob."""
    torch.manual_seed(0)
    algo = make_algorithm({"name": "extrapolated_opd", "lam": lam, "clip_reference": clip_reference})
    z = torch.tensor(math.log(b / (1 - b)), requires_grad=True)  # student logit, starts at the base
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(150):
        q = torch.sigmoid(z)
        tok = (torch.rand(256) < q.detach()).long()  # 1 = modal token
        lp = torch.where(tok == 1, torch.log(q), torch.log1p(-q))[None]
        t = torch.where(tok == 1, LN(p), LN(1 - p)).float()[None]
        bl = torch.where(tok == 1, LN(b), LN(1 - b)).float()[None]
        samples_batch = collate([Sample(uid="u", group_id="g", index=0, prompt_ids=[1], response_ids=[2] * 256,
                                        behaviour_logprobs=lp[0].tolist(), reward=0.0,
                                        teacher_logprobs=t[0].tolist(), ref_logprobs=bl[0].tolist())], 0)
        samples_batch = algo.prepare(samples_batch)
        loss, _ = algo.loss(torch.cat([torch.zeros(1, 0), lp], 1), samples_batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(torch.sigmoid(z).detach())


def test_gradient_moves_toward_the_extrapolated_fixed_point():
    """The unclipped (fresh-sample) loss converges to σ(ℓ(b) + λ(ℓ(p) − ℓ(b)))."""
    p, b, lam = 0.7, 0.9, 2.0
    assert _bandit(p, b, lam, "behaviour") == pytest.approx(fixed_point_q(p, b, lam), abs=0.03)


def test_base_clip_does_not_hold_the_region_where_its_stationary_point_is():
    """Where the base clip leaves the student (docs/lambda_star.md, "the clip actually applied"):
    p = 0.7, b = 0.9, c = 2 gives λ* = 0.60 (tail ratio 2 at q = 0.8). At λ = 0.9 the fixed point
    q* = 0.728 (tail ratio 2.7) is outside the region, yet every advantage there is ln Z < 0, which
    the clip does not stop: the student reaches q*. At λ = 2, ln Z > 0: the tail token's push is
    clipped, the modal token's is not (q/b never reaches 1/2), and it stops where its advantage is 0,
    q = b^(1-λ) p^λ = 0.544, not q* = 0.377."""
    p, b = 0.7, 0.9
    assert lambda_star(p, b, 2.0) == pytest.approx(0.6007, abs=1e-4)
    assert _bandit(p, b, 0.9, "base") == pytest.approx(fixed_point_q(p, b, 0.9), abs=0.03)
    assert _bandit(p, b, 2.0, "base") == pytest.approx(b ** -1.0 * p ** 2.0, abs=0.03)


def test_config_validation_and_yaml_matches_schema():
    with pytest.raises(ValueError, match="schedule"):
        ExtrapolatedOPDConfig(schedule="sometimes")
    with pytest.raises(ValueError, match="clip_c"):
        ExtrapolatedOPDConfig(clip_c=1.0)
    with pytest.raises(ValueError, match="min_teacher_prob"):
        ExtrapolatedOPDConfig(min_teacher_prob=0.3)
    with pytest.raises(ValueError, match="clip_reference"):
        ExtrapolatedOPDConfig(clip_reference="teacher")
    yaml = OmegaConf.load("relaxrl/conf/algorithm/extrapolated_opd.yaml")
    yaml.pop("defaults")
    algo = make_algorithm(OmegaConf.to_container(yaml))
    assert set(algo.required_fields) >= {"teacher_logprobs", "ref_logprobs"}
