r"""GRPO with the usual refinements, as pure tensor functions plus a thin ``Algorithm`` class.

Notation: a group ``g`` is the set of responses to one prompt, ``r_i`` a response's reward,
``pi_b`` the behaviour (rollout) policy, ``pi_prox`` the proximal policy, ``pi`` the one trained.

* GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g r) / (std_g r + eps)``, broadcast
  to every token of response ``i``; ``std`` is the unbiased one (``torch.std``, correction=1) as in
  the original implementations. Groups whose rewards are all equal (incl. size 1) get ``A = 0``.
* Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean_g r``
  (``norm_std=False``) and token *sums* divided by a constant ``B * L`` (``seq_mean_token_sum``),
  which removes the std and length biases.
* DAPO clip-higher (Yu et al. 2025): ``L = -min(rho A, clip(rho, 1 - e_low, 1 + e_high) A)`` with
  ``e_high > e_low``, and the token-level mean over the whole batch (``token_mean``).
* Decoupled PPO (Hilton et al. 2022; AReaL, Fu et al. 2025):
  ``L = -(pi_prox / pi_b) * min(rho A, clip(rho) A)``, ``rho = pi / pi_prox``: trust region
  around ``pi_prox``, off-policyness corrected by the importance weight ``w = pi_prox / pi_b``.
* Truncated IS (Espeholt et al. 2018; Yao et al. 2025, "TIS"): as above with ``w = min(w, C)``.
* KL to a reference with Schulman's k3 estimator: ``k3 = exp(q) - q - 1``, ``q = log pi_ref - log pi``
  (unbiased for KL(pi || pi_ref) on samples of pi, always >= 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from relaxrl.algorithms.registry import register_algorithm
from relaxrl.sample import TensorBatch

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
OFF_POLICY_MODES = ("none", "decoupled", "truncated_is")


@dataclass
class GRPOConfig:
    name: str = "grpo"
    norm_std: bool = True  # divide advantages by the group std; False = Dr.GRPO (unbiased)
    std_eps: float = 1e-6  # added to the group std before dividing
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher)
    clip_high: float = 0.28  # upper clip; larger than clip_low keeps exploration tokens alive
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum
    loss_agg_len: int = 0  # seq_mean_token_sum divides by rows * this; 0 = batch's longest row
    kl_coef: float = 0.0  # > 0 adds kl_coef * k3 KL to the reference (needs the teacher role)
    # none: rho = pi / pi_b, clipped (the trust region is around the behaviour policy); measured
    # best at max_staleness=2 (docs/benchmarks.md) | decoupled | truncated_is
    off_policy: str = "none"
    is_cap: float = 2.0  # truncated_is: cap on the behaviour importance weight

    def __post_init__(self) -> None:
        for field_name in ("clip_low", "clip_high", "std_eps", "kl_coef", "loss_agg_len"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"{field_name} must be >= 0, got {getattr(self, field_name)}")
        if self.clip_low > 1:  # 1 - clip_low must stay a valid (non-negative) ratio bound
            raise ValueError(f"clip_low must be in [0, 1], got {self.clip_low}")
        if self.is_cap <= 0:
            raise ValueError(f"is_cap must be > 0, got {self.is_cap}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {self.loss_agg!r}")
        if self.off_policy not in OFF_POLICY_MODES:
            raise ValueError(f"off_policy must be one of {OFF_POLICY_MODES}, got {self.off_policy!r}")


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, norm_std: bool, eps: float) -> torch.Tensor:
    """Per-sample advantage ``r_i - mean_g`` (divided by ``std_g + eps`` when ``norm_std``).

    ``std_g`` is the unbiased std (correction=1). Groups whose rewards are all equal, including
    groups of one, carry no learning signal and get exactly 0 (no rounding residue / eps blow-up).
    """
    r = rewards.double()  # float64: group sums of many rewards stay exact enough
    n = int(group_index.max()) + 1 if group_index.numel() else 0
    count = torch.zeros(n, dtype=r.dtype).index_add_(0, group_index, torch.ones_like(r))
    mean = torch.zeros(n, dtype=r.dtype).index_add_(0, group_index, r) / count.clamp(min=1)
    centred = r - mean[group_index]
    if norm_std:
        sq = torch.zeros(n, dtype=r.dtype).index_add_(0, group_index, centred**2)
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std[group_index] + eps)
    return torch.where(_constant_groups(rewards, group_index)[group_index], 0.0, centred).to(rewards.dtype)


def _constant_groups(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """``[num_groups]`` bool: True where every reward of a (non-empty) group is the same."""
    n = int(group_index.max()) + 1 if group_index.numel() else 0
    hi = torch.full((n,), -torch.inf, dtype=rewards.dtype).scatter_reduce(0, group_index, rewards, "amax")
    lo = torch.full((n,), torch.inf, dtype=rewards.dtype).scatter_reduce(0, group_index, rewards, "amin")
    return hi == lo  # an empty group (gap in group_index) has hi=-inf, lo=inf


def loss_normaliser(mask: torch.Tensor, mode: str, agg_len: float) -> float:
    """Denominator of ``aggregate`` for the rows in ``mask`` (``agg_len`` only for seq_mean_token_sum)."""
    if mode == "token_mean":
        return max(float(mask.sum()), 1.0)  # all loss tokens
    if mode == "seq_mean_token_mean":
        return max(float(mask.shape[0]), 1.0)  # all rows, also rows without loss tokens
    return max(float(mask.shape[0]) * float(agg_len), 1.0)  # Dr.GRPO's constant B * L


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """Reduce ``[B, T]`` per-token values to a scalar; ``normaliser`` comes from the *whole* batch,
    which makes the result additive over row slices (micro-batches)."""
    masked = per_token * mask
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    if mode in ("token_mean", "seq_mean_token_sum"):
        return masked.sum() / normaliser
    raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {mode!r}")


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1``."""
    q = ref_logprobs - logprobs
    return torch.exp(q) - q - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    off_policy: str,
    is_cap: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped-surrogate loss ``-w * min(rho A, clip(rho, 1-cl, 1+ch) A)`` and stats.

    ``none``: ``rho = pi / pi_b``, ``w = 1`` (plain PPO/GRPO, the behaviour policy is the anchor).
    ``decoupled``: ``pi_prox = pi.detach()``. This is exact, not an approximation: RelaxRL takes one
    optimizer step per batch, so during the step the proximal policy *is* the current weights.
    ``rho`` is then 1 in value (clipping is inactive) but carries the gradient of ``log pi``, and
    ``w = pi_prox / pi_b`` corrects for the staleness of the rollout. ``truncated_is``: ``min(w, is_cap)``.
    """
    if off_policy not in OFF_POLICY_MODES:
        raise ValueError(f"off_policy must be one of {OFF_POLICY_MODES}, got {off_policy!r}")
    # Off the mask the log-probs are padding; zeroing the log-ratios there keeps exp() finite.
    if off_policy == "none":
        ratio = torch.exp((logprobs - behaviour_logprobs) * mask)
        weight = torch.ones_like(logprobs)
    else:
        prox = logprobs.detach()
        ratio = torch.exp(logprobs - prox)
        weight = torch.exp((prox - behaviour_logprobs) * mask)
        if off_policy == "truncated_is":
            weight = weight.clamp(max=is_cap)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -weight * torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clip_frac": _masked_mean((clipped < unclipped).float(), mask),  # min picked the clipped term
            "is_weight_mean": _masked_mean(weight, mask),
            "approx_kl_behaviour": _masked_mean(behaviour_logprobs - logprobs, mask),
        }
    return per_token, stats


@register_algorithm("grpo", GRPOConfig)
class GRPO:
    """Group-relative policy optimisation; see the module docstring for the variants."""

    name = "grpo"

    def __init__(self, config: GRPOConfig | None = None) -> None:
        self.config = config if config is not None else GRPOConfig()
        needs_ref = ("ref_logprobs",) if self.config.kl_coef > 0 else ()
        self.required_fields: tuple[str, ...] = ("response_ids", "behaviour_logprobs", "reward") + needs_ref

    def prepare(self, batch: TensorBatch) -> TensorBatch:
        """Advantages ``[B, T-1]`` in ``extras`` and whole-batch normalisers in ``scalars``."""
        cfg = self.config
        if cfg.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("GRPO with kl_coef > 0 needs ref_logprobs: enable the teacher role (reference model)")
        mask = batch.loss_mask
        adv = group_advantages(batch.rewards.float(), batch.group_index, cfg.norm_std, cfg.std_eps)
        batch.extras["advantages"] = adv[:, None] * mask
        agg_len = float(cfg.loss_agg_len or mask.sum(-1).max())
        batch.scalars.update(
            loss_agg_len=agg_len,
            loss_normaliser=loss_normaliser(mask, cfg.loss_agg, agg_len),
            adv_abs_mean=float(adv.abs().mean()),
            zero_adv_groups=float(_constant_groups(batch.rewards.float(), batch.group_index).sum()),
            reward_mean=float(batch.rewards.float().mean()),
        )
        return batch

    def loss(self, logprobs: torch.Tensor, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the whole-batch loss, and its metrics."""
        cfg = self.config
        if "advantages" not in batch.extras:
            raise ValueError("GRPO.loss needs batch.extras['advantages']: call prepare() on the whole batch first")
        mask = batch.loss_mask
        if logprobs.shape != mask.shape:
            raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != loss_mask shape {tuple(mask.shape)}")
        logprobs = logprobs.float()  # bf16 log-prob differences are too coarse for ratios
        per_token, metrics = policy_loss(
            logprobs, batch.behaviour_logprobs, batch.extras["advantages"], mask,
            cfg.clip_low, cfg.clip_high, cfg.off_policy, cfg.is_cap,
        )  # fmt: skip
        local = loss_normaliser(mask, cfg.loss_agg, batch.scalars["loss_agg_len"])
        with torch.no_grad():  # per-micro-batch mean, in the same units as the loss
            metrics = {"pg_loss": float(aggregate(per_token, mask, cfg.loss_agg, local)), **metrics}
        if cfg.kl_coef > 0:
            kl = k3_kl(logprobs, batch.ref_logprobs)
            per_token = per_token + cfg.kl_coef * kl
            metrics["kl"] = _masked_mean(kl.detach(), mask)
        return aggregate(per_token, mask, cfg.loss_agg, batch.scalars["loss_normaliser"]), metrics
