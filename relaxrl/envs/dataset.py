"""Tasks read from a local JSONL/JSON/Parquet file of prompts and answers."""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path
from typing import Iterator, Optional

from relaxrl.envs.base import Task
from relaxrl.envs.verifiers import Verifier, get_verifier

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "eval")
ON_BAD_ROW = ("error", "skip")
log = logging.getLogger(__name__)


def _load_columns(path: Path, fields: list[str]) -> dict[str, list]:
    """The named columns of a local file: JSON parsed here (so a bad line is named), Parquet via
    HF ``datasets`` (never the hub). A row lacking a field holds None there."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"unsupported dataset file extension {path.suffix!r} for {str(path)!r}; valid: {list(_FORMATS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist (env.path; a relative path is "
                                f"read from {str(Path.cwd())!r})")
    if fmt == "json":
        rows = _json_rows(path)
        names = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
        columns = {f: [r.get(f) if isinstance(r, dict) else _NotAnObject(r) for r in rows] for f in fields}
    else:
        import datasets  # heavy import, only needed here

        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        names = ds.column_names
        columns = {f: list(ds[f]) for f in fields if f in names}
    for f in fields:
        if f not in names:
            raise ValueError(f"field {f!r} not in dataset {str(path)!r}; columns present: {names} "
                             "(set env.prompt_field / env.answer_field / env.domain_field to one of them)")
    return columns


class _NotAnObject:
    def __init__(self, value) -> None:
        self.value = value


def _json_rows(path: Path) -> list:
    """Rows of a JSON Lines file or of a JSON array; a line that is not JSON is an error naming it."""
    text = path.read_text()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"dataset {str(path)!r} line {lineno}: not valid JSON ({e.msg})") from None
    return rows


def _row_problem(prompt, answer, domain, fields: list[str]) -> str | None:
    """Why a row cannot be used (None if it can): a missing field or a value of the wrong type."""
    if isinstance(prompt, _NotAnObject):
        return f"expected a JSON object, got {type(prompt.value).__name__}"
    for name, value, types in ((fields[0], prompt, (str,)), (fields[1], answer, (str, int, float)),
                               (fields[2] if len(fields) > 2 else None, domain, (str,))):
        if name is None:
            continue
        if value is None:
            return f"field {name!r} is missing"
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            return f"field {name!r} has type {type(value).__name__}, expected {want}"
    if not prompt.strip():
        return f"field {fields[0]!r} is empty"
    return None


def reward_components(verifier: str, weights: Optional[dict[str, float]]) -> list[tuple[float, Verifier]]:
    """(weight, verifier) pairs of ``env.reward_weights``: ``correct`` is ``env.verifier``, any other
    key a verifier by name (e.g. ``format``: a final answer is stated). Empty: ``{correct: 1.0}``."""
    weights = dict(weights or {"correct": 1.0})
    out = []
    for key, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"env.reward_weights.{key} must be a number, got {weight!r}")
        name = verifier if key == "correct" else key
        out.append((float(weight), get_verifier(name, "env.verifier" if key == "correct" else
                                                f"env.reward_weights.{key}")))
    return out


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
        on_bad_row: str = "error",
        reward_weights: Optional[dict[str, float]] = None,
    ) -> None:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row must be one of {list(ON_BAD_ROW)}, got {on_bad_row!r}")
        self.name, self.path = name, str(path)
        self._components = reward_components(verifier, reward_weights)
        fields = [prompt_field, answer_field] + ([domain_field] if domain_field else [])
        cols = _load_columns(Path(path), fields)
        n_file = len(cols[prompt_field])
        domains = cols[domain_field] if domain_field else [domain] * n_file
        # (prompt, answer, domain, row); answers are stringified since JSON numbers load as ints/floats.
        self._rows, self.bad_rows = [], []
        for i, (p, a, d) in enumerate(zip(cols[prompt_field], cols[answer_field], domains)):
            problem = _row_problem(p, a, d, fields)
            if problem is None:
                self._rows.append((p, str(a), d, i))
                continue
            where = f"dataset {self.path!r} row {i}" + (" (line %d)" % (i + 1) if self.path.endswith(".jsonl") else "")
            if on_bad_row == "error":
                raise ValueError(f"{where}: {problem} (set env.on_bad_row=skip to skip such rows, counted)")
            self.bad_rows.append((i, problem))
        if self.bad_rows:  # counted and logged, never silently
            log.warning("dataset %r: skipped %d malformed rows, e.g. row %d: %s", self.path, len(self.bad_rows),
                        *self.bad_rows[0])
        n = len(self._rows)
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
        prompt, answer, domain, file_row = self._rows[row]
        return Task(task_id=f"{split}-{i}", prompt=prompt, answer=answer, domain=domain, meta={"row": file_row})

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
        """The weighted sum of the reward components (just ``verifier`` by default)."""
        return sum(w * float(fn(response, task.answer)) for w, fn in self._components)

    def sft_pairs(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` (prompt, answer) pairs from the train rows, for warm start."""
        return [(t.prompt, t.answer) for t in itertools.islice(self.tasks("train", seed + 1_000_003), n)]
