"""Weight payloads: a state dict serialised with safetensors, tied (shared) tensors stored once."""

from __future__ import annotations

from typing import Mapping

import torch
from safetensors.torch import load as st_load, save as st_save

from relaxrl.engines.base import WeightPayload

KINDS = ("full", "lora")


def _view_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor *view*: two names with the same key are the same (tied) weight."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def pack_weights(state_dict: Mapping[str, torch.Tensor], *, version: int, kind: str) -> WeightPayload:
    """Serialise ``state_dict`` to a payload.

    A tensor that is the very same view as one already packed (a tied weight such as
    ``lm_head.weight`` = ``model.embed_tokens.weight``) is skipped: the receiver re-ties it, see
    ``load_full_state_dict``. Other tensors that merely share storage are copied.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown payload kind {kind!r}; valid: {list(KINDS)}")
    seen_views: set[tuple] = set()
    seen_storages: set[tuple] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        view = _view_key(t)
        if view in seen_views:
            continue
        seen_views.add(view)
        storage = (t.device, t.untyped_storage().data_ptr())
        out = t.detach().to("cpu").contiguous()
        if storage in seen_storages or out.untyped_storage().nbytes() != out.nbytes:
            out = out.clone()  # safetensors refuses tensors that share memory or are partial views
        seen_storages.add(storage)
        tensors[name] = out
    return WeightPayload(version=int(version), kind=kind, blob=st_save(tensors))


def cast_state_dict(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` in ``dtype`` (floating tensors only), tied weights kept tied (cast once, shared),
    so ``save_pretrained`` and ``pack_weights`` still write them once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = _view_key(t)
        if key not in cast:
            cast[key] = t.detach().to(dtype)
        out[name] = cast[key]
    return out


def unpack_weights(payload: WeightPayload) -> dict[str, torch.Tensor]:
    """The (CPU) state dict inside ``payload``."""
    return st_load(payload.blob)


def tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict names that are the same tensor as an earlier name (what ``pack_weights`` skips)."""
    seen: set[tuple] = set()
    tied: set[str] = set()
    for name, t in model.state_dict().items():
        view = _view_key(t)
        if view in seen:
            tied.add(name)
        seen.add(view)
    return tied


def load_full_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict`` that is strict except for tied weights missing from ``state_dict``.

    Names and shapes are checked before anything is copied, so a bad payload leaves the model as it was.
    """
    own = model.state_dict()
    missing = set(own) - set(state_dict) - tied_keys(model)
    unexpected = set(state_dict) - set(own)
    reshaped = [k for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}, shape mismatch {sorted(reshaped)[:5]}"
        )
    model.load_state_dict(dict(state_dict), strict=False)
