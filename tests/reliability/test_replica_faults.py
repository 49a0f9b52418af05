"""Replica faults on a real local Ray: dead replicas are replaced and their work retried, hung ones
restarted, and a weight store that fails or hangs never blocks the trainer or the rollout."""

import asyncio
import json
import os
import time

import pytest
import ray
from ray import serve

from relaxrl.faults import RequestWatch, is_retryable, replica_actors
from relaxrl.services.common import WeightFollower
from relaxrl.train import run_experiment
from relaxrl.weights import WeightSyncError, publish_with_timeout
from tests.integration.helpers import make_cfg
from tests.reliability.runs import app_replicas, in_thread, train_log, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.fault]


def test_killed_rollout_reward_and_teacher_replicas_are_replaced_and_the_run_finishes(
        ray_local, tmp_path, model_cache):
    # Asynchronous run with a KL reference, so all of rollout, reward and teacher are deployed. The
    # verifier waits 0.3 s per request, so a request in production is inside a replica when the kill lands.
    cfg = make_cfg(tmp_path, model_cache, "trainer.steps=10", "rollout.max_staleness=2", "rollout.group_size=4",
                   "rollout.groups_per_step=2", "algorithm.kl_coef=0.05", "faults.max_retries=4",
                   "reward.simulated_latency_s=0.3")
    t, box = in_thread(run_experiment, cfg)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 180, "step 3", box)
    queue = run_queue()
    # Kill all three while some group is between admission and the queue, so its calls are hit.
    wait_for(lambda: producing(queue), 60, "a group in production", box)
    replicas = {role: app_replicas(role)[0] for role in ("rollout", "reward", "teacher")}
    for replica in replicas.values():
        ray.kill(replica, no_restart=True)
    for role, old in replicas.items():  # Serve replaces each killed replica while the run waits
        wait_for(lambda: replaced(role, old), 180, f"a new {role} replica", box)
    t.join(300)
    assert "error" not in box, box
    s = box["result"]
    assert s["steps"] == 10  # the run finished
    acc = s["accounting"]
    # admitted == trained + dropped + in flight (also checked by the run itself, which would raise)
    assert acc["admitted_samples"] == acc["trained_samples"] + acc["dropped_samples"] + acc["in_flight_samples"]
    assert acc["trained_samples"] == 10 * 2 * 4
    log = train_log(tmp_path)
    assert len(log) == len({uid for uid, _ in log}) == 10 * 2 * 4  # no sample trained twice
    # Lost requests were retried (or dropped and counted): the generation in flight was hit.
    lost = sum(s["retried_by_reason"].values()) + s["dropped"]
    assert lost >= 1, s
    summary = json.loads(metrics.read_text().splitlines()[-1])["summary"]
    assert summary["accounting"] == acc
    print(f"replica kill: retried={s['retried_by_reason']} dropped={s['dropped_by_reason']} accounting={acc}")


def run_queue():
    (a,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("relaxrl-queue-")]
    return ray.get_actor(a["name"], namespace=a["namespace"])


def replaced(role, old) -> bool:
    ids = [r._actor_id.hex() for r in app_replicas(role)]
    return bool(ids) and old._actor_id.hex() not in ids


def producing(queue) -> bool:
    m = ray.get(queue.metrics.remote())
    return m["in_flight_groups"] > m["ready_groups"]


def test_a_hung_replica_is_reported_and_restarted(ray_local):
    @serve.deployment(health_check_period_s=0.5, health_check_timeout_s=5)
    class Sleeper:
        def __init__(self):
            self.watch = RequestWatch(hang_timeout_s=1.0)

        async def work(self, seconds: float) -> int:
            await asyncio.to_thread(self.watch.wrap(time.sleep), seconds)
            return os.getpid()

        def check_health(self):
            self.watch.check()

    handle = serve.run(Sleeper.bind(), name="sleeper-hang", route_prefix=None)
    try:
        (before,) = [a._actor_id.hex() for a in replica_actors("sleeper-hang")]

        async def main():
            response = handle.work.remote(3600)

            async def call():
                return await response

            with pytest.raises(TimeoutError) as info:  # what the driver's faults.role_timeout_s does
                await asyncio.wait_for(call(), 1.5)
            response.cancel()
            assert is_retryable(info.value)  # the driver retries such a call
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # Serve replaces the replica once check_health fails
                ids = [a._actor_id.hex() for a in replica_actors("sleeper-hang")]
                if ids and before not in ids:
                    return await asyncio.wait_for(handle.work.remote(0), 30)
                await asyncio.sleep(0.2)
            raise AssertionError("hung replica was not restarted")

        assert isinstance(asyncio.run(main()), int)
    finally:
        serve.delete("sleeper-hang")


@ray.remote(num_cpus=0)
class HangingStore:
    async def publish(self, *args):
        await asyncio.sleep(3600)

    async def newer_than(self, version):
        await asyncio.sleep(3600)


class FakeEngine:  # a generation engine stand-in: only the version matters here
    version = 4

    def load_weights(self, payload):
        raise AssertionError("nothing should be loaded")


def test_weight_sync_failure_never_deadlocks(ray_local):
    store = HangingStore.options(name="hanging-store", namespace="relaxrl-tests").remote()
    try:
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="version 5 timed out"):  # the trainer stops, clearly
            asyncio.run(publish_with_timeout(store, 5, [None], "full", 1, timeout_s=1.0))
        follower = WeightFollower(FakeEngine(), "hanging-store", "relaxrl-tests", timeout_s=1.0)
        asyncio.run(follower.sync())  # the rollout goes on with the weights it has
        assert follower.failures == 1 and follower.engine.version == 4
        ray.kill(store)  # a dead store: an error, not a hang
        with pytest.raises(WeightSyncError, match="failed"):
            asyncio.run(publish_with_timeout(store, 6, [None], "full", 1, timeout_s=30.0))
        asyncio.run(follower.sync())
        assert follower.failures == 2
        assert time.monotonic() - t0 < 30
    finally:
        ray.kill(store)


def test_every_role_drains_in_short_polls_and_keeps_the_health_checks():
    """Serve's default 2 s poll before an idle replica exits delayed every run's end by ~2 s."""
    from relaxrl.faults import DRAIN_POLL_S, FaultConfig, replica_options

    opts = replica_options(FaultConfig(health_check_period_s=3.0, health_check_timeout_s=7.0))
    assert opts == {"health_check_period_s": 3.0, "health_check_timeout_s": 7.0,
                    "graceful_shutdown_wait_loop_s": DRAIN_POLL_S}
    assert DRAIN_POLL_S < 2.0
