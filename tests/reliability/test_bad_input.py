"""Bad input: each case is a clear error naming what is wrong, or a counted and logged rejection."""

import asyncio
import json
import logging
import time

import pytest
import ray
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from relaxrl import checkpoint
from relaxrl.driver import RunResult, TaskStream, produce
from relaxrl.engines.torch_trainer import TorchTrainerEngine
from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.envs.base import Task
from relaxrl.envs.dataset import DatasetEnv
from relaxrl.envs.guarded import GuardedVerifier
from relaxrl.envs.verifiers import VERIFIERS
from relaxrl.launch import Roles
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.queue import QueueActor, StalenessQueue, group_name
from relaxrl.sample import Sample
from relaxrl.train import run_experiment

pytestmark = pytest.mark.badinput
TASK = Task(task_id="t1", prompt="1+1=", answer="2")


def sample(i=0, text="2", response=(5, 1), reward=None):
    return Sample(uid=f"g0/{i}", group_id="g0", index=i, prompt_ids=[3], response_ids=list(response),
                  behaviour_logprobs=[-0.5] * len(response), policy_version=0, response_text=text, reward=reward)


def score(verify, timeout_s=5.0, **kw):
    guard = GuardedVerifier(lambda text, task: verify(text), timeout_s=timeout_s, **kw)
    return asyncio.run(guard.score([sample()], TASK))[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_is_rejected_and_never_trained(value, caplog):
    s = score(lambda text: value)
    assert s.reward is None and s.reward_info["error"] == "reward_nonfinite"
    assert "reward_nonfinite" in caplog.text
    # Second line of defence: a non-finite reward that reaches the queue drops its group, counted.
    q = StalenessQueue(groups_per_step=1, group_size=1, max_staleness=0)
    q.admit()
    q.put([sample(reward=value)])
    assert q.take(1) is None and q.metrics()["dropped_by_reason"] == {"reward_nonfinite": 1}


def test_verifier_exception_and_timeout_are_counted_not_raised(caplog):
    def broken(text):
        raise KeyError("no such field")

    s = score(broken)
    assert s.reward is None and s.reward_info["error"] == "verifier_error"
    assert "KeyError" in s.reward_info["detail"]
    t0 = time.monotonic()
    s = score(lambda text: time.sleep(3), timeout_s=0.3)
    assert s.reward_info["error"] == "verifier_timeout" and time.monotonic() - t0 < 2.5
    assert score(broken, on_error="zero").reward == 0.0  # on_error=zero: scored 0 instead, still recorded
    assert "verifier_error" in caplog.text and "verifier_timeout" in caplog.text
    with pytest.raises(ValueError, match="on_error must be 'drop' or 'zero', got 'ignore'"):
        GuardedVerifier(broken, on_error="ignore")


def test_a_hung_verifier_costs_its_own_sample_only():
    """Samples run in a few pool jobs of consecutive samples; those queued behind a hung one get
    jobs of their own once the request's timeout passes, and are verified."""
    calls = []

    def verify(text, task):
        calls.append(text)
        if text == "hang":
            time.sleep(3)
        return float(text == task.answer)

    guard = GuardedVerifier(verify, timeout_s=0.5, max_workers=2)
    texts = ["2", "hang", "2", "1", "2", "2"]  # runs [0, 1, 2] and [3, 4, 5]: 2 waits behind the hang
    batch = [sample(i, text=t) for i, t in enumerate(texts)]
    t0 = time.monotonic()
    scored = asyncio.run(guard.score(batch, TASK))
    assert time.monotonic() - t0 < 2.5
    assert [s.reward for s in scored] == [1.0, None, 1.0, 0.0, 1.0, 1.0]
    assert scored[1].reward_info["error"] == "verifier_timeout"
    assert sorted(calls) == sorted(texts)  # every sample verified once: none twice, none skipped


@pytest.mark.parametrize("n, parts, runs", [(6, 2, [[0, 1, 2], [3, 4, 5]]), (5, 8, [[0], [1], [2], [3], [4]]),
                                            (7, 3, [[0, 1, 2], [3, 4, 5], [6]]), (0, 8, [])])
def test_verifier_runs_split_the_samples_evenly(n, parts, runs):
    from relaxrl.envs.guarded import _split

    assert _split(n, parts) == runs


def test_empty_response_scores_zero_or_is_dropped_by_name():
    assert all(VERIFIERS[name]("", "2") == 0.0 for name in ("exact", "numeric", "contains"))
    q = StalenessQueue(groups_per_step=1, group_size=2, max_staleness=0,
                       required_fields=("response_ids", "behaviour_logprobs", "reward"))
    q.admit()
    q.put([sample(0, reward=0.0), sample(1, text="", response=(), reward=0.0)])  # no tokens at all
    assert q.take(1) is None
    assert q.metrics()["dropped_by_reason"] == {"missing_behaviour_logprobs_response_ids": 2}
    q.check_accounting()


def test_samples_of_several_groups_are_verified_against_their_own_task():
    guard = GuardedVerifier(lambda text, task: float(text == task.answer))
    other = Sample(uid="g1/0", group_id="g1", index=0, prompt_ids=[3], response_ids=[5], behaviour_logprobs=[-0.5],
                   policy_version=0, response_text="3")
    tasks = {"g0": TASK, "g1": Task(task_id="t2", prompt="1+2=", answer="3")}
    assert [s.reward for s in asyncio.run(guard.score([sample(), other], tasks))] == [1.0, 1.0]
    with pytest.raises(KeyError, match="sample g1/0: no task for group 'g1'"):
        asyncio.run(guard.score([other], {"g0": TASK}))


@pytest.mark.ray
def test_prompt_longer_than_the_context_is_rejected_and_counted(ray_local, caplog):
    queue = ray.remote(QueueActor).options(max_concurrency=100).remote(
        groups_per_step=1, group_size=2, max_staleness=0)
    roles = Roles("t", None, None, None, None, queue, None)
    cfg = OmegaConf.create({"rollout": {"group_size": 2}, "seed": 0, "env": {"name": "arithmetic"},
                            "faults": {"max_retries": 0, "role_timeout_s": 5}})
    stats = RunResult()

    async def main():
        task = asyncio.create_task(produce(roles, TaskStream(ArithmeticEnv(), 0), cfg,
                                           lambda text: [1] * 300, stats, max_prompt_tokens=250))
        while ray.get(queue.metrics.remote())["dropped_groups"] < 3:
            await asyncio.sleep(0.01)
        await queue.close.remote()
        await task

    with caplog.at_level(logging.WARNING, logger="relaxrl.driver"):
        asyncio.run(main())
    m = ray.get(queue.metrics.remote())
    assert set(m["dropped_by_reason"]) == {"prompt_too_long"} and stats.prompts_rejected >= 3
    assert "task train-0 rejected: prompt of 300 tokens" in caplog.text
    ray.get(queue.check_accounting.remote())
    ray.kill(queue)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "answer": 1}, {"answer": 2}], r"data.jsonl' row 1 \(line 2\): field 'prompt' is missing"),
    ([{"prompt": "a", "answer": 1}, {"prompt": ["x"], "answer": 2}],
     r"row 1 \(line 2\): field 'prompt' has type list, expected str"),
    ([{"prompt": "a", "answer": {"v": 1}}], r"row 0 \(line 1\): field 'answer' has type dict, expected str or int"),
    ([{"prompt": " ", "answer": 1}], r"row 0 \(line 1\): field 'prompt' is empty"),
    ([{"prompt": "a", "answer": 1}, 7], r"row 1 \(line 2\): expected a JSON object, got int"),
])
def test_malformed_dataset_rows_name_the_file_and_row(tmp_path, rows, message):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=message):
        DatasetEnv(str(path), eval_fraction=0.0)


