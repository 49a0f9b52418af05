"""LoRA adapters via peft: a plain-typed config node, wrapping, and adapter-only state dicts."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch


@dataclass
class LoraConfig:
    enabled: bool = False  # wrap the policy in LoRA adapters; base weights are then frozen
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter input (training only)
    # Names (suffixes) of the linear modules that get adapters.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def apply_lora(model: torch.nn.Module, cfg: LoraConfig | None) -> torch.nn.Module:
    """``model`` wrapped in a peft ``PeftModel`` when ``cfg.enabled``, else ``model`` unchanged."""
    if cfg is None or not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

    peft_cfg = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
    )
    return get_peft_model(model, peft_cfg)


def is_lora(model: torch.nn.Module) -> bool:
    peft = sys.modules.get("peft")  # a model was never wrapped if peft was never imported (saves 0.5 s)
    return peft is not None and isinstance(model, peft.PeftModel)


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only (keys contain ``lora_``), as peft saves them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an ``adapter_state_dict`` into a LoRA-wrapped ``model``; every adapter key must match.

    The adapter's rank and target modules must equal the model's (shapes are checked by torch).
    """
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state_dict)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"adapter state dict does not match the model: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
