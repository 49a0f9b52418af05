"""Entry point: ``python -m relaxrl.train +experiment=quickstart [key=value ...]``.

Hydra composes the typed config (relaxrl/config.py + relaxrl/conf/), then the run is:
Ray up → model directory → role deployments → driver loops → summary line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

import relaxrl.config  # noqa: F401  (registers the schemas with Hydra's ConfigStore)

log = logging.getLogger("relaxrl")


def summary_line(s: dict) -> str:
    return (
        f"relaxrl summary: steps={s['steps']} wall_s={s['wall_s']:.1f} reward_first={s['reward_first']:.3f} "
        f"reward_last={s['reward_last']:.3f} max_staleness_seen={s['max_staleness_seen']} dropped={s['dropped']}"
        f" trainer_restarts={s.get('trainer_restarts', 0)}"  # lost trainers restored in the run (driver.run)
        # Admitted and never trained nor dropped: in flight when the run ended (admission stops at
        # the run's total, so this is what a drop near the end let in, or a producer's last request).
        f" untrained={(s.get('accounting') or {}).get('in_flight_samples') or 0}"
        + (f" eval_greedy={s['eval/reward_greedy']:.3f} eval_sampled={s['eval/reward_sampled']:.3f}"
           if "eval/reward_greedy" in s else "")  # trainer.eval_every: the last held-out evaluation
    )


class StepHooks:
    """Several ``driver.StepHook``s as one (e.g. a pipeline stage's evaluation and the run's held-out
    one), called in order with their metrics merged; due at a step when any of them is."""

    def __init__(self, *hooks) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def due(self, step: int) -> bool:
        return any(getattr(h, "due", lambda _: True)(step) for h in self.hooks)

    async def __call__(self, roles, step: int, metrics: dict) -> dict:
        out: dict = {}
        for hook in self.hooks:
            out.update(await hook(roles, step, metrics))
        return out


def run_experiment(cfg: DictConfig, on_step=None) -> dict:
    """Run one experiment end to end and return its summary (``on_step``: see ``driver.StepHook``)."""
    from relaxrl.config import Config
    from relaxrl.config_check import (check_known_keys, check_model_dir, check_rollout, check_trainer,
                                      fill_from_rollout, prompt_template_of)
    from relaxrl.envs.registry import make_env
    from relaxrl.evaluation import check_heldout

    check_known_keys(cfg, Config)  # a key added with '+' that nothing reads is an error, not a no-op
    fill_from_rollout(cfg)  # algorithm.loss_agg_len=0: rollout.max_new_tokens (Dr.GRPO's constant)
    check_trainer(cfg)
    check_rollout(cfg)
    # What the roles could not load (model directory, tokenizer, chat template or env.prompt_template,
    # the env: its dataset file and fields, a user's env class) fails here, before the imports of Ray
    # and the engines below: in seconds, with one error, instead of minutes later in a replica's log.
    from relaxrl.envs.episodes import is_multi_turn

    env = make_env(**OmegaConf.to_container(cfg.env, resolve=True))
    multi_turn = is_multi_turn(env)
    check_multi_turn(cfg, multi_turn)
    from relaxrl.envs.agent import check_agent_config

    check_agent_config(cfg, multi_turn)  # agent.target: the OpenAI endpoint's settings, the agent importable
    check_model_dir(cfg, multi_turn=multi_turn)
    # trainer.eval_every: its eval split exists and the settings fit (multi-turn: held-out seeds)
    heldout = None if multi_turn else check_heldout(cfg, env)

    from relaxrl import checkpoint, launch
    from relaxrl.algorithms import make_algorithm
    from relaxrl.driver import run
    from relaxrl.models.chat import PromptEncoder
    from relaxrl.models.loading import load_tokenizer
    from relaxrl.monitor import Monitor, phase
    from relaxrl.services.common import check_cpus, keep_off_cpus, restore_cpus
    from relaxrl.services.evaluator import HeldoutEval, delete_evaluator, deploy_evaluator

    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    resume = checkpoint.resolve_resume(cfg.resume, run_dir)  # a missing checkpoint fails before Ray starts
    OmegaConf.save(cfg, os.path.join(run_dir, "resolved_config.yaml"), resolve=True)
    m = cfg.model
    checkpoint.write_run_info(run_dir, {"seed": cfg.seed, "model.tiny.seed": m.tiny.seed,
                                        "model.warm_start.seed": m.warm_start.seed}, resume)
    check_cpus(cfg.trainer.cpus)
    algorithm = make_algorithm(launch.plain(cfg.algorithm))  # validates the algorithm config early
    with phase("starting Ray" if cfg.ray.address is None else f"joining Ray at {cfg.ray.address}"):
        launch.init_ray(cfg)
    with phase("preparing the model directory"):
        model_dir = launch.prepare_model_dir(cfg)
    arch = checkpoint.arch(model_dir)
    if resume:  # a checkpoint of another architecture fails before any replica starts
        checkpoint.check_compatible(checkpoint.load_meta(resume), resume, arch, bool(m.lora.enabled),
                                    cfg.rollout.group_size)
    tokenizer = load_tokenizer(model_dir)
    context = arch.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", None)
    max_prompt_tokens = context - cfg.rollout.max_new_tokens if context and context < 10**8 else None
    build_request = None
    if multi_turn:  # a group = the episodes of one env seed, played by the episode rollout
        from relaxrl.envs.episodes import SeedTasks

        env, build_request, max_prompt_tokens = SeedTasks(env.name), episode_requests(cfg, algorithm), None
    log.info("model %s; run dir %s", model_dir, run_dir)
    with phase(f"starting the roles ({launch.describe_roles(cfg, tuple(algorithm.required_fields), multi_turn)}) "
               "and loading their models"):
        roles = launch.start_roles(cfg, model_dir, tuple(algorithm.required_fields), multi_turn)
    monitor = Monitor(cfg, run_dir, cfg.trainer.steps)
    summary = None
    eval_app, heldout_eval = None, None
    affinity = keep_off_cpus(launch.reserved_cpus(cfg))  # the driver too keeps off them, for this run
    try:
        if heldout is not None:
            with phase(f"starting the evaluator ({len(heldout)} held-out tasks, every {cfg.trainer.eval_every} "
                       "steps)"):
                eval_app, evaluator = deploy_evaluator(cfg, model_dir, launch.plain(cfg.env), roles.run_id,
                                                       launch.reserved_cpus(cfg))
            heldout_eval = HeldoutEval(evaluator, monitor, every=cfg.trainer.eval_every, last_step=cfg.trainer.steps,
                                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
            on_step = StepHooks(on_step, heldout_eval)
        episode_eval = episode_heldout(cfg, roles, monitor) if multi_turn else None
        if episode_eval is not None:
            on_step = StepHooks(on_step, episode_eval)
        encoder = PromptEncoder(tokenizer, template=prompt_template_of(cfg))  # env.prompt_template or the chat template
        result = asyncio.run(run(roles, cfg, env, encoder, monitor, resume=resume,
                                 max_prompt_tokens=max_prompt_tokens, on_step=on_step, build_request=build_request))
        summary = result.summary()
        summary["run_dir"] = run_dir
        summary["wandb_dir"] = monitor.wandb_dir
        if heldout_eval is not None and heldout_eval.history:  # the last held-out evaluation's eval/* metrics
            summary.update({k: v for k, v in heldout_eval.history[-1].items() if k != "step"})
        if multi_turn:
            summary.update(episode_summary(episode_eval, summary))
            summary.update(roles.rollout.stats.remote().result())
    finally:
        try:
            monitor.close(summary)
        finally:  # a logger failure must not leave the run's replicas holding the cluster
            restore_cpus(affinity)
            if eval_app is not None:
                delete_evaluator(eval_app)
            roles.shutdown()
    print(
        f"relaxrl overlap: gen_busy={summary['gen_busy_frac']:.3f} train_busy={summary['train_busy_frac']:.3f} "
        f"both_busy={summary['overlap_frac']:.3f} staleness_hist={summary['staleness_hist']} "
        f"dropped_by_reason={summary['dropped_by_reason']} "
        f"stage_ms_per_step={ {k: round(v * 1000, 1) for k, v in summary['stage_s_per_step'].items()} }"
    )
    print(summary_line(summary), flush=True)
    if multi_turn:
        print(episode_line(summary), flush=True)
    print(f"relaxrl: run directory {run_dir}" + (f"; final model {summary['checkpoint']}/model"
                                                  if summary.get("checkpoint") else ""), flush=True)
    return summary


def check_multi_turn(cfg: DictConfig, multi_turn: bool) -> None:
    """Before Ray: the settings a multi-turn run (the episode rollout) cannot work with."""
    if cfg.algorithm.name == "dagger" and not multi_turn:
        raise ValueError(f"algorithm=dagger needs a multi-turn env (reset/step/expert_action), got env={cfg.env.name}")
    if not multi_turn:
        return
    if cfg.rollout.engine != "hf":
        raise ValueError(f"multi-turn envs run on the episode rollout, HF generation only: set rollout.engine=hf "
                         f"(got {cfg.rollout.engine!r})")
    if cfg.weight_sync.method != "object_store":
        raise ValueError("multi-turn envs need weight_sync.method=object_store (the episode rollout follows the "
                         "weight store)")
    if cfg.algorithm.name == "dagger" and cfg.algorithm.group_size != cfg.rollout.group_size:
        raise ValueError(f"algorithm.group_size={cfg.algorithm.group_size} and rollout.group_size="
                         f"{cfg.rollout.group_size} differ: a queue group is rollout.group_size episodes of one seed "
                         "(set both)")


def episode_requests(cfg: DictConfig, algorithm) -> "Callable":
    """The driver's request per admitted group of a multi-turn run: ``rollout.group_size`` episodes
    of the group's env seed, with DAgger's teacher probability at the weight version it is
    admitted for (its schedule runs on optimizer steps)."""
    from relaxrl.envs.episodes import EpisodeGroup
    from relaxrl.launch import episode_teacher

    n, name, labelled = cfg.rollout.group_size, cfg.env.name, episode_teacher(cfg) != "none"
    beta_of = getattr(algorithm, "beta_at_version", lambda version: 0.0)

    def build(task, group_id: str, seq: int, need: int) -> EpisodeGroup:
        return EpisodeGroup(group_id=group_id, seed=int(task.meta["seed"]), n=n, beta=beta_of(need),
                            with_teacher=labelled, env=name, min_version=need)

    return build


def episode_heldout(cfg: DictConfig, roles, monitor):
    """The held-out hook of a multi-turn run: DAgger's ``algorithm.eval_every`` collection periods
    (``eval_episodes`` seeds), else ``trainer.eval_every`` steps (``eval_max_tasks`` seeds, 64 if 0)."""
    from relaxrl.services.episode_rollout import EpisodeHeldout

    a, tr = cfg.algorithm, cfg.trainer
    if a.name == "dagger":
        every, n = a.eval_every * a.steps_per_iter, a.eval_episodes
    else:
        if not tr.eval_every:
            return None
        every, n = tr.eval_every, tr.eval_max_tasks or 64
    return EpisodeHeldout(roles.rollout, monitor, every=every, last_step=tr.steps, episodes=n)


def episode_summary(hook, summary: dict) -> dict:  # hook: EpisodeHeldout, or None (no held-out evaluation)
    """A multi-turn run's summary: held-out success (last evaluation), the curve, episodes trained
    (queue accounting) and, for DAgger, the labels aggregated (the actor's buffer counts)."""
    last = hook.history[-1] if hook is not None and hook.history else {}
    m = hook.last_metrics if hook is not None else {}
    return {"success": last.get("eval/success"), "success_greedy": last.get("eval/success_greedy"),
            "curve": [{"step": h["step"], "success": h["eval/success"], "success_greedy": h["eval/success_greedy"]}
                      for h in (hook.history if hook is not None else [])],
            "episodes": (summary.get("accounting") or {}).get("trained_samples"),
            "labels": int(m.get("algo/labels", 0)), "labels_dropped": int(m.get("algo/labels_dropped", 0))}


def episode_line(s: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    return (f"relaxrl episodes: steps={s['steps']} episodes={s['episodes']} labels={s['labels']} "
            f"heldout_success={f(s['success'])} heldout_success_greedy={f(s['success_greedy'])} "
            f"max_staleness_seen={s['max_staleness_seen']} wall_s={s['wall_s']:.1f}")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from relaxrl.services.common import quiet_progress_bars

    quiet_progress_bars()  # the console shows start-up phases and one progress bar, not per-file bars
    if cfg.pipeline.stages:  # a stage pipeline (e.g. +experiment=mopd_toy): stages run in order
        from relaxrl.pipeline.runner import run_pipeline

        return float(run_pipeline(cfg)["final_score"])
    summary = run_experiment(cfg)
    if summary.get("success") is not None:  # a multi-turn run: held-out success is what a sweeper optimises
        return float(summary["success"])
    return float(summary.get("reward_last", 0.0))  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()  # Hydra exits non-zero itself when the run raises
