"""Run checkpoints (what a resume needs) and the run record (what an audit needs).

A checkpoint directory ``<run_dir>/checkpoints/<name>/`` holds

* ``model/``, ``trainer_state.pt`` — the trainer engine: weights (safetensors), optimizer,
  scheduler, policy version, torch RNG (loaded with ``weights_only=True``);
* ``actor_state.json`` — trained uids (none is trained twice after a resume), Python/NumPy RNG;
* ``meta.json`` — step, version, the queue's accounting and data position (groups admitted so far
  and those in flight, which a resume generates again with the same task and seed), the rewards so
  far, the model architecture, and the run files copied alongside (``RUN_FILES``);
* ``train_log.jsonl`` — the ordered (sample uid, policy version) log up to this step.

It is written under ``<name>.partial`` and renamed when complete, so a run killed while saving
never leaves a checkpoint that looks whole. Only JSON, safetensors and tensor-only torch files are
read back: nothing in a checkpoint can execute code.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from importlib import metadata
from typing import Any, Optional

META = "meta.json"
TRAIN_LOG = "train_log.jsonl"
RUN_INFO = "run_info.json"
# Files of the run directory that belong to its state (e.g. a MOPD teacher registry): copied into
# each checkpoint when present and restored on resume. Other modules may append their own.
RUN_FILES: list[str] = ["mopd_registry.json"]
# config.json keys that must match for a checkpoint's weights to fit the model.
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings",
             "max_position_embeddings")
PACKAGES = ("relaxrl", "torch", "ray", "transformers", "peft", "hydra-core", "omegaconf", "safetensors",
            "datasets", "numpy")


class CheckpointError(ValueError):
    """A checkpoint that does not exist, is incomplete, or does not fit this run."""


def partial_dir(final: str) -> str:
    path = final.rstrip("/") + ".partial"
    shutil.rmtree(path, ignore_errors=True)  # left by a run killed while saving
    return path


def finish(tmp: str, final: str, meta: dict, run_dir: str) -> str:
    """Add ``meta.json``, the train log and run files to ``tmp`` (the trainer has written its part)
    and move it to ``final`` in one rename."""
    for name in [TRAIN_LOG, *RUN_FILES]:
        src = os.path.join(run_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(tmp, name))
    meta = {**meta, "run_files": [n for n in RUN_FILES if os.path.isfile(os.path.join(tmp, n))]}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_meta(path: str) -> dict:
    file = os.path.join(path, META)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path!r} is not a complete checkpoint (no {META})")
    with open(file) as f:
        return json.load(f)


def latest(checkpoints_dir: str) -> Optional[str]:
    """The complete checkpoint with the highest step under ``checkpoints_dir`` (None if none)."""
    if not os.path.isdir(checkpoints_dir):
        return None
    found = []
    for name in os.listdir(checkpoints_dir):
        path = os.path.join(checkpoints_dir, name)
        if not name.endswith(".partial") and os.path.isfile(os.path.join(path, META)):
            found.append((load_meta(path)["step"], os.path.getmtime(os.path.join(path, META)), path))
    return max(found)[2] if found else None


def resolve_resume(resume: Any, run_dir: str) -> Optional[str]:
    """The checkpoint ``resume`` names: None/false: none; true/latest: the newest one of ``run_dir``;
    a path: that checkpoint, or the newest one in that run directory or checkpoints directory."""
    if resume is None or str(resume).lower() in ("", "false", "none", "null"):
        return None
    if str(resume).lower() in ("true", "latest"):
        where = os.path.join(run_dir, "checkpoints")
        found = latest(where)
        if found is None:
            raise CheckpointError(f"resume={resume}: no complete checkpoint in {where!r}")
        return found
    path = os.path.abspath(os.path.expanduser(str(resume)))
    if not os.path.exists(path):
        raise CheckpointError(f"resume: checkpoint path {path!r} does not exist")
    if os.path.isfile(os.path.join(path, META)):
        return path
    for where in (os.path.join(path, "checkpoints"), path):
        found = latest(where)
        if found is not None:
            return found
    raise CheckpointError(f"resume: {path!r} holds no complete checkpoint (a directory with {META})")


def arch(model_dir: str) -> dict:
    """The architecture keys of a model directory's ``config.json``."""
    file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"no config.json in model directory {model_dir!r}")
    with open(file) as f:
        cfg = json.load(f)
    return {k: cfg.get(k) for k in ARCH_KEYS}


def check_compatible(meta: dict, path: str, model_arch: dict, lora: bool, group_size: int) -> None:
    """Raise ``CheckpointError`` naming each difference between the checkpoint and this run."""
    diffs = [f"{k}: checkpoint {meta['arch'].get(k)!r}, run {model_arch.get(k)!r}"
             for k in ARCH_KEYS if meta["arch"].get(k) != model_arch.get(k)]
    if meta.get("lora") != lora:
        diffs.append(f"model.lora.enabled: checkpoint {meta.get('lora')}, run {lora}")
    if meta["queue"]["group_size"] != group_size:
        diffs.append(f"rollout.group_size: checkpoint {meta['queue']['group_size']}, run {group_size}")
    if diffs:
        raise CheckpointError(f"checkpoint {path!r} does not fit this run: " + "; ".join(diffs))


def restore_run_files(path: str, run_dir: str) -> None:
    """Put the checkpoint's train log and run files back into ``run_dir`` (dropping anything the
    killed run logged after the checkpoint)."""
    meta = load_meta(path)
    for name in [TRAIN_LOG, *meta.get("run_files", [])]:
        src, dst = os.path.join(path, name), os.path.join(run_dir, name)
        if os.path.isfile(src):
            if os.path.abspath(src) != os.path.abspath(dst):
                shutil.copy2(src, dst)
        elif name == TRAIN_LOG and os.path.isfile(dst):
            os.remove(dst)


def package_versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_run_info(run_dir: str, seeds: dict, resumed_from: Optional[str]) -> dict:
    """``run_info.json``: seeds, package versions, Python, platform, command line, resume source."""
    info = {
        "seeds": seeds,
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
        "resumed_from": resumed_from,
    }
    with open(os.path.join(run_dir, RUN_INFO), "w") as f:
        json.dump(info, f, indent=1)
    return info
