"""The MOPD-vs-GRPO forgetting experiment, in-process (no Ray): teachers, the post-B checkpoint, the two methods.

Two domains with one prompt format ``a?b=`` and different skills: ``add`` (``3+4=`` -> ``7``) and
``sub`` (``7-3=`` -> ``4``). Both map the same two digits to an answer, so training one moves the
other's answers (training sub for long enough makes a tiny model forget add).

* The base is warm-started on both domains (SFT on the mix). Stage A (add): supervised warm start
  on add, then GRPO on add; its best checkpoint on add's eval is add's teacher. Stage B (sub): from
  stage A's end, a short supervised warm start on sub, then GRPO on sub; its best checkpoint
  on sub is sub's teacher and its last one is the post-B checkpoint (add partly forgotten).
  Both are built once per config (fixed seed) and cached on disk by the config and this file's text.
* From the post-B checkpoint, per seed: MOPD (every sample distilled from the teacher of its own
  domain, reverse-KL token advantage) and GRPO on the add+sub mix, the same samples per step and the
  same optimizer; greedy accuracy per domain on a fixed eval set after every step, until both domains
  are at >= 95% of their teacher's eval score or the step budget ends.

The pieces are RelaxRL's: ``ArithmeticEnv``/``MixtureEnv``, ``HFGenerationEngine``,
``TorchTrainerEngine``, ``make_algorithm('grpo'|'mopd')``, ``evaluate_tasks``; the Serve pipeline that
runs the same stages with Ray (``+experiment=mopd_toy``) is covered by tests/pipeline and the e2e tier.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TARGET = 0.95  # a method reaches its target when every domain is at >= TARGET x its teacher's score
DOMAINS = ("add", "sub")  # task "arith"; task "digits" has the domains of ToyConfig.digit_ops
TASKS = ("arith", "digits")
DIGIT_OPS = {"rev": lambda s: s[::-1], "rot": lambda s: s[1:] + s[:1], "sort": lambda s: "".join(sorted(s))}
DIGIT_MARKS = {"rev": "r", "rot": "o", "sort": "s"}  # the prompt's one-letter skill marker


@dataclass(frozen=True)
class ToyConfig:
    """Everything that defines the teachers and the post-B checkpoint (the cache key) and the runs."""

    max_operand: int = 9
    eval_size: int = 640  # per domain: binomial standard error <= sqrt(0.25 / 640) = 0.0198 at any accuracy
    hidden_size: int = 128
    num_layers: int = 2
    model_seed: int = 0
    # The base knows both domains partly (SFT on the mix); each stage then specialises on its own domain:
    # a supervised warm start, then GRPO on it. Stage B's GRPO erodes add gradually (not in one jump, as
    # SFT on sub does), so the post-B student is still unsure on add: its samples hold what MOPD needs.
    base_sft_steps: int = 300
    base_sft_lr: float = 3e-3
    sft_batch: int = 64
    sft_pairs: int = 20_000  # (prompt, answer) pairs each warm start draws its batches from
    stage_sft_lr: float = 1e-3
    sft_steps: tuple = (100, 10)  # stage A (add), stage B (sub)
    rl_steps: tuple = (10, 250)
    stage_eval_every: int = 5
    # the comparison (and the stages' GRPO): samples per step = groups x group_size
    groups: int = 16
    group_size: int = 8
    lr: float = 3e-4  # 1e-3 made every RL phase noisy (greedy accuracy swinging by 0.1 between steps)
    temperature: float = 1.0
    max_new_tokens: int = 3
    adv_clip: float = 1.0  # MOPD's per-token advantage clip, as +experiment=mopd_toy (3.0: docs/mopd.md)
    # "arith": add vs sub, 1-2 token answers. "digits": a string of ``digits`` digits, prompt "3815r=", and one
    # of ``digit_ops`` per domain (rev: "5183", rot: "8153", sort: "1358"): multi-token answers, exact match.
    task: str = "arith"
    digits: int = 4
    digit_ops: str = "rev,sort"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid: {list(TASKS)}")
        ops = self.digit_ops.split(",")
        if self.task == "digits":
            bad = [op for op in ops if op not in DIGIT_OPS]
            if bad or len(ops) != 2 or ops[0] == ops[1]:
                raise ValueError(f"digit_ops={self.digit_ops!r}: want two distinct of {sorted(DIGIT_OPS)}")
            if self.max_new_tokens < self.digits + 1:
                raise ValueError(f"max_new_tokens={self.max_new_tokens} < digits + 1 = {self.digits + 1} "
                                 "(the answer and EOS)")

    @property
    def domains(self) -> tuple[str, str]:
        return DOMAINS if self.task == "arith" else tuple(self.digit_ops.split(","))

    def key(self, code: str) -> str:
        stage = {k: v for k, v in asdict(self).items() if k not in ("adv_clip",)}
        return hashlib.sha256((json.dumps(stage, sort_keys=True) + code).encode()).hexdigest()[:16]


class DigitStringEnv:
    """A string of ``digits`` random digits and one transform of it: "3815r=" -> "5183" (exact match)."""

    def __init__(self, op: str, digits: int, eval_size: int) -> None:
        self.name, self.op, self.domain, self.digits, self.eval_size = f"digits-{op}", op, op, digits, eval_size

    def _draw(self, rng: random.Random) -> tuple[str, str]:
        s = "".join(rng.choice("0123456789") for _ in range(self.digits))
        return f"{s}{DIGIT_MARKS[self.op]}=", DIGIT_OPS[self.op](s)

    def tasks(self, split: str, seed: int):
        from relaxrl.envs.base import Task

        rng = random.Random(f"{self.name}:{split}:{seed}")
        for i in (itertools.count() if split == "train" else range(self.eval_size)):
            prompt, answer = self._draw(rng)
            yield Task(task_id=f"{split}-{i}", prompt=prompt, answer=answer, domain=self.domain)

    def verify(self, response: str, task) -> float:
        return float(response.strip() == task.answer)

    def sft_pairs(self, n: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.name}:sft:{seed}")
        return [self._draw(rng) for _ in range(n)]


def _mixture(parts: list):
    """RelaxRL's MixtureEnv over env objects (its constructor takes registry nodes)."""
    from relaxrl.envs.mixture import MixtureEnv

    mix = MixtureEnv.__new__(MixtureEnv)
    mix.name, mix.parts, mix.domains = "mixture", parts, [p.domain for p in parts]
    mix._by_domain = dict(zip(mix.domains, parts))
    return mix


