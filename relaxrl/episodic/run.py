"""What a run of multi-turn episodes adds to the one driver (relaxrl/train.py, relaxrl/driver.py):
its checks before Ray, the request built per admitted group, its held-out hook and its summary."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig


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


def episode_requests(cfg: DictConfig, algorithm) -> Callable:
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
