"""A DAgger run on Serve: episode-rollout, actor (and teacher) deployments driven by the loop.

    collect  → EpisodeRollout.episodes (concurrent episodes, env steps in threads, batched actions)
    train    → Actor.train_step (one optimizer step; publishes weights the rollout picks up)
    evaluate → EpisodeRollout.episodes on held-out seeds, the student alone

The staleness queue is not used: DAgger's aggregated label buffer is its data store (labels are
the teacher's tokens, valid for any student version), and collection alternates with training.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import ray
from omegaconf import DictConfig, OmegaConf
from ray import serve

from relaxrl import launch
from relaxrl.sample import Packed
from relaxrl.weights import WeightStore, store_name

log = logging.getLogger(__name__)
REQUEST_CHUNK = 8  # seeds per episode request: several requests let Serve spread them over replicas


class EpisodicRoles:
    def __init__(self, cfg: DictConfig, model_dir: str, algorithm: Any) -> None:
        from relaxrl.services.actor import Actor
        from relaxrl.services.episode_rollout import EpisodeRollout
        from relaxrl.services.teacher import Teacher

        self.run_id = uuid.uuid4().hex[:8]
        ns, r, tr, t = cfg.ray.namespace, cfg.rollout, cfg.trainer, cfg.teacher
        algorithm_cfg = algorithm.config
        self.store = ray.remote(WeightStore).options(name=store_name(self.run_id), namespace=ns, num_cpus=0).remote()
        apps = {}
        teacher_app = None
        if algorithm_cfg.teacher == "checkpoint":
            apps["teacher"] = Teacher.options(
                num_replicas=t.num_replicas, ray_actor_options={"num_cpus": t.num_cpus, "num_gpus": t.num_gpus}
            ).bind({"teacher": algorithm_cfg.teacher_checkpoint}, temperature=r.temperature, dtype=cfg.model.dtype,
                   torch_threads=t.torch_threads)
            teacher_app = f"teacher-{self.run_id}"
        apps["episodes"] = EpisodeRollout.options(
            num_replicas=r.num_replicas, ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
        ).bind(
            model_dir, env=launch.plain(cfg.env), sampling={"temperature": r.temperature, "top_p": r.top_p},
            teacher=algorithm_cfg.teacher, teacher_app=teacher_app, dtype=cfg.model.dtype,
            torch_threads=r.torch_threads, store_name=store_name(self.run_id), namespace=ns, seed=cfg.seed,
        )
        apps["actor"] = Actor.options(
            num_replicas=1, ray_actor_options={"num_cpus": tr.num_cpus, "num_gpus": tr.num_gpus}
        ).bind(
            model_dir, algorithm=launch.plain(cfg.algorithm), trainer=launch.plain(tr), lora=None,
            # The trainer's log-prob temperature is the loss's (T=1 for the CE on labels), not the rollout's.
            dtype=cfg.model.dtype, temperature=algorithm.logprob_temperature(r.temperature), seed=cfg.seed,
            store_name=store_name(self.run_id), namespace=ns,
        )
        self.names = [f"{n}-{self.run_id}" for n in apps]
        handles = serve.run_many(
            [serve.RunTarget(target=app, name=f"{n}-{self.run_id}", route_prefix=None) for n, app in apps.items()]
        )
        h = dict(zip(apps, handles))
        self.episodes, self.actor = h["episodes"], h["actor"]

    def shutdown(self) -> None:
        for name in self.names:
            try:
                serve.delete(name, _blocking=False)
            except Exception as e:  # best effort: Serve may already be gone
                log.warning("could not delete Serve app %s: %s", name, e)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(self.names) & set(serve.status().applications):
            time.sleep(0.2)
        ray.kill(self.store)


async def _episodes(roles: EpisodicRoles, seeds, prefix: str, **kwargs) -> list:
    from relaxrl.services.episode_rollout import EpisodeRequest

    chunks = [list(seeds[i:i + REQUEST_CHUNK]) for i in range(0, len(seeds), REQUEST_CHUNK)]
    parts = await asyncio.gather(*(
        roles.episodes.episodes.remote(EpisodeRequest(seeds=c, prefix=f"{prefix}.{k}", **kwargs))
        for k, c in enumerate(chunks)
    ))
    return [e for p in parts for e in p]


def await_stats(roles: EpisodicRoles) -> dict:
    return roles.episodes.stats.remote().result()


def run_episodic_experiment(cfg: DictConfig) -> dict:
    """DAgger (or its BC / outcome-only baselines) on Serve; returns the summary."""
    from relaxrl.algorithms import make_algorithm
    from relaxrl.episodic.loop import dagger_loop
    from relaxrl.models.loading import load_tokenizer
    from relaxrl.monitor import Monitor

    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(run_dir, "resolved_config.yaml"), resolve=True)
    algorithm = make_algorithm(launch.plain(cfg.algorithm))
    acfg = algorithm.config
    algorithm.logprob_temperature(cfg.rollout.temperature)  # a temperature it cannot train at fails before Ray
    launch.init_ray(cfg)
    model_dir = launch.prepare_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    roles = EpisodicRoles(cfg, model_dir, algorithm)
    monitor = Monitor(cfg, run_dir, cfg.trainer.steps)
    summary = None
    t0 = time.time()

    async def collect(seeds, beta, prefix):
        return await _episodes(roles, seeds, beta=beta, prefix=prefix, group_size=acfg.group_size,
                               with_teacher=acfg.teacher != "none")

    async def train(samples):
        return await roles.actor.train_step.remote([ray.put(Packed(samples))])  # pickled by column, as the roles send

    async def evaluate(seeds):
        out = {}
        for key, temp in (("success", None), ("success_greedy", 0.0)):
            eps = await _episodes(roles, seeds, beta=0.0, prefix=f"eval-{key}", temperature=temp, with_teacher=False)
            out[key] = sum(e.success for e in eps) / len(eps)
        return out

    try:
        result = asyncio.run(dagger_loop(acfg, total_steps=cfg.trainer.steps, collect=collect, train=train,
                                         evaluate=evaluate, tokenizer=tokenizer, seed=cfg.seed,
                                         on_step=monitor.log))
        final = result.final
        stats = await_stats(roles)
        summary = {
            "steps": result.steps, "wall_s": time.time() - t0, "labels": result.labels,
            "labels_dropped": result.labels_dropped, "episodes": result.episodes, "evicted": result.evicted,
            "success": final.get("success"), "success_greedy": final.get("success_greedy"),
            "curve": result.curve, "run_dir": run_dir, "untrainable_turns": result.untrainable_turns,
            "generate_calls": stats["generate_calls"], "student_actions": stats["student_actions"],
        }
    finally:
        try:
            monitor.close(summary)
        finally:
            roles.shutdown()
    print(
        f"relaxrl dagger: steps={summary['steps']} labels={summary['labels']} episodes={summary['episodes']} "
        f"heldout_success={summary['success']:.3f} heldout_success_greedy={summary['success_greedy']:.3f} "
        f"wall_s={summary['wall_s']:.1f}", flush=True,
    )
    return summary
