"""Tasks read from a local JSONL/JSON/Parquet file of prompts and answers."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Iterator, Optional

from relaxrl.envs.base import Task
from relaxrl.envs.verifiers import get_verifier

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "eval")


def _load_columns(path: Path, fields: list[str]) -> dict[str, list]:
    """The named columns of a local file, via HF ``datasets`` (never the hub)."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"unsupported dataset file extension {path.suffix!r} for {str(path)!r}; valid: {list(_FORMATS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    import datasets  # heavy import, only needed here

    ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    for f in fields:
        if f not in ds.column_names:
            raise ValueError(f"field {f!r} not in dataset {str(path)!r}; columns present: {ds.column_names}")
    return {f: list(ds[f]) for f in fields}


class DatasetEnv:
    """Single-turn tasks from a file; a fixed held-out fraction is the eval split."""

    def __init__(
        self,
        path: str,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        domain_field: Optional[str] = None,
        domain: str = "default",
        verifier: str = "exact",
        eval_fraction: float = 0.1,
        name: str = "dataset",
    ) -> None:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self.name, self.path = name, str(path)
        self._verifier = get_verifier(verifier)
        fields = [prompt_field, answer_field] + ([domain_field] if domain_field else [])
        cols = _load_columns(Path(path), fields)
        n = len(cols[prompt_field])
        domains = [str(d) for d in cols[domain_field]] if domain_field else [domain] * n
        # (prompt, answer, domain, row); answers are stringified since JSON numbers load as ints/floats.
        triples = zip(cols[prompt_field], cols[answer_field], domains)
        self._rows = [(str(p), str(a), d, i) for i, (p, a, d) in enumerate(triples)]
        n_eval = round(n * eval_fraction)
        if eval_fraction > 0 and n_eval == 0 and n > 1:
            n_eval = 1  # a requested eval split is never silently empty
        if n - n_eval < 1:
            raise ValueError(f"dataset {self.path!r} has {n} rows: too few for eval_fraction={eval_fraction}")
        # The partition ignores the run seed so eval stays the same set and never leaks into train.
        order = list(range(n))
        random.Random(f"{name}:partition").shuffle(order)
        held = set(order[:n_eval])
        self._eval = [r for r in range(n) if r in held]
        self._train = [r for r in range(n) if r not in held]

    def __len__(self) -> int:
        return len(self._rows)

    def _task(self, split: str, i: int, row: int) -> Task:
        prompt, answer, domain, _ = self._rows[row]
        return Task(task_id=f"{split}-{i}", prompt=prompt, answer=answer, domain=domain, meta={"row": row})

    def _train_rows(self, seed: int) -> Iterator[int]:
        """Endless row indices: a fresh seeded shuffle of the train rows each epoch."""
        rng = random.Random(f"{self.name}:train:{seed}")
        while True:
            order = list(self._train)
            rng.shuffle(order)
            yield from order

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        """Endless shuffled ``train`` stream or the finite held-out ``eval`` rows in file order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
        rows = self._train_rows(seed) if split == "train" else iter(self._eval)
        for i, row in zip(itertools.count(), rows):
            yield self._task(split, i, row)

    def verify(self, response: str, task: Task) -> float:
        return self._verifier(response, task.answer)

    def sft_pairs(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` (prompt, answer) pairs from the train rows, for warm start."""
        return [(t.prompt, t.answer) for t in itertools.islice(self.tasks("train", seed + 1_000_003), n)]
