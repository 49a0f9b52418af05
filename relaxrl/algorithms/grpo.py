r"""GRPO with the usual refinements, as pure tensor functions plus a thin ``Algorithm`` class.

Notation: a group ``g`` is the set of responses to one prompt, ``r_i`` a response's reward,
``pi_b`` the behaviour (rollout) policy, ``pi_prox`` the proximal policy, ``pi`` the one trained.

* GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g r) / (std_g r + eps)``, broadcast
  to every token of response ``i``; ``std`` is the unbiased one (``torch.std``, correction=1) as in
  the original implementations. Groups whose rewards are all equal (incl. size 1) get ``A = 0``.
* Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean_g r``
  (``norm_std=False``) and token *sums* divided by a constant ``B * L`` (``seq_mean_token_sum``),
  which removes the std and length biases. ``L`` is the generation limit (``loss_agg_len``; a run
  fills it from ``rollout.max_new_tokens``), so the constant is the same for every batch.
* DAPO clip-higher (Yu et al. 2025): ``L = -min(rho A, clip(rho, 1 - e_low, 1 + e_high) A)`` with
  ``e_high > e_low``, and the token-level mean over the whole batch (``token_mean``).
* Decoupled PPO (Hilton et al. 2022; AReaL, Fu et al. 2025):
  ``L = -(pi_prox / pi_b) * min(rho A, clip(rho) A)``, ``rho = pi / pi_prox``: trust region
  around ``pi_prox``, off-policyness corrected by the importance weight ``w = pi_prox / pi_b``.
* Capped importance weight (``is_cap = C``): truncated, ``w = min(w, C)`` (Espeholt et al. 2018;
  Yao et al. 2025, "TIS"), or masked, ``w = 0`` where ``w > C`` (AReaL's ``behav_imp_weight_cap``);
  per token, or per sequence with the row's geometric-mean weight (GSPO's length-normalised ratio).
* KL to a reference with Schulman's k3 estimator: ``k3 = exp(q) - q - 1``, ``q = log pi_ref - log pi``
  (unbiased for KL(pi || pi_ref) on samples of pi, always >= 0), taken on loss tokens only, with
  ``q`` and ``k3`` optionally clamped (verl's ``low_var_kl`` clamps ``q`` to 20 and ``k3`` to 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from relaxrl.algorithms.registry import register_algorithm
from relaxrl.sample import TensorBatch

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
OFF_POLICY_MODES = ("none", "decoupled")
IS_CAP_MODES = ("truncate", "mask")
IS_LEVELS = ("token", "sequence")


@dataclass
class GRPOConfig:
    name: str = "grpo"
    norm_std: bool = True  # divide advantages by the group std; False = Dr.GRPO (unbiased)
    std_eps: float = 1e-6  # added to the group std before dividing
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher)
    clip_high: float = 0.28  # upper clip; larger than clip_low keeps exploration tokens alive
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum
    # seq_mean_token_sum divides by rows * this (Dr.GRPO's L, the generation limit). 0: a run fills
    # in rollout.max_new_tokens (relaxrl.config_check.fill_from_rollout); prepare() refuses 0.
    loss_agg_len: int = 0
    kl_coef: float = 0.0  # > 0 adds kl_coef * k3 KL to the reference (needs the teacher role)
    # |log pi_ref - log pi| clamped to this before exp(), so k3 stays finite (verl's 20); 0 = off
    kl_log_ratio_clamp: float = 20.0
    kl_clamp: float = 0.0  # k3 clamped to at most this (verl's low_var_kl: 10); 0 = off
    # none: rho = pi / pi_b, clipped (the trust region is around the behaviour policy); measured
    # best at max_staleness=2 (docs/benchmarks.md) | decoupled: rho = pi / pi_prox, times w = pi_prox / pi_b
    off_policy: str = "none"
    # decoupled only: cap C on w (AReaL's behav_imp_weight_cap); 0 = uncapped
    is_cap: float = 0.0
    # truncate: w = min(w, C) (TIS; the default: every token keeps a bounded gradient) | mask: w = 0 where w > C
    is_cap_mode: str = "truncate"
    # token: each token's own w | sequence: the row's geometric-mean w, on every token of the row
    is_level: str = "token"

    def __post_init__(self) -> None:
        for field_name in ("clip_low", "clip_high", "std_eps", "kl_coef", "loss_agg_len", "kl_log_ratio_clamp",
                           "kl_clamp", "is_cap"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"{field_name} must be >= 0, got {getattr(self, field_name)}")
        if self.clip_low > 1:  # 1 - clip_low must stay a valid (non-negative) ratio bound
            raise ValueError(f"clip_low must be in [0, 1], got {self.clip_low}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {self.loss_agg!r}")
        check_off_policy(self.off_policy, self.is_cap_mode, self.is_level)
        if self.off_policy == "none" and (self.is_cap > 0 or self.is_level != "token"):
            raise ValueError(f"is_cap={self.is_cap} / is_level={self.is_level!r} act on the importance weight of "
                             "off_policy=decoupled; off_policy=none has none (w = 1)")
        if self.is_cap_mode == "mask" and self.is_cap == 0:
            raise ValueError("is_cap_mode=mask needs is_cap > 0 (the weight above which tokens are masked out)")


def check_off_policy(off_policy: str, is_cap_mode: str = "truncate", is_level: str = "token") -> None:
    """Errors naming an unknown ``off_policy`` / ``is_cap_mode`` / ``is_level``."""
    if off_policy == "truncated_is":  # folded into decoupled: one way to cap the weight
        raise ValueError("off_policy='truncated_is' is now off_policy=decoupled with is_cap=C "
                         "(is_cap_mode=truncate, the default; the old truncated_is cap was 2.0)")
    if off_policy not in OFF_POLICY_MODES:
        raise ValueError(f"off_policy must be one of {OFF_POLICY_MODES}, got {off_policy!r}")
    if is_cap_mode not in IS_CAP_MODES:
        raise ValueError(f"is_cap_mode must be one of {IS_CAP_MODES}, got {is_cap_mode!r}")
    if is_level not in IS_LEVELS:
        raise ValueError(f"is_level must be one of {IS_LEVELS}, got {is_level!r}")


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
        # Rows with loss tokens only: a row without any has no token mean, and counting it as 0
        # would shrink every other row's weight by how many such rows the batch happens to hold.
        return max(float((mask.sum(-1) > 0).sum()), 1.0)
    # Dr.GRPO's constant B * L: all rows, since the point is a denominator that no length moves.
    return max(float(mask.shape[0]) * float(agg_len), 1.0)


def _on_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask``, and exactly 0 off the mask even where ``x`` is not finite there (inf * 0 = NaN)."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """Reduce ``[B, T]`` per-token values to a scalar; ``normaliser`` comes from the *whole* batch,
    which makes the result additive over row slices (micro-batches)."""
    masked = _on_mask(per_token, mask)
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    if mode in ("token_mean", "seq_mean_token_sum"):
        return masked.sum() / normaliser
    raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {mode!r}")


def k3_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    log_ratio_clamp: float = 0.0,
    clamp: float = 0.0,
) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(q) - q - 1``, ``q = ref - logp``.

    Off ``mask`` ``q`` is 0 *before* exp (so k3 is 0 with no gradient): a prompt or padding position
    can hold any log-prob, and exp of one below about -88.7 would overflow to inf, which no later
    masking can undo (inf * 0 is NaN, in the value and the gradient). ``log_ratio_clamp > 0`` clamps
    ``q`` to +-that (exp stays finite on loss tokens too); ``clamp > 0`` caps k3 itself. A clamped
    token has no KL gradient, as in verl's ``low_var_kl``.
    """
    q = ref_logprobs - logprobs
    if mask is not None:
        q = torch.where(mask != 0, q, torch.zeros((), dtype=q.dtype))
    if log_ratio_clamp > 0:
        q = q.clamp(-log_ratio_clamp, log_ratio_clamp)
    k3 = torch.exp(q) - q - 1
    return k3.clamp(max=clamp) if clamp > 0 else k3


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(_on_mask(x, mask).sum() / mask.sum().clamp(min=1))


