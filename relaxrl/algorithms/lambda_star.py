r"""The λ* clip-safety threshold of extrapolated on-policy distillation, its online estimate, the schedule.

Model (docs/lambda_star.md): at a structural position the
teacher puts probability ``p`` on the modal token (the one the output format requires), the base
(warm-start) policy ``b``. The extrapolated fixed point ``pi* ∝ pi_B^(1-λ) pi_T^λ`` puts

    q*(λ) = σ(ℓ(b) + λ (ℓ(p) − ℓ(b))),   ℓ(x) = log(x / (1 − x))

on it. The clip ``algorithm.clip_reference=base`` applies holds each sampled token's ratio to the
base in ``[1/c, c]``: in the reduction the modal ratio ``q/b`` and the tail ratio ``(1 − q)/(1 − b)``
both, i.e. ``q ∈ [max(b/c, 1 − c(1 − b)), min(c b, 1 − (1 − b)/c)]`` (``clip_region``). ``λ*`` is where
``q*(λ)`` reaches the edge on the teacher's side, ``(ℓ(edge) − ℓ(b)) / (ℓ(p) − ℓ(b))``:

* ``p > b``, ``b ≥ 1/(c+1)``: ``λ* = ln(1 + (c − 1)/b) / ln(p(1 − b) / (b(1 − p)))``  (tail ratio = 1/c)
* ``p > b``, ``b < 1/(c+1)``: ``λ* = ln(c(1 − b)/(1 − c b)) / ln(...)``  (modal ratio = c)
* ``p < b``, ``b ≥ c/(c+1)``: ``λ* = ln((1 − c(1 − b)) / (c b)) / ln(...)``  (tail ratio = c)
* ``p < b``, ``b < c/(c+1)``: ``λ* = ln((1 − b)/(c − b)) / ln(...)``  (modal ratio = 1/c; the tail-only
  reduction of LAMBDA_STAR.md called this ``∞`` when ``c(1 − b) ≥ 1``)
* ``p = b``: λ has no effect, ``λ* = ∞``.

Online estimate: structural positions are the student's sampled tokens that the teacher gives at
least ``min_teacher_prob`` (>= 0.5, so the sampled token *is* the teacher's modal token), optionally
only those whose token id the task's output contract lists. They are grouped by token id (one
modal class per structural token, e.g. ``}``); per class the mean logits of the teacher's and the
base's probabilities are smoothed with an EMA, and the binding class (smallest λ*) sets λ*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

LambdaStarFn = Callable[[float, float, float], float]
_ESTIMATORS: dict[str, LambdaStarFn] = {}
AGGREGATES = ("binding", "pooled")
_PROB_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before taking logits


def logit(x: float) -> float:
    return math.log(x / (1.0 - x))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def fixed_point_q(p: float, b: float, lam: float) -> float:
    """Modal probability of the extrapolated fixed point ``π_B^(1-λ) π_T^λ`` (Bernoulli reduction)."""
    return sigmoid(logit(b) + lam * (logit(p) - logit(b)))


def tail_ratio(p: float, b: float, lam: float) -> float:
    """``(1 − q*(λ)) / (1 − b)``: how far the fixed point moved the tail mass from the base's."""
    return (1.0 - fixed_point_q(p, b, lam)) / (1.0 - b)


def _check(p: float, b: float, c: float) -> None:
    for name, v in (("p", p), ("b", b)):
        if not 0.0 < v < 1.0:
            raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {v}")
    if not c > 1.0:
        raise ValueError(f"clip strength c must be > 1 (ratios clipped to [1/c, c]), got {c}")


def register_lambda_star(name: str) -> Callable[[LambdaStarFn], LambdaStarFn]:
    """Decorator: make ``fn(p, b, c) -> λ*`` selectable as ``algorithm.estimator=name``."""

    def decorate(fn: LambdaStarFn) -> LambdaStarFn:
        if name in _ESTIMATORS and _ESTIMATORS[name] is not fn:
            raise ValueError(f"λ* estimator {name!r} is already registered")
        _ESTIMATORS[name] = fn
        return fn

    return decorate


