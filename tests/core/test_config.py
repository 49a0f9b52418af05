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
