"""Resume with partial rollouts in flight (issue 24 item 5), on a local Ray with the streaming HF
engine and the tiny model: the checkpoint is taken while groups are being generated (one token per
chunk, long responses from a model with no warm start, so they rarely stop early), the trainer is
killed after it, and the resumed run continues the recorded partial rollouts instead of generating
them again. With max_staleness=0 the (uid, version) training log equals an uninterrupted run's;
with max_staleness=2 no uid is lost or trained twice. Each case is several whole runs (~1-2 min on
2 cores), so both are in the e2e tier (``RELAXRL_E2E=1 pytest -m e2e``, run by .ci/engines)."""

import json
import os

import pytest
import ray

from relaxrl.driver import TrainerLost
from relaxrl.train import run_experiment
from tests.integration.helpers import make_cfg
from tests.reliability.runs import app_replicas, in_thread, train_log, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.fault, pytest.mark.e2e]

STEPS, GROUPS, SIZE = 6, 2, 4
STREAM = ["rollout.streaming=true", "rollout.stream_chunk_tokens=1", "rollout.max_new_tokens=96",
          "model.warm_start.steps=0", f"rollout.group_size={SIZE}", f"rollout.groups_per_step={GROUPS}",
          "rollout.batch_max_groups=1", f"trainer.steps={STEPS}", "seed=3"]


def killed_after_first_checkpoint(run_dir, model_cache, *overrides) -> dict:
    """Run with a checkpoint every 2 steps, kill the trainer once the first is written (the run stops
    with TrainerLost), resume it; returns the resumed run's summary and the checkpoint's meta."""
    t, box = in_thread(run_experiment, make_cfg(run_dir, model_cache, *STREAM, *overrides,
                                                "trainer.checkpoint_every=2", "faults.trainer_restarts=0"))
    wait_for(lambda: os.path.isfile(run_dir / "checkpoints" / "step_2" / "meta.json"), 300, "checkpoint", box)
    for replica in app_replicas("actor"):
        ray.kill(replica, no_restart=True)
    t.join(300)
    assert isinstance(box.get("error"), TrainerLost), box
    s = run_experiment(make_cfg(run_dir, model_cache, *STREAM, *overrides, "resume=true"))
    with open(os.path.join(s["resumed_from"], "meta.json")) as f:
        meta = json.load(f)
    return {"summary": s, "meta": meta}


def check_continued(run: dict) -> int:
    """The resumed run continued every partial rollout its checkpoint recorded (the bound allowed
    all of them), and there was at least one; returns how many."""
    recorded = run["meta"]["queue"]["partials"]
    s = run["summary"]
    assert recorded, "no partial rollout in flight at the checkpoint: the test did not test resume with partials"
    tokens = [len(r["response_ids"]) for pg in recorded.values() for r in pg["responses"]]
    assert all(0 < n <= 96 for n in tokens), tokens
    assert (s["partials_continued"], s["partials_discarded"]) == (len(recorded), 0), s
    return len(recorded)


def test_resume_with_partials_in_flight_gives_the_uninterrupted_training_log_at_staleness_0(
        ray_local, tmp_path, model_cache):
    whole = run_experiment(make_cfg(tmp_path / "whole", model_cache, *STREAM, "rollout.max_staleness=0"))
    run = killed_after_first_checkpoint(tmp_path / "broken", model_cache, "rollout.max_staleness=0")
    n = check_continued(run)
    assert train_log(tmp_path / "broken") == train_log(tmp_path / "whole")
    assert len(set(train_log(tmp_path / "broken"))) == STEPS * GROUPS * SIZE
    s = run["summary"]
    assert s["staleness_hist"] == {0: STEPS * GROUPS * SIZE} and s["dropped"] == 0
    assert s["accounting"]["trained_samples"] == whole["accounting"]["trained_samples"] == STEPS * GROUPS * SIZE
    print(f"partial resume, max_staleness=0: {n} partial rollouts continued, train log equal")


def test_resume_with_partials_in_flight_loses_and_duplicates_nothing_at_staleness_2(ray_local, tmp_path,
                                                                                    model_cache):
    run = killed_after_first_checkpoint(tmp_path / "broken", model_cache, "rollout.max_staleness=2")
    n = check_continued(run)
    log = train_log(tmp_path / "broken")
    uids = [uid for uid, _ in log]
    assert len(uids) == len(set(uids)) == STEPS * GROUPS * SIZE  # none trained twice
    assert set(uids) == {f"g{q}/{i}" for q in range(STEPS * GROUPS) for i in range(SIZE)}  # none lost
    s = run["summary"]
    assert max(s["staleness_hist"]) <= 2 and s["dropped"] == 0
    print(f"partial resume, max_staleness=2: {n} partial rollouts continued; staleness {s['staleness_hist']}")
