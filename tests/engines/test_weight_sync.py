"""Bucketed weight broadcast: the plan (hand-computed layouts) and a real two-process gloo broadcast
of a tiny model's weights into an HF generation engine (the same code NCCL runs on GPUs)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from relaxrl.engines.weight_sync import Bucket, Entry, pack_bucket, plan_buckets, unpack_bucket


def test_plan_buckets_by_dtype_and_size():
    state = {
        "a": torch.zeros(2, 3),  # 6 fp32 = 24 bytes
        "b": torch.zeros(4, dtype=torch.bfloat16),  # 8 bytes
        "c": torch.zeros(3),  # 12 bytes: 24 + 12 > 32, new fp32 bucket
        "d": torch.zeros(2),  # 8 bytes: 12 + 8 <= 32, same bucket as c
        "e": torch.zeros(10),  # 40 bytes > 32: a bucket of its own
    }
    plan = plan_buckets(state, bucket_bytes=32)
    assert plan == [
        Bucket("float32", (Entry("a", (2, 3), 0, 6),), 6),
        Bucket("float32", (Entry("c", (3,), 0, 3), Entry("d", (2,), 3, 2)), 5),
        Bucket("float32", (Entry("e", (10,), 0, 10),), 10),
        Bucket("bfloat16", (Entry("b", (4,), 0, 4),), 4),
    ]
    assert [b.nbytes for b in plan] == [24, 20, 40, 8]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(state, 0)


def test_pack_unpack_round_trip():
    state = {"x": torch.arange(6.0).view(2, 3), "y": torch.tensor([7.0, 8.0])}
    (bucket,) = plan_buckets(state, 1 << 20)
    flat = pack_bucket(bucket, state, "cpu")
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    out = dict(unpack_bucket(bucket, flat))
    assert torch.equal(out["x"], state["x"]) and torch.equal(out["y"], state["y"])


def _peer(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.engines.payload import load_full_state_dict
    from relaxrl.engines.weight_sync import receive_weights, send_weights, torch_dist_broadcast
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=rank)  # different weights on each side
    plan = plan_buckets(model.state_dict(), bucket_bytes=64 * 1024)  # the plan travels out of band
    if rank == 0:
        stats = send_weights(model.state_dict(), plan, torch_dist_broadcast(), "cpu")
        queue.put(("stats", stats.bytes, stats.buckets, len(plan), sum(t.numel() * 4 for t in model.state_dict().values())))
    else:
        engine = HFGenerationEngine(model, tok)
        load_full_state_dict(engine.model, dict(receive_weights(plan, torch_dist_broadcast(), "cpu")))
        ref = build_tiny_model(tok, seed=0)
        diff = max(float((a - b).abs().max()) for a, b in zip(engine.model.state_dict().values(), ref.state_dict().values()))
        queue.put(("diff", diff))
    dist.destroy_process_group()


def test_gloo_bucketed_broadcast_into_generation_engine():
    from relaxrl.engines.deepspeed_trainer import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_peer, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((item[0], item[1:]) for item in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    nbytes, buckets, planned, state_bytes = results["stats"]
    print(f"gloo broadcast: {nbytes} bytes in {buckets} buckets")
    assert buckets == planned > 1 and nbytes == state_bytes
    assert results["diff"] == (0.0,)
