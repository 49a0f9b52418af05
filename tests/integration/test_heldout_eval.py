"""Held-out evaluation of a single run (trainer.eval_every): its schedule, metrics, checks and bar
without Ray, then one short Serve run with env=dataset that logs it with the weights it trained."""

import asyncio
import json

import pytest
from omegaconf import OmegaConf

from relaxrl.evaluation import check_heldout, eval_due, evaluate_tasks, heldout_metrics
from relaxrl.monitor import Monitor, bar_postfix
from relaxrl.train import StepHooks
from tests.integration.helpers import make_cfg


def test_eval_is_due_at_step_0_every_n_steps_and_the_last():
    assert [s for s in range(8) if eval_due(s, 3, 7)] == [0, 3, 6, 7]
    assert [s for s in range(5) if eval_due(s, 0, 4)] == []  # 0: off, today's runs unchanged


def test_heldout_metrics_weight_domains_by_their_task_counts():
    greedy = {"a": {"accuracy": 1.0, "response_len": 2.0, "n": 3.0},
              "b": {"accuracy": 0.0, "response_len": 6.0, "n": 1.0}}
    sampled = {"a": {"accuracy": 0.5, "response_len": 4.0, "n": 3.0},
               "b": {"accuracy": 1.0, "response_len": 4.0, "n": 1.0}}
    m = heldout_metrics(greedy, sampled)
    assert m["eval/n"] == 4
    assert m["eval/reward_greedy"] == 0.75 and m["eval/reward_sampled"] == 0.625
    assert m["eval/response_len_greedy"] == 3.0 and m["eval/response_len_sampled"] == 4.0
    assert m["eval/b/reward_greedy"] == 0.0 and m["eval/a/reward_sampled"] == 0.5
    one = heldout_metrics({"a": greedy["a"]}, {"a": sampled["a"]})
    assert "eval/a/reward_greedy" not in one  # one domain: the overall mean says it all
    with pytest.raises(ValueError, match="different domains"):
        heldout_metrics(greedy, {"a": sampled["a"]})


def _dataset(path, rows=50):
    from relaxrl.envs.arithmetic import ArithmeticEnv

    pairs = ArithmeticEnv().sft_pairs(rows, seed=7)
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    return str(path)


def _cfg(**trainer):
    return OmegaConf.create({"seed": 0, "algorithm": {"name": "grpo"}, "weight_sync": {"method": "object_store"},
                             "trainer": {"eval_every": 2, "eval_max_tasks": 0, **trainer}})


def test_check_heldout_returns_the_eval_split_or_names_what_cannot_work(tmp_path):
    from relaxrl.envs.dataset import DatasetEnv

    env = DatasetEnv(path=_dataset(tmp_path / "d.jsonl"), eval_fraction=0.2)
    assert check_heldout(_cfg(eval_every=0), env) is None
    assert len(check_heldout(_cfg(), env)) == 10
    assert len(check_heldout(_cfg(eval_max_tasks=4), env)) == 4
    with pytest.raises(ValueError, match="trainer.eval_every must be >= 0"):
        check_heldout(_cfg(eval_every=-1), env)
    with pytest.raises(ValueError, match="env.eval_fraction"):
        check_heldout(_cfg(), DatasetEnv(path=_dataset(tmp_path / "e.jsonl"), eval_fraction=0.0))
    bad = _cfg()
    bad.weight_sync.method = "broadcast"
    with pytest.raises(ValueError, match="weight_sync.method=object_store"):
        check_heldout(bad, env)
    bad = _cfg()
    bad.algorithm.name = "dagger"
    with pytest.raises(ValueError, match="algorithm.eval_every"):
        check_heldout(bad, env)


