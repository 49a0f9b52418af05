"""GRPO: hand-computed values for each pure function, micro-batch additivity, registry, config."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hydra import compose, initialize_config_module
from hypothesis import strategies as st
from omegaconf import OmegaConf

from relaxrl.algorithms import available_algorithms, make_algorithm
from relaxrl.algorithms.grpo import (
    GRPO,
    GRPOConfig,
    aggregate,
    behaviour_weights,
    group_advantages,
    k3_kl,
    loss_normaliser,
    policy_loss,
)
from relaxrl.config_check import fill_from_rollout
from relaxrl.sample import Sample, collate

LN = math.log


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


# ----------------------------------------------------------------------------- group advantages


def test_one_group_unbiased_std():
    # mean = 0.5; centred = [+.5, -.5, -.5, +.5]; unbiased var = 4 * 0.25 / (4 - 1) = 1/3
    # std = sqrt(1/3) = 0.577350; A = 0.5 / 0.577350 = 0.866025
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), True, 0.0)
    assert adv.tolist() == approx([0.866025, -0.866025, -0.866025, 0.866025])


def test_two_interleaved_groups():
    rewards = torch.tensor([1.0, 2.0, 0.0, 0.0, 4.0, 9.0, 1.0])
    groups = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    # group 0 = [1, 0, 0, 1] -> +-0.866025 as above.
    # group 1 = [2, 4, 9]: mean 5, centred [-3, -1, 4], var = (9 + 1 + 16) / 2 = 13, std = 3.605551
    # A = [-3, -1, 4] / 3.605551 = [-0.832050, -0.277350, 1.109400]
    adv = group_advantages(rewards, groups, True, 0.0)
    assert adv.tolist() == approx([0.866025, -0.832050, -0.866025, -0.866025, -0.277350, 1.109400, 0.866025])
    # Dr.GRPO: only centred, no std -> [+.5, -3, -.5, -.5, -1, 4, +.5]
    adv = group_advantages(rewards, groups, False, 0.0)
    assert adv.tolist() == approx([0.5, -3.0, -0.5, -0.5, -1.0, 4.0, 0.5])


@pytest.mark.parametrize("norm_std", [True, False])
def test_singleton_and_constant_groups_get_zero(norm_std):
    # group 0 = [0.7] alone; group 1 = [0.1, 0.1, 0.1] all equal (0.1 is inexact in float: still 0)
    rewards = torch.tensor([0.7, 0.1, 0.1, 0.1, 1.0, 0.0])
    groups = torch.tensor([0, 1, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups, norm_std, 1e-6)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    # group 2 = [1, 0]: mean .5, var = 0.5 / 1, std = 0.707107 -> A = +-0.707107 (Dr.GRPO: +-0.5)
    expected = 0.707107 if norm_std else 0.5
    assert adv[4:].tolist() == approx([expected, -expected])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-5, 5), min_size=1, max_size=6), min_size=1, max_size=5))
def test_group_advantages_properties(groups_rewards):
    rewards = torch.tensor([float(r) for g in groups_rewards for r in g])
    index = torch.tensor([gi for gi, g in enumerate(groups_rewards) for _ in g])
    for norm_std in (True, False):
        adv = group_advantages(rewards, index, norm_std, 1e-6)
        for gi, g in enumerate(groups_rewards):
            a = adv[index == gi].double()
            assert abs(float(a.sum())) < 1e-4  # centred within each group
            if len(set(g)) == 1:
                assert a.abs().max() == 0
            elif norm_std:  # integer rewards that differ: std >= 0.4, so eps moves it by < 1e-5
                assert float(a.std()) == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- k3 and aggregation


def test_k3_kl_known_points():
    # logp = log .5, ref = log .25: q = ref - logp = log .5 = -0.693147
    # k3 = exp(q) - q - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # logp = log .25, ref = log .5: q = log 2 = 0.693147 -> 2 - 0.693147 - 1 = 0.306853; equal -> 0
    kl = k3_kl(torch.tensor([LN(0.5), LN(0.25), -1.3]), torch.tensor([LN(0.25), LN(0.5), -1.3]))
    assert kl.tolist() == approx([0.193147, 0.306853, 0.0])


def test_k3_kl_mask_and_clamps():
    # logp [-1, -100, -30, -1], ref [-1, 0, 0, -16], position 1 off the mask:
    # q = ref - logp = [0, (100: masked -> 0), 30, -15]
    logp = torch.tensor([-1.0, -100.0, -30.0, -1.0], requires_grad=True)
    ref, mask = torch.tensor([-1.0, 0.0, 0.0, -16.0]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    # No clamps: k3(30) = e^30 - 31 = 1.068647e13, k3(-15) = e^-15 + 15 - 1 = 14.0000003
    kl = k3_kl(logp, ref, mask).detach()
    assert kl[:2].tolist() == [0.0, 0.0] and float(kl[3]) == pytest.approx(14.0, abs=1e-5)
    assert float(kl[2]) == pytest.approx(math.exp(30) - 31, rel=1e-5)
    # log-ratio clamp 20: q = 30 -> 20, k3 = e^20 - 21 = 4.851652e8 (exp stays far from overflow)
    kl = k3_kl(logp, ref, mask, log_ratio_clamp=20.0).detach()
    assert float(kl[2]) == pytest.approx(math.exp(20) - 21, rel=1e-5) and float(kl[3]) == pytest.approx(14.0, abs=1e-5)
    # k3 clamp 10 caps both tails: [0, 0, 10, 10]; clamped tokens (and masked ones) get no gradient,
    # the others d k3 / d logp = 1 - exp(q) = 0 at q = 0
    kl = k3_kl(logp, ref, mask, log_ratio_clamp=20.0, clamp=10.0)
    assert kl.tolist() == approx([0.0, 0.0, 10.0, 10.0])
    kl.sum().backward()
    assert logp.grad.tolist() == [0.0, 0.0, 0.0, 0.0]


def masked_kl_batch(response_len):
    """The issue's minimal input: 2 rows, one group with rewards [1, 0] (Dr.GRPO advantages
    [+0.5, -0.5]); column 0 a loss token, column 1 (when present) masked out."""
    mask = [1, 0][:response_len]
    return collate([
        sample("a", 0, 1, [-1.1, -3.0][:response_len], 1.0, ref=[-1.0, 0.0][:response_len], mask=mask),
        sample("a", 1, 1, [-0.9, -3.0][:response_len], 0.0, ref=[-1.0, 0.0][:response_len], mask=mask),
    ], pad_id=0)  # fmt: skip


# defaults (log-ratio clamp 20), and masking alone (no clamp): both finite
@pytest.mark.parametrize("clamps", [{}, {"kl_log_ratio_clamp": 0.0}], ids=["default", "no_clamp"])
def test_kl_on_masked_positions_is_finite_and_exact(clamps):
    # kl_coef=1e-3, mask [[1, 0], [1, 0]], logp [[-1, -100], [-1, -3]], ref [[-1, 0], [-1, 0]]: at the
    # masked logp = -100, exp(ref - logp) = exp(100) overflows float32 and inf * 0 made the loss NaN.
    algo = GRPO(GRPOConfig(norm_std=False, kl_coef=1e-3, **clamps))
    batch = algo.prepare(masked_kl_batch(2))
    assert batch.loss_mask.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    logp = torch.tensor([[-1.0, -100.0], [-1.0, -3.0]], requires_grad=True)
    loss, metrics = algo.loss(logp, batch)
    loss.backward()
    # Loss tokens only: ratios exp(-1 + 1.1) = 1.105171 and exp(-1 + 0.9) = 0.904837, both inside
    # [0.8, 1.28]; k3 = 0 (ref = logp). token_mean over 2 tokens:
    # (-0.5 * 1.105171 + 0.5 * 0.904837) / 2 = -0.050083; d/dlogp = -A * ratio / 2 = [-0.276293, 0.226209]
    assert float(loss.detach()) == pytest.approx(-0.050083, abs=1e-6) and metrics["kl"] == 0.0
    assert logp.grad.tolist() == [approx([-0.276293, 0.0], abs=1e-6), approx([0.226209, 0.0], abs=1e-6)]
    # ... and equal to the loss computed on the loss tokens alone (the masked column left out).
    safe_algo = GRPO(GRPOConfig(norm_std=False, kl_coef=1e-3, **clamps))
    safe = safe_algo.prepare(masked_kl_batch(1))
    safe_lp = torch.tensor([[-1.0], [-1.0]], requires_grad=True)
    safe_loss, _ = safe_algo.loss(safe_lp, safe)
    safe_loss.backward()
    assert float(loss.detach()) == float(safe_loss.detach())
    assert torch.equal(logp.grad[:, :1], safe_lp.grad)


# 100 = off the mask; the third row has no loss tokens (e.g. an episode of env tokens only)
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, 100.0, 100.0], [100.0, 100.0, 100.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, agg_len, normaliser, value",
    [
        # masked sum = 1 + 2 + 3 + 4 + 6 = 16 over 5 tokens = 3.2
        ("token_mean", 0, 5.0, 3.2),
        # row means (1+2+3)/3 = 2 and (4+6)/2 = 5, summed = 7, over the 2 rows that have loss
        # tokens = 3.5 (the empty third row is left out of the sequence mean, not counted as 0)
        ("seq_mean_token_mean", 0, 2.0, 3.5),
        # masked sum 16 over rows * L = 3 * 4 = 12 -> 1.333333 (Dr.GRPO's constant counts every row)
        ("seq_mean_token_sum", 4, 12.0, 16 / 12),
    ],
)
def test_aggregate_modes(mode, agg_len, normaliser, value):
    assert loss_normaliser(MASK, mode, agg_len) == normaliser
    assert float(aggregate(PER_TOKEN, MASK, mode, normaliser)) == pytest.approx(value)
    # Row slices with the whole-batch normaliser add up to the whole.
    parts = aggregate(PER_TOKEN[:1], MASK[:1], mode, normaliser) + aggregate(PER_TOKEN[1:], MASK[1:], mode, normaliser)
    assert float(parts) == pytest.approx(value)


def test_aggregate_ignores_non_finite_values_off_the_mask():
    per_token = torch.tensor([[2.0, torch.inf], [4.0, torch.nan]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(aggregate(per_token, mask, "token_mean", 2.0)) == 3.0  # (2 + 4) / 2; inf * 0 was NaN


# ----------------------------------------------------------------------------- policy loss


@pytest.mark.parametrize(
    "p_new, p_old, adv, loss, grad, clipped",
    [
        # ratio 0.6/0.4 = 1.5 > 1.28, A=+1: min(1.5, 1.28) = 1.28 -> loss -1.28, clipped: no gradient
        (0.6, 0.4, 1.0, -1.28, 0.0, 1.0),
        # ratio 0.5 < 0.8, A=-1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped: no gradient
        (0.25, 0.5, -1.0, 0.8, 0.0, 1.0),
        # ratio 1.5, A=-1: min(-1.5, -1.28) = -1.5 -> unclipped, loss 1.5, d/dlogp(-ratio*A) = +1.5
        (0.6, 0.4, -1.0, 1.5, 1.5, 0.0),
        # ratio 1.1 inside [0.8, 1.28], A=+2: loss -2.2, gradient -ratio*A = -2.2
        (0.55, 0.5, 2.0, -2.2, -2.2, 0.0),
    ],
)
def test_clipped_surrogate_on_policy(p_new, p_old, adv, loss, grad, clipped):
    logp = torch.tensor([[LN(p_new)]], requires_grad=True)
    per_token, stats = policy_loss(
        logp, torch.tensor([[LN(p_old)]]), torch.tensor([[adv]]), torch.ones(1, 1), 0.2, 0.28, "none"
    )
    per_token.sum().backward()
    assert float(per_token.detach()) == pytest.approx(loss, abs=1e-5)
    assert float(logp.grad) == pytest.approx(grad, abs=1e-5)
    assert stats["clip_frac"] == clipped and stats["is_weight_mean"] == 1.0 and stats["is_capped_frac"] == 0.0
    assert stats["approx_kl_behaviour"] == pytest.approx(LN(p_old) - LN(p_new), abs=1e-6)


def test_decoupled_and_capped_weights():
    # current p = 0.8 everywhere; behaviour p = 0.5 and 0.2 -> w = 0.8/0.5 = 1.6 and 0.8/0.2 = 4.0
    logp = torch.full((1, 3), LN(0.8))
    behaviour = torch.tensor([[LN(0.5), LN(0.2), 0.0]])
    adv = torch.tensor([[1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # ratio to the proximal policy is exactly 1, so loss = -w * A = [-1.6, +2.0]; never clipped
    per_token, stats = policy_loss(logp, behaviour, adv, mask, 0.2, 0.28, "decoupled")
    assert (per_token * mask)[0, :2].tolist() == approx([-1.6, 2.0])
    assert stats["is_weight_mean"] == pytest.approx((1.6 + 4.0) / 2) and stats["clip_frac"] == 0.0
    assert stats["is_capped_frac"] == 0.0  # uncapped by default
    # is_cap=2, truncate (what truncated_is was): w [1.6, 2.0] -> loss [-1.6, +1.0], mean weight 1.8
    per_token, stats = policy_loss(logp, behaviour, adv, mask, 0.2, 0.28, "decoupled", 2.0)
    assert (per_token * mask)[0, :2].tolist() == approx([-1.6, 1.0])
    assert stats["is_weight_mean"] == pytest.approx(1.8) and stats["is_capped_frac"] == 0.5
    # is_cap=2, mask: the w=4 token leaves the loss: [-1.6, 0], mean weight (1.6 + 0) / 2 = 0.8
    per_token, stats = policy_loss(logp, behaviour, adv, mask, 0.2, 0.28, "decoupled", 2.0, "mask")
    assert (per_token * mask)[0, :2].tolist() == approx([-1.6, 0.0])
    assert stats["is_weight_mean"] == pytest.approx(0.8) and stats["is_capped_frac"] == 0.5


# Current p = 0.8 on the loss tokens. Row 0: behaviour p 0.5, 0.2 -> w = 1.6, 4.0. Row 1: behaviour
# 0.8, 0.5 -> w = 1.0, 1.6. Column 2 is off the mask, with a current log-prob of -100 there.
W_PROX = torch.tensor([[LN(0.8), LN(0.8), -100.0], [LN(0.8), LN(0.8), -100.0]])
W_BEHAV = torch.tensor([[LN(0.5), LN(0.2), 0.0], [LN(0.8), LN(0.5), 0.0]])
W_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
GEO0, GEO1 = math.sqrt(1.6 * 4.0), math.sqrt(1.0 * 1.6)  # rows' geometric means: 2.529822, 1.264911


@pytest.mark.parametrize(
    "cap, mode, level, weights, capped",
    [
        ("0", "truncate", "token", [[1.6, 4.0, 1.0], [1.0, 1.6, 1.0]], [[0, 0, 0], [0, 0, 0]]),
        ("2", "truncate", "token", [[1.6, 2.0, 1.0], [1.0, 1.6, 1.0]], [[0, 1, 0], [0, 0, 0]]),
        ("2", "mask", "token", [[1.6, 0.0, 1.0], [1.0, 1.6, 1.0]], [[0, 1, 0], [0, 0, 0]]),
        # sequence level: row 0's geometric mean 2.529822 > 2 -> all its tokens; row 1's 1.264911 stays
        ("0", "truncate", "sequence", [[GEO0, GEO0, 1.0], [GEO1, GEO1, 1.0]], [[0, 0, 0], [0, 0, 0]]),
        ("2", "truncate", "sequence", [[2.0, 2.0, 1.0], [GEO1, GEO1, 1.0]], [[1, 1, 0], [0, 0, 0]]),
        ("2", "mask", "sequence", [[0.0, 0.0, 1.0], [GEO1, GEO1, 1.0]], [[1, 1, 0], [0, 0, 0]]),
    ],
)
def test_behaviour_weights(cap, mode, level, weights, capped):
    w, c = behaviour_weights(W_PROX, W_BEHAV, W_MASK, float(cap), mode, level)
    assert w.tolist() == [approx(row, abs=1e-5) for row in weights]
    assert c.int().tolist() == capped


def test_decoupled_mask_mode_gradient_and_capped_fraction():
    # The batch of test_decoupled_gradient_is_minus_w_a_over_n: w = [0.8, 1.6] (A = +0.5) and
    # [2, 1, 0.8] (A = -0.5), 5 loss tokens.
    samples = [
        sample("a", 0, 2, [LN(0.5), LN(0.25)], 1.0),
        sample("a", 1, 1, [LN(0.2), LN(0.4), LN(0.5)], 0.0),
    ]
    # token level, cap 1.5, mask: the 1.6 and 2 tokens leave the loss; the others keep -w * A / 5
    algo = GRPO(GRPOConfig(norm_std=False, off_policy="decoupled", is_cap=1.5, is_cap_mode="mask"))
    batch = algo.prepare(collate(samples, pad_id=0))
    logp = torch.full(batch.loss_mask.shape, LN(0.4), requires_grad=True)
    loss, metrics = algo.loss(logp, batch)
    loss.backward()
    assert logp.grad.tolist() == [approx([0.0, -0.08, 0.0]), approx([0.0, 0.1, 0.08])]
    assert metrics["is_capped_frac"] == pytest.approx(2 / 5)
    assert metrics["is_weight_mean"] == pytest.approx((0.8 + 0.0 + 0.0 + 1.0 + 0.8) / 5)
    # sequence level, cap 1.15, mask: geometric means sqrt(0.8 * 1.6) = 1.131371 (kept) and
    # (2 * 1 * 0.8) ** (1/3) = 1.169607 (> 1.15: row 1 leaves the loss); row 0: -1.131371 * 0.5 / 5
    algo = GRPO(GRPOConfig(norm_std=False, off_policy="decoupled", is_cap=1.15, is_cap_mode="mask",
                           is_level="sequence"))
    batch = algo.prepare(collate(samples, pad_id=0))
    logp = torch.full(batch.loss_mask.shape, LN(0.4), requires_grad=True)
    loss, metrics = algo.loss(logp, batch)
    loss.backward()
    assert logp.grad.tolist() == [approx([0.0, -0.113137, -0.113137]), approx([0.0, 0.0, 0.0])]
    assert metrics["is_capped_frac"] == pytest.approx(3 / 5)


# ----------------------------------------------------------------------------- the GRPO class


def sample(group, index, prompt_len, behaviour, reward, ref=None, mask=None):
    n = len(behaviour)
    return Sample(
        uid=f"{group}/{index}", group_id=group, index=index, prompt_ids=list(range(1, prompt_len + 1)),
        response_ids=[7] * n, behaviour_logprobs=behaviour, reward=reward, ref_logprobs=ref,
        loss_mask=mask or [],
    )  # fmt: skip


def test_decoupled_gradient_is_minus_w_a_over_n():
    # group "a": rewards [1, 0] -> Dr.GRPO advantages [+0.5, -0.5]; 2 + 3 = 5 loss tokens
    samples = [
        sample("a", 0, 2, [LN(0.5), LN(0.25)], 1.0),
        sample("a", 1, 1, [LN(0.2), LN(0.4), LN(0.5)], 0.0),
    ]
    algo = GRPO(GRPOConfig(norm_std=False, off_policy="decoupled"))
    batch = algo.prepare(collate(samples, pad_id=0))  # width 4 -> 3 target columns
    logp = torch.full(batch.loss_mask.shape, LN(0.4), requires_grad=True)
    loss, _ = algo.loss(logp, batch)
    loss.backward()
    w = torch.exp(torch.full_like(logp, LN(0.4)) - batch.behaviour_logprobs)
    expected = -w * batch.extras["advantages"] * batch.loss_mask / 5.0
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    # row 0: prompt 2 -> columns 1, 2: w = 0.4/0.5 = 0.8, 0.4/0.25 = 1.6; A = 0.5 -> -0.08, -0.16
    assert logp.grad[0].tolist() == approx([0.0, -0.08, -0.16])
    # row 1: prompt 1 -> columns 0..2: w = 0.4/0.2 = 2, 0.4/0.4 = 1, 0.4/0.5 = 0.8; A = -0.5
    # -> -w * A / 5 = [0.2, 0.1, 0.08]
    assert logp.grad[1].tolist() == approx([0.2, 0.1, 0.08])


PREP_SAMPLES = [
    sample("a", 0, 2, [-1.0, -1.0], 1.0),
    sample("a", 1, 2, [-1.0], 0.0),
    sample("b", 0, 1, [-1.0, -1.0, -1.0], 0.5),
    sample("b", 1, 1, [-1.0], 0.5),
]


def test_prepare_extras_and_scalars():
    batch = GRPO(GRPOConfig(norm_std=False, loss_agg="seq_mean_token_sum", loss_agg_len=8)).prepare(
        collate(PREP_SAMPLES, pad_id=0))
    adv = batch.extras["advantages"]
    assert adv.shape == batch.loss_mask.shape == (4, 3)
    assert adv.tolist() == [[0.0, 0.5, 0.5], [0.0, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # L = the generation limit 8, not the longest row (3 loss tokens): normaliser = 4 rows * 8 = 32
    assert batch.scalars["loss_agg_len"] == 8 and batch.scalars["loss_normaliser"] == 32
    assert batch.scalars["zero_adv_groups"] == 1  # group "b" = [0.5, 0.5]
    assert batch.scalars["reward_mean"] == pytest.approx(0.5)  # (1 + 0 + .5 + .5) / 4
    assert batch.scalars["adv_abs_mean"] == pytest.approx(0.25)  # (.5 + .5 + 0 + 0) / 4


def test_seq_mean_token_sum_needs_the_generation_limit():
    with pytest.raises(ValueError, match="loss_agg_len.*rollout.max_new_tokens"):
        GRPO(GRPOConfig(loss_agg="seq_mean_token_sum")).prepare(collate(PREP_SAMPLES, pad_id=0))


def compose_run(*overrides):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(config_name="config", overrides=["run_dir=/tmp/x", "+experiment=quickstart", *overrides])


def test_run_config_fills_loss_agg_len_from_max_new_tokens():
    cfg = compose_run("algorithm.loss_agg=seq_mean_token_sum", "rollout.max_new_tokens=5")
    assert cfg.algorithm.loss_agg_len == 0
    fill_from_rollout(cfg)
    assert cfg.algorithm.loss_agg_len == 5
    # Dr.GRPO's constant is B * 5 = 20 for these 4 rows, whose longest has 3 loss tokens
    batch = make_algorithm(cfg.algorithm).prepare(collate(PREP_SAMPLES, pad_id=0))
    assert batch.scalars["loss_normaliser"] == 20
    cfg = compose_run("algorithm.loss_agg_len=7", "rollout.max_new_tokens=5")
    fill_from_rollout(cfg)
    assert cfg.algorithm.loss_agg_len == 7  # set explicitly: kept


def random_batch(seed, with_ref=True):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(8):
        n = 1 + int(torch.randint(6, (1,), generator=g))
        lp = (-torch.rand(n, generator=g) * 3).tolist()
        ref = (-torch.rand(n, generator=g) * 3).tolist() if with_ref else None
        mask = [1] * n if i % 3 else [1] + [0] * (n - 1)  # some env tokens inside responses
        if i == 7:
            mask = [0] * n  # a row without loss tokens
        samples.append(sample(f"g{i // 3}", i % 3, 1 + i % 3, lp, float(i % 2), ref, mask))
    return collate(samples, pad_id=0)


OFF_POLICY_SETTINGS = [
    {"off_policy": "none"},
    {"off_policy": "decoupled"},
    {"off_policy": "decoupled", "is_cap": 1.2},
    {"off_policy": "decoupled", "is_cap": 1.2, "is_cap_mode": "mask"},
    {"off_policy": "decoupled", "is_cap": 1.05, "is_cap_mode": "mask", "is_level": "sequence"},
]


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("off_policy", OFF_POLICY_SETTINGS, ids=lambda d: "-".join(map(str, d.values())))
def test_micro_batches_sum_to_whole_batch(loss_agg, off_policy):
    algo = GRPO(GRPOConfig(loss_agg=loss_agg, loss_agg_len=6, kl_coef=0.1, **off_policy))
    batch = algo.prepare(random_batch(0))
    noise = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(1))
    logp_init = batch.behaviour_logprobs + 0.3 * noise  # ratios spread over and beyond the clip range
    whole_lp = logp_init.clone().requires_grad_(True)
    whole, metrics = algo.loss(whole_lp, batch)
    whole.backward()
    assert set(metrics) == {"pg_loss", "kl", "clip_frac", "is_weight_mean", "is_capped_frac", "approx_kl_behaviour"}
    if "is_cap" in off_policy:  # the noise puts some weights over the cap
        assert 0 < metrics["is_capped_frac"] < 1
    assert all(isinstance(v, float) for v in metrics.values())
    micro_lp = logp_init.clone().requires_grad_(True)
    total = sum(algo.loss(micro_lp[i:j], batch.rows(i, j))[0] for i, j in [(0, 2), (2, 3), (3, 8)])
    total.backward()
    assert float(total.detach()) == pytest.approx(float(whole.detach()), abs=1e-6)
    assert torch.allclose(micro_lp.grad, whole_lp.grad, atol=1e-7)


def test_kl_needs_reference():
    algo = GRPO(GRPOConfig(kl_coef=0.05))
    assert algo.required_fields == ("response_ids", "behaviour_logprobs", "reward", "ref_logprobs")
    assert GRPO().required_fields == ("response_ids", "behaviour_logprobs", "reward")
    with pytest.raises(ValueError, match="teacher role"):
        algo.prepare(random_batch(0, with_ref=False))


def test_loss_before_prepare_is_an_error():
    batch = random_batch(0)
    with pytest.raises(ValueError, match="prepare"):
        GRPO().loss(batch.behaviour_logprobs.clone(), batch)


# ----------------------------------------------------------------------------- config and registry


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip_low": -0.1}, "clip_low"),
        ({"clip_high": -1.0}, "clip_high"),
        ({"loss_agg": "sum"}, "loss_agg.*token_mean.*seq_mean_token_mean.*seq_mean_token_sum"),
        ({"off_policy": "vtrace"}, "off_policy.*none.*decoupled"),
        ({"off_policy": "truncated_is"}, "off_policy=decoupled with is_cap"),
        ({"off_policy": "decoupled", "is_cap": -1.0}, "is_cap must be >= 0"),
        ({"off_policy": "decoupled", "is_cap": 2.0, "is_cap_mode": "drop"}, "is_cap_mode.*truncate.*mask"),
        ({"off_policy": "decoupled", "is_level": "seq"}, "is_level.*token.*sequence"),
        ({"off_policy": "decoupled", "is_cap_mode": "mask"}, "mask needs is_cap > 0"),
        ({"is_cap": 2.0}, "off_policy=none has none"),
        ({"is_level": "sequence"}, "off_policy=none has none"),
        ({"kl_log_ratio_clamp": -1.0}, "kl_log_ratio_clamp"),
        ({"kl_clamp": -1.0}, "kl_clamp"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


def test_registry_builds_from_each_config_form():
    assert "grpo" in available_algorithms()
    for cfg in (
        GRPOConfig(clip_high=0.3),
        {"name": "grpo", "clip_high": 0.3},
        OmegaConf.create({"name": "grpo", "clip_high": 0.3}),
        OmegaConf.structured(GRPOConfig(clip_high=0.3)),
    ):
        algo = make_algorithm(cfg)
        assert isinstance(algo, GRPO) and algo.name == "grpo"
        assert isinstance(algo.config, GRPOConfig) and algo.config.clip_high == 0.3


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown algorithm 'ppo'; registered: \[.*'grpo'"):
        make_algorithm({"name": "ppo"})
    with pytest.raises(ValueError, match="clip_hihg"):
        make_algorithm({"name": "grpo", "clip_hihg": 0.3})
    with pytest.raises(ValueError, match="off_policy"):
        make_algorithm(OmegaConf.create({"name": "grpo", "off_policy": "bad"}))
