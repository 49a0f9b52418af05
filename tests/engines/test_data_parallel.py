"""Balanced data parallelism: every rank runs as many micro-batches (fillers where short) on its
share of the rows, and two gloo ranks on CPU take the same step as one rank, 7 uneven rows."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relaxrl.engines.microbatch import plan_micro_batches, rank_micro_batches

LENGTHS7 = [12, 3, 40, 7, 25, 5, 18]


def _all_ranks(lengths, world, mbs, budget=0):
    return [rank_micro_batches(lengths, world, r, mbs, budget) for r in range(world)]


def _rows(plans):
    return sorted(i for p in plans for i in p)


def test_seven_rows_two_ranks_same_count_every_row_once():
    for mbs in (1, 2, 3, 4):
        ranks = _all_ranks(LENGTHS7, 2, mbs)
        assert len(ranks[0]) == len(ranks[1]), (mbs, ranks)
        assert _rows(ranks[0] + ranks[1]) == list(range(7))
        assert [len(_rows(p)) for p in ranks] == [3, 4]  # no rank empty, shares differ by one row
    # 3 and 4 rows at 3 per micro-batch: 1 and 2 real ones, so rank 0 gets a filler
    assert _all_ranks(LENGTHS7, 2, 3) == [[[2, 0, 1], []], [[4, 6, 3], [5]]]


def test_long_rows_are_spread_over_the_ranks():
    tokens = [sum(LENGTHS7[i] for p in plans for i in p) for plans in _all_ranks(LENGTHS7, 2, 2)]
    assert tokens == [55, 55]  # contiguous shares (rows 0-3 | 4-6): 62 and 48
    tokens = [sum([40, 30, 2, 1][i] for p in plans for i in p) for plans in _all_ranks([40, 30, 2, 1], 2, 2)]
    assert tokens == [41, 32]  # contiguous: 70 and 3


def test_one_row_two_ranks_is_one_real_and_one_filler():
    assert _all_ranks([5], 2, 4) == [[[0]], [[]]]
    assert _all_ranks([], 2, 4) == [[], []]


def test_one_rank_is_the_plain_plan():
    for budget in (0, 50):
        assert rank_micro_batches(LENGTHS7, 1, 0, 2, budget) == plan_micro_batches(LENGTHS7, 2, budget)


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        rank_micro_batches(LENGTHS7, 2, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        rank_micro_batches(LENGTHS7, 2, 0, 0)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), max_size=20), world=st.integers(1, 4), mbs=st.integers(1, 5),
       budget=st.sampled_from([0, 30, 90]))
def test_rank_plans_partition_the_rows_in_equal_counts(lengths, world, mbs, budget):
    ranks = _all_ranks(lengths, world, mbs, budget)
    assert len({len(p) for p in ranks}) == 1  # every rank enters as many passes
    assert _rows([p for plans in ranks for p in plans]) == list(range(len(lengths)))
    shares = [len(_rows(p)) for p in ranks]
    assert max(shares) - min(shares) <= 1
    for plans in ranks:
        real = [p for p in plans if p]
        assert plans[:len(real)] == real  # fillers only at the end
        for p in real:
            assert len(p) <= mbs
            assert len(p) == 1 or not budget or len(p) * max(lengths[i] for i in p) <= budget


def test_deepspeed_ranks_run_equal_micro_batch_counts():
    """The DeepSpeed engine's split (its ``_rank_plans``; no deepspeed needed to plan): the old
    round-up split gave 7 rows at 3 per micro-batch 2 passes on rank 0 and 1 on rank 1 (a hang
    under ZeRO-3), and 3 rows over 4 ranks an empty rank."""
    from relaxrl.engines.deepspeed_trainer import DeepSpeedTrainerEngine

    from .test_trainer_updates import uneven_batch

    for n, world, mbs in ((7, 2, 3), (3, 4, 2), (5, 4, 2), (8, 3, 3)):
        batch = uneven_batch(LENGTHS7 * 2)
        batch = batch.rows(0, n)
        plans = []
        for rank in range(world):
            engine = object.__new__(DeepSpeedTrainerEngine)
            engine.rank, engine.world_size, engine.micro_batch_size = rank, world, mbs
            plans.append(engine._rank_plans(batch))
        assert len({len(p) for p in plans}) == 1, (n, world, mbs, plans)
        assert _rows([p for ps in plans for p in ps]) == list(range(n))
        assert all(any(p) for p in plans) or n < world


def test_config_check_lets_torch_ranks_do_mini_batches_and_token_budgets():
    from relaxrl.config_check import check_trainer

    from .test_placement_and_factory import compose_cfg

    check_trainer(compose_cfg("trainer.num_ranks=2", "trainer.mini_batches=2", "trainer.ppo_epochs=2",
                              "trainer.max_tokens_per_micro_batch=512"))  # refused before: "with one rank"
    with pytest.raises(ValueError, match="implemented by trainer.engine=torch \\(got engine=deepspeed\\)"):
        check_trainer(compose_cfg("trainer.engine=deepspeed", "trainer.num_ranks=2", "trainer.mini_batches=2"))


# ---- two gloo ranks on CPU against one rank ---------------------------------------------------

ENGINES = {  # name: engine options; "ppo" also runs mini-batches of whole groups under a token budget
    "plain": dict(micro_batch_size=2),
    "ppo": dict(micro_batch_size=2, mini_batches=2, max_tokens_per_micro_batch=60),
}


def _step(model, batch, options, on_loss=None):
    """One engine step; ``on_loss`` sees each micro-batch's size."""
    from relaxrl.algorithms.grpo import GRPO
    from relaxrl.engines.torch_trainer import TorchTrainerEngine

    algo = GRPO()

    def loss(logp, mb):
        if on_loss is not None:
            on_loss(mb.size)
        return algo.loss(logp, mb)

    engine = TorchTrainerEngine(copy.deepcopy(model), lr=1e-4, seed=0, **options)
    prepare = algo.prepare if options.get("mini_batches", 1) > 1 else None
    metrics = engine.train_step(batch, loss, prepare=prepare)
    return metrics, {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def _rank_main(rank: int, port: int, model, batch, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for name, options in ENGINES.items():
            seen: list[int] = []
            metrics, state = _step(model, batch, options, seen.append)
            results[name] = {"metrics": metrics, "state": state, "rows": sum(seen)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_take_the_one_rank_step_on_seven_rows(tmp_path):
    import torch.multiprocessing as mp

    from relaxrl.algorithms.grpo import GRPO
    from relaxrl.engines.deepspeed_trainer import free_port
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    from .test_trainer_updates import uneven_batch

    model = build_tiny_model(build_tokenizer(), seed=0)
    batch = GRPO().prepare(uneven_batch([2, 30, 5, 24, 1, 17, 9]))  # 7 rows, 4 groups (the last of one row)
    mp.spawn(_rank_main, args=(free_port(), model, batch, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, options in ENGINES.items():
        ref_metrics, ref_state = _step(model, batch, options)
        mine = [r[name] for r in ranks]
        # each rank trained its own share: 4 + 3 rows (each rank on all 7 would give the same step too)
        assert sorted(m["rows"] for m in mine) == [3, 4], name
        for m in mine:
            assert m["metrics"]["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-5), name
            assert m["metrics"]["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-5), name
            diff = max(float((m["state"][k] - ref_state[k]).abs().max()) for k in ref_state)
            print(f"{name}: 2 gloo ranks vs 1: loss {m['metrics']['loss']:.7f} vs {ref_metrics['loss']:.7f}, "
                  f"grad_norm {m['metrics']['grad_norm']:.6f} vs {ref_metrics['grad_norm']:.6f}, "
                  f"max weight diff {diff:.1e}")
            assert diff < 1e-5, (name, diff)  # AdamW's first step is ~lr (1e-4) per weight
        # the ranks took the very same step (identical all-reduced gradients)
        assert all(torch.equal(mine[0]["state"][k], mine[1]["state"][k]) for k in ref_state), name
