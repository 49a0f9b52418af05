"""Weight payloads as tensors: owned copies, out-of-band pickling, parts, and mapped pages given back."""

from __future__ import annotations

import mmap
import pickle

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from relaxrl.engines.base import WeightPayload
from relaxrl.engines.payload import load_full_parts, pack_weights, split_payload, unpack_weights
from relaxrl.memory import drop_shared_pages, resident_bytes


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                      num_key_value_heads=1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def test_a_payload_owns_its_tensors_and_casts_in_the_same_copy():
    model = tiny_model(0)
    payload = pack_weights(model.state_dict(), version=3, kind="full", dtype=torch.bfloat16)
    w = payload.tensors["model.embed_tokens.weight"]
    assert w.dtype == torch.bfloat16 and "lm_head.weight" not in payload.tensors  # tied: once
    before = w.clone()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # the trainer goes on training
    assert torch.equal(payload.tensors["model.embed_tokens.weight"], before)
    assert payload.nbytes == sum(t.numel() * 2 for t in payload.tensors.values())


def test_pickling_moves_every_tensor_out_of_band():
    """Protocol 5 hands each tensor's bytes to the transport (Ray's object store) as a buffer:
    the pickle itself holds names and shapes only, so no serialised copy of the weights is made."""
    state = {"a": torch.randn(256, 64).to(torch.bfloat16), "b": torch.arange(1000), "c": torch.tensor(2.5),
             "d": torch.randn(3, 0)}
    payload = WeightPayload(7, "full", tensors=state)
    buffers = []
    data = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    assert len(data) < 2_000 < payload.nbytes
    back = pickle.loads(data, buffers=buffers)
    assert back.version == 7 and back.kind == "full" and back.manifest == payload.manifest
    for k, t in state.items():
        assert back.tensors[k].dtype == t.dtype and torch.equal(back.tensors[k], t)


def test_parts_are_bounded_and_loaded_after_the_manifest_is_checked():
    src, dst = tiny_model(1), tiny_model(2)
    payload = pack_weights(src.state_dict(), version=1, kind="full")
    biggest = max(t.numel() * t.element_size() for t in payload.tensors.values())
    parts = split_payload(payload, bucket_bytes=biggest)
    assert len(parts) > 2
    assert all(p.nbytes <= biggest for p in parts)
    assert sorted(k for p in parts for k in p.tensors) == sorted(payload.tensors)
    assert all(p.manifest == payload.manifest for p in parts)
    assert load_full_parts(dst, parts) == len(payload.tensors)
    for k, t in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], t), k

    # A manifest that does not match is refused before the first part is copied.
    other = tiny_model(3)
    before = {k: t.clone() for k, t in other.state_dict().items()}
    bad = split_payload(payload, bucket_bytes=biggest)
    bad[0].manifest["model.norm.weight"] = ((7,), "float32")
    with pytest.raises(ValueError, match="shape mismatch.*model.norm.weight"):
        load_full_parts(other, bad)
    assert all(torch.equal(other.state_dict()[k], t) for k, t in before.items())


def test_split_keeps_a_tensor_larger_than_the_bucket_whole():
    payload = WeightPayload(0, "full", tensors={"big": torch.zeros(1000), "s1": torch.zeros(10), "s2": torch.zeros(10)})
    parts = split_payload(payload, bucket_bytes=100)
    assert [list(p.tensors) for p in parts] == [["big"], ["s1", "s2"]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        split_payload(payload, 0)


def test_unpack_returns_the_tensors():
    payload = pack_weights({"x": torch.ones(3)}, version=0, kind="lora")
    assert list(unpack_weights(payload)) == ["x"]


def test_mapped_pages_are_given_back_and_private_memory_is_left_alone():
    n = 64 * 2**20
    shared = mmap.mmap(-1, n)  # a shared anonymous mapping, as the object store's
    t = torch.frombuffer(shared, dtype=torch.uint8)
    t.fill_(7)  # touched: resident here
    touched = resident_bytes()
    assert drop_shared_pages([t]) >= n - 2 * mmap.PAGESIZE
    assert touched - resident_bytes() > n // 2
    assert int(t[12345]) == 7 and int(t.sum()) == 7 * n  # the data stays in the mapping
    private = torch.full((1024,), 3.0)
    assert drop_shared_pages([private]) == 0
    assert torch.equal(private, torch.full((1024,), 3.0))
    del t
    shared.close()