def test_the_bar_keeps_the_last_eval_until_the_next_and_step_0_does_not_advance_it(tmp_path):
    shown = bar_postfix({}, {"reward_mean": 0.5, "eval/reward_greedy": 0.25, "eval/reward_sampled": 0.125})
    shown = bar_postfix(shown, {"reward_mean": 0.75})
    assert shown == {"reward": "0.75", "eval": "0.25", "eval~": "0.125"}
    mon = Monitor(OmegaConf.create({"logger": {"progress": True, "name": "console"}}), str(tmp_path), 3)
    mon.log(0, {"eval/reward_greedy": 0.25}, advance=False)
    assert mon._bar.n == 0
    mon.log(1, {"reward_mean": 0.5})
    assert mon._bar.n == 1 and mon._postfix["eval"] == "0.25"
    mon.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 0, "eval/reward_greedy": 0.25}, {"step": 1, "reward_mean": 0.5}]


def test_step_hooks_run_in_order_merge_metrics_and_are_due_when_one_is():
    calls = []

    class Every2:
        def due(self, step):
            return step % 2 == 0

        async def __call__(self, roles, step, metrics):
            calls.append(("every2", step))
            return {"a": step} if self.due(step) else {}

    async def always(roles, step, metrics):  # a hook without due(): due at every step
        calls.append(("always", step))
        return {"b": 1}

    hooks = StepHooks(None, Every2())
    assert [s for s in range(4) if hooks.due(s)] == [0, 2]
    both = StepHooks(Every2(), always)
    assert all(both.due(s) for s in range(4))
    assert asyncio.run(both(None, 2, {})) == {"a": 2, "b": 1}
    assert calls == [("every2", 2), ("always", 2)]


@pytest.fixture(scope="module")
def quickstart_model(tmp_path_factory, model_cache):
    """The tests' quickstart model (warm-started on addition; cached for the session)."""
    from relaxrl.launch import prepare_model_dir

    return prepare_model_dir(make_cfg(tmp_path_factory.mktemp("qs"), model_cache))


def _local_eval(model_dir, env, tasks, **kw):
    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.models.chat import render_prompt_ids

    engine = HFGenerationEngine.from_pretrained(model_dir, torch_threads=1)
    return evaluate_tasks(engine, env, tasks, lambda t: render_prompt_ids(engine.tokenizer, t), max_new_tokens=3, **kw)


def test_sampled_evaluation_is_reproducible_by_seed_and_greedy_is_the_default(tmp_path, quickstart_model):
    from relaxrl.envs.dataset import DatasetEnv

    env = DatasetEnv(path=_dataset(tmp_path / "d.jsonl", rows=100), eval_fraction=0.3)
    tasks = list(env.tasks("eval", 0))
    greedy = _local_eval(quickstart_model, env, tasks)
    assert greedy == _local_eval(quickstart_model, env, tasks, temperature=0.0, seed=3)
    a, b = (_local_eval(quickstart_model, env, tasks, temperature=1.0, seed=3, batch_size=16) for _ in range(2))
    assert a == b
    print(f"greedy={greedy} sampled={a}")


