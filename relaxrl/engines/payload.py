"""Weight payloads: a state dict copied out of the trainer once, as tensors (tied tensors once).

No serialisation format sits between the trainer and the rollout: ``pack_weights`` makes the one
copy (cast to the rollout's dtype on the way), Ray moves the tensors as raw buffers
(``payload_to_arrays``: each tensor a uint8 numpy view, which pickle protocol 5 hands to the object
store out of band), and a receiver copies them into its model in place. ``split_payload`` cuts an
update into parts of at most ``bucket_bytes`` so a receiver holds one part at a time.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np
import torch

from relaxrl.engines.base import WeightPayload

KINDS = ("full", "lora")


def _view_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor *view*: two names with the same key are the same (tied) weight."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def pack_weights(state_dict: Mapping[str, torch.Tensor], *, version: int, kind: str,
                 dtype: Optional[torch.dtype] = None) -> WeightPayload:
    """Copy ``state_dict`` into a payload that owns its tensors (CPU, contiguous): one copy per
    tensor, cast to ``dtype`` (floating tensors only) in the same copy.

    A tensor that is the very same view as one already packed (a tied weight such as
    ``lm_head.weight`` = ``model.embed_tokens.weight``) is skipped: the receiver re-ties it, see
    ``load_full_state_dict``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown payload kind {kind!r}; valid: {list(KINDS)}")
    seen_views: set[tuple] = set()
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in state_dict.items():
            view = _view_key(t)
            if view in seen_views:
                continue
            seen_views.add(view)
            to = dtype if dtype is not None and t.is_floating_point() else t.dtype
            out = torch.empty(t.shape, dtype=to, device="cpu")  # owned: the trainer goes on changing t
            out.copy_(t.detach())
            tensors[name] = out
    return WeightPayload(version=int(version), kind=kind, tensors=tensors)


def split_payload(payload: WeightPayload, bucket_bytes: int) -> list[WeightPayload]:
    """``payload`` cut into parts of at most ``bucket_bytes`` each (in state-dict order; a larger
    tensor is a part of its own), each with the whole update's manifest. Views, not copies."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in payload.tensors.items():
        n = t.numel() * t.element_size()
        if parts[-1] and size + n > bucket_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = t
        size += n
    return [WeightPayload(payload.version, payload.kind, tensors=p, manifest=dict(payload.manifest))
            for p in parts if p or len(parts) == 1]


def payload_to_arrays(payload: WeightPayload) -> tuple:
    """The arguments of ``payload_from_arrays``: every tensor as a flat uint8 numpy view of its
    bytes (no copy), so any dtype (bfloat16 included) crosses pickle protocol 5 out of band."""
    arrays = {k: t.detach().reshape(-1).view(torch.uint8).numpy() for k, t in payload.tensors.items()}
    return payload.version, payload.kind, arrays, payload.manifest


def payload_from_arrays(version: int, kind: str, arrays: dict[str, np.ndarray],
                        manifest: dict[str, tuple[tuple[int, ...], str]]) -> WeightPayload:
    """The payload of ``payload_to_arrays``, its tensors views of ``arrays`` (read-only when they
    are mapped from Ray's object store: a receiver only reads them)."""
    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, a in arrays.items():
            shape, dtype = manifest[k]
            tensors[k] = torch.from_numpy(a).view(getattr(torch, dtype)).view(tuple(shape))
    return WeightPayload(int(version), kind, tensors=tensors, manifest=manifest)


def write_parts(parts: Iterable[WeightPayload]) -> list[str]:
    """Each part's tensors as a safetensors file in shared memory (``/dev/shm`` where there is one),
    for an engine core in another process (``read_tensors``); the caller removes what is left."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = tempfile.mkdtemp(prefix="relaxrl-weights-", dir=root)
    paths = []
    seen: set[tuple] = set()
    try:
        for i, part in enumerate(parts):
            paths.append(os.path.join(folder, f"part-{i:04d}.safetensors"))
            save_file(_distinct(part.tensors, seen), paths[-1])
    finally:
        if not paths or not os.path.exists(paths[-1]):  # nothing, or it failed half-way
            shutil.rmtree(folder, ignore_errors=True)
    return paths


def _distinct(tensors: Mapping[str, torch.Tensor], seen: set[tuple]) -> dict[str, torch.Tensor]:
    """``tensors`` without a second name for a view already in ``seen`` (a tied weight: the
    receiver re-ties it) and with views of one storage made whole (safetensors stores each once)."""
    out, storages = {}, set()
    for name, t in tensors.items():
        view = _view_key(t)
        if view in seen:
            continue
        seen.add(view)
        storage = (t.device, t.untyped_storage().data_ptr())
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous()
        out[name] = t if whole and storage not in storages else t.contiguous().clone()
        storages.add(storage)
    return out


def read_tensors(paths: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``write_parts``' files, one file at a time (memory-mapped), each
    deleted once read."""
    import os

    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        os.remove(path)
        yield from tensors.items()
        del tensors


def remove_parts(paths: Iterable[str]) -> None:
    import os
    import shutil

    paths = list(paths)
    if paths:
        shutil.rmtree(os.path.dirname(paths[0]), ignore_errors=True)


def check_manifest(model: torch.nn.Module, manifest: Mapping[str, tuple]) -> None:
    """Raise ``ValueError`` unless ``manifest`` names every weight of ``model`` (tied copies may be
    absent) with its shape, and nothing else: checked before anything is copied, so a bad update
    leaves the model as it was."""
    own = model.state_dict()
    missing = set(own) - set(manifest) - tied_keys(model)
    unexpected = set(manifest) - set(own)
    reshaped = [k for k in manifest if k in own and tuple(manifest[k][0]) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}, shape mismatch {sorted(reshaped)[:5]}"
        )