def make_envs(cfg: ToyConfig):
    from relaxrl.envs.arithmetic import ArithmeticEnv
    from relaxrl.envs.mixture import MixtureEnv

    if cfg.task == "digits":
        parts = [DigitStringEnv(op, cfg.digits, cfg.eval_size) for op in cfg.domains]
        return {**{p.domain: p for p in parts}, "mix": _mixture(parts)}
    parts = [{"name": "arithmetic", "ops": [op], "max_operand": cfg.max_operand, "domain": d, "eval_size": cfg.eval_size}
             for op, d in (("+", "add"), ("-", "sub"))]
    return {"add": ArithmeticEnv(**{k: v for k, v in parts[0].items() if k != "name"}),
            "sub": ArithmeticEnv(**{k: v for k, v in parts[1].items() if k != "name"}),
            "mix": MixtureEnv(parts)}


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` independent eval prompts."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n)


class Evaluator:
    """Greedy accuracy per domain on the mixture's fixed eval split (``eval_size`` prompts per domain)."""

    def __init__(self, cfg: ToyConfig, tok, env) -> None:
        from relaxrl.models.chat import render_prompt_ids

        self.cfg, self.env = cfg, env
        self.tasks = list(env.tasks("eval", 0))
        cache: dict[str, list[int]] = {}
        self.prompt = lambda text: cache.setdefault(text, render_prompt_ids(tok, text))

    def __call__(self, engine) -> dict[str, float]:
        from relaxrl.evaluation import evaluate_tasks

        res = evaluate_tasks(engine, self.env, self.tasks, self.prompt, max_new_tokens=self.cfg.max_new_tokens,
                             batch_size=len(self.tasks))
        return {d: v["accuracy"] for d, v in res.items()}


class Loop:
    """One student trained in-process: sample groups, verify, (score under the domain teachers), one step."""

    def __init__(self, cfg: ToyConfig, tok, model, algorithm: dict, env, seed: int,
                 teachers: dict[str, Any] | None = None) -> None:
        from relaxrl.algorithms import make_algorithm
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.engines.torch_trainer import TorchTrainerEngine
        from relaxrl.models.chat import render_prompt_ids

        self.cfg, self.tok, self.env, self.seed, self.teachers = cfg, tok, env, seed, teachers or {}
        self.algo = make_algorithm(algorithm)
        self.trainer = TorchTrainerEngine(model, lr=cfg.lr, max_grad_norm=1.0, micro_batch_size=256, seed=seed,
                                          temperature=cfg.temperature)
        self.student = HFGenerationEngine(self.trainer.model, tok)  # the very weights being trained
        self.tasks = env.tasks("train", seed)
        cache: dict[str, list[int]] = {}
        self.prompt = lambda text: cache.setdefault(text, render_prompt_ids(tok, text))
        self.steps = 0

    def step(self) -> dict[str, float]:
        from relaxrl.engines.base import SamplingParams
        from relaxrl.sample import Sample, collate

        cfg, k = self.cfg, self.cfg.group_size
        self.steps += 1
        group = [next(self.tasks) for _ in range(cfg.groups)]
        prompts = [self.prompt(t.prompt) for t in group for _ in range(k)]
        params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                seed=self.seed * 1_000_003 + self.steps)
        gens = self.student.generate(prompts, params)
        teacher_lp: list[list[float] | None] = [None] * len(gens)
        for domain, teacher in self.teachers.items():  # each sample scored by its own domain's teacher
            rows = [i for i in range(len(gens)) if group[i // k].domain == domain]
            scored = teacher.score([prompts[i] + gens[i].response_ids for i in rows], [len(prompts[i]) for i in rows],
                                   batch_size=len(rows) or 1)
            for i, lp in zip(rows, scored.logprobs):
                teacher_lp[i] = lp
        samples = []
        for i, (p, g) in enumerate(zip(prompts, gens)):
            task = group[i // k]
            ids = g.response_ids[:-1] if g.finish_reason == "stop" else g.response_ids
            text = self.tok.decode(ids, skip_special_tokens=True)
            samples.append(Sample(uid=f"{self.steps}/{i}", group_id=f"{self.steps}/{i // k}", index=i % k,
                                  prompt_ids=p, domain=task.domain, response_ids=g.response_ids,
                                  behaviour_logprobs=g.logprobs, policy_version=self.trainer.version,
                                  reward=self.env.verify(text, task), teacher_logprobs=teacher_lp[i]))
        batch = self.algo.prepare(collate(samples, self.student.pad_id))
        metrics = self.trainer.train_step(batch, self.algo.loss)
        metrics["reward_mean"] = sum(s.reward for s in samples) / len(samples)
        return metrics


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_stage(cfg: ToyConfig, tok, model, domain: str, envs: dict, evaluate: Evaluator, log: Callable) -> dict:
    """Warm start on ``domain``, then GRPO on it; returns the best-on-``domain`` state and the last one."""
    from relaxrl.models.warm_start import warm_start

    i = cfg.domains.index(domain)
    env, rl_steps = envs[domain], cfg.rl_steps[i]
    t0 = time.time()
    warm_start(model, tok, env.sft_pairs(cfg.sft_pairs, seed=cfg.model_seed + 1 + i), steps=cfg.sft_steps[i],
               lr=cfg.stage_sft_lr, batch_size=cfg.sft_batch, seed=cfg.model_seed + 1 + i)
    loop = Loop(cfg, tok, model, {"name": "grpo"}, env, seed=cfg.model_seed + 1 + i)
    history = [{"step": 0, "domains": evaluate(loop.student)}]
    best = (history[0]["domains"][domain], 0, _state(loop.trainer.model))
    for step in range(1, rl_steps + 1):
        loop.step()
        if step % cfg.stage_eval_every == 0 or step == rl_steps:
            acc = evaluate(loop.student)
            history.append({"step": step, "domains": acc})
            if acc[domain] > best[0]:
                best = (acc[domain], step, _state(loop.trainer.model))
    log(f"stage {domain}: " + "; ".join(f"step {h['step']}: " + " ".join(f"{d}={a:.3f}" for d, a in h["domains"].items())
                                        for h in history) + f" ({time.time() - t0:.0f} s)")
    return {"best_score": best[0], "best_step": best[1], "best": best[2], "last": _state(loop.trainer.model),
            "history": history}


def build_checkpoints(cfg: ToyConfig, cache_dir: str, log: Callable = print) -> dict:
    """The two teachers and the post-B checkpoint (state dicts) with their eval scores, cached on disk."""
    import torch

    from relaxrl.models.tiny import build_tiny_model, build_tokenizer
    from relaxrl.models.warm_start import warm_start

    key = cfg.key(Path(__file__).read_text())
    path = Path(cache_dir) / f"mopd_toy-{key}.pt"
    if path.exists():
        log(f"teachers: cached {path}")
        return torch.load(path, weights_only=False)
    t0 = time.time()
    tok, envs = build_tokenizer(), make_envs(cfg)
    evaluate = Evaluator(cfg, tok, envs["mix"])
    model = build_tiny_model(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.model_seed)
    warm_start(model, tok, envs["mix"].sft_pairs(cfg.sft_pairs, seed=cfg.model_seed), steps=cfg.base_sft_steps,
               lr=cfg.base_sft_lr, batch_size=cfg.sft_batch, seed=cfg.model_seed)
    da, db = cfg.domains
    a = run_stage(cfg, tok, model, da, envs, evaluate, log)
    b = run_stage(cfg, tok, model, db, envs, evaluate, log)  # continues from stage A's last weights
    model.load_state_dict(b["last"])
    out = {"config": asdict(cfg), "teacher_states": {da: a["best"], db: b["best"]},
           "post_b": b["last"], "stages": {da: a["history"], db: b["history"]},
           "teachers": {da: a["best_score"], db: b["best_score"]},
           "post_b_eval": b["history"][-1]["domains"], "build_s": time.time() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
    log(f"teachers: built in {out['build_s']:.0f} s, cached {path}")
    return out


def run_method(method: str, ckpt: dict, cfg: ToyConfig, seed: int, budget: int, log: Callable = print) -> list[dict]:
    """``method`` ('mopd' | 'grpo_mix') from the post-B checkpoint; per-step greedy eval rows until both
    domains reach ``TARGET`` x their teacher or ``budget`` steps."""
    import torch

    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    tok, envs = build_tokenizer(), make_envs(cfg)
    evaluate = Evaluator(cfg, tok, envs["mix"])

    def model_from(state):
        m = build_tiny_model(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.model_seed)
        m.load_state_dict(state)
        return m

    teachers = None
    algorithm = {"name": "grpo"}
    if method == "mopd":
        teachers = {d: HFGenerationEngine(model_from(s), tok) for d, s in ckpt["teacher_states"].items()}
        algorithm = {"name": "mopd", "adv_clip": cfg.adv_clip}
    elif method != "grpo_mix":
        raise ValueError(f"unknown method {method!r}; valid: mopd, grpo_mix")
    torch.manual_seed(seed)
    random.seed(seed)
    loop = Loop(cfg, tok, model_from(ckpt["post_b"]), algorithm, envs["mix"], seed=seed, teachers=teachers)
    targets = {d: TARGET * s for d, s in ckpt["teachers"].items()}
    # Rows as the bench reads them (and the Serve pipeline's eval.jsonl has them): {domain: {"accuracy": a}}.
    scores = lambda: {d: {"accuracy": a} for d, a in evaluate(loop.student).items()}
    reached = lambda row: all(row[d]["accuracy"] >= t for d, t in targets.items())
    history = [{"step": 0, "domains": scores()}]
    t0 = time.time()
    while not reached(history[-1]["domains"]) and loop.steps < budget:
        metrics = loop.step()
        history.append({"step": loop.steps, "domains": scores(), "reward_mean": metrics["reward_mean"],
                        **({"teacher_kl": metrics["teacher_kl"]} if "teacher_kl" in metrics else {})})
    last = history[-1]
    log(f"seed {seed} {method}: {last['step']} steps, "
        + " ".join(f"{d}={v['accuracy']:.3f}" for d, v in last["domains"].items())
        + f" ({time.time() - t0:.0f} s)")
    return history
