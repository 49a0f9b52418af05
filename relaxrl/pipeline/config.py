"""Typed config of a stage pipeline (``pipeline.stages``); registered with the root ``Config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class StageConfig:
    name: str = MISSING  # unique; the stage's run directory is <run_dir>/<name>
    algorithm: Any = None  # algorithm node, e.g. {name: mopd, is_low: 0.5}; None: the run's algorithm
    env: Any = None  # training env node, e.g. {name: arithmetic, ops: ["+"], domain: add}; None: the run's env
    eval_env: Any = None  # env whose eval split is scored per domain; None: this stage's env
    steps: Optional[int] = None  # optimizer steps; None: trainer.steps
    eval_every: int = 0  # steps between evaluations (always at step 0 and the last step)
    metric: str = "accuracy"  # selection metric per domain (higher is better): accuracy | response_len
    register: list[str] = field(default_factory=list)  # domains whose best checkpoint this stage records
    teachers: list[str] = field(default_factory=list)  # domains whose registered teacher this stage serves
    init_from: str = "previous"  # previous | base | <earlier stage name>
    init_select: Optional[str] = None  # None: that stage's final checkpoint; <domain>: its best for domain
    overrides: Any = None  # nested values merged into the run's config, e.g. {trainer: {lr: 1e-3}}


@dataclass
class PipelineConfig:
    stages: list[StageConfig] = field(default_factory=list)
    registry: Optional[str] = None  # checkpoint registry JSON; None: <run_dir>/registry.json
    resume: bool = False  # skip the stages already completed in run_dir (pipeline_state.json)
    start_at: Optional[str] = None  # rerun from this stage on; the earlier ones must be complete
