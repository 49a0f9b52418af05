"""Helpers for runs that are killed, resumed and compared."""

import glob
import json
import os
import threading
import time

import torch
from safetensors.torch import load_file

from relaxrl.faults import replica_actors


def final_params(run_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "final", "model", "*.safetensors"))):
        out.update(load_file(f))
    assert out, f"no final weights in {run_dir}"
    return out


def step_metrics(run_dir) -> list[dict]:
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [x for x in lines if "step" in x]


def train_log(run_dir) -> list[tuple[str, int]]:
    out = []
    for line in open(os.path.join(run_dir, "train_log.jsonl")):
        out += [tuple(x) for x in json.loads(line)["samples"]]
    return out


def app_replicas(role: str) -> list:
    """Live replica actors of this test session's (only) run of ``role`` (none while restarting)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{role}-")]
    apps = {n.split("::", 1)[1].split("#", 1)[0] for n in names}
    assert len(apps) <= 1, f"expected one {role} app, found {apps}"
    return replica_actors(apps.pop()) if apps else []


def in_thread(fn, *args):
    """Run ``fn`` in a thread; returns (thread, box) where box gets 'result' or 'error'."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def wait_for(predicate, timeout_s: float, what: str, box=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if box is not None and box:
            raise AssertionError(f"run ended before {what}: {box}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
