"""Greedy evaluation of a generation engine on an env's eval split, scored per domain.

Scores are rewards of the decoded text; no log-prob is used here (a greedy generation's log-probs
are T=1's, as the engines report them, whatever rollout.temperature is)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

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
) -> dict[str, dict[str, float]]:
    """``{domain: {"accuracy": mean reward, "response_len": mean tokens, "n": count}}`` under greedy decoding."""
    if not tasks:
        raise ValueError("evaluate_tasks needs at least one task (is the env's eval split empty?)")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    rewards: dict[str, list[float]] = defaultdict(list)
    lengths: dict[str, list[int]] = defaultdict(list)
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
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
