"""Run checkpoints (what a resume needs) and the run record (what an audit needs).

A checkpoint directory ``<run_dir>/checkpoints/<name>/`` holds

* ``model/``, ``trainer_state.pt`` — the trainer engine: weights (safetensors), optimizer,
  scheduler, policy version, torch RNG (loaded with ``weights_only=True``);
* ``actor_state.json`` — the trainer's ledger of trained samples (``relaxrl.ledger``: none is
  trained twice after a resume; a few integers per group in flight), Python/NumPy RNG;
* ``meta.json`` — step, version, the queue's accounting and data position (groups admitted so far
  and those in flight, which a resume generates again with the same task and seed, with their
  admission levels, and the partial rollouts the rollout recorded for them: tokens, behaviour
  log-probs and token versions per response, which a resume continues instead; see
  ``StalenessQueue.snapshot`` and ``relaxrl.partial``), the rewards so far, the model architecture, the run files copied alongside (``RUN_FILES``), and the length of
  the run's ``train_log.jsonl`` at this step (``train_log_bytes``): the log is not copied (it grows
  with the run); a resume cuts the run's log back to that length.

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
# Files of the run directory that belong to its state (the MOPD teacher registry, relaxrl/pipeline): copied into
# each checkpoint when present and restored on resume. Other modules may append their own.
RUN_FILES: list[str] = ["registry.json"]
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
    """Add ``meta.json`` and run files to ``tmp`` (the trainer has written its part) and move it to
    ``final`` in one rename. The train log stays in the run directory; meta records its length."""
    for name in RUN_FILES:
        src = os.path.join(run_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(tmp, name))
    log = os.path.join(run_dir, TRAIN_LOG)
    meta = {**meta, "run_files": [n for n in RUN_FILES if os.path.isfile(os.path.join(tmp, n))],
            "train_log_bytes": os.path.getsize(log) if os.path.isfile(log) else 0}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def partial_rollouts(meta: dict) -> dict[str, Any]:
    """The partial rollouts a checkpoint's ``meta`` carries, by group id (``PartialGroup``s): what a
    resumed run continues. Empty for a checkpoint taken with none in flight, or before they were kept."""
    from relaxrl.partial import PartialGroup

    return {f"g{seq}": PartialGroup.from_json(pg) for seq, pg in meta.get("queue", {}).get("partials", {}).items()}


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
    """Put the checkpoint's train log and run files back into ``run_dir``: the log is cut back to
    its length at the checkpoint (dropping what the lost or killed run logged after it)."""
    meta = load_meta(path)
    if "train_log_bytes" in meta:
        restore_train_log(path, meta, run_dir)
    for name in [*([] if "train_log_bytes" in meta else [TRAIN_LOG]), *meta.get("run_files", [])]:
        src, dst = os.path.join(path, name), os.path.join(run_dir, name)
        if os.path.isfile(src):
            if os.path.abspath(src) != os.path.abspath(dst):
                shutil.copy2(src, dst)
        elif name == TRAIN_LOG and os.path.isfile(dst):
            os.remove(dst)


def restore_train_log(path: str, meta: dict, run_dir: str) -> None:
    """``run_dir``'s train log as it was at checkpoint ``path``: the first ``train_log_bytes`` of
    the log of the run that wrote it (``<its run_dir>/checkpoints/<name>``), whose last line must be
    the checkpoint's step."""
    size, step = int(meta["train_log_bytes"]), int(meta["step"])
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), TRAIN_LOG)
    dst = os.path.join(run_dir, TRAIN_LOG)
    if size == 0:
        if os.path.isfile(dst):
            os.remove(dst)
        return
    if not os.path.isfile(src) or os.path.getsize(src) < size:
        raise CheckpointError(f"checkpoint {path!r} needs the first {size} bytes of {src!r} (its train log), "
                              f"which has {os.path.getsize(src) if os.path.isfile(src) else 'no file'}")
    last = _last_line(src, size)
    if json.loads(last).get("step") != step:
        raise CheckpointError(f"train log {src!r} does not fit checkpoint {path!r}: the line ending at byte "
                              f"{size} is not step {step}")
    if os.path.abspath(src) == os.path.abspath(dst):
        with open(dst, "r+b") as f:
            f.truncate(size)
    else:
        with open(src, "rb") as f, open(dst, "wb") as out:
            shutil.copyfileobj(_Prefix(f, size), out)


def _last_line(file: str, end: int) -> bytes:
    """The line of ``file`` ending at byte ``end`` (which must be just after a newline)."""
    with open(file, "rb") as f:
        pos, tail = end, b""
        while pos > 0 and b"\n" not in tail[:-1]:
            step = min(pos, 1 << 16)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
    if not tail.endswith(b"\n"):
        raise CheckpointError(f"train log {file!r}: byte {end} is not the end of a line")
    return tail[:-1].rsplit(b"\n", 1)[-1]


class _Prefix:
    """The first ``n`` bytes of a file object, for ``shutil.copyfileobj``."""

    def __init__(self, f: Any, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


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
