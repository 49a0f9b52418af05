"""A replica's memory during a weight load through the object store: one part's pages at a time."""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from relaxrl.engines.payload import load_full_parts, pack_weights, split_payload
from relaxrl.weights import WeightStore

MB = 2**20


def big_model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)])  # 64 MB fp32


def replica_class():
    class PlainEngine:
        """The generation-engine surface ``WeightFollower`` uses, over a plain module."""

        def __init__(self) -> None:
            self.model, self.version = big_model(), 0

        def load_weight_parts(self, parts) -> None:
            versions = []

            def each():  # lazily, as the real engines do: a part's pages go once the next is asked for
                for p in parts:
                    versions.append(p.version)
                    yield p

            load_full_parts(self.model, each())
            self.version = versions[0]

    class Replica:
        def __init__(self, store_name: str) -> None:
            from relaxrl.services.common import WeightFollower

            self.engine = PlainEngine()
            self.follower = WeightFollower(self.engine, store_name, "relaxrl-tests")

        async def sync(self) -> dict:
            await self.follower.sync()
            m = self.follower.last_memory
            checksum = float(sum(p.double().sum() for p in self.engine.model.parameters()))
            return {"rise": m["resident_peak"] - m["resident_before"], "version": self.engine.version,
                    "checksum": checksum}

    return ray.remote(num_cpus=0)(Replica)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests


@pytest.mark.parametrize("bucket_mb", [4, 1024])
def test_a_load_holds_one_part_at_a_time(ray_local, bucket_mb):
    name = f"reload-memory-{bucket_mb}"
    store = ray.remote(WeightStore).options(name=name, namespace="relaxrl-tests").remote()
    source = big_model(seed=2)
    payload = pack_weights(source.state_dict(), version=1, kind="full")
    refs = [ray.put(p) for p in split_payload(payload, bucket_mb * MB)]
    ray.get(store.publish.remote(1, refs, "full", payload.nbytes))
    replica = replica_class().remote(name)
    got = ray.get(replica.sync.remote())
    assert got["version"] == 1
    assert got["checksum"] == pytest.approx(float(sum(p.double().sum() for p in source.parameters())), rel=1e-9)
    if bucket_mb == 4:  # 16 parts of 4 MB: the peak rise stays near one part, not the 64 MB model
        assert got["rise"] < 16 * MB, got
    else:  # one part: the whole model's pages are mapped at once (what the parts avoid)
        assert got["rise"] > 48 * MB, got
    ray.kill(replica)
    ray.kill(store)
