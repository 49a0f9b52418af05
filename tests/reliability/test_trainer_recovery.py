"""A lost trainer is restored in the same run from its newest checkpoint: the run finishes, and
trains exactly what a run restarted by hand from that checkpoint (``resume=PATH``) trains."""

import json
import os
from types import SimpleNamespace

import pytest
import ray

from relaxrl.driver import RunResult, TrainerLost, restorable
from relaxrl.train import run_experiment, summary_line
from tests.integration.helpers import make_cfg
from tests.reliability.runs import app_replicas, in_thread, step_metrics, train_log, wait_for
from tests.reliability.test_resume import SYNC, comparable

pytestmark = pytest.mark.fault


@pytest.mark.ray
def test_a_killed_trainer_is_restored_in_the_run_and_trains_what_a_hand_restart_trains(
        ray_local, tmp_path, model_cache):
    run, hand = tmp_path / "run", tmp_path / "hand"
    t, box = in_thread(run_experiment, make_cfg(run, model_cache, *SYNC, "trainer.checkpoint_every=2"))
    wait_for(lambda: os.path.isfile(run / "checkpoints" / "step_2" / "meta.json"), 120, "checkpoint", box)
    for replica in app_replicas("actor"):
        ray.kill(replica, no_restart=True)
    t.join(300)
    assert "error" not in box, box  # no TrainerLost: the run went on
    s = box["result"]
    assert s["steps"] == 6 and s["trainer_restarts"] == 1, s
    (restored,) = s["restored_from"]
    assert os.path.dirname(restored) == str(run / "checkpoints")
    summary = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["trainer_restarts"] == 1

    # The same checkpoint restarted by hand, in another run directory.
    h = run_experiment(make_cfg(hand, model_cache, *SYNC, "trainer.checkpoint_every=2", f"resume={restored}"))
    assert h["steps"] == 6 and h["resumed_from"] == restored
    log = train_log(run)
    assert log == train_log(hand)  # every step's (uid, policy version), in training order
    assert len(set(log)) == len(log) == 6 * 2 * 4  # the lost steps' log lines were cut, not kept twice
    k = json.loads(open(os.path.join(restored, "meta.json")).read())["step"]
    rows = step_metrics(run)
    assert [m["step"] for m in rows] == list(range(1, 7))  # the lost steps' rows went with the restore
    assert {m["step"]: comparable(m) for m in rows if m["step"] > k} == \
        {m["step"]: comparable(m) for m in step_metrics(hand)}
    assert s["accounting"] == h["accounting"]
    # The checkpoints hold no per-sample uid list: neither the trained uids nor a copy of the train log.
    for ckpt in ("step_2", "step_4", "step_6"):
        state = json.loads((run / "checkpoints" / ckpt / "actor_state.json").read_text())
        assert "trained_uids" not in state and not (run / "checkpoints" / ckpt / "train_log.jsonl").exists()
    print(f"in-run restore from {os.path.basename(restored)}: {s['accounting']}")


def test_a_lost_trainer_is_restored_only_from_a_checkpoint_of_this_run_and_only_so_often(tmp_path):
    lost = TrainerLost("step 3: the trainer replica was lost")
    cfg = SimpleNamespace(run_dir=str(tmp_path), faults=SimpleNamespace(trainer_restarts=1),
                          weight_sync=SimpleNamespace(method="object_store"))
    with pytest.raises(TrainerLost, match="no checkpoint in this run"):
        restorable(cfg, RunResult(), lost)
    ckpt = tmp_path / "checkpoints" / "step_2"
    os.makedirs(ckpt)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2}))
    assert restorable(cfg, RunResult(), lost) == str(ckpt)
    with pytest.raises(TrainerLost, match="replica was lost$"):  # restarts used up: the error that says resume
        restorable(cfg, RunResult(trainer_restarts=1), lost)
    assert "trainer_restarts=1" in summary_line(RunResult(steps=3, trainer_restarts=1).summary())
    cfg.weight_sync.method = "broadcast"
    with pytest.raises(TrainerLost, match="needs weight_sync.method=object_store"):
        restorable(cfg, RunResult(), lost)
