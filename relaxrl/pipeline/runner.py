"""Run a stage pipeline: each stage is one ordinary run, started from an earlier stage's checkpoint.

    base model ─▶ stage 1 (e.g. GRPO on domain A) ─▶ stage 2 (GRPO on B) ─▶ stage 3 (MOPD over A, B)
                    │ best checkpoint of A ──┐          │ best of B ──┐        ▲ teacher.domains
                    └────────────────────────┴──▶ registry.json ──────┴────────┘

``<run_dir>/pipeline_state.json`` records every completed stage (its final and best checkpoints), so
``pipeline.resume=true`` skips completed stages and ``pipeline.start_at=NAME`` reruns from a stage.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from relaxrl.launch import plain
from relaxrl.pipeline.registry import CheckpointRegistry
from relaxrl.pipeline.stage_eval import StageEval, export_model_dir, stage_eval_env

log = logging.getLogger("relaxrl")
STATE_FILE = "pipeline_state.json"


class PipelineState:
    """Completed stages of one pipeline run directory, in a JSON file rewritten after each stage."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def complete(self, name: str, record: dict) -> None:
        self.data["stages"][name] = record
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=float)
        os.replace(tmp, self.path)


def validate_stages(stages: list) -> None:
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"pipeline stage names must be unique; repeated: {dupes}")
    for i, s in enumerate(stages):
        if s.init_from not in ("previous", "base") and s.init_from not in names[:i]:
            raise ValueError(f"stage {s.name!r}: init_from={s.init_from!r} must be 'previous', 'base' or an "
                             f"earlier stage; earlier: {names[:i]}")
        if s.init_select is not None and s.init_from == "base":
            raise ValueError(f"stage {s.name!r}: init_select needs init_from to name a stage, not 'base'")


def stages_to_run(stages: list, state: PipelineState, resume: bool, start_at: str | None) -> list[bool]:
    """For each stage, whether it runs (True) or is reused from ``state`` (False)."""
    names = [s.name for s in stages]
    if start_at is not None and start_at not in names:
        raise ValueError(f"pipeline.start_at={start_at!r} is not a stage; stages: {names}")
    first = names.index(start_at) if start_at is not None else None
    run = []
    for i, name in enumerate(names):
        done = name in state.stages()
        if first is not None:
            if i < first and not done:
                raise ValueError(f"pipeline.start_at={start_at!r} needs stage {name!r} completed in {state.path}")
            run.append(i >= first)
        else:
            run.append(not (resume and done))
    return run


def init_checkpoint(stage: DictConfig, index: int, stages: list, base_model: str, state: PipelineState) -> str:
    """The model directory a stage starts from."""
    source = stage.init_from
    if source == "base" or (source == "previous" and index == 0):
        return base_model
    name = stages[index - 1].name if source == "previous" else source
    record = state.stages()[name]
    if stage.init_select is None:
        return record["final"]
    best = record["best"].get(stage.init_select)
    if best is None:
        raise ValueError(f"stage {stage.name!r}: stage {name!r} recorded no best checkpoint for domain "
                         f"{stage.init_select!r}; it registered {sorted(record['best'])}")
    return best["path"]


def stage_config(cfg: DictConfig, stage: DictConfig, init: str, registry: CheckpointRegistry,
                 run_dir: str) -> DictConfig:
    """The config of one stage's run: the pipeline's config with the stage's choices applied."""
    from relaxrl.algorithms import make_algorithm
    from relaxrl.envs.registry import make_env

    c = copy.deepcopy(cfg)
    c.run_dir = os.path.join(run_dir, stage.name)
    c.pipeline.stages = []
    if "resume" in c:  # a stage never resumes a single-run checkpoint; the pipeline resumes by stage
        c.resume = None
    if stage.overrides is not None:
        c = OmegaConf.merge(c, stage.overrides)  # typed: a misspelled key is an error naming it
    if stage.algorithm is not None:
        c.algorithm = OmegaConf.structured(make_algorithm(plain(stage.algorithm)).config)
    if stage.env is not None:
        c.env = plain(stage.env)
    make_env(**plain(c.env))  # fails early on a bad env node
    if c.model.lora.enabled:
        raise ValueError("pipeline stages pass full checkpoints between stages; model.lora.enabled is not supported")
    c.model.source, c.model.path = "local", init
    if stage.steps is not None:
        c.trainer.steps = stage.steps
    c.trainer.save_final = True
    c.teacher.domains = registry.teachers(list(stage.teachers)) if stage.teachers else {}
    return c


def run_pipeline(cfg: DictConfig) -> dict:
    """Run ``cfg.pipeline.stages`` in order; returns a summary with ``final_score`` (last stage's mean)."""
    from relaxrl import launch
    from relaxrl.train import run_experiment

    p = cfg.pipeline
    stages = list(p.stages)
    validate_stages(stages)
    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(run_dir, "pipeline_config.yaml"), resolve=True)
    registry = CheckpointRegistry(p.registry or os.path.join(run_dir, "registry.json"))
    state = PipelineState(os.path.join(run_dir, STATE_FILE))
    plan = stages_to_run(stages, state, p.resume, p.start_at)
    launch.init_ray(cfg)
    base_model = launch.prepare_model_dir(cfg)  # warm-started on the run's env (e.g. every domain)
    for i, (stage, runs) in enumerate(zip(stages, plan)):
        if not runs:
            log.info("stage %s: completed earlier, reusing %s", stage.name, state.stages()[stage.name]["final"])
            continue
        forgotten = registry.forget_stage(stage.name)
        if forgotten:
            log.info("stage %s reruns: dropped its registry entries for %s", stage.name, forgotten)
        init = init_checkpoint(stage, i, stages, base_model, state)
        scfg = stage_config(cfg, stage, init, registry, run_dir)
        print(f"relaxrl pipeline: stage {i + 1}/{len(stages)} {stage.name} algorithm={scfg.algorithm.name} "
              f"steps={scfg.trainer.steps} init={init} teachers={dict(scfg.teacher.domains)}", flush=True)
        hook = StageEval(scfg, stage, registry, init, stage_eval_env(stage, scfg.env))
        try:
            summary = run_experiment(scfg, on_step=hook)
        finally:
            hook.close()
        final = export_model_dir(summary["checkpoint"], init)
        last = hook.history[-1]["domains"]
        state.complete(stage.name, {"final": final, "init": init, "best": hook.best, "eval": last,
                                    "steps": summary["steps"], "run_dir": scfg.run_dir})
        print(f"relaxrl pipeline: stage {stage.name} done: " +
              " ".join(f"{d}={m[stage.metric]:.3f}" for d, m in last.items()), flush=True)
    teachers = {d: e.score for d, e in registry.entries().items()}
    last_eval = state.stages()[stages[-1].name]["eval"]
    final_score = sum(m[stages[-1].metric] for m in last_eval.values()) / max(len(last_eval), 1)
    print(f"relaxrl pipeline: stages={','.join(s.name for s in stages)} registry={registry.path} "
          f"teachers={teachers} final={ {d: round(m[stages[-1].metric], 3) for d, m in last_eval.items()} }",
          flush=True)
    return {"registry": registry.path, "teachers": teachers, "stages": state.stages(), "final_score": final_score}