def behaviour_weights(
    prox_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 0.0,
    mode: str = "truncate",
    level: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights ``w = pi_prox / pi_b`` (no gradient) and where the cap acted.

    ``level="token"``: each token's own ``w``. ``"sequence"``: the row's geometric-mean weight
    ``exp(mean over its loss tokens of log w)`` on every token of the row; the geometric mean, not
    the product, so a cap means the same for a 3-token and a 3000-token response (a product of
    per-token ratios of 1.01 over 1000 tokens is 2e4). ``cap > 0``: ``mode="truncate"`` gives
    ``min(w, cap)``, ``"mask"`` gives 0 where ``w > cap`` (those tokens or rows leave the loss; the
    batch's denominator stays as it is, which keeps the loss additive over micro-batches).
    Returns ``(w, capped)``, both ``[B, T]``, 1 and False off the mask.
    """
    on = mask != 0
    zero = torch.zeros((), dtype=prox_logprobs.dtype)
    log_w = torch.where(on, (prox_logprobs - behaviour_logprobs).detach(), zero)
    if level == "sequence":
        row = log_w.sum(-1, keepdim=True) / on.sum(-1, keepdim=True).clamp(min=1)
        log_w = torch.where(on, row.expand_as(log_w), zero)
    elif level != "token":
        raise ValueError(f"is_level must be one of {IS_LEVELS}, got {level!r}")
    weight = torch.exp(log_w)
    capped = on & (weight > cap) if cap > 0 else torch.zeros_like(on)
    if mode == "truncate":
        weight = weight.clamp(max=cap) if cap > 0 else weight
    elif mode == "mask":
        weight = torch.where(capped, zero, weight)
    else:
        raise ValueError(f"is_cap_mode must be one of {IS_CAP_MODES}, got {mode!r}")
    return weight, capped


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    off_policy: str,
    is_cap: float = 0.0,
    is_cap_mode: str = "truncate",
    is_level: str = "token",
    prox_logprobs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped-surrogate loss ``-w * min(rho A, clip(rho, 1-cl, 1+ch) A)`` and stats.

    ``none``: ``rho = pi / pi_b``, ``w = 1`` (plain PPO/GRPO, the behaviour policy is the anchor).
    ``decoupled``: ``pi_prox`` is the policy at the start of the step: ``prox_logprobs`` when the
    step makes several updates (PPO mini-batches or epochs; the trainer computes them first), else
    ``pi.detach()``, which is exact for a single update: the proximal policy *is* the current weights.
    ``rho`` is then 1 in value on the first update (clipping is inactive) but carries the gradient
    of ``log pi``, and ``w = pi_prox / pi_b`` (see ``behaviour_weights`` for ``is_cap``/``is_cap_mode``/``is_level``)
    corrects for the staleness of the rollout.
    """
    check_off_policy(off_policy, is_cap_mode, is_level)
    if off_policy == "none":
        # Off the mask the log-probs are padding; zeroing the log-ratios there keeps exp() finite.
        on = mask != 0
        ratio = torch.exp(torch.where(on, logprobs - behaviour_logprobs, torch.zeros((), dtype=logprobs.dtype)))
        weight, capped = torch.ones_like(logprobs), torch.zeros_like(on)
    else:
        prox = logprobs.detach() if prox_logprobs is None else prox_logprobs
        on = mask != 0
        ratio = torch.exp(torch.where(on, logprobs - prox, torch.zeros((), dtype=logprobs.dtype)))
        weight, capped = behaviour_weights(prox, behaviour_logprobs, mask, is_cap, is_cap_mode, is_level)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -weight * torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clip_frac": _masked_mean((clipped < unclipped).float(), mask),  # min picked the clipped term
            "is_weight_mean": _masked_mean(weight, mask),
            "is_capped_frac": _masked_mean(capped.float(), mask),  # loss tokens whose w was over is_cap
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
        # The decoupled objective's proximal policy is the step's starting one (see policy_loss).
        self.needs_proximal = self.config.off_policy == "decoupled"

    def prepare(self, batch: TensorBatch) -> TensorBatch:
        """Advantages ``[B, T-1]`` in ``extras`` and whole-batch normalisers in ``scalars``."""
        cfg = self.config
        if cfg.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("GRPO with kl_coef > 0 needs ref_logprobs: enable the teacher role (reference model)")
        mask = batch.loss_mask
        adv = group_advantages(batch.rewards.float(), batch.group_index, cfg.norm_std, cfg.std_eps)
        batch.extras["advantages"] = adv[:, None] * mask
        if cfg.loss_agg == "seq_mean_token_sum" and cfg.loss_agg_len == 0:
            # The batch's longest row would make Dr.GRPO's constant change from batch to batch.
            raise ValueError("GRPO loss_agg=seq_mean_token_sum needs loss_agg_len > 0, Dr.GRPO's constant L: "
                             "the generation limit (a run fills it in from rollout.max_new_tokens)")
        batch.scalars.update(
            loss_agg_len=float(cfg.loss_agg_len),
            loss_normaliser=loss_normaliser(mask, cfg.loss_agg, cfg.loss_agg_len),
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
            cfg.clip_low, cfg.clip_high, cfg.off_policy, cfg.is_cap, cfg.is_cap_mode, cfg.is_level,
            batch.extras.get("prox_logprobs"),
        )  # fmt: skip
        local = loss_normaliser(mask, cfg.loss_agg, batch.scalars["loss_agg_len"])
        with torch.no_grad():  # per-micro-batch mean, in the same units as the loss
            metrics = {"pg_loss": float(aggregate(per_token, mask, cfg.loss_agg, local)), **metrics}
        if cfg.kl_coef > 0:
            kl = k3_kl(logprobs, batch.ref_logprobs, mask, cfg.kl_log_ratio_clamp, cfg.kl_clamp)
            per_token = per_token + cfg.kl_coef * kl
            metrics["kl"] = _masked_mean(kl.detach(), mask)
        return aggregate(per_token, mask, cfg.loss_agg, batch.scalars["loss_normaliser"]), metrics
