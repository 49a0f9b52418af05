"""Users' envs and verifiers from outside the package: by import path or by a registered name, checked."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from relaxrl.envs import plugins
from relaxrl.envs.base import Task
from relaxrl.envs.dataset import DatasetEnv
from relaxrl.envs.registry import make_env
from relaxrl.envs.verifiers import get_verifier

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "custom_task"

USER_MODULE = '''
from relaxrl.envs.base import Task
from relaxrl.envs.plugins import register_env, register_verifier

class Echo:
    def __init__(self, word="hi", name="echo"):
        self.name, self.word = name, word
    def tasks(self, split, seed):
        while True:
            yield Task(task_id="t", prompt=self.word, answer=self.word)
    def verify(self, response, task):
        return float(response == task.answer)

@register_env("echo_registered")
def make_echo(**kw):
    return Echo(**kw)

class NoVerify:
    def tasks(self, split, seed):
        return iter(())

class BadVerify(Echo):
    def verify(self, response):
        return 1.0

class HalfMultiTurn:
    max_turns = 3
    def reset(self, seed):
        return "start"
    def step(self, action):
        pass

@register_verifier("starts_with_answer")
def starts_with_answer(response, answer):
    return float(response.startswith(answer))

def one_arg(response):
    return 1.0

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module outside the package, as a user's: ``user_plugins_<test>`` on sys.path; registrations undone."""
    name = f"user_plugins_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "USER_ENVS", dict(plugins.USER_ENVS))
    monkeypatch.setattr(plugins, "USER_VERIFIERS", dict(plugins.USER_VERIFIERS))
    monkeypatch.setattr("relaxrl.envs.registry.USER_ENVS", plugins.USER_ENVS)
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("sep", [":", "."])
def test_env_by_import_path_with_args(user_module, sep):
    env = make_env("custom", target=f"{user_module}{sep}Echo", args={"word": "yo"})
    assert next(env.tasks("train", 0)).prompt == "yo" and env.verify("yo", Task("t", "yo", "yo")) == 1.0


def test_env_by_registered_name_after_imports(user_module):
    with pytest.raises(ValueError, match="unknown env 'echo_registered'.*needs its module in env.imports"):
        make_env("echo_registered")
    env = make_env("echo_registered", imports=[user_module], args={"word": "ok"})
    assert next(env.tasks("train", 0)).answer == "ok"


def test_env_that_does_not_fit_names_what_is_missing(user_module):
    with pytest.raises(TypeError, match=rf"{user_module}\.NoVerify\) does not implement SingleTurnEnv "
                                        r"\(relaxrl.envs.base\): missing method verify\(response, task\)"):
        make_env("custom", target=f"{user_module}:NoVerify")
    with pytest.raises(TypeError, match=r"method verify cannot be called as \(response, task\)"):
        make_env("custom", target=f"{user_module}:BadVerify")
    with pytest.raises(TypeError, match=r"does not implement MultiTurnEnv \(relaxrl.envs.multiturn\): missing "
                                        r"method expert_action\(\); missing attribute max_action_tokens"):
        make_env("custom", target=f"{user_module}:HalfMultiTurn")
    with pytest.raises(TypeError, match="env.target='.*:NOT_CALLABLE' is int, not an env class or factory"):
        make_env("custom", target=f"{user_module}:NOT_CALLABLE")
    with pytest.raises(TypeError, match=r"building the env with env.args \['colour', 'word'\] failed"):
        make_env("custom", target=f"{user_module}:Echo", args={"colour": 1, "word": "x"})


def test_bad_import_paths_are_named(user_module):
    with pytest.raises(ImportError, match="env.target: cannot import module 'no_such_module_xyz'.*PYTHONPATH"):
        make_env("custom", target="no_such_module_xyz:Env")
    with pytest.raises(ImportError, match=f"module '{user_module}' has no attribute 'Nope'"):
        make_env("custom", target=f"{user_module}:Nope")
    with pytest.raises(ValueError, match="is not an import path"):
        make_env("custom", target="Echo")
    with pytest.raises(ImportError, match="env.imports: cannot import module 'missing_mod_xyz'"):
        make_env("arithmetic", imports=["missing_mod_xyz"])
    with pytest.raises(ValueError, match="env=custom needs env.target=module:Class"):
        make_env("custom")


