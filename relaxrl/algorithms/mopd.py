r"""MOPD: multi-domain on-policy distillation (Nemotron-Cascade 2), as pure tensor functions.

The best checkpoint of each finished domain stage is that domain's teacher ``pi_T^d``. On the
student's own samples ``y ~ pi_b`` (the behaviour policy that generated them), every response token
of a sample from domain ``d`` gets the advantage

    A_t = log pi_T^d(y_t | y_<t) - log pi(y_t | y_<t)            (reverse-KL signal)

with ``log pi`` the current student, detached. The loss is the policy gradient of the reverse KL
``KL(pi || pi_T^d)`` on those samples, corrected for the behaviour policy by a truncated importance
weight between the current and the behaviour policy:

    L = -sum_t w_t * A_t * log pi(y_t),   w_t = clip(pi(y_t) / pi_b(y_t), is_low, is_high)

(``w`` and ``A`` detached; NC2 uses ``[0.5, 2.0]``). Its gradient is ``E[w (log pi - log pi_T) grad log pi]``,
the reverse-KL gradient (``E[grad log pi] = 0``). Optionally the GRPO outcome advantage is added with
weight ``outcome_weight``: ``A_t + outcome_weight * A_grpo``.

Which teacher scored a sample is the teacher role's business (``teacher_logprobs`` are the
log-probs of the teacher of the sample's own domain); this module only sees the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from relaxrl.algorithms.grpo import LOSS_AGG_MODES, aggregate, group_advantages, loss_normaliser
from relaxrl.algorithms.registry import register_algorithm
from relaxrl.sample import TensorBatch


@dataclass
class MOPDConfig:
    name: str = "mopd"
    is_low: float = 0.5  # truncated importance weight pi/pi_b clipped to [is_low, is_high]
    is_high: float = 2.0
    outcome_weight: float = 0.0  # > 0 adds this times the GRPO (group-normalised reward) advantage
    norm_std: bool = True  # GRPO part: divide by the group std
    std_eps: float = 1e-6
    adv_clip: float = 0.0  # > 0 clips the distillation advantage to [-adv_clip, adv_clip]
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum
    loss_agg_len: int = 0  # seq_mean_token_sum divides by rows * this; 0 = batch's longest row

    def __post_init__(self) -> None:
        if not 0 < self.is_low <= 1 <= self.is_high:
            raise ValueError(f"need 0 < is_low <= 1 <= is_high, got is_low={self.is_low}, is_high={self.is_high}")
        for name in ("outcome_weight", "std_eps", "adv_clip", "loss_agg_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {self.loss_agg!r}")


def truncated_is_weights(
    logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """``clip(exp(log pi - log pi_b), low, high)`` per token, detached; 1 off the mask."""
    log_ratio = (logprobs.detach() - behaviour_logprobs) * mask  # zero off the mask keeps exp() finite
    return torch.exp(log_ratio).clamp(low, high) * mask + (1 - mask)


def distill_advantages(
    teacher_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor, clip: float = 0.0
) -> torch.Tensor:
    """Per-token ``log pi_T - log pi`` (detached), 0 off the mask; clipped to ``[-clip, clip]`` if ``clip > 0``."""
    adv = (teacher_logprobs - logprobs.detach()) * mask
    return adv.clamp(-clip, clip) if clip > 0 else adv


def mopd_token_loss(logprobs: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-token ``-w * A * log pi`` (``w`` and ``A`` treated as constants)."""
    return -(weights.detach() * advantages.detach()) * logprobs


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


@register_algorithm("mopd", MOPDConfig)
class MOPD:
    """Token-level distillation from the teacher of each sample's domain; see the module docstring."""

    name = "mopd"

    def __init__(self, config: MOPDConfig | None = None) -> None:
        self.config = config if config is not None else MOPDConfig()
        self.required_fields: tuple[str, ...] = ("response_ids", "behaviour_logprobs", "reward", "teacher_logprobs")

    def prepare(self, batch: TensorBatch) -> TensorBatch:
        """Outcome advantages (when mixed in) and whole-batch normalisers; the distillation
        advantage needs the current log-probs, so it is formed in ``loss``."""
        cfg = self.config
        if batch.teacher_logprobs is None:
            raise ValueError("MOPD needs teacher_logprobs on every sample: the teacher role must score by domain")
        mask = batch.loss_mask
        if cfg.outcome_weight > 0:
            adv = group_advantages(batch.rewards.float(), batch.group_index, cfg.norm_std, cfg.std_eps)
            batch.extras["outcome_advantages"] = adv[:, None] * mask
        agg_len = float(cfg.loss_agg_len or mask.sum(-1).max())
        batch.scalars.update(
            loss_agg_len=agg_len,
            loss_normaliser=loss_normaliser(mask, cfg.loss_agg, agg_len),
            reward_mean=float(batch.rewards.float().mean()),
        )
        return batch

    def loss(self, logprobs: torch.Tensor, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the whole-batch loss, and its metrics."""
        cfg = self.config
        mask = batch.loss_mask
        if logprobs.shape != mask.shape:
            raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != loss_mask shape {tuple(mask.shape)}")
        if "loss_normaliser" not in batch.scalars:
            raise ValueError("MOPD.loss needs batch.scalars from prepare(): call prepare() on the whole batch first")
        logprobs = logprobs.float()
        raw = distill_advantages(batch.teacher_logprobs, logprobs, mask)
        distill = raw.clamp(-cfg.adv_clip, cfg.adv_clip) if cfg.adv_clip > 0 else raw
        adv = distill
        if cfg.outcome_weight > 0:
            adv = distill + cfg.outcome_weight * batch.extras["outcome_advantages"]
        weights = truncated_is_weights(logprobs, batch.behaviour_logprobs, mask, cfg.is_low, cfg.is_high)
        per_token = mopd_token_loss(logprobs, adv, weights)
        with torch.no_grad():
            ratio = torch.exp((logprobs - batch.behaviour_logprobs) * mask)
            metrics = {
                # Reverse KL(pi || pi_T) per token, estimated on the samples: E[log pi - log pi_T].
                "teacher_kl": _masked_mean(-raw, mask),
                "adv_clip_frac": _masked_mean((raw.abs() > cfg.adv_clip).float(), mask) if cfg.adv_clip > 0 else 0.0,
                "is_weight_mean": _masked_mean(weights, mask),
                "is_clip_frac": _masked_mean(((ratio < cfg.is_low) | (ratio > cfg.is_high)).float(), mask),
            }
        return aggregate(per_token, mask, cfg.loss_agg, batch.scalars["loss_normaliser"]), metrics
