"""Engine selection and GPU placement from the config: Serve options per role (hand-computed),
clear errors for unknown or missing engines, and the examples/ cluster recipe's numbers."""

from __future__ import annotations

import importlib.util

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from relaxrl.engines.factory import check_sampling, make_generation_engine, make_trainer_engine
from relaxrl.services.placement import gpus_per_role, rollout_options, trainer_options


def compose_cfg(*overrides):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(config_name="config", overrides=["run_dir=/tmp/x", *overrides])


def test_defaults_keep_embedded_engines_and_plain_options():
    cfg = compose_cfg("+experiment=quickstart")
    assert cfg.rollout.engine == "hf" and cfg.trainer.engine == "torch" and cfg.trainer.num_ranks == 1
    assert rollout_options(cfg.rollout) == {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}}
    assert trainer_options(cfg.trainer) == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0}}


def test_tensor_parallel_rollout_and_multi_rank_trainer_get_placement_groups():
    cfg = compose_cfg(
        "+experiment=quickstart", "rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2",
        "rollout.num_gpus=1", "rollout.num_cpus=2", "rollout.num_replicas=2", "trainer.engine=deepspeed",
        "trainer.num_ranks=4", "trainer.num_gpus=1", "trainer.num_cpus=4", "trainer.deepspeed.zero_stage=2",
    )
    assert rollout_options(cfg.rollout) == {
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.0},
        "placement_group_bundles": [{"CPU": 2.0}, {"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}],
        "placement_group_strategy": "STRICT_PACK",
    }
    assert trainer_options(cfg.trainer) == {
        "ray_actor_options": {"num_cpus": 4.0, "num_gpus": 1.0},
        "placement_group_bundles": [{"CPU": 4.0, "GPU": 1.0}] * 4,
        "placement_group_strategy": "PACK",
    }
    assert gpus_per_role(cfg.rollout, cfg.trainer) == {"rollout": 4, "trainer": 4.0}


def test_cluster_recipe_uses_four_rollout_and_four_trainer_gpus():
    cfg = compose_cfg("+experiment=cluster_8gpu", "model.path=/models/x")
    assert cfg.rollout.engine == "vllm" and cfg.trainer.engine == "deepspeed"
    assert gpus_per_role(cfg.rollout, cfg.trainer) == {"rollout": 4.0, "trainer": 4.0}
    assert "placement_group_bundles" in trainer_options(cfg.trainer)
    assert cfg.weight_sync.method == "broadcast" and cfg.weight_sync.backend == "nccl"


def test_bad_engine_settings_are_errors_naming_them():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("rollout.vllm.tensor_paralel_size=2")
    assert "tensor_paralel_size" in str(info.value.__cause__ or info.value)
    with pytest.raises(ValueError, match="unknown rollout engine 'vlm'"):
        rollout_options(compose_cfg("rollout.engine=vlm").rollout)
    with pytest.raises(ValueError, match="needs trainer.engine=deepspeed"):
        trainer_options(compose_cfg("trainer.num_ranks=2").trainer)
    with pytest.raises(ValueError, match="whole GPU"):
        rollout_options(compose_cfg("rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2", "rollout.num_gpus=0.5").rollout)
    with pytest.raises(ValueError, match="rollout.top_p=0.9"):
        check_sampling("vllm", {"top_p": 0.9})
    check_sampling("hf", {"top_p": 0.9})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_missing_vllm_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="rollout.engine=vllm needs the 'vllm' package"):
        make_generation_engine("vllm", str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_missing_deepspeed_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="trainer.engine=deepspeed needs the 'deepspeed' package"):
        make_trainer_engine("deepspeed", str(tmp_path))
