"""What a user watches: a progress bar, a JSONL metrics file per run, and optionally W&B."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

_BAR_KEYS = {"reward_mean": "reward", "staleness_mean": "stale", "samples_per_s": "samp/s"}
# extrapolated_opd's schedule and the structured-output env's parse validity, when present
_BAR_KEYS.update({"algo/lambda": "λ", "algo/lambda_star": "λ*", "algo/p": "p", "algo/b": "b", "info/valid": "valid"})
# held-out evaluation (trainer.eval_every): greedy and sampled reward, shown until the next one
_BAR_KEYS.update({"eval/reward_greedy": "eval", "eval/reward_sampled": "eval~"})
# W&B's x-axis. Its own step must only grow (a lower one is dropped), but an in-run restore trains
# the steps after its checkpoint again: so every row carries the train step and W&B plots by it.
WANDB_STEP = "trainer/step"


def bar_postfix(shown: dict[str, str], metrics: dict[str, Any]) -> dict[str, str]:
    """The progress bar's fields after ``metrics``: each ``_BAR_KEYS`` value it holds, and the last
    value of the others, so a metric logged every few steps (eval) stays on the bar in between."""
    return {**shown, **{label: f"{metrics[k]:.3g}" for k, label in _BAR_KEYS.items() if k in metrics}}


@contextmanager
def phase(name: str) -> Iterator[None]:
    """One start-up (or wind-down) phase on the console: its name when it starts, its time when done,
    so the seconds before step 1 say what they are spent on."""
    start = time.perf_counter()
    log.info("%s ...", name)
    yield
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)


def _row_step(line: str) -> float:
    """A metrics.jsonl row's step; a summary row, or a line a killed run left half-written, sorts
    after every step."""
    try:
        step = json.loads(line).get("step")
    except json.JSONDecodeError:
        return float("inf")
    return float("inf") if step is None else step


class Monitor:
    def __init__(self, cfg: DictConfig, run_dir: str, total_steps: int) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)
        self._bar = tqdm(total=total_steps, desc="relaxrl", unit="step", disable=not cfg.logger.progress,
                         dynamic_ncols=True)
        self._wandb = self._start_wandb(cfg, run_dir) if cfg.logger.name == "wandb" else None
        self._postfix: dict[str, str] = {}

    @staticmethod
    def _start_wandb(cfg: DictConfig, run_dir: str) -> Any:
        import wandb

        lg = cfg.logger
        run = wandb.init(
            project=lg.project,
            entity=lg.entity,
            mode=lg.mode or os.environ.get("WANDB_MODE", "online"),
            dir=run_dir,
            tags=list(lg.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        run.define_metric(WANDB_STEP)
        run.define_metric("*", step_metric=WANDB_STEP)
        return run

    @property
    def wandb_dir(self) -> Optional[str]:
        return None if self._wandb is None else self._wandb.dir

    def log(self, step: int, metrics: dict[str, Any], advance: bool = True) -> None:
        """One line of metrics.jsonl (and W&B) for ``step``; ``advance``: the step is done (the bar
        moves on; False for what is logged before step 1, e.g. step 0's evaluation)."""
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        self._file.write(json.dumps({"step": step, **flat}, default=float) + "\n")
        if self._wandb is not None:
            self._wandb.log({WANDB_STEP: step, **{k: v for k, v in flat.items() if not isinstance(v, str)}})
        self._postfix = bar_postfix(self._postfix, metrics)
        self._bar.set_postfix(self._postfix)
        if advance:
            self._bar.update(1)

    def rewind(self, step: int) -> int:
        """Back to the end of ``step`` (a resume or an in-run restore from its checkpoint): the rows
        of later steps, and any summary, leave metrics.jsonl, since those steps are trained again and
        logged anew; the bar stands at ``step``. Returns how many rows were dropped. W&B keeps the
        old rows (its history only grows); plotted by ``trainer/step`` the new ones lie over them."""
        self._file.close()
        with open(self.path) as f:
            rows = f.readlines()
        kept = [r for r in rows if _row_step(r) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)
        self._bar.n = step
        self._bar.refresh()
        if len(kept) < len(rows):
            log.info("metrics.jsonl: %d rows after step %d removed (those steps are trained again)",
                     len(rows) - len(kept), step)
        return len(rows) - len(kept)

    def close(self, summary: Optional[dict[str, Any]] = None) -> None:
        self._bar.close()
        if summary:
            self._file.write(json.dumps({"summary": summary}, default=float) + "\n")
            if self._wandb is not None:  # W&B summaries take scalars with string keys
                self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
