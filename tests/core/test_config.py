"""Hydra config: typed schemas, shipped YAML, and errors that name what is wrong."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from relaxrl.algorithms import make_algorithm


def compose_cfg(*overrides):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(config_name="config", overrides=["run_dir=/tmp/x", *overrides])


def test_quickstart_composes_with_typed_groups():
    cfg = compose_cfg("+experiment=quickstart")
    assert cfg.rollout.max_staleness == 2 and cfg.algorithm.name == "grpo"
    assert cfg.env.name == "arithmetic" and cfg.model.source == "tiny"
    assert make_algorithm(cfg.algorithm).required_fields == ("response_ids", "behaviour_logprobs", "reward")


def test_misspelled_key_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("trainer.lrr=0.1")
    assert "lrr" in str(info.value.__cause__ or info.value)


def test_wrong_type_is_an_error():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_cfg("rollout.group_size=eight")
    assert "group_size" in str(info.value.__cause__ or info.value)


def test_unknown_group_option_is_an_error_naming_it():
    with pytest.raises(Exception) as info:
        compose_cfg("algorithm=grpoo")
    assert "grpoo" in str(info.value)


def test_algorithm_field_typo_is_an_error():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("algorithm.clip_hihg=0.3")
    assert "clip_hihg" in str(info.value.__cause__ or info.value)


def test_invalid_algorithm_value_is_named():
    cfg = compose_cfg("algorithm.off_policy=sometimes")
    with pytest.raises(ValueError, match="off_policy"):
        make_algorithm(cfg.algorithm)


def test_env_schema_checked():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("env.max_operandd=5")
    assert "max_operandd" in str(info.value.__cause__ or info.value)
    cfg = compose_cfg("env=dataset", "env.path=/data/x.jsonl")
    assert cfg.env.verifier == "exact"


def test_cli_typo_exits_nonzero_and_names_the_key():
    proc = subprocess.run(
        [sys.executable, "-m", "relaxrl.train", "+experiment=quickstart", "trainer.lrr=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr + proc.stdout


def test_every_shipped_experiment_composes():
    from importlib.resources import files

    names = [p.name[:-5] for p in (files("relaxrl.conf") / "experiment").iterdir() if p.name.endswith(".yaml")]
    assert "quickstart" in names
    for name in names:
        assert compose_cfg(f"+experiment={name}").trainer.steps > 0


def test_trainer_cpus_are_reserved_only_when_generation_overlaps_training():
    from relaxrl.launch import reserved_cpus

    assert reserved_cpus(compose_cfg("+experiment=quickstart", "trainer.cpus=[0]")) == [0]  # max_staleness=2
    assert reserved_cpus(compose_cfg("+experiment=quickstart", "trainer.cpus=[0]", "rollout.max_staleness=0")) == []
    assert reserved_cpus(compose_cfg("+experiment=quickstart")) == []


# --- Checks before any role starts (model directory, tokenizer, chat template, dataset) ---

@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    """A tiny model saved as a base model is: config, weights and tokenizer, but no chat template."""
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    d = tmp_path_factory.mktemp("bare-model")
    tok = build_tokenizer()
    build_tiny_model(tok).save_pretrained(d)
    tok.chat_template = None
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    return path


def _local(model_dir, data_file, *overrides):
    return compose_cfg("model=local", f"model.path={model_dir}", "env=dataset", f"env.path={data_file}", *overrides)


def test_model_dir_without_chat_template_needs_a_prompt_template(bare_model_dir, data_file):
    from relaxrl.config_check import check_model_dir

    with pytest.raises(ValueError, match=r"the tokenizer has no chat template; set env.prompt_template \(e.g. "):
        check_model_dir(_local(bare_model_dir, data_file))
    check_model_dir(_local(bare_model_dir, data_file, 'env.prompt_template="Q: {prompt} A:"'))  # accepted
    with pytest.raises(ValueError, match=r"env.prompt_template must contain '\{prompt\}'"):
        check_model_dir(_local(bare_model_dir, data_file, 'env.prompt_template="Q: {question}"'))
    with pytest.raises(ValueError, match="multi-turn episodes are rendered as chats"):
        check_model_dir(_local(bare_model_dir, data_file, 'env.prompt_template="Q: {prompt}"'), multi_turn=True)


def test_missing_model_dir_config_or_tokenizer_is_named(tmp_path, data_file):
    from relaxrl.config_check import check_model_dir

    with pytest.raises(FileNotFoundError, match="model.path='.*/nowhere' is not a directory"):
        check_model_dir(_local(tmp_path / "nowhere", data_file))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_dir(_local(tmp_path, data_file))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer \(none of \['tokenizer.json'"):
        check_model_dir(_local(tmp_path, data_file))
    with pytest.raises(ValueError, match="model=local needs model.path=DIR"):
        check_model_dir(compose_cfg("model=local"))


def test_dataset_file_and_fields_fail_before_any_role(bare_model_dir, data_file, tmp_path):
    from relaxrl.train import run_experiment

    template = 'env.prompt_template="Q: {prompt}"'
    with pytest.raises(FileNotFoundError, match=r"dataset file '.*missing.jsonl' does not exist \(env.path"):
        run_experiment(_local(bare_model_dir, tmp_path / "missing.jsonl", template))
    with pytest.raises(ValueError, match=r"field 'question' not in dataset .* \(set env.prompt_field"):
        run_experiment(_local(bare_model_dir, data_file, template, "env.prompt_field=question"))


def test_cli_refuses_a_base_model_without_prompt_template_before_ray(bare_model_dir, data_file, tmp_path):
    import resource
    import time

    start, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "relaxrl.train", "model=local", f"model.path={bare_model_dir}", "env=dataset",
         f"env.path={data_file}", f"run_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    wall, cpu1 = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("no chat template; set env.prompt_template") == 1, out[-3000:]
    assert "starting Ray" not in out  # refused before Ray (and every role) started
    print(f"refused in {wall:.1f} s wall, {cpu:.1f} s CPU")  # wall = CPU on an idle machine


def test_rollout_partial_mode_is_checked_before_any_role_starts():
    from relaxrl.config_check import check_rollout

    check_rollout(compose_cfg("+experiment=quickstart", "rollout.partial=abort"))
    assert compose_cfg("+experiment=quickstart").rollout.partial == "continue"
    with pytest.raises(ValueError, match=r"rollout.partial='drop': expected one of \('continue', 'abort'\)"):
        check_rollout(compose_cfg("+experiment=quickstart", "rollout.partial=drop"))