@pytest.mark.ray
def test_a_dataset_run_logs_heldout_eval_of_the_weights_it_trained(ray_local, tmp_path, model_cache, quickstart_model):
    """env=dataset with trainer.eval_every=2 over 4 steps: eval/* at steps 0, 2 and 4 in
    metrics.jsonl and the summary; step 0 is the initial model's score and step 4 the final
    checkpoint's (computed here, in-process), and training's accounting is untouched."""
    from relaxrl.envs.dataset import DatasetEnv
    from relaxrl.pipeline.stage_eval import export_model_dir
    from relaxrl.train import run_experiment, summary_line

    data = _dataset(tmp_path / "d.jsonl", rows=100)
    cfg = make_cfg(tmp_path / "run", model_cache, "model=local", f"model.path={quickstart_model}", "env=dataset",
                   f"env.path={data}", "env.eval_fraction=0.3", "trainer.steps=4", "trainer.eval_every=2",
                   "rollout.groups_per_step=2", "rollout.max_staleness=1", "trainer.save_final=true")
    s = run_experiment(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {x["step"]: x for x in lines if "eval/reward_greedy" in x}
    assert sorted(evals) == [0, 2, 4]
    assert [x["step"] for x in lines if "version" in x] == [1, 2, 3, 4]  # one line per step, step 0 aside
    assert all(e["eval/n"] == 30 for e in evals.values())
    assert s["accounting"]["trained_samples"] == 4 * 2 * 8 and s["accounting"]["in_flight_samples"] == 0
    assert s["eval/reward_greedy"] == evals[4]["eval/reward_greedy"]
    assert "eval_greedy=" in summary_line(s)

    env = DatasetEnv(path=data, eval_fraction=0.3)
    tasks = list(env.tasks("eval", 0))
    start = _local_eval(quickstart_model, env, tasks)["default"]
    start_sampled = _local_eval(quickstart_model, env, tasks, temperature=1.0, seed=0)["default"]
    final = _local_eval(export_model_dir(s["checkpoint"], quickstart_model), env, tasks)["default"]
    print(f"eval greedy {[evals[k]['eval/reward_greedy'] for k in (0, 2, 4)]}, sampled "
          f"{[evals[k]['eval/reward_sampled'] for k in (0, 2, 4)]}; in-process start {start} final {final}")
    assert evals[0]["eval/reward_greedy"] == start["accuracy"]
    assert evals[0]["eval/reward_sampled"] == start_sampled["accuracy"]
    assert evals[4]["eval/reward_greedy"] == final["accuracy"]
    assert evals[4]["eval/response_len_greedy"] == final["response_len"]


@pytest.mark.ray
def test_the_evaluator_follows_the_trainer_back_after_an_in_run_restore(ray_local, tmp_path, quickstart_model):
    """driver.restore_lost_trainer rolls the weight store back and the restored trainer publishes an
    older version again: the evaluator (no Serve here, its class in-process on a real weight store)
    loads it instead of refusing to evaluate ("holds v2, asked to evaluate v1")."""
    import ray
    import torch

    from relaxrl.engines.payload import pack_weights
    from relaxrl.models.loading import load_model
    from relaxrl.services.evaluator import Evaluator
    from relaxrl.weights import WeightStore, store_name

    name = store_name("heldout-test")
    store = ray.remote(WeightStore).options(name=name, namespace="relaxrl-tests", num_cpus=0).remote()
    try:
        good = load_model(quickstart_model).state_dict()
        torch.manual_seed(0)
        noisy = {k: v + 0.5 * torch.randn_like(v) for k, v in good.items()}
        env = {"name": "dataset", "path": _dataset(tmp_path / "d.jsonl", rows=100), "eval_fraction": 0.3}
        ev = Evaluator.func_or_class(quickstart_model, env, max_new_tokens=3, store_name=name,
                                     namespace="relaxrl-tests")

        async def publish(state, version):
            await store.publish.remote(version, [ray.put(pack_weights(state, version=version, kind="full"))], "full", 0)

        async def scenario():
            await publish(good, 1)
            at_1 = await ev.evaluate_heldout(1, 1.0)
            await publish(noisy, 2)
            at_2 = await ev.evaluate_heldout(2, 1.0)
            await store.rollback.remote()  # the trainer was lost after step 2 and restored at step 1
            await publish(good, 1)
            return at_1, at_2, await ev.evaluate_heldout(1, 1.0)

        at_1, at_2, again = asyncio.run(scenario())
        print(f"v1 {at_1['eval/reward_greedy']:.3f} v2 {at_2['eval/reward_greedy']:.3f} "
              f"v1 again {again['eval/reward_greedy']:.3f}")
        assert again == at_1 and ev.engine.version == 1
        assert at_2["eval/reward_greedy"] < at_1["eval/reward_greedy"]  # v2 was other weights
    finally:
        ray.kill(store)
