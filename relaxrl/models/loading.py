"""Loading models from local directories, and building cached tiny models for tests and CPU runs.

RelaxRL never downloads: every path must be a local directory written by ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from relaxrl.engines.device import DTYPES, dtype_name, to_dtype, token_ids
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.models.warm_start import warm_start as run_warm_start

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the tokenizer/model builders change, to invalidate caches
MARKER = "relaxrl_complete.json"
WARM_START_DEFAULTS = {"steps": 0, "lr": 3e-3, "batch_size": 32, "seed": 0}


def _require_local_dir(path: Union[str, os.PathLike], need_config: bool) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"model directory {str(p)!r} does not exist; RelaxRL does not download models: "
            "pass a local directory written by save_pretrained"
        )
    if need_config and not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in {str(p)!r}; RelaxRL does not download models: "
            "pass a local directory written by save_pretrained"
        )
    return p


# tokenizer_config.json classes meaning "the tokenizer is tokenizer.json, as it is".
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: Union[str, os.PathLike]) -> Any:
    """The tokenizer saved in the local directory ``path``.

    A directory whose tokenizer_config.json names the generic class (what ``save_pretrained`` of a
    plain tokenizer.json tokenizer writes, as the tiny models' does) is loaded as exactly that file.
    AutoTokenizer would pick the class by the model's type instead (transformers 5 does so for
    qwen2), and Qwen2's tokenizer rebuilds the pre-tokenizer: the character-level tokenizer of a
    tiny Qwen2 then dropped every space and newline it encoded. Any other directory goes through
    AutoTokenizer."""
    p = _require_local_dir(path, need_config=False)
    if (p / "tokenizer.json").is_file() and _tokenizer_class(p) in _GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def _tokenizer_class(p: Path) -> Optional[str]:
    try:
        return json.loads((p / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolve_dtype(path: Union[str, os.PathLike], dtype: Union[str, torch.dtype] = "auto") -> str:
    """The dtype name to load ``path`` in: ``dtype`` itself, or for ``"auto"`` the directory's own
    (config.json's ``dtype``, or ``torch_dtype`` as older transformers wrote it; float32 when it
    names none). A bf16 directory is then trained and saved in bf16, not silently upcast."""
    if isinstance(dtype, torch.dtype):
        return dtype_name(dtype)
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {['auto', *DTYPES]}")
        return dtype
    config = _read_json(_require_local_dir(path, need_config=True) / "config.json")
    own = config.get("dtype") or config.get("torch_dtype") or "float32"
    if own not in DTYPES:
        raise ValueError(f"model.dtype=auto: {path}/config.json names dtype {own!r}; set model.dtype to one of {list(DTYPES)}")
    return own


def eos_token_ids(path: Union[str, os.PathLike], tokenizer: Any = None) -> list[int]:
    """Every id that ends a response of the model in ``path``: its generation config's
    ``eos_token_id`` (an id or a list: Llama-3 has two), else config.json's, then the tokenizer's."""
    p = _require_local_dir(path, need_config=False)
    gen = _read_json(p / "generation_config.json").get("eos_token_id")
    own = gen if gen is not None else _read_json(p / "config.json").get("eos_token_id")
    ids = token_ids(own, None if tokenizer is None else tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{path}: no eos_token_id in generation_config.json, config.json or the tokenizer")
    return ids


def load_model(path: Union[str, os.PathLike], dtype: Union[str, torch.dtype] = "auto") -> PreTrainedModel:
    """The causal LM saved in the local directory ``path``, in ``dtype`` (``"auto"``: the
    directory's own, see ``resolve_dtype``), in eval mode."""
    p = _require_local_dir(path, need_config=True)
    dtype = to_dtype(resolve_dtype(p, dtype))
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    model.eval()
    return model


def cache_key(model_kwargs: dict, warm_start: dict, key_extra: dict) -> str:
    """A short stable hash of everything that determines the built model directory."""
    payload = {"format": FORMAT_VERSION, "model": model_kwargs, "warm_start": warm_start, "extra": key_extra}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def prepare_tiny_model_dir(
    *,
    cache_dir: str,
    model_kwargs: dict,
    warm_start_pairs_fn: Optional[Callable[[int], list[tuple[str, str]]]],
    warm_start: dict,
    key_extra: dict,
    prompt_template: Optional[str] = None,
) -> str:
    """Build (or reuse) a tiny model + tokenizer directory under ``cache_dir``; returns its path.

    The directory name hashes ``model_kwargs``, ``warm_start`` and ``key_extra``; the pairs function
    is not hashable, so ``key_extra`` must identify what it produces (e.g. the env's config).
    ``warm_start_pairs_fn(n)`` is asked for ``steps * batch_size`` pairs; their prompts are rendered
    with ``prompt_template`` (``env.prompt_template``) when given, as RL will render them.
    """
    unknown = set(warm_start) - set(WARM_START_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown warm_start key(s) {sorted(unknown)}; valid: {list(WARM_START_DEFAULTS)}")
    ws = {**WARM_START_DEFAULTS, **warm_start}
    key = cache_key(model_kwargs, ws, {**key_extra, **({"prompt_template": prompt_template} if prompt_template else {})})
    root = Path(cache_dir)
    final = root / key
    if (final / MARKER).is_file():
        info = json.loads((final / MARKER).read_text())
        log.info("reusing tiny model %s (warm-start loss %s)", final, info.get("metrics", {}).get("final_loss"))
        return str(final)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-"))
    try:
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, **model_kwargs)
        metrics: dict[str, Any] = {}
        if ws["steps"] > 0 and warm_start_pairs_fn is not None:
            pairs = warm_start_pairs_fn(ws["steps"] * ws["batch_size"])
            metrics = run_warm_start(
                model, tokenizer, pairs, steps=ws["steps"], lr=ws["lr"], batch_size=ws["batch_size"], seed=ws["seed"],
                prompt_template=prompt_template,
            )
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"key": key, "model_kwargs": model_kwargs, "warm_start": ws, "key_extra": key_extra}
        marker["metrics"] = metrics
        (tmp / MARKER).write_text(json.dumps(marker, sort_keys=True, indent=1, default=str))
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # left over from an interrupted non-atomic writer
        try:
            os.rename(tmp, final)  # atomic: readers see a complete directory or none
        except OSError:
            if not (final / MARKER).is_file():
                raise
            log.info("tiny model %s was built concurrently by another process; using it", final)
            shutil.rmtree(tmp, ignore_errors=True)
            return str(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built tiny model %s (warm-start loss %s)", final, metrics.get("final_loss"))
    return str(final)
