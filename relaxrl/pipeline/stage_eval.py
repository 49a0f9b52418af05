"""Periodic evaluation during a stage, and recording the best checkpoint per domain.

``StageEval`` is the driver's step hook for one stage: at step 0, every ``eval_every`` steps and at
the last step it asks an ``Evaluator`` deployment (greedy, the eval split of the stage's eval env,
the newest published weights) for per-domain metrics, appends them to ``<stage>/eval.jsonl``, and
for each domain the stage registers, saves a checkpoint when the selection metric improves and
offers it to the checkpoint registry (which keeps it if it beats the domain's current teacher).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from omegaconf import DictConfig
from relaxrl.launch import Roles, plain
from relaxrl.pipeline.registry import CheckpointRegistry

log = logging.getLogger(__name__)


def export_model_dir(checkpoint: str, tokenizer_dir: str) -> str:
    """The checkpoint's HF model directory, made loadable on its own by adding the tokenizer."""
    from relaxrl.engines.torch_trainer import MODEL_DIR
    from relaxrl.models.loading import load_tokenizer

    model_dir = os.path.join(checkpoint, MODEL_DIR)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} has no full model in {MODEL_DIR}/ (LoRA checkpoints "
                                "cannot be stage inits or teachers yet)")
    load_tokenizer(tokenizer_dir).save_pretrained(model_dir)
    return model_dir


class StageEval:
    def __init__(self, cfg: DictConfig, stage: DictConfig, registry: CheckpointRegistry, model_dir: str,
                 eval_env: dict) -> None:
        self.cfg, self.stage, self.registry = cfg, stage, registry
        self.model_dir, self.eval_env = model_dir, eval_env
        self.steps = int(cfg.trainer.steps)
        self.every = int(stage.eval_every)
        self.path = os.path.join(cfg.run_dir, "eval.jsonl")
        self.best: dict[str, dict[str, Any]] = {}  # domain -> {"score", "step", "path"} within this stage
        self.history: list[dict] = []
        self._app: Optional[str] = None
        self._handle: Any = None

    def due(self, step: int) -> bool:
        return step == 0 or step == self.steps or (self.every > 0 and step % self.every == 0)

    def _evaluator(self, roles: Roles) -> Any:
        if self._handle is None:
            from relaxrl.services.evaluator import deploy_evaluator

            self._app, self._handle = deploy_evaluator(self.cfg, self.model_dir, self.eval_env, roles.run_id)
        return self._handle

    async def __call__(self, roles: Roles, step: int, metrics: dict) -> dict:
        if not self.due(step):
            return {}
        scores = await self._evaluator(roles).evaluate.remote(version=step)
        self.history.append({"step": step, "domains": scores})
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "domains": scores}) + "\n")
        metric = self.stage.metric
        for domain in self.stage.register:
            if domain not in scores:
                raise ValueError(f"stage {self.stage.name!r} registers domain {domain!r}, but its eval set has "
                                 f"only {sorted(scores)}")
            if metric not in scores[domain]:
                raise ValueError(f"unknown selection metric {metric!r}; valid: {sorted(scores[domain])}")
            score = scores[domain][metric]
            if domain in self.best and self.best[domain]["score"] >= score:
                continue
            ckpt = os.path.join(self.cfg.run_dir, "checkpoints", f"best_{domain}")
            await roles.actor.save_checkpoint.remote(ckpt)
            path = export_model_dir(ckpt, self.model_dir)
            self.best[domain] = {"score": score, "step": step, "path": path}
            if self.registry.offer(domain, path, score, metric=metric, stage=self.stage.name, step=step):
                log.info("stage %s step %d: teacher for %s is now %s (%s=%.3f)",
                         self.stage.name, step, domain, path, metric, score)
        return {f"eval/{d}/{k}": v for d, m in scores.items() for k, v in m.items() if k != "n"}

    def close(self) -> None:
        if self._app is not None:
            from relaxrl.services.evaluator import delete_evaluator

            delete_evaluator(self._app)
            self._app = self._handle = None


def stage_eval_env(stage: DictConfig, train_env: Any) -> dict:
    return plain(stage.eval_env) if stage.eval_env is not None else plain(train_env)