def test_verifier_by_import_path_and_by_name(user_module, tmp_path):
    with pytest.raises(ValueError, match="unknown verifier 'starts_with_answer'"):
        get_verifier("starts_with_answer")  # its module is not imported yet
    assert get_verifier(f"{user_module}:starts_with_answer")("42 is it", "42") == 1.0
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "q", "answer": "7"}) + "\n" + json.dumps({"prompt": "r", "answer": "8"}))
    env = make_env("dataset", path=str(data), verifier="starts_with_answer", imports=[user_module], eval_fraction=0.0)
    assert isinstance(env, DatasetEnv) and env.verify("7 apples", Task("t", "q", "7")) == 1.0
    with pytest.raises(TypeError, match=r"env.verifier='.*:one_arg' does not implement Verifier \(fn\(response: str, "
                                        r"answer: str\) -> float\): it cannot be called as \(response, answer\)"):
        get_verifier(f"{user_module}:one_arg")


def test_register_refuses_builtin_and_clashing_names(user_module):
    with pytest.raises(ValueError, match="'arithmetic' is a built-in env"):
        plugins.register_env("arithmetic")
    with pytest.raises(ValueError, match="'exact' is a built-in verifier"):
        plugins.register_verifier("exact")
    plugins.register_env("dup")(lambda: None)
    with pytest.raises(ValueError, match="register_env\\('dup'\\): already registered by"):
        plugins.register_env("dup")(dict)


def test_readme_command_composes_and_builds_the_example_task(monkeypatch):
    """The README's `env=custom env.target=my_task:ReverseTask` with PYTHONPATH=examples/custom_task."""
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["+experiment=quickstart", "env=custom",
                                                       "env.target=my_task:ReverseTask", "+env.args.length=4"])
    env = make_env(**OmegaConf.to_container(cfg.env))
    task = next(env.tasks("train", 0))
    assert len(task.answer) == 4 and task.answer == task.prompt[:-1][::-1]
    assert env.verify(task.answer, task) == 1.0 and env.verify(task.answer[:2], task) == 0.5
    assert type(make_env("reverse", imports=["my_task"])).__name__ == "ReverseTask"  # the decorator's name


def test_the_same_file_imported_under_two_names_registers_once(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    monkeypatch.setattr(plugins, "USER_ENVS", {})
    monkeypatch.setattr("relaxrl.envs.registry.USER_ENVS", plugins.USER_ENVS)
    for name in ("my_task", "examples.custom_task.my_task"):  # PYTHONPATH=examples/custom_task, or the repo root
        sys.modules.pop(name, None)
        assert type(make_env("reverse", imports=[name])).__name__ == "ReverseTask"
    with pytest.raises(ValueError, match=r"register_env\('reverse'\): already registered by .*my_task.ReverseTask"):
        plugins.register_env("reverse")(type("ReverseTask", (), {}))


def test_a_multi_turn_env_by_import_path_fits_its_protocol():
    env = make_env("custom", target="relaxrl.envs.guess:GuessEnv", args={"high": 7})
    assert env.reset(0) and env.max_turns == 5 and env.expert_action()


def test_the_example_multi_turn_env_runs_dagger_by_import_path(monkeypatch, model_cache):
    """examples/custom_task/my_game.py through the DAgger loop in one process (the Serve run's pieces)."""
    from relaxrl.algorithms.dagger import DAggerConfig
    from relaxrl.episodic.local import LocalEpisodes
    from relaxrl.models.loading import prepare_tiny_model_dir

    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    env_cfg = {"name": "custom", "target": "my_game:Parity"}
    game = make_env(**env_cfg)
    game.reset(0)
    while not (result := game.step(game.expert_action())).done:
        pass
    assert result.reward == 1.0 and result.info["success"]
    model_dir = prepare_tiny_model_dir(cache_dir=model_cache, model_kwargs={"seed": 0}, warm_start_pairs_fn=None,
                                       warm_start={}, key_extra={"purpose": "plugin_test"})
    cfg = DAggerConfig(episodes_per_iter=4, steps_per_iter=1, batch_size=8, eval_episodes=2, beta_decay_iters=1)
    out = LocalEpisodes(model_dir, env_cfg, cfg, lr=1e-3, seed=0).run(total_steps=2)
    assert out.steps == 2 and out.labels > 0 and out.episodes > 0
