"""A small file-backed registry of the best checkpoint per domain: those checkpoints are the teachers.

One JSON file, rewritten atomically on every change. The pipeline offers each evaluated checkpoint
of a stage for the domains that stage trains; an offer is recorded only if it beats the domain's
current entry on the same metric. A user can register an external checkpoint as a domain's teacher;
such entries are pinned (pipeline offers never replace them):

    python -m relaxrl.pipeline.registry runs/x/registry.json register add /models/add-teacher --score 0.93
    python -m relaxrl.pipeline.registry runs/x/registry.json show
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class Entry:
    domain: str
    path: str  # a local HF model directory (weights + tokenizer)
    score: Optional[float]  # None for an external checkpoint registered without a score
    metric: str
    stage: str  # the stage that produced it, or "external"
    step: int = -1
    pinned: bool = False  # external: pipeline offers never replace it
    time: float = 0.0


class CheckpointRegistry:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self._entries: dict[str, Entry] = self._load()

    def _load(self) -> dict[str, Entry]:
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            raw = json.load(f)
        try:
            return {d: Entry(**e) for d, e in raw["domains"].items()}
        except (KeyError, TypeError) as e:
            raise ValueError(f"checkpoint registry {self.path!r} is malformed: {e}") from e

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        data = {"domains": {d: asdict(e) for d, e in sorted(self._entries.items())}}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".registry-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def get(self, domain: str) -> Optional[Entry]:
        return self._entries.get(domain)

    def offer(self, domain: str, path: str, score: float, *, metric: str, stage: str, step: int) -> bool:
        """Record ``path`` as ``domain``'s teacher if it beats the current entry; True if recorded."""
        current = self._entries.get(domain)
        if current is not None:
            if current.pinned:
                return False
            if current.metric == metric and current.score is not None and current.score >= score:
                return False
        self._entries[domain] = Entry(domain, os.path.abspath(path), float(score), metric, stage, step,
                                      time=time.time())
        self._save()
        return True

    def register(self, domain: str, path: str, *, score: Optional[float] = None, metric: str = "accuracy") -> Entry:
        """Make an external checkpoint ``domain``'s teacher (pinned); ``path`` must be a model directory."""
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no config.json in {path!r}: register a local model directory (save_pretrained)")
        entry = Entry(domain, path, score, metric, "external", pinned=True, time=time.time())
        self._entries[domain] = entry
        self._save()
        return entry

    def forget_stage(self, stage: str) -> list[str]:
        """Drop the entries produced by ``stage`` (it is being rerun); returns their domains."""
        dropped = [d for d, e in self._entries.items() if e.stage == stage and not e.pinned]
        for d in dropped:
            del self._entries[d]
        if dropped:
            self._save()
        return dropped

    def teachers(self, domains: list[str]) -> dict[str, str]:
        """``{domain: checkpoint path}`` for ``domains``; every one must be registered."""
        missing = [d for d in domains if d not in self._entries]
        if missing:
            raise KeyError(
                f"no teacher registered for domain(s) {missing} in {self.path}; registered: {sorted(self._entries)}"
            )
        return {d: self._entries[d].path for d in domains}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relaxrl.pipeline.registry", description=__doc__.split("\n")[0])
    parser.add_argument("registry", help="path of the registry JSON file (created if missing)")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="register an external checkpoint as a domain's teacher")
    reg.add_argument("domain")
    reg.add_argument("path", help="local model directory (config.json, weights, tokenizer)")
    reg.add_argument("--score", type=float, default=None)
    reg.add_argument("--metric", default="accuracy")
    sub.add_parser("show", help="print the registry")
    args = parser.parse_args(argv)
    registry = CheckpointRegistry(args.registry)
    if args.command == "register":
        registry.register(args.domain, args.path, score=args.score, metric=args.metric)
    for e in registry.entries().values():
        print(f"{e.domain}: {e.path} {e.metric}={e.score} stage={e.stage} step={e.step} pinned={e.pinned}")


if __name__ == "__main__":
    main()
