"""The actor role on real Serve: the next step's request waits its turn, and steps never train
out of order or on top of a failed step."""

import asyncio

import pytest
import ray
from ray import serve

from relaxrl.faults import ReplicaStateLost
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.sample import Sample
from relaxrl.services.actor import Actor
from relaxrl.weights import WeightStore

pytestmark = pytest.mark.ray

TRAINER = {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "max_grad_norm": 1.0, "warmup_steps": 0,
           "micro_batch_size": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    d = tmp_path_factory.mktemp("actor-model")
    build_tiny_model(tok, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def batch(step: int, size: int = 4) -> list[Sample]:
    return [Sample(uid=f"g{step}/{i}", group_id=f"g{step}", index=i, prompt_ids=[2, 5, 6], response_ids=[7, 8],
                   behaviour_logprobs=[-1.0, -1.0], policy_version=step, reward=float(i % 2)) for i in range(size)]


def test_steps_sent_ahead_train_in_turn_and_publish_in_order(ray_local, model_dir):
    store = ray.remote(WeightStore).options(name="actor-test-weights", namespace="relaxrl-tests").remote()
    app = Actor.options(ray_actor_options={"num_cpus": 0}).bind(
        model_dir, algorithm={"name": "grpo"}, trainer=TRAINER, store_name="actor-test-weights",
        namespace="relaxrl-tests")
    handle = serve.run(app, name="actor-test", route_prefix=None)
    try:
        async def main():
            # Step 1's request arrives while step 0 trains, its batch already fetched and collated.
            first = handle.train_step.remote([ray.put(batch(0))], 0)
            second = handle.train_step.remote([ray.put(batch(1))], 1)
            return await first, await second

        m0, m1 = asyncio.run(main())
        assert (m0["version"], m1["version"]) == (1, 2)
        assert m1["train_start"] >= m0["train_end"]  # one step at a time
        assert ray.get(store.info.remote()).version == 2  # both published, in order
        # A step sent after one that fails before training refuses to train on the wrong weights.
        async def broken():
            failing = handle.train_step.remote([ray.put([])], 2)
            after = handle.train_step.remote([ray.put(batch(3))], 3)
            with pytest.raises(ValueError, match="empty batch"):
                await failing
            with pytest.raises(ReplicaStateLost, match="at version 2, this step expects 3"):
                await after

        asyncio.run(broken())
        assert handle.ledger.remote().result() == {"trained_count": 8, "distinct_uids": 8, "version": 2}
    finally:
        serve.delete("actor-test")
        ray.kill(store)
