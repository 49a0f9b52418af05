"""Evaluator role: scores an env's eval split with the newest published weights.

Pipeline stages ask it for greedy accuracy per domain (``evaluate``); a single run with
``trainer.eval_every`` asks for its held-out metrics, greedy and sampled (``evaluate_heldout``),
through ``HeldoutEval``, the driver's step hook for it. The evaluator only reads the weight store:
it generates with its own engine and never touches the queue, so it cannot change what is trained."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.services.common import WeightFollower, keep_off_cpus, quiet_replica_logs, set_threads

log = logging.getLogger(__name__)


@serve.deployment(max_ongoing_requests=4)
class Evaluator:
    def __init__(self, model_dir: str, env: dict, *, seed: int = 0, max_new_tokens: int = 8,
                 dtype: str = "float32", torch_threads: int = 1, store_name: Optional[str] = None,
                 namespace: str = "relaxrl", lora: Optional[dict] = None, prompt_template: Optional[str] = None,
                 max_tasks: int = 0, avoid_cpus: Sequence[int] = ()) -> None:
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.envs.registry import make_env
        from relaxrl.models.chat import render_prompt_ids
        from relaxrl.models.lora import LoraConfig

        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)  # the trainer's CPUs (trainer.cpus)
        set_threads(torch_threads)
        # LoRA on: the trainer publishes the adapter only, which this engine applies to its base.
        self.engine = HFGenerationEngine.from_pretrained(model_dir, lora=LoraConfig(**lora) if lora else None,
                                                         dtype=dtype, torch_threads=torch_threads)
        self.weights = WeightFollower(self.engine, store_name, namespace)
        self.env = make_env(**env)
        self.tasks = list(itertools.islice(self.env.tasks("eval", seed), max_tasks or None))  # 0: the whole split
        # The prompt the policy is trained on: env.prompt_template when set, else the chat template.
        self.prompt_ids = lambda text: render_prompt_ids(self.engine.tokenizer, text, prompt_template)
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    async def _weights_at(self, version: Optional[int]) -> None:
        """Load the newest published weights, which must be ``version`` when given."""
        await self.weights.sync()
        if version is not None and self.engine.version > version:
            # The trainer was restored in this run from an earlier checkpoint and published that
            # version again (driver.restore_lost_trainer): follow it back to what it trains now.
            self.engine.version = -1
            await self.weights.sync()
        if version is not None and self.engine.version != version:
            raise RuntimeError(f"evaluator holds weights v{self.engine.version}, asked to evaluate v{version}")

    async def evaluate(self, version: Optional[int] = None) -> dict:
        """Greedy per-domain metrics of the newest weights, which must be ``version`` when given."""
        from relaxrl.evaluation import evaluate_tasks

        await self._weights_at(version)
        return await asyncio.to_thread(evaluate_tasks, self.engine, self.env, self.tasks, self.prompt_ids,
                                       max_new_tokens=self.max_new_tokens)

    async def evaluate_heldout(self, version: Optional[int], temperature: float, top_p: float = 1.0) -> dict:
        """``eval/*`` metrics (``relaxrl.evaluation.heldout_metrics``) of weights ``version``: one greedy
        and one sampled response per task, sampled at ``temperature`` (rollout.temperature) with the
        run's seed, so successive evaluations differ by their weights only."""
        from relaxrl.evaluation import evaluate_tasks, heldout_metrics

        await self._weights_at(version)
        greedy = await asyncio.to_thread(evaluate_tasks, self.engine, self.env, self.tasks, self.prompt_ids,
                                         max_new_tokens=self.max_new_tokens)
        sampled = greedy if temperature <= 0 else await asyncio.to_thread(
            evaluate_tasks, self.engine, self.env, self.tasks, self.prompt_ids, max_new_tokens=self.max_new_tokens,
            temperature=temperature, top_p=top_p, seed=self.seed)
        return heldout_metrics(greedy, sampled)


class HeldoutEval:
    """The step hook (``driver.StepHook``) of ``trainer.eval_every``: at step 0, every ``every`` steps
    and at the last, the evaluator scores the weights the trainer has just published; the metrics
    go into that step's line of metrics.jsonl (and W&B, and the progress bar) like training metrics.
    The driver logs no step 0 line, so step 0's evaluation is logged here."""

    def __init__(self, evaluator: Any, monitor: Any, *, every: int, last_step: int, temperature: float,
                 top_p: float = 1.0) -> None:
        self.evaluator, self.monitor = evaluator, monitor
        self.every, self.last_step = every, last_step
        self.temperature, self.top_p = temperature, top_p
        self.history: list[dict] = []  # {"step", **metrics} of every evaluation in this run

    def due(self, step: int) -> bool:
        from relaxrl.evaluation import eval_due

        return eval_due(step, self.every, self.last_step)

    async def __call__(self, roles: Any, step: int, metrics: dict) -> dict:
        if not self.due(step):
            return {}
        version = int(metrics.get("version", step))  # one weight version per step
        out = await self.evaluator.evaluate_heldout.remote(version, self.temperature, self.top_p)
        self.history.append({"step": step, **out})
        if step == 0:
            self.monitor.log(0, out, advance=False)
        return out


def deploy_evaluator(cfg: Any, model_dir: str, env: dict, run_id: str, avoid_cpus: Sequence[int] = ()) -> tuple:
    """Start a run's evaluator (Serve app ``eval-<run_id>``); returns ``(app name, handle)``."""
    from relaxrl.config_check import prompt_template_of
    from relaxrl.faults import replica_options
    from relaxrl.launch import plain
    from relaxrl.weights import store_name

    tr = cfg.trainer
    name = f"eval-{run_id}"
    app = Evaluator.options(ray_actor_options={"num_cpus": 0.1, "num_gpus": tr.eval_num_gpus},
                            **replica_options(cfg.faults)).bind(
        model_dir, env, seed=cfg.seed, max_new_tokens=cfg.rollout.max_new_tokens, dtype=cfg.model.dtype,
        torch_threads=cfg.rollout.torch_threads, store_name=store_name(run_id), namespace=cfg.ray.namespace,
        lora=plain(cfg.model.lora) if cfg.model.lora.enabled else None, prompt_template=prompt_template_of(cfg),
        max_tasks=tr.eval_max_tasks, avoid_cpus=list(avoid_cpus),
    )
    return name, serve.run(app, name=name, route_prefix=None)


def delete_evaluator(name: str) -> None:
    try:
        serve.delete(name)
    except Exception as e:  # best effort, like the roles' teardown
        log.warning("could not delete Serve app %s: %s", name, e)