def load_full_parts(model: torch.nn.Module, parts: Iterable[WeightPayload]) -> int:
    """Load an update's parts into ``model`` in place (the manifest checked first); returns the
    number of tensors copied."""
    n = 0
    for i, part in enumerate(parts):
        if i == 0:
            check_manifest(model, part.manifest)
        with torch.no_grad():
            model.load_state_dict(dict(part.tensors), strict=False)
        n += len(part.tensors)
    return n


def first_part(parts: Iterable[WeightPayload]) -> tuple[WeightPayload, Iterator[WeightPayload]]:
    """The first part of an update (its version, kind and manifest) and every part, the first
    included, still to be taken one at a time (a caller may give each part's memory back when the
    next is asked for). An update with no parts is an error."""
    parts = iter(parts)
    first = next(parts, None)
    if first is None:
        raise ValueError("a weight update with no parts")
    return first, itertools.chain([first], parts)


class ByteCount:
    """``parts``, taken lazily, adding up their bytes in ``nbytes`` as they go (what a load copied)."""

    def __init__(self, parts: Iterable[WeightPayload]) -> None:
        self._parts, self.nbytes = parts, 0

    def __iter__(self) -> Iterator[WeightPayload]:
        for part in self._parts:
            self.nbytes += part.nbytes
            yield part


def merged(parts: Iterable[WeightPayload]) -> WeightPayload:
    """One payload holding every part's tensors (a LoRA adapter: small enough to load at once)."""
    parts = list(parts)
    if not parts:
        raise ValueError("a weight update with no parts")
    tensors = {k: t for p in parts for k, t in p.tensors.items()}
    return WeightPayload(parts[0].version, parts[0].kind, tensors=tensors, manifest=dict(parts[0].manifest))


def iter_tensors(parts: Iterable[WeightPayload]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every part in turn (a loader that takes one iterator, e.g. vLLM's)."""
    for part in parts:
        yield from part.tensors.items()


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
    return dict(payload.tensors)


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
    check_manifest(model, {k: (tuple(t.shape), "") for k, t in state_dict.items()})
    model.load_state_dict(dict(state_dict), strict=False)
