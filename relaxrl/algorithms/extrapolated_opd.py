r"""Extrapolated on-policy distillation, with the λ* clip-safety scheduler.

On the student's own samples, per token ``t`` (teacher T, base B = the warm-start policy):

    r_t = λ (log π_T(y_t) − log π_B(y_t))            extrapolated distillation reward
    A_t = r_t − (log π(y_t) − log π_B(y_t))            minus the per-token KL(π ‖ π_B) term
    L   = −mean_t min(ρ_t A_t, clip(ρ_t, lo_t, hi_t) A_t),  ρ_t = π(y_t) / π_behaviour(y_t)

The stationary point of ``E_π[r] − KL(π ‖ π_B)`` is ``π ∝ π_B^(1−λ) π_T^λ``; λ = 1 gives
``A_t = log π_T − log π``, plain on-policy (reverse-KL) distillation. ``A_t`` is a constant
(detached) per-token advantage; ``ρ`` is the importance ratio against the rollout policy, exactly
1 in value for fresh samples. Where the clip is taken (``clip_reference``):

* ``behaviour`` (PPO): ``[lo, hi] = [1/c, c]``, the ratio π/π_behaviour is clipped; binds only on
  stale samples.
* ``base``: ``[lo, hi] = [π_B/(c π_behaviour), c π_B/π_behaviour]``, i.e. π/π_B is clipped to
  ``[1/c, c]``, the clip the λ* reduction assumes (docs/lambda_star.md); π_B is ``ref_logprobs``,
  the teacher role's score of the base. Binds on fresh samples too, once π has moved a factor c
  from the base on the sampled token.

``schedule=lambda_star`` sets ``λ_t = min(λ, (1 − ε) λ*_t)`` with λ*_t estimated online from the
batch (``relaxrl.algorithms.lambda_star``); ``schedule=fixed`` uses λ but still estimates and logs
λ*, so every run shows where the threshold is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from relaxrl.algorithms.grpo import _masked_mean
from relaxrl.algorithms.lambda_star import (
    AGGREGATES,
    LambdaStarTracker,
    class_stats,
    schedule_lambda,
    structural_mask,
)
from relaxrl.algorithms.registry import register_algorithm
from relaxrl.sample import TensorBatch

SCHEDULES = ("fixed", "lambda_star")
CLIP_REFERENCES = ("behaviour", "base")


@dataclass
class ExtrapolatedOPDConfig:
    name: str = "extrapolated_opd"
    lam: float = 1.0  # λ (schedule=fixed) or λ_target (schedule=lambda_star); 1 = plain OPD
    schedule: str = "fixed"  # fixed | lambda_star
    clip_c: float = 2.0  # importance ratios clipped to [1/c, c]; also the c of λ*(p, b, c)
    clip_reference: str = "behaviour"  # behaviour: clip π/π_behaviour (PPO) | base: clip π/π_B (as λ* assumes)
    eps: float = 0.1  # scheduler margin: λ_t = min(lam, (1 - eps) λ*)
    estimator: str = "closed_form"  # a registered λ*(p, b, c) function
    aggregate: str = "binding"  # binding: per-token-class λ*, smallest wins | pooled: all positions as one
    ema: float = 0.9  # smoothing of the per-class logits of p and b across steps
    min_teacher_prob: float = 0.9  # structural position: teacher prob of the sampled token >= this (>= 0.5)
    min_count: int = 8  # a class needs this many positions in a batch to update its estimate
    # Token ids the output contract fixes (e.g. JSON punctuation); empty: every confident position.
    structural_token_ids: list[int] = field(default_factory=list)
    lambda_no_estimate: float = 1.0  # λ used by the scheduler before any structural position was seen

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.clip_c > 1:
            raise ValueError(f"clip_c must be > 1 (ratios clipped to [1/c, c]), got {self.clip_c}")
        if self.clip_reference not in CLIP_REFERENCES:
            raise ValueError(f"clip_reference must be one of {CLIP_REFERENCES}, got {self.clip_reference!r}")
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if not 0.5 <= self.min_teacher_prob < 1:
            raise ValueError(f"min_teacher_prob must be in [0.5, 1) (so it marks the modal token), "
                             f"got {self.min_teacher_prob}")


def extrapolated_advantages(
    logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, base_logprobs: torch.Tensor, lam: float
) -> torch.Tensor:
    """``A = λ (log π_T − log π_B) − (log π − log π_B)`` per token (no gradient)."""
    lp = logprobs.detach()
    return lam * (teacher_logprobs - base_logprobs) - (lp - base_logprobs)


def clipped_surrogate(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    c: float,
    reference_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``−min(ρ A, clip(ρ, lo, hi) A)``, ``ρ = π/π_behaviour``, and a 0/1 tensor of where the
    clip was binding. Without ``reference_logprobs`` ``[lo, hi] = [1/c, c]``; with them (the base's)
    ``[lo, hi] = [1/c, c] · π_ref/π_behaviour``, so it is π/π_ref that is held to ``[1/c, c]`` while
    the gradient keeps the behaviour policy's importance weight."""
    ratio = torch.exp((logprobs - behaviour_logprobs) * mask)  # 1 off the mask: padding stays finite
    unclipped = ratio * advantages
    if reference_logprobs is None:
        bounded = ratio.clamp(1.0 / c, c)
    else:
        shift = torch.exp((reference_logprobs - behaviour_logprobs) * mask)
        bounded = torch.minimum(torch.maximum(ratio, shift / c), shift * c)
    clipped = bounded * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


