"""The torch trainer's step: token-budget micro-batches equal the plain ones; PPO mini-batches and
epochs make several updates in one version, the decoupled objective anchored on the step's start."""

from __future__ import annotations

import copy

import pytest
import torch

from relaxrl.algorithms.grpo import GRPO, GRPOConfig
from relaxrl.engines.microbatch import plan_micro_batches, row_lengths
from relaxrl.engines.torch_trainer import TorchTrainerEngine
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.sample import Sample, collate


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(build_tokenizer(), seed=0)


def uneven_batch(lengths, group_size=2, stale_shift=0.0, seed=0):
    """Groups of ``group_size`` responses of very uneven lengths, rewards varied within groups."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(lengths):
        resp = torch.randint(10, 80, (n,), generator=g).tolist()
        samples.append(Sample(uid=f"g{i // group_size}/{i % group_size}", group_id=f"g{i // group_size}",
                              index=i % group_size, prompt_ids=[2, 40 + i % 7, 41], response_ids=resp,
                              behaviour_logprobs=[-4.0 - stale_shift] * n, reward=float((i * 7) % 3), policy_version=0))
    return collate(samples, pad_id=0)


def sgd_engine(model, **kw):
    """An engine whose update is exactly ``-grad`` (SGD, lr 1, no clipping): weights show the gradient."""
    engine = TorchTrainerEngine(copy.deepcopy(model), lr=1.0, max_grad_norm=0, **kw)
    engine.optimizer = torch.optim.SGD(engine.params, lr=1.0)
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: 1.0)
    return engine


def deltas(model, engine):
    before = dict(model.named_parameters())
    return {n: (p.detach() - before[n].detach()) for n, p in engine.model.named_parameters()}


LENGTHS = [2, 60, 3, 55, 1, 64, 4, 50]  # very uneven: most of a padded batch is padding


def test_token_budget_micro_batches_equal_plain_ones_and_cut_padding(model):
    algo = GRPO(GRPOConfig(loss_agg="token_mean"))
    results = {}
    for budget in (0, 140):
        engine = sgd_engine(model, micro_batch_size=2, max_tokens_per_micro_batch=budget)
        batch = algo.prepare(uneven_batch(LENGTHS))
        metrics = engine.train_step(batch, algo.loss)
        results[budget] = metrics, deltas(model, engine)
    (plain, d_plain), (packed, d_packed) = results[0], results[140]
    assert packed["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    for name in d_plain:
        torch.testing.assert_close(d_packed[name], d_plain[name], atol=1e-5, rtol=1e-4, msg=name)
    assert max(float(d.abs().max()) for d in d_plain.values()) > 1e-3  # the step did move the weights
    assert packed["pad_frac"] <= plain["pad_frac"] / 2 and plain["pad_frac"] > 0.4


def test_budget_plan_keeps_micro_batches_under_it():
    batch = uneven_batch(LENGTHS)
    for plan in plan_micro_batches(row_lengths(batch), 8, 140):
        widest = max(row_lengths(batch)[i] for i in plan)
        assert len(plan) * widest <= 140 or len(plan) == 1


def test_mini_batches_make_several_updates_in_one_version(model):
    algo = GRPO(GRPOConfig())
    engine = TorchTrainerEngine(copy.deepcopy(model), lr=1e-3, mini_batches=4, ppo_epochs=2)
    batch = algo.prepare(uneven_batch(LENGTHS))
    with pytest.raises(ValueError, match="needs the algorithm's prepare"):
        engine.train_step(batch, algo.loss)
    metrics = engine.train_step(batch, algo.loss, prepare=algo.prepare)
    assert engine.version == 1 and metrics["updates"] == 8.0  # 4 mini-batches x 2 epochs, one version


def test_decoupled_is_anchored_on_the_step_start_and_differs_from_plain(model):
    """Stale samples (behaviour 0.5 nats off): after the first update of a step, decoupled's ratio to
    the step's starting policy is clipped, the plain one's to the behaviour policy is not the same."""
    runs = {}
    for mode in ("none", "decoupled"):
        algo = GRPO(GRPOConfig(off_policy=mode))
        engine = TorchTrainerEngine(copy.deepcopy(model), lr=3e-2, mini_batches=4)
        batch = algo.prepare(uneven_batch(LENGTHS, stale_shift=0.5))
        start = engine.logprobs(batch)
        metrics = engine.train_step(batch, algo.loss, prepare=algo.prepare, proximal=algo.needs_proximal)
        runs[mode] = metrics, deltas(model, engine), batch, start
    _, _, batch, start = runs["decoupled"]
    torch.testing.assert_close(batch.extras["prox_logprobs"], start)  # the proximal policy: the step's start
    assert "prox_logprobs" not in runs["none"][2].extras
    diff = max(float((runs["none"][1][n] - runs["decoupled"][1][n]).abs().max()) for n in runs["none"][1])
    assert diff > 1e-4
    assert runs["decoupled"][0]["clip_frac"] > 0  # the later updates moved away from the step's start


def test_lr_schedule_carries_over_a_checkpoint_without_optimizer_state(model, tmp_path):
    """A DeepSpeed (ZeRO) checkpoint has no torch-format AdamW state: the resumed step must still use
    the schedule's lr (the param groups kept the initial warmup lr, 1/3 of the schedule's)."""
    from relaxrl.engines.torch_trainer import STATE_FILE

    algo = GRPO(GRPOConfig())
    src = TorchTrainerEngine(copy.deepcopy(model), lr=1e-2, warmup_steps=3)
    src.train_step(algo.prepare(uneven_batch(LENGTHS)), algo.loss)
    src.save_checkpoint(str(tmp_path))
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    state["optimizer"] = None  # as a ZeRO-sharded checkpoint converted to this layout
    torch.save(state, tmp_path / STATE_FILE)
    dst = TorchTrainerEngine(copy.deepcopy(model), lr=1e-2, warmup_steps=3)
    dst.load_checkpoint(str(tmp_path))
    m_src = src.train_step(algo.prepare(uneven_batch(LENGTHS)), algo.loss)
    m_dst = dst.train_step(algo.prepare(uneven_batch(LENGTHS)), algo.loss)
    assert m_src["lr"] == pytest.approx(2e-2 / 3) and m_dst["lr"] == m_src["lr"]
    assert dst.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # the next step's, warmup done
