"""Entry point: ``python -m relaxrl.train +experiment=quickstart [key=value ...]``.

Hydra composes the typed config (relaxrl/config.py + relaxrl/conf/), then the run is:
Ray up → model directory → role deployments → driver loops → summary line.
"""

from __future__ import annotations

import asyncio
import logging
import os

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
    from relaxrl.episodic.run import (check_multi_turn, episode_heldout, episode_line, episode_requests,
                                      episode_summary)

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
        else:  # what a weight load cost the rollout's memory (one replica's figure)
            summary["reload_resident_ratio"] = roles.rollout.stats.remote().result().get("reload_resident_ratio")
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