def get_lambda_star(name: str) -> LambdaStarFn:
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown λ* estimator {name!r}; registered: {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[name]


def clip_region(b: float, c: float) -> tuple[float, float]:
    """Modal probabilities ``q`` a per-token clip of ``π/π_B`` to ``[1/c, c]`` admits in the Bernoulli
    reduction: ``q/b`` and ``(1 − q)/(1 − b)`` both in ``[1/c, c]``."""
    _check(0.5, b, c)
    return max(b / c, 1.0 - c * (1.0 - b)), min(c * b, 1.0 - (1.0 - b) / c)


@register_lambda_star("closed_form")
def lambda_star(p: float, b: float, c: float) -> float:
    """The closed-form clip-safety threshold λ*(p, b, c) (module docstring); ``math.inf`` iff p = b.

    The tail-binding branches keep the forms without ``1 − (1 − b)/c`` (no cancellation at b → 1).
    """
    _check(p, b, c)
    log_odds_ratio = logit(p) - logit(b)  # = ln(p(1-b) / (b(1-p)))
    if log_odds_ratio == 0.0:
        return math.inf
    if log_odds_ratio > 0:  # q rises to the region's top: the tail ratio reaches 1/c, or q/b reaches c
        edge = math.log(1.0 + (c - 1.0) / b) if b >= 1.0 / (c + 1.0) else math.log(c * (1.0 - b) / (1.0 - c * b))
    else:  # q falls to the region's bottom: the tail ratio reaches c, or q/b reaches 1/c
        edge = math.log((1.0 - c * (1.0 - b)) / (c * b)) if b >= c / (c + 1.0) else math.log((1.0 - b) / (c - b))
    return edge / log_odds_ratio


def schedule_lambda(target: float, lam_star: float, eps: float) -> float:
    """``λ_t = min(λ_target, (1 − ε) λ*_t)``."""
    return min(target, (1.0 - eps) * lam_star)


@dataclass
class ClassStats:
    """Structural positions of one modal class in one batch: mean logits of p and b, and a count."""

    logit_p: float
    logit_b: float
    count: int


def structural_mask(
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    target_ids: torch.Tensor,
    min_teacher_prob: float,
    structural_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Bool ``[B, T-1]``: loss tokens the teacher gives >= ``min_teacher_prob`` (and whose id is in
    ``structural_ids`` when that is non-empty)."""
    sel = (mask > 0) & (teacher_logprobs >= math.log(min_teacher_prob))
    if structural_ids:
        sel &= torch.isin(target_ids, torch.tensor(list(structural_ids), dtype=target_ids.dtype))
    return sel


def class_stats(
    teacher_logprobs: torch.Tensor, base_logprobs: torch.Tensor, target_ids: torch.Tensor, selected: torch.Tensor
) -> dict[int, ClassStats]:
    """Per token id among ``selected`` positions: mean ℓ(p) (teacher) and mean ℓ(b) (base)."""
    lo, hi = math.log(_PROB_EPS), math.log1p(-_PROB_EPS)
    lp = teacher_logprobs[selected].double().clamp(lo, hi)
    lb = base_logprobs[selected].double().clamp(lo, hi)
    # ℓ(x) from log x: log x − log(1 − x) = lx − log1p(−exp(lx))
    zp, zb = lp - torch.log1p(-lp.exp()), lb - torch.log1p(-lb.exp())
    ids = target_ids[selected]
    out = {}
    for tok in ids.unique().tolist():
        rows = ids == tok
        out[int(tok)] = ClassStats(float(zp[rows].mean()), float(zb[rows].mean()), int(rows.sum()))
    return out


def pool(stats: dict[int, ClassStats]) -> dict[int, ClassStats]:
    """All classes as one (count-weighted mean logits), under the key -1."""
    n = sum(s.count for s in stats.values())
    if n == 0:
        return {}
    zp = sum(s.logit_p * s.count for s in stats.values()) / n
    zb = sum(s.logit_b * s.count for s in stats.values()) / n
    return {-1: ClassStats(zp, zb, n)}


@dataclass
class LambdaStarTracker:
    """Smoothed online λ*: EMA of each modal class's mean logits; the binding class sets λ*.

    ``update`` takes one batch's ``class_stats`` and returns the current estimate. Classes seen
    fewer than ``min_count`` times in a batch do not update their average (too noisy).
    """

    c: float
    ema: float = 0.9
    estimator: str = "closed_form"
    aggregate: str = "binding"
    min_count: int = 8
    _avg: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        self._fn = get_lambda_star(self.estimator)
        _check(0.5, 0.5, self.c)

    def update(self, stats: dict[int, ClassStats]) -> Optional[dict[str, float]]:
        """Fold in a batch; returns ``{p, b, lambda_star, binding_class}`` or None before any estimate."""
        if self.aggregate == "pooled":
            stats = pool(stats)
        for tok, s in stats.items():
            if s.count < self.min_count:
                continue
            prev = self._avg.get(tok)
            new = (s.logit_p, s.logit_b)
            if prev is not None:
                new = tuple(self.ema * a + (1.0 - self.ema) * x for a, x in zip(prev, new))
            self._avg[tok] = new
        return self.estimate()

    def estimate(self) -> Optional[dict[str, float]]:
        best = None
        for tok, (zp, zb) in self._avg.items():
            p, b = sigmoid(zp), sigmoid(zb)
            p, b = min(max(p, _PROB_EPS), 1 - _PROB_EPS), min(max(b, _PROB_EPS), 1 - _PROB_EPS)
            lam = self._fn(p, b, self.c)
            if best is None or lam < best["lambda_star"]:
                best = {"p": p, "b": b, "lambda_star": lam, "binding_class": float(tok)}
        return best
