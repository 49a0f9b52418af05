"""Multi-turn episodes token-in/token-out: the trained ids are the sampled ids (relaxrl.envs.episodes),
DAgger's label aggregation in the algorithm (exactly once per queue sample, checkpointed)."""

import asyncio
import json

import pytest

from relaxrl.algorithms.dagger import DAgger, DAggerConfig
from relaxrl.engines.base import Generation
from relaxrl.envs.calculator import CalculatorEnv
from relaxrl.envs.episodes import ExpertTeacher, labels_of, run_episode, trajectory_sample
from relaxrl.models.tiny import build_tokenizer
from relaxrl.sample import collate


class SplitStudent:
    """Samples the given actions one token per character (a split the BPE would merge), at a new
    weight version each turn."""

    def __init__(self, tok, actions, first_version=3):
        self.tok, self.actions, self.version, self.sampled = tok, list(actions), first_version, []

    async def __call__(self, state_ids, max_new_tokens):
        text = self.actions[len(self.sampled)]
        ids = [i for ch in text for i in self.tok(ch, add_special_tokens=False)["input_ids"]] + [self.tok.eos_token_id]
        self.sampled.append(ids)
        self.version += 1
        return Generation(ids, [-0.25] * len(ids), "stop"), self.version - 1


@pytest.fixture(scope="module")
def qwen():
    from relaxrl.models.build import build_tokenizer as build_real
    from relaxrl.models.presets import get_preset

    return build_real(get_preset("qwen-tiny-152k"))


def test_trained_ids_are_the_sampled_ids_where_re_rendering_would_differ(qwen):
    env = CalculatorEnv()
    q = env.reset(5)
    student = SplitStudent(qwen, [f"calc({q})", f"answer({eval(q)})"])
    ep = asyncio.run(run_episode(CalculatorEnv(), 5, tokenizer=qwen, student=student, teacher=ExpertTeacher(),
                                 beta=0.0, episode_id="e", group_id="g"))
    assert ep.success and len(ep.turns) == 2
    traj = trajectory_sample(ep)
    row = collate([traj], qwen.pad_token_id)
    ids = row.input_ids[0].tolist()
    trained = [ids[t + 1] for t, m in enumerate(row.loss_mask[0].tolist()) if m]
    assert trained == student.sampled[0] + student.sampled[1]  # exactly the sampled tokens, nothing masked
    assert [lp for lp, m in zip(traj.behaviour_logprobs, traj.loss_mask) if m] == [-0.25] * len(trained)
    # The old way, re-rendering the chat's text, tokenises the actions otherwise: other ids.
    rendered = qwen.apply_chat_template(ep.messages(), tokenize=True)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert rendered[:len(ids)] != ids and qwen.decode(rendered).startswith(qwen.decode(ids))
    # Each state is what the student saw: a prefix of the trajectory; the tool's reply is unmasked.
    assert ids[:len(ep.turns[1].state_ids)] == ep.turns[1].state_ids
    a1 = len(traj.prompt_ids) + len(student.sampled[0])
    assert qwen.decode(ids[a1:len(ep.turns[1].state_ids)]).startswith("\n<|im_start|>user\n=")
    # Per token versions: each action its own, the observation that of the action before.
    n0, n1 = len(student.sampled[0]), len(student.sampled[1])
    obs = len(traj.response_ids) - n0 - n1
    assert traj.token_versions == [3] * (n0 + obs) + [4] * n1 and traj.oldest_version == 3 == traj.policy_version


def dagger_trajectories(tok, seeds, beta=1.0, prefix="q"):
    out = []
    for k, seed in enumerate(seeds):
        ep = asyncio.run(run_episode(CalculatorEnv(), seed, tokenizer=tok, student=None, teacher=ExpertTeacher(),
                                     beta=beta, episode_id=f"{prefix}{k}", group_id=f"{prefix}{k}", start_version=0))
        out.append(trajectory_sample(ep, uid=f"{prefix}{k}/0"))
    return out


def test_labels_are_the_teachers_ids_at_states_that_prefix_the_trajectory():
    tok = build_tokenizer()
    (traj,) = dagger_trajectories(tok, [7])
    labels = labels_of(traj)
    assert len(labels) == 2 and sum(traj.loss_mask) == 0  # teacher-acted: nothing for the outcome loss
    full = traj.prompt_ids + traj.response_ids
    for lab in labels:
        assert full[:len(lab.prompt_ids)] == lab.prompt_ids and lab.policy_version == -1
        assert full[len(lab.prompt_ids):len(lab.prompt_ids) + len(lab.response_ids)] == lab.response_ids
    assert tok.decode(labels[1].response_ids).startswith("answer(")


def test_dagger_aggregates_each_queue_batchs_labels_once_and_its_state_round_trips():
    tok = build_tokenizer()
    alg = DAgger(DAggerConfig(batch_size=3, label_budget=5, steps_per_iter=2, beta_decay_iters=2))
    assert [alg.beta_at_version(v) for v in (0, 1, 2, 3, 4, 9)] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    first = alg.training_rows(dagger_trajectories(tok, [1, 2]))  # 2 labels each
    assert alg.labels == 4 and len(alg.buffer) == 4 and len(first) == 3
    rows = alg.training_rows(dagger_trajectories(tok, [3, 4], prefix="r"))  # 4 more: 1 fits the budget
    assert (alg.labels, alg.labels_dropped, len(alg.buffer)) == (5, 3, 5)
    assert all(r.uid.endswith("@2") for r in rows) and len({r.uid for r in rows}) == 3
    state = json.loads(json.dumps(alg.state_dict()))  # what the actor's checkpoint holds
    again = DAgger(alg.config)
    again.load_state_dict(state)
    more = dagger_trajectories(tok, [5], prefix="s")
    a, b = alg.training_rows(more), again.training_rows(more)
    assert [(r.uid, r.prompt_ids, r.response_ids) for r in a] == [(r.uid, r.prompt_ids, r.response_ids) for r in b]
    with pytest.raises(RuntimeError, match="no training data"):
        DAgger(DAggerConfig()).training_rows([s.replace(labels=[]) for s in more])


@pytest.mark.parametrize("overrides, error", [
    (["rollout.engine=vllm"], "rollout.engine=hf"),
    (["rollout.group_size=4"], "algorithm.group_size=1 and rollout.group_size=4 differ"),
    (["env=arithmetic"], "algorithm=dagger needs a multi-turn env"),
])
def test_multi_turn_settings_it_cannot_run_are_refused_before_ray(tmp_path, overrides, error):
    from hydra import compose, initialize_config_module

    from relaxrl.train import run_experiment

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["+experiment=dagger_toy", f"run_dir={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=error):
        run_experiment(cfg)
