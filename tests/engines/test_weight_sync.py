"""Bucketed weight broadcast: the plan (hand-computed layouts) and a real gloo broadcast of a tiny
model's weights into an HF generation engine (the code path NCCL runs on GPUs)."""

from __future__ import annotations

import threading

import pytest
import torch

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


def test_gloo_bucketed_broadcast_into_generation_engine():
    """Sender and receiver are two members of a standalone gloo group (threads of this process: the
    group has its own TCP store, like the actor and a rollout replica in a run)."""
    from relaxrl.engines.deepspeed_trainer import free_port
    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.engines.payload import load_full_state_dict
    from relaxrl.engines.weight_sync import gloo_group, receive_weights, send_weights
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    sender_model, engine = build_tiny_model(tok, seed=0), HFGenerationEngine(build_tiny_model(tok, seed=1), tok)
    state = sender_model.state_dict()
    plan = plan_buckets(state, bucket_bytes=64 * 1024)  # the plan travels out of band (the coordinator)
    port, out, errors, groups = free_port(), {}, [], []

    def member(rank: int) -> None:
        try:
            broadcast = gloo_group("127.0.0.1", port, rank, 2, timeout_s=60)
            groups.append(broadcast)  # a group torn down while its peer still talks waits for the timeout
            if rank == 0:
                out["stats"] = send_weights(state, plan, broadcast, "cpu")
            else:
                load_full_state_dict(engine.model, dict(receive_weights(plan, broadcast, "cpu")))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    stats = out["stats"]
    print(f"gloo broadcast: {stats.bytes} bytes in {stats.buckets} buckets, {stats.seconds * 1000:.1f} ms")
    assert stats.buckets == len(plan) > 1 and stats.bytes == sum(t.numel() * 4 for t in state.values())
    ref = sender_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in engine.model.state_dict().items())
