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
from relaxrl.algorithms.lambda_star import lambda_star
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


def test_gradient_moves_toward_the_extrapolated_fixed_point():
    """A one-position bandit trained with the loss converges to σ(ℓ(b) + λ(ℓ(p) − ℓ(b)))."""
    torch.manual_seed(0)
    p, b, lam = 0.7, 0.9, 2.0
    algo = make_algorithm({"name": "extrapolated_opd", "lam": lam})
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
    target = 1 / (1 + math.exp(-(math.log(b / (1 - b)) + lam * (math.log(p / (1 - p)) - math.log(b / (1 - b))))))
    assert float(torch.sigmoid(z).detach()) == pytest.approx(target, abs=0.03)


def test_config_validation_and_yaml_matches_schema():
    with pytest.raises(ValueError, match="schedule"):
        ExtrapolatedOPDConfig(schedule="sometimes")
    with pytest.raises(ValueError, match="clip_c"):
        ExtrapolatedOPDConfig(clip_c=1.0)
    with pytest.raises(ValueError, match="min_teacher_prob"):
        ExtrapolatedOPDConfig(min_teacher_prob=0.3)
    yaml = OmegaConf.load("relaxrl/conf/algorithm/extrapolated_opd.yaml")
    yaml.pop("defaults")
    algo = make_algorithm(OmegaConf.to_container(yaml))
    assert set(algo.required_fields) >= {"teacher_logprobs", "ref_logprobs"}
