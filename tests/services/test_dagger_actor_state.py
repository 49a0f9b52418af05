"""The actor holds DAgger's aggregated labels: fed once per queue batch, saved and restored with its
checkpoint (the Actor class in-process, no Ray: no store, no queue)."""

import asyncio

import pytest

from relaxrl.envs.calculator import CalculatorEnv
from relaxrl.envs.episodes import ExpertTeacher, run_episode, trajectory_sample
from relaxrl.models.tiny import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    d = tmp_path_factory.mktemp("policy")
    build_tiny_model(tok, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def actor(model_dir):
    from hydra import compose, initialize_config_module

    from relaxrl.launch import plain
    from relaxrl.services.actor import Actor

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["+experiment=dagger_toy", "algorithm.batch_size=4"])
    return Actor.func_or_class(model_dir, algorithm=plain(cfg.algorithm), trainer=plain(cfg.trainer))


def batch(seeds, prefix):
    tok = build_tokenizer()
    out = []
    for k, seed in enumerate(seeds):
        ep = asyncio.run(run_episode(CalculatorEnv(), seed, tokenizer=tok, student=None, teacher=ExpertTeacher(),
                                     beta=1.0, episode_id=f"{prefix}{k}", group_id=f"{prefix}{k}", start_version=0))
        out.append(trajectory_sample(ep, uid=f"{prefix}{k}/0"))
    return out


async def step(a, samples, version):
    done = asyncio.get_running_loop().create_future()
    done.set_result(samples)
    return await a.train_step([done], version)


def test_actor_trains_on_drawn_labels_and_its_checkpoint_keeps_the_buffer(model_dir, tmp_path):
    a = actor(model_dir)
    m = asyncio.run(step(a, batch([1, 2, 3], "g"), 0))
    assert m["samples"] == 3 and m["algo/labels"] == 6 and m["algo/label_rows"] == 4  # 2 labels per episode
    assert [u for u, _ in m["trained"]] == ["g0/0", "g1/0", "g2/0"]  # the queue's samples, once
    asyncio.run(a.save_checkpoint(str(tmp_path / "ck")))
    b = actor(model_dir)
    asyncio.run(b.load_checkpoint(str(tmp_path / "ck")))
    assert b.algorithm.state_dict() == a.algorithm.state_dict() and b.trained_count == 3
    more = batch([4], "h")
    ma, mb = asyncio.run(step(a, more, 1)), asyncio.run(step(b, more, 1))
    assert ma["algo/labels"] == mb["algo/labels"] == 8 and ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
