"""Evaluator role: greedy accuracy per domain on an env's eval split, with the newest published weights."""

from __future__ import annotations

import asyncio
from typing import Optional

from ray import serve

from relaxrl.services.common import WeightFollower, quiet_replica_logs, set_threads


@serve.deployment(max_ongoing_requests=4)
class Evaluator:
    def __init__(self, model_dir: str, env: dict, *, seed: int = 0, max_new_tokens: int = 8,
                 dtype: str = "float32", torch_threads: int = 1, store_name: Optional[str] = None,
                 namespace: str = "relaxrl") -> None:
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.envs.registry import make_env
        from relaxrl.models.chat import render_prompt_ids

        quiet_replica_logs()
        set_threads(torch_threads)
        self.engine = HFGenerationEngine.from_pretrained(model_dir, dtype=dtype, torch_threads=torch_threads)
        self.weights = WeightFollower(self.engine, store_name, namespace)
        self.env = make_env(**env)
        self.tasks = list(self.env.tasks("eval", seed))
        self.prompt_ids = lambda text: render_prompt_ids(self.engine.tokenizer, text)
        self.max_new_tokens = max_new_tokens

    async def evaluate(self, version: Optional[int] = None) -> dict:
        """Per-domain metrics of the newest weights, which must be ``version`` when given."""
        from relaxrl.evaluation import evaluate_tasks

        await self.weights.sync()
        if version is not None and self.engine.version != version:
            raise RuntimeError(f"evaluator holds weights v{self.engine.version}, asked to evaluate v{version}")
        return await asyncio.to_thread(evaluate_tasks, self.engine, self.env, self.tasks, self.prompt_ids,
                                       max_new_tokens=self.max_new_tokens)
