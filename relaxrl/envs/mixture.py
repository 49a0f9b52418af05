"""Several single-turn envs as one: one domain per part, tasks interleaved, verified by their own part."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from relaxrl.envs.base import Task

SPLITS = ("train", "eval")


@dataclass
class MixtureEnvConfig:
    name: str = "mixture"
    # Env nodes, e.g. {name: arithmetic, ops: ["+"], domain: add}; each part's domain must be distinct.
    parts: list[Any] = field(default_factory=list)


class MixtureEnv:
    """Round-robin over ``parts`` for training (equal shares); the eval split is every part's eval split."""

    def __init__(self, parts: list[dict], name: str = "mixture") -> None:
        from relaxrl.envs.registry import make_env  # the registry imports this module

        if not parts:
            raise ValueError("mixture env needs at least one part, e.g. parts=[{name: arithmetic, domain: a}]")
        self.name = name
        self.parts = [make_env(**dict(p)) for p in parts]
        self.domains = [self._domain_of(env, i) for i, env in enumerate(self.parts)]
        dupes = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if dupes:
            raise ValueError(f"mixture env parts must have distinct domains; repeated: {dupes}")
        self._by_domain = dict(zip(self.domains, self.parts))

    @staticmethod
    def _domain_of(env: Any, i: int) -> str:
        domain: Optional[str] = getattr(env, "domain", None)
        if domain is None:
            raise ValueError(f"mixture part {i} ({getattr(env, 'name', env)!r}) has no single 'domain'")
        return domain

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
        streams = [env.tasks(split, seed) for env in self.parts]
        if split == "eval":
            # Domains take turns, so any prefix (trainer.eval_max_tasks) scores every domain.
            live = list(zip(self.domains, streams))
            while live:
                for domain, stream in list(live):
                    t = next(stream, None)
                    if t is None:
                        live.remove((domain, stream))
                    else:
                        yield Task(f"{domain}/{t.task_id}", t.prompt, t.answer, domain, t.meta)
            return
        for i in itertools.count():
            t = next(streams[i % len(streams)])
            yield Task(f"train-{i}", t.prompt, t.answer, t.domain, t.meta)

    def verify(self, response: str, task: Task) -> float:
        env = self._by_domain.get(task.domain)
        if env is None:
            raise ValueError(f"task domain {task.domain!r} is not a part of this mixture; parts: {self.domains}")
        return env.verify(response, task)

    def sft_pairs(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` pairs, interleaved across the parts (equal shares)."""
        k = len(self.parts)
        per_part = [env.sft_pairs(-(-n // k), seed) for env in self.parts]
        return [per_part[i % k][i // k] for i in range(n)]