def test_malformed_rows_can_be_skipped_counted_and_logged(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    good = [{"prompt": f"q{i}", "answer": i} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in good[:2] + [{"prompt": "q"}] + good[2:]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"data.jsonl' line 7: not valid JSON"):
        DatasetEnv(str(path))
    path.write_text("\n".join(json.dumps(r) for r in good[:2] + [{"prompt": "q"}] + good[2:]) + "\n")
    env = DatasetEnv(str(path), eval_fraction=0.0, on_bad_row="skip")
    assert len(env) == 5 and env.bad_rows == [(2, "field 'answer' is missing")]
    assert "skipped 1 malformed rows" in caplog.text
    rows = {t.meta["row"] for t, _ in zip(env.tasks("train", 0), range(10))}
    assert rows == {0, 1, 3, 4, 5}  # file rows, the bad one never used


def compose_run(*overrides):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(config_name="config", overrides=["run_dir=/tmp/x", "+experiment=quickstart", *overrides])


@pytest.mark.parametrize("override, name", [
    ("trainer.lrr=1", "lrr"), ("faults.max_retry=3", "max_retry"), ("resume=[1,2]", "resume"),
])
def test_misspelled_or_mistyped_config_keys_are_errors_naming_them(override, name):
    with pytest.raises(ConfigCompositionException) as info:
        compose_run(override)
    assert name in str(info.value.__cause__ or info.value) + str(info.value)


@pytest.mark.parametrize("override, name", [("+bogus_key=1", "bogus_key"), ("+trainer.bogus=2", "trainer.bogus"),
                                            ("+env.extra=3", "env.extra")])
def test_keys_added_with_plus_that_nothing_reads_are_errors(override, name):
    with pytest.raises(ValueError, match=rf"unknown config key\(s\) \['{name}'\]"):
        run_experiment(compose_run(override))  # refused before Ray or any model starts


def test_missing_checkpoint_path_fails_before_anything_starts(tmp_path):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"run_dir={tmp_path}", "+experiment=quickstart",
                                                       f"resume={tmp_path}/nope"])
    with pytest.raises(checkpoint.CheckpointError, match="nope' does not exist"):
        run_experiment(cfg)
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.resolve_resume("true", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="holds no complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "empty"), str(tmp_path))


def test_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    tok = build_tokenizer()
    small = TorchTrainerEngine(build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                                intermediate_size=64))
    small.save_checkpoint(str(tmp_path / "ckpt"))
    other = TorchTrainerEngine(build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                                intermediate_size=64))
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match="weights do not match the model: missing"):
        other.load_checkpoint(str(tmp_path / "ckpt"))
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())  # left as it was
    # The run-level check names the differing config keys before any replica starts.
    meta = {"arch": {"hidden_size": 64, "num_hidden_layers": 1}, "lora": False, "queue": {"group_size": 8}}
    with pytest.raises(checkpoint.CheckpointError, match="num_hidden_layers: checkpoint 1, run 2"):
        checkpoint.check_compatible(meta, "ck", {"hidden_size": 64, "num_hidden_layers": 2}, False, 8)
    with pytest.raises(checkpoint.CheckpointError, match="rollout.group_size: checkpoint 8, run 4"):
        checkpoint.check_compatible(meta, "ck", {"hidden_size": 64, "num_hidden_layers": 1}, False, 4)