@register_algorithm("extrapolated_opd", ExtrapolatedOPDConfig)
class ExtrapolatedOPD:
    """See the module docstring. Stateful only in the scheduler's smoothed λ* estimate."""

    name = "extrapolated_opd"

    def __init__(self, config: ExtrapolatedOPDConfig | None = None) -> None:
        self.config = cfg = config if config is not None else ExtrapolatedOPDConfig()
        self.required_fields: tuple[str, ...] = (
            "response_ids", "behaviour_logprobs", "reward", "ref_logprobs", "teacher_logprobs",
        )  # fmt: skip
        self.tracker = LambdaStarTracker(c=cfg.clip_c, ema=cfg.ema, estimator=cfg.estimator,
                                         aggregate=cfg.aggregate, min_count=cfg.min_count)

    def step_lambda(self, batch: TensorBatch) -> dict[str, float]:
        """Update the λ* estimate from this batch's structural positions; return λ_t and what set it."""
        cfg = self.config
        targets = batch.input_ids[:, 1:]
        sel = structural_mask(batch.teacher_logprobs, batch.loss_mask, targets, cfg.min_teacher_prob,
                              cfg.structural_token_ids)
        est = self.tracker.update(class_stats(batch.teacher_logprobs, batch.ref_logprobs, targets, sel))
        out = {"structural_positions": float(sel.sum()), "c": cfg.clip_c, "lambda_target": cfg.lam}
        if est is None:
            out.update(p=math.nan, b=math.nan, lambda_star=math.nan, binding_class=-2.0)
            lam = cfg.lam if cfg.schedule == "fixed" else min(cfg.lam, cfg.lambda_no_estimate)
        else:
            out.update(est)
            lam = cfg.lam if cfg.schedule == "fixed" else schedule_lambda(cfg.lam, est["lambda_star"], cfg.eps)
        out["lambda"] = lam
        return out

    def prepare(self, batch: TensorBatch) -> TensorBatch:
        if batch.teacher_logprobs is None or batch.ref_logprobs is None:
            raise ValueError("extrapolated_opd needs teacher_logprobs and ref_logprobs (the base): "
                             "the teacher role must score both (teacher.teacher_checkpoint)")
        mask = batch.loss_mask
        batch.scalars.update(self.step_lambda(batch))
        batch.scalars["loss_normaliser"] = max(float(mask.sum()), 1.0)
        batch.scalars["reward_mean"] = float(batch.rewards.float().mean())
        return batch

    def loss(self, logprobs: torch.Tensor, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if "lambda" not in batch.scalars:
            raise ValueError("ExtrapolatedOPD.loss needs batch.scalars['lambda']: call prepare() first")
        mask = batch.loss_mask
        if logprobs.shape != mask.shape:
            raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != loss_mask shape {tuple(mask.shape)}")
        logprobs = logprobs.float()
        adv = extrapolated_advantages(logprobs, batch.teacher_logprobs, batch.ref_logprobs, batch.scalars["lambda"])
        adv = adv * mask
        reference = batch.ref_logprobs if self.config.clip_reference == "base" else None
        per_token, clipped = clipped_surrogate(logprobs, batch.behaviour_logprobs, adv, mask, self.config.clip_c,
                                               reference)
        with torch.no_grad():
            metrics = {
                "distill_reward": _masked_mean(batch.teacher_logprobs - batch.ref_logprobs, mask),
                "kl_base": _masked_mean(logprobs - batch.ref_logprobs, mask),
                "kl_teacher": _masked_mean(logprobs - batch.teacher_logprobs, mask),
                "adv_mean": _masked_mean(adv, mask),
                "clip_frac": _masked_mean(clipped, mask),
            }
        return (per_token * mask).sum() / batch.scalars["loss_normaliser"], metrics
