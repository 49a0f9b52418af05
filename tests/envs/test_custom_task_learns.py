"""A user's task from outside the package, on a base model without a chat template, learns on Serve.

One short run covers two ways in: the env of examples/custom_task/ by import path (env=custom
env.target=...; the reward role imports it in its own process) and a model directory with no chat
template prompted through env.prompt_template. The "base model" is the tiny model fine-tuned a
little on the template's plain-text format, then saved without a chat template.
"""

import pytest

from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.models.warm_start import warm_start
from relaxrl.train import run_experiment
from tests.integration.helpers import make_cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TEMPLATE = "Q: {prompt}"
# Ray's workers get the driver's working directory (the repo root) on sys.path, so the example is
# importable there by its package path; from the README it is `PYTHONPATH=examples/custom_task`
# and env.target=my_task:ReverseTask.
TARGET = "examples.custom_task.my_task:ReverseTask"


def _base_model_dir(path):
    from examples.custom_task.my_task import ReverseTask

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0)
    tok.chat_template = "Q: {{ messages[0]['content'] }}"  # TEMPLATE, for the warm start only
    warm_start(model, tok, ReverseTask().sft_pairs(20 * 32, seed=0), steps=20, lr=3e-3, batch_size=32, seed=0)
    model.save_pretrained(path)
    tok.chat_template = None  # saved as a base model: no chat template
    tok.save_pretrained(path)
    assert not (path / "chat_template.jinja").exists()
    return path


def test_custom_task_on_a_base_model_learns(ray_local, tmp_path, model_cache):
    model_dir = _base_model_dir(tmp_path / "base-model")
    cfg = make_cfg(tmp_path / "run", model_cache, "env=custom", f"env.target={TARGET}", "model=local",
                   f"model.path={model_dir}", f'env.prompt_template="{TEMPLATE}"',
                   "rollout.max_new_tokens=4", "trainer.steps=80", "seed=0")
    assert cfg.env.prompt_template == TEMPLATE
    s = run_experiment(cfg)
    print(f"reward_first={s['reward_first']:.3f} reward_last={s['reward_last']:.3f}")
    assert s["steps"] == 80 and s["dropped"] == 0
    # Partial-credit reward; the warm-started model scores ~0.3 under sampling before RL.
    assert s["reward_last"] >= s["reward_first"] + 0.15
