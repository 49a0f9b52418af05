"""The DAgger loop in one process: generation and trainer engines, no Ray (bench, fast tests).

The same episodes, samples and DAgger loss as a run through the driver; the rollout engine gets the trainer's
weights after every step through the same export/load path that Serve uses.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Sequence

from relaxrl.algorithms.dagger import DAgger, DAggerConfig
from relaxrl.engines.base import SamplingParams
from relaxrl.engines.batched_policy import BatchedPolicy
from relaxrl.envs.episodes import Episode, ExpertTeacher, ModelTeacher, run_episodes
from relaxrl.envs.registry import make_env
from relaxrl.episodic.loop import LoopResult, dagger_loop
from relaxrl.sample import Sample, collate

log = logging.getLogger(__name__)


class LocalEpisodes:
    """Collect, train and evaluate in-process."""

    def __init__(self, model_dir: str, env: dict, cfg: DAggerConfig, *, lr: float, micro_batch_size: int = 64,
                 temperature: float = 1.0, seed: int = 0, max_grad_norm: float = 1.0) -> None:
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.engines.torch_trainer import TorchTrainerEngine
        from relaxrl.models.loading import load_tokenizer

        self.cfg, self.env_cfg, self.seed = cfg, dict(env), seed
        self.tokenizer = load_tokenizer(model_dir)
        self.generator = HFGenerationEngine.from_pretrained(model_dir)
        self.algorithm = DAgger(cfg)
        # The student samples at ``temperature``; the trainer scores at the loss's (T=1 for the CE on labels).
        self.trainer = TorchTrainerEngine.from_pretrained(
            model_dir, lr=lr, micro_batch_size=micro_batch_size,
            temperature=self.algorithm.logprob_temperature(temperature), seed=seed, max_grad_norm=max_grad_norm)
        self.temperature = temperature
        self.teacher: Any = None
        if cfg.teacher == "expert":
            self.teacher = ExpertTeacher()
        elif cfg.teacher == "checkpoint":
            teacher_engine = HFGenerationEngine.from_pretrained(cfg.teacher_checkpoint)
            self.teacher = ModelTeacher(BatchedPolicy(teacher_engine, SamplingParams(temperature=0.0)),
                                        self.tokenizer)
        self._calls = 0

    def _student(self, temperature: float) -> BatchedPolicy:
        if self.generator.version != self.trainer.version:  # weights move only between collections
            self.generator.load_weights(self.trainer.export_weights())
        self._calls += 1
        return BatchedPolicy(self.generator, SamplingParams(temperature=temperature,
                                                            seed=self.seed * 7919 + self._calls))

    async def collect(self, seeds: Sequence[int], beta: float, prefix: str) -> list[Episode]:
        return await run_episodes(lambda: make_env(**self.env_cfg), seeds, group_size=self.cfg.group_size,
                                  prefix=prefix, tokenizer=self.tokenizer, student=self._student(self.temperature),
                                  teacher=self.teacher, beta=beta)

    async def train(self, samples: list[Sample]) -> dict:
        batch = self.algorithm.prepare(collate(samples, self.tokenizer.pad_token_id))
        return self.trainer.train_step(batch, self.algorithm.loss)

    async def evaluate(self, seeds: Sequence[int]) -> dict:
        """Held-out success of the student alone: sampled as in rollouts, and greedy."""
        out = {}
        for key, temp in (("success", self.temperature), ("success_greedy", 0.0)):
            eps = await run_episodes(lambda: make_env(**self.env_cfg), seeds, prefix=f"eval-{key}",
                                     tokenizer=self.tokenizer, student=self._student(temp), teacher=None, beta=0.0)
            out[key] = sum(e.success for e in eps) / len(eps)
            out[f"{key}_turns"] = sum(len(e.turns) for e in eps) / len(eps)
        return out

    def run(self, total_steps: int, on_step: Optional[Any] = None) -> LoopResult:
        return asyncio.run(dagger_loop(self.cfg, total_steps=total_steps, collect=self.collect, train=self.train,
                                       evaluate=self.evaluate, tokenizer=self.tokenizer, seed=self.seed,
                                       on_step=on_step))
