"""GRPO: hand-computed values for each pure function, micro-batch additivity, registry, config."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from relaxrl.algorithms import available_algorithms, make_algorithm
from relaxrl.algorithms.grpo import (
    GRPO,
    GRPOConfig,
    aggregate,
    group_advantages,
    k3_kl,
    loss_normaliser,
    policy_loss,
)
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


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, 100.0, 100.0]])  # 100 = off the mask
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, agg_len, normaliser, value",
    [
        # masked sum = 1 + 2 + 3 + 4 + 6 = 16 over 5 tokens = 3.2
        ("token_mean", 0, 5.0, 3.2),
        # row means (1+2+3)/3 = 2 and (4+6)/2 = 5, summed = 7, over 2 rows = 3.5
        ("seq_mean_token_mean", 0, 2.0, 3.5),
        # masked sum 16 over rows * L = 2 * 4 = 8 -> 2.0
        ("seq_mean_token_sum", 4, 8.0, 2.0),
    ],
)
def test_aggregate_modes(mode, agg_len, normaliser, value):
    assert loss_normaliser(MASK, mode, agg_len) == normaliser
    assert float(aggregate(PER_TOKEN, MASK, mode, normaliser)) == pytest.approx(value)
    # Row slices with the whole-batch normaliser add up to the whole.
    parts = aggregate(PER_TOKEN[:1], MASK[:1], mode, normaliser) + aggregate(PER_TOKEN[1:], MASK[1:], mode, normaliser)
    assert float(parts) == pytest.approx(value)


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
        logp, torch.tensor([[LN(p_old)]]), torch.tensor([[adv]]), torch.ones(1, 1), 0.2, 0.28, "none", 2.0
    )
    per_token.sum().backward()
    assert float(per_token.detach()) == pytest.approx(loss, abs=1e-5)
    assert float(logp.grad) == pytest.approx(grad, abs=1e-5)
    assert stats["clip_frac"] == clipped and stats["is_weight_mean"] == 1.0
    assert stats["approx_kl_behaviour"] == pytest.approx(LN(p_old) - LN(p_new), abs=1e-6)


def test_decoupled_and_truncated_weights():
    # current p = 0.8 everywhere; behaviour p = 0.5 and 0.2 -> w = 0.8/0.5 = 1.6 and 0.8/0.2 = 4.0
    logp = torch.full((1, 3), LN(0.8))
    behaviour = torch.tensor([[LN(0.5), LN(0.2), 0.0]])
    adv = torch.tensor([[1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # ratio to the proximal policy is exactly 1, so loss = -w * A = [-1.6, +2.0]; never clipped
    per_token, stats = policy_loss(logp, behaviour, adv, mask, 0.2, 0.28, "decoupled", 2.0)
    assert (per_token * mask)[0, :2].tolist() == approx([-1.6, 2.0])
    assert stats["is_weight_mean"] == pytest.approx((1.6 + 4.0) / 2) and stats["clip_frac"] == 0.0
    # truncated_is caps w at 2: [1.6, 2.0] -> loss [-1.6, +1.0], mean weight 1.8
    per_token, stats = policy_loss(logp, behaviour, adv, mask, 0.2, 0.28, "truncated_is", 2.0)
    assert (per_token * mask)[0, :2].tolist() == approx([-1.6, 1.0])
    assert stats["is_weight_mean"] == pytest.approx(1.8)


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


def test_prepare_extras_and_scalars():
    samples = [
        sample("a", 0, 2, [-1.0, -1.0], 1.0),
        sample("a", 1, 2, [-1.0], 0.0),
        sample("b", 0, 1, [-1.0, -1.0, -1.0], 0.5),
        sample("b", 1, 1, [-1.0], 0.5),
    ]
    batch = GRPO(GRPOConfig(norm_std=False, loss_agg="seq_mean_token_sum")).prepare(collate(samples, pad_id=0))
    adv = batch.extras["advantages"]
    assert adv.shape == batch.loss_mask.shape == (4, 3)
    assert adv.tolist() == [[0.0, 0.5, 0.5], [0.0, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # longest row has 3 loss tokens -> L = 3, normaliser = 4 rows * 3 = 12
    assert batch.scalars["loss_agg_len"] == 3 and batch.scalars["loss_normaliser"] == 12
    assert batch.scalars["zero_adv_groups"] == 1  # group "b" = [0.5, 0.5]
    assert batch.scalars["reward_mean"] == pytest.approx(0.5)  # (1 + 0 + .5 + .5) / 4
    assert batch.scalars["adv_abs_mean"] == pytest.approx(0.25)  # (.5 + .5 + 0 + 0) / 4


def random_batch(seed, with_ref=True):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(7):
        n = 1 + int(torch.randint(6, (1,), generator=g))
        lp = (-torch.rand(n, generator=g) * 3).tolist()
        ref = (-torch.rand(n, generator=g) * 3).tolist() if with_ref else None
        mask = [1] * n if i % 3 else [1] + [0] * (n - 1)  # some env tokens inside responses
        samples.append(sample(f"g{i // 3}", i % 3, 1 + i % 3, lp, float(i % 2), ref, mask))
    return collate(samples, pad_id=0)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("off_policy", ["none", "decoupled", "truncated_is"])
def test_micro_batches_sum_to_whole_batch(loss_agg, off_policy):
    algo = GRPO(GRPOConfig(loss_agg=loss_agg, off_policy=off_policy, kl_coef=0.1))
    batch = algo.prepare(random_batch(0))
    noise = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(1))
    logp_init = batch.behaviour_logprobs + 0.3 * noise  # ratios spread over and beyond the clip range
    whole_lp = logp_init.clone().requires_grad_(True)
    whole, metrics = algo.loss(whole_lp, batch)
    whole.backward()
    assert set(metrics) == {"pg_loss", "kl", "clip_frac", "is_weight_mean", "approx_kl_behaviour"}
    assert all(isinstance(v, float) for v in metrics.values())
    micro_lp = logp_init.clone().requires_grad_(True)
    total = sum(algo.loss(micro_lp[i:j], batch.rows(i, j))[0] for i, j in [(0, 2), (2, 3), (3, 7)])
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
        ({"off_policy": "vtrace"}, "off_policy.*none.*decoupled.*truncated_is"),
        ({"is_cap": 0.0}, "is_cap"),
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
