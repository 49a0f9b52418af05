"""Evaluation of a generation engine on an env's eval split, scored per domain.

Scores are rewards of the decoded text; no log-prob is used here (a greedy generation's log-probs
are T=1's, as the engines report them, whatever rollout.temperature is).

Two users: pipeline stages (``relaxrl/pipeline/stage_eval.py``, greedy accuracy per domain) and a
single run's held-out evaluation (``trainer.eval_every``: greedy and sampled, flattened by
``heldout_metrics`` into ``eval/*`` metrics that are logged like training metrics)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

from relaxrl.engines.base import SamplingParams
from relaxrl.envs.base import Task


def evaluate_tasks(
    engine: Any,
    env: Any,
    tasks: Sequence[Task],
    prompt_ids: Callable[[str], list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
) -> dict[str, dict[str, float]]:
    """``{domain: {"accuracy": mean reward, "response_len": mean tokens, "n": count}}``: one response
    per task, greedy by default, sampled at ``temperature``/``top_p`` otherwise (``seed``: the same
    seed and weights give the same responses, so two evaluations differ by their weights only)."""
    if not tasks:
        raise ValueError("evaluate_tasks needs at least one task (is the env's eval split empty?)")
    rewards: dict[str, list[float]] = defaultdict(list)
    lengths: dict[str, list[int]] = defaultdict(list)
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        # One seed per chunk: a chunk's responses do not depend on how many chunks came before it.
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                seed=None if seed is None else seed + start)
        gens = engine.generate([prompt_ids(t.prompt) for t in chunk], params)
        for task, g in zip(chunk, gens):
            ids = g.response_ids[:-1] if g.finish_reason == "stop" else g.response_ids  # drop EOS, as the rollout does
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            rewards[task.domain].append(float(env.verify(text, task)))
            lengths[task.domain].append(len(g.response_ids))
    return {
        d: {"accuracy": sum(r) / len(r), "response_len": sum(lengths[d]) / len(r), "n": float(len(r))}
        for d, r in sorted(rewards.items())
    }


def eval_due(step: int, every: int, last_step: int) -> bool:
    """Whether a run with ``trainer.eval_every=every`` evaluates after ``step`` (0: before training):
    at step 0, every ``every`` steps and at the last step; never when ``every`` is 0."""
    return every > 0 and (step == 0 or step == last_step or step % every == 0)


def heldout_tasks(env: Any, seed: int, max_tasks: int = 0) -> list[Task]:
    """The env's eval split (its first ``max_tasks`` tasks when > 0), refused when empty: a run
    asked to evaluate must have something to evaluate on."""
    if max_tasks < 0:
        raise ValueError(f"trainer.eval_max_tasks must be >= 0 (0: the whole eval split), got {max_tasks}")
    tasks = list(itertools.islice(env.tasks("eval", seed), max_tasks or None))
    if not tasks:
        raise ValueError(f"trainer.eval_every > 0 but env {type(env).__name__} has an empty eval split "
                         "(env=dataset: set env.eval_fraction > 0)")
    return tasks


def heldout_metrics(greedy: dict[str, dict[str, float]], sampled: dict[str, dict[str, float]]) -> dict[str, float]:
    """``evaluate_tasks``' per-domain results of a greedy and a sampled pass as flat metrics:
    ``eval/reward_greedy``, ``eval/reward_sampled``, ``eval/response_len_greedy|sampled`` (means over
    all tasks) and ``eval/n``; with several domains also ``eval/<domain>/reward_greedy|sampled``."""
    if sorted(greedy) != sorted(sampled):
        raise ValueError(f"greedy and sampled passes scored different domains: {sorted(greedy)} vs {sorted(sampled)}")
    n = sum(m["n"] for m in greedy.values())
    out = {"eval/n": n}
    for mode, res in (("greedy", greedy), ("sampled", sampled)):
        out[f"eval/reward_{mode}"] = sum(m["accuracy"] * m["n"] for m in res.values()) / n
        out[f"eval/response_len_{mode}"] = sum(m["response_len"] * m["n"] for m in res.values()) / n
        if len(res) > 1:
            out.update({f"eval/{d}/reward_{mode}": m["accuracy"] for d, m in res.items()})
    return out


def check_heldout(cfg: Any, env: Any) -> Optional[list[Task]]:
    """Before Ray starts: the eval tasks of ``trainer.eval_every`` (None when it is 0, off), or an
    error naming the setting that cannot work with it."""
    tr = cfg.trainer
    if tr.eval_every < 0:
        raise ValueError(f"trainer.eval_every must be >= 0 (0: no held-out evaluation), got {tr.eval_every}")
    if tr.eval_every == 0:
        return None
    if cfg.algorithm.name == "dagger":
        raise ValueError("trainer.eval_every is for single-turn runs; algorithm=dagger evaluates its episodes "
                         "every algorithm.eval_every steps")
    if cfg.weight_sync.method != "object_store":
        raise ValueError(f"trainer.eval_every needs weight_sync.method=object_store (the evaluator loads the "
                         f"published weights from the store), got {cfg.weight_sync.method!r}")
    return heldout_tasks(env, cfg.seed, tr.eval_max_tasks)
