"""Where an engine's model runs and in what dtype, and the one log line that says so."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: Optional[str]) -> torch.device:
    """``device``, or (None) the GPU when this process sees one, else the CPU. A Ray role with
    ``num_gpus=0`` sees no CUDA device, so the default follows the role's resources."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A dtype name (``float32``, ``bfloat16``, ``float16``) or a ``torch.dtype`` as a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {list(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def param_count(model: torch.nn.Module) -> int:
    """Parameters counted once (tied weights are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _short_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def describe_model(role: str, model: torch.nn.Module, dtype: torch.dtype, note: str = "") -> str:
    """E.g. ``trainer model: Qwen2ForCausalLM 494M params, bfloat16 on cuda:0 (fp32 master weights)``."""
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = f"{role} model: {type(base).__name__} {_short_count(param_count(model))} params, {dtype_name(dtype)} on {device}"
    return f"{text} ({note})" if note else text


def log_model(log: logging.Logger, role: str, model: torch.nn.Module, dtype: torch.dtype, note: str = "") -> None:
    """One INFO line per engine build. In a process whose logging nobody configured (a Ray Serve
    replica: Serve configures only its own logger) the engines' logger gets a stderr handler, so
    the line reaches the replica's log, and the driver's console with ``log_to_driver``."""
    _ensure_engine_log_handler()
    log.info("%s", describe_model(role, model, dtype, note))


def _ensure_engine_log_handler() -> None:
    engines = logging.getLogger("relaxrl.engines")
    if logging.getLogger().handlers or engines.handlers:
        return  # the application configured logging (the driver, pytest): leave it to that
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    engines.addHandler(handler)
    if engines.getEffectiveLevel() > logging.INFO:
        engines.setLevel(logging.INFO)


def token_ids(*candidates: Union[None, int, Sequence[int]]) -> list[int]:
    """The ids in ``candidates`` (each None, an id or a list of ids) in order, each once: e.g. a
    generation config's EOS list followed by the tokenizer's own EOS."""
    out: list[int] = []
    for c in candidates:
        for t in ([] if c is None else [c] if isinstance(c, int) else list(c)):
            if int(t) not in out:
                out.append(int(t))
    return out


def first_stop(row: Sequence[int], stop_ids: Sequence[int]) -> Optional[int]:
    """Index of the first token of ``row`` that is any of ``stop_ids``; None when there is none."""
    stops = set(stop_ids)
    return next((i for i, t in enumerate(row) if t in stops), None)
