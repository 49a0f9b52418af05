"""Stage planning without Ray: validation, resume plans, init checkpoints and per-stage configs."""

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from relaxrl.pipeline.config import StageConfig
from relaxrl.pipeline.registry import CheckpointRegistry
from relaxrl.pipeline.runner import PipelineState, init_checkpoint, stage_config, stages_to_run, validate_stages


def stages(*specs):
    return [OmegaConf.structured(StageConfig(**s)) for s in specs]


def toy_cfg(tmp_path, *overrides):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(config_name="config", overrides=["+experiment=mopd_toy", f"run_dir={tmp_path}", *overrides])


def test_validation_names_the_bad_stage():
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        validate_stages(stages({"name": "a"}, {"name": "a"}))
    with pytest.raises(ValueError, match="init_from='c'"):
        validate_stages(stages({"name": "a"}, {"name": "b", "init_from": "c"}))


def test_resume_skips_completed_stages_and_start_at_reruns_from_a_stage(tmp_path):
    ss = stages({"name": "a"}, {"name": "b"}, {"name": "c"})
    state = PipelineState(str(tmp_path / "state.json"))
    assert stages_to_run(ss, state, resume=True, start_at=None) == [True, True, True]
    state.complete("a", {"final": "/a", "best": {}})
    state.complete("b", {"final": "/b", "best": {"add": {"path": "/b/add", "score": 0.5, "step": 3}}})
    state = PipelineState(str(tmp_path / "state.json"))  # read back
    assert stages_to_run(ss, state, resume=True, start_at=None) == [False, False, True]
    assert stages_to_run(ss, state, resume=False, start_at=None) == [True, True, True]
    assert stages_to_run(ss, state, resume=False, start_at="b") == [False, True, True]
    with pytest.raises(ValueError, match="needs stage 'a' completed"):
        stages_to_run(ss, PipelineState(str(tmp_path / "none.json")), resume=False, start_at="c")
    with pytest.raises(ValueError, match="not a stage"):
        stages_to_run(ss, state, resume=False, start_at="z")
    # Where each stage starts: base, previous final, a named stage's best for a domain.
    c = stages({"name": "a"}, {"name": "b"}, {"name": "c", "init_from": "b", "init_select": "add"})
    assert init_checkpoint(c[0], 0, c, "/base", state) == "/base"
    assert init_checkpoint(c[1], 1, c, "/base", state) == "/a"
    assert init_checkpoint(c[2], 2, c, "/base", state) == "/b/add"


def test_stage_config_applies_the_stage_and_serves_registered_teachers(tmp_path):
    cfg = toy_cfg(tmp_path)
    reg = CheckpointRegistry(str(tmp_path / "registry.json"))
    reg.offer("add", "/ck/add", 0.8, metric="accuracy", stage="grpo_add", step=10)
    first, mopd = cfg.pipeline.stages[0], cfg.pipeline.stages[2]
    with pytest.raises(KeyError, match="sub"):
        stage_config(cfg, mopd, "/init", reg, str(tmp_path))
    reg.offer("sub", "/ck/sub", 0.7, metric="accuracy", stage="grpo_sub", step=10)
    s = stage_config(cfg, mopd, "/init", reg, str(tmp_path))
    assert s.algorithm.name == "mopd" and s.algorithm.is_low == 0.5 and s.algorithm.is_high == 2.0
    assert dict(s.teacher.domains) == {"add": "/ck/add", "sub": "/ck/sub"}
    assert (s.model.source, s.model.path, s.trainer.steps) == ("local", "/init", mopd.steps)
    assert s.env.name == "mixture" and s.run_dir == str(tmp_path / "mopd")
    g = stage_config(cfg, first, "/init", reg, str(tmp_path))
    assert g.algorithm.name == "grpo" and g.env.domain == "add" and dict(g.teacher.domains) == {}


def test_stage_overrides_are_typed(tmp_path):
    cfg = toy_cfg(tmp_path, "+pipeline.stages.0.overrides={trainer: {lr: 0.01}}")
    reg = CheckpointRegistry(str(tmp_path / "registry.json"))
    assert stage_config(cfg, cfg.pipeline.stages[0], "/i", reg, str(tmp_path)).trainer.lr == 0.01
    bad = toy_cfg(tmp_path, "+pipeline.stages.0.overrides={trainer: {lrr: 0.01}}")
    with pytest.raises(Exception, match="lrr"):
        stage_config(bad, bad.pipeline.stages[0], "/i", reg, str(tmp_path))
