"""A resume or an in-run restore trains the steps after its checkpoint again: metrics.jsonl keeps
one row per step (the new one) and W&B keeps every row, plotted by the train step."""

import glob
import json
import struct

import pytest
from omegaconf import OmegaConf

from relaxrl.monitor import WANDB_STEP, Monitor


def _cfg(logger: str):
    return OmegaConf.create({"logger": {"progress": False, "name": logger, "project": "t", "entity": None,
                                        "mode": "offline", "tags": []}})


def _rows(path):
    return [json.loads(x) for x in open(path)]


def test_rewind_drops_the_later_steps_rows_and_a_half_written_line(tmp_path):
    mon = Monitor(_cfg("console"), str(tmp_path), 6)
    mon.log(0, {"eval/accuracy": 0.25}, advance=False)
    for step in range(1, 5):
        mon.log(step, {"loss": float(step)})
    mon._file.write('{"step": 5, "lo')  # a run killed while it wrote a line
    assert mon.rewind(2) == 3 and mon._bar.n == 2
    for step in (3, 4):
        mon.log(step, {"loss": 10.0 + step})
    mon.close({"steps": 4})
    rows = _rows(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in rows if "step" in r]
    assert steps == [0, 1, 2, 3, 4]  # each step once: the retrained steps' new rows only
    assert [r["loss"] for r in rows if r.get("step", 0) >= 3] == [13.0, 14.0]
    assert rows[-1] == {"summary": {"steps": 4}}


def _wandb_history(run_dir) -> list[dict]:
    """History records of an offline W&B run, read from its ``.wandb`` file (a LevelDB-style log:
    32 KiB blocks of chunks with a 7-byte header; chunk kinds 1 = whole record, 2-4 = first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    data, pos, buf, out = open(path, "rb").read(), 7, b"", []  # 7: the file's own header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and n == 0):  # block padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


def test_wandb_keeps_the_retrained_steps(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    mon = Monitor(_cfg("wandb"), str(tmp_path), 4)
    for step in range(1, 5):
        mon.log(step, {"loss": float(step)})
    mon.rewind(2)
    for step in (3, 4):
        mon.log(step, {"loss": 10.0 + step})
    mon.close({"steps": 4})
    hist = [(h[WANDB_STEP], h["loss"]) for h in _wandb_history(tmp_path) if "loss" in h]
    # W&B drops a row whose own step is below its newest: logged by step, (3, 13.0) and (4, 14.0) were lost.
    assert hist == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (3, 13.0), (4, 14.0)]
