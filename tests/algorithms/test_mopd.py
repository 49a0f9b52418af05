"""MOPD: truncated IS weights, distillation advantages and the loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from relaxrl.algorithms import available_algorithms, make_algorithm
from relaxrl.algorithms.mopd import MOPD, MOPDConfig, distill_advantages, mopd_token_loss, truncated_is_weights
from relaxrl.sample import Sample, collate

LN = math.log


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


def test_truncated_is_weights_clip_to_half_and_two():
    # ratios pi/pi_b = [3, 1.5, 1, 0.25] -> clipped to [2, 1.5, 1, 0.5]; the masked-out column is 1.
    cur = torch.tensor([[LN(0.3), LN(0.3), LN(0.5), LN(0.1), LN(0.9)]])
    beh = torch.tensor([[LN(0.1), LN(0.2), LN(0.5), LN(0.4), LN(0.01)]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w = truncated_is_weights(cur, beh, mask, 0.5, 2.0)
    assert w.tolist() == [approx([2.0, 1.5, 1.0, 0.5, 1.0])]
    # A wider window lets the raw ratios through: [3, 1.5, 1, 0.25].
    assert truncated_is_weights(cur, beh, mask, 0.2, 5.0).tolist() == [approx([3.0, 1.5, 1.0, 0.25, 1.0])]


def test_truncated_is_weights_are_detached():
    cur = torch.tensor([[LN(0.3)]], requires_grad=True)
    w = truncated_is_weights(cur, torch.tensor([[LN(0.2)]]), torch.ones(1, 1), 0.5, 2.0)
    assert not w.requires_grad


def test_distill_advantage_is_teacher_minus_student_logprob():
    # teacher p = [0.8, 0.1, 0.5], student p = [0.4, 0.2, 0.5] -> A = [ln 2, ln 0.5, 0]
    teacher = torch.tensor([[LN(0.8), LN(0.1), LN(0.5), -3.0]])
    student = torch.tensor([[LN(0.4), LN(0.2), LN(0.5), -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv = distill_advantages(teacher, student, mask)
    assert adv.tolist() == [approx([0.693147, -0.693147, 0.0, 0.0])]
    assert distill_advantages(teacher, student, mask, clip=0.5).tolist() == [approx([0.5, -0.5, 0.0, 0.0])]


def test_token_loss_and_its_gradient():
    # L_t = -w A log pi: w = [2, 0.5], A = [1.5, -1], log pi = [-1, -2]
    # L = [-(2 * 1.5 * -1), -(0.5 * -1 * -2)] = [3, -1]; dL/dlogpi = -w A = [-3, 0.5]
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = mopd_token_loss(logp, torch.tensor([1.5, -1.0]), torch.tensor([2.0, 0.5]))
    assert loss.tolist() == approx([3.0, -1.0])
    loss.sum().backward()
    assert logp.grad.tolist() == approx([-3.0, 0.5])


def _batch(teacher, behaviour, rewards, domains=("a", "a")):
    samples = [
        Sample(uid=f"g0/{i}", group_id="g0", index=i, prompt_ids=[5, 6], domain=domains[i], response_ids=[7, 8],
               behaviour_logprobs=behaviour[i], reward=rewards[i], teacher_logprobs=teacher[i], policy_version=0)
        for i in range(2)
    ]
    return collate(samples, pad_id=0)


def test_mopd_loss_matches_hand_computed_value():
    # Two samples, two response tokens each (target columns 1 and 2 of a [2, 3] batch).
    # current log pi:  s0 = [ln .5, ln .25], s1 = [ln .2, ln .6]
    # behaviour:       s0 = [ln .5, ln .05], s1 = [ln .8, ln .6]  -> ratios [1, 5 -> 2], [.25 -> .5, 1]
    # teacher:         s0 = [ln .5, ln .5],  s1 = [ln .4, ln .3]  -> A = [0, ln 2], [ln 2, -ln 2]
    # token_mean over 4 tokens: L = -(1*0*ln.5 + 2*ln2*ln.25 + .5*ln2*ln.2 + 1*(-ln2)*ln.6) / 4
    b = _batch(teacher=[[LN(0.5), LN(0.5)], [LN(0.4), LN(0.3)]],
               behaviour=[[LN(0.5), LN(0.05)], [LN(0.8), LN(0.6)]], rewards=[1.0, 0.0])
    algo = MOPD(MOPDConfig())
    algo.prepare(b)
    logp = torch.zeros_like(b.loss_mask)
    logp[0, 1:] = torch.tensor([LN(0.5), LN(0.25)])
    logp[1, 1:] = torch.tensor([LN(0.2), LN(0.6)])
    logp.requires_grad_(True)
    loss, metrics = algo.loss(logp, b)
    ln2 = LN(2)
    expected = -(0 + 2 * ln2 * LN(0.25) + 0.5 * ln2 * LN(0.2) + 1 * (-ln2) * LN(0.6)) / 4
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    assert metrics["is_weight_mean"] == pytest.approx((1 + 2 + 0.5 + 1) / 4)
    assert metrics["is_clip_frac"] == pytest.approx(0.5)
    assert metrics["teacher_kl"] == pytest.approx(-(0 + ln2 + ln2 - ln2) / 4)
    loss.backward()  # gradient = -w A / 4 on each token, 0 off the mask
    assert logp.grad[0].tolist() == approx([0.0, 0.0, -2 * ln2 / 4])
    assert logp.grad[1].tolist() == approx([0.0, -0.5 * ln2 / 4, ln2 / 4])


def test_outcome_weight_adds_the_grpo_advantage():
    # Group rewards [1, 0] -> GRPO advantages [+0.707107, -0.707107] (unbiased std = 0.707107).
    # Student == teacher == behaviour, so only the outcome part is left: A = 0.5 * [+.707, -.707].
    lp = [[LN(0.5), LN(0.5)], [LN(0.5), LN(0.5)]]
    b = _batch(teacher=lp, behaviour=lp, rewards=[1.0, 0.0])
    algo = MOPD(MOPDConfig(outcome_weight=0.5))
    algo.prepare(b)
    logp = torch.full_like(b.loss_mask, LN(0.5)).requires_grad_(True)
    loss, _ = algo.loss(logp, b)
    loss.backward()
    a = 0.5 * 0.707107
    assert logp.grad[0, 1:].tolist() == approx([-a / 4, -a / 4])
    assert logp.grad[1, 1:].tolist() == approx([a / 4, a / 4])


def test_micro_batches_sum_to_the_whole_batch_loss():
    b = _batch(teacher=[[-0.1, -2.0], [-1.0, -0.3]], behaviour=[[-0.5, -0.4], [-0.2, -3.0]], rewards=[1.0, 0.0])
    algo = MOPD(MOPDConfig(outcome_weight=0.3))
    algo.prepare(b)
    logp = torch.tensor([[0.0, -0.7, -0.2], [0.0, -1.1, -0.9]])
    whole, _ = algo.loss(logp, b)
    parts = sum(float(algo.loss(logp[i : i + 1], b.rows(i, i + 1))[0]) for i in range(2))
    assert parts == pytest.approx(float(whole), abs=1e-6)


def test_registry_and_config_validation():
    assert "mopd" in available_algorithms()
    algo = make_algorithm({"name": "mopd", "is_low": 0.8, "is_high": 1.25})
    assert isinstance(algo, MOPD) and algo.config.is_low == 0.8
    assert "teacher_logprobs" in algo.required_fields
    with pytest.raises(ValueError, match="is_low"):
        MOPDConfig(is_low=1.5)
    with pytest.raises(ValueError, match="unknown option"):
        make_algorithm({"name": "mopd", "is_hi": 2.0})
    b = collate([Sample(uid="g/0", group_id="g", index=0, prompt_ids=[1], response_ids=[2],
                        behaviour_logprobs=[-1.0], reward=1.0)], pad_id=0)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        MOPD().prepare(b)
