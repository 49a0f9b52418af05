"""vLLM and DeepSpeed on CUDA: bf16 log-prob agreement and throughput, tensor parallelism, ZeRO-2
with gradient checkpointing, NCCL weight sync into vLLM, data-parallel trainer ranks on Ray."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from relaxrl.engines.base import SamplingParams
from relaxrl.engines.payload import pack_weights
from relaxrl.models.chat import render_prompt_ids
from relaxrl.models.loading import load_model, load_tokenizer

from .conftest import needs

pytestmark = pytest.mark.gpu


def prompts(tok, n=64):
    return [render_prompt_ids(tok, f"{i} + {i % 7} = ") for i in range(n)]


def hf_score(model, prompts_, gens, temperature=1.0):
    from relaxrl.engines.hf_generation import HFGenerationEngine

    ref = HFGenerationEngine(model, load_tokenizer_cached())
    seqs = [list(p) + g.response_ids for p, g in zip(prompts_, gens)]
    return ref.score(seqs, [len(p) for p in prompts_], temperature=temperature).logprobs


_TOK = {}


def load_tokenizer_cached():
    return _TOK["tok"]


@needs(1, "vllm")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.05)])
def test_vllm_gpu_logprobs_match_hf_and_throughput(gpu_model_dir, dtype, tol):
    from relaxrl.engines.vllm_generation import VLLMGenerationEngine

    _TOK["tok"] = load_tokenizer(gpu_model_dir)
    engine = VLLMGenerationEngine(gpu_model_dir, dtype=dtype, options={"gpu_memory_utilization": 0.3, "in_process": False})
    ps = prompts(_TOK["tok"], 256)
    params = SamplingParams(temperature=1.0, max_new_tokens=128, seed=0)
    engine.generate(ps[:8], params)
    t0 = time.perf_counter()
    gens = engine.generate(ps, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(g.response_ids) for g in gens)
    print(f"vLLM {dtype}: {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.0f} tokens/s")
    ref_model = load_model(gpu_model_dir, dtype="float32").cuda()
    ref = hf_score(ref_model, ps[:32], gens[:32])
    diff = max(abs(a - b) for g, r in zip(gens[:32], ref) for a, b in zip(g.logprobs, r))
    print(f"vLLM {dtype}: max |logp - HF fp32| = {diff:.2e}")
    assert diff < tol
    engine.close()


@needs(2, "vllm")
def test_vllm_tensor_parallel_two_gpus(gpu_model_dir):
    from relaxrl.engines.vllm_generation import VLLMGenerationEngine

    _TOK["tok"] = load_tokenizer(gpu_model_dir)
    engine = VLLMGenerationEngine(gpu_model_dir, dtype="float32",
                                  options={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.3, "in_process": False})
    ps = prompts(_TOK["tok"], 32)
    gens = engine.generate(ps, SamplingParams(temperature=1.0, max_new_tokens=32, seed=1))
    ref = hf_score(load_model(gpu_model_dir).cuda(), ps, gens)
    assert max(abs(a - b) for g, r in zip(gens, ref) for a, b in zip(g.logprobs, r)) < 1e-3
    # in-place full update on both TP workers
    other = load_model(gpu_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine.load_weights(pack_weights(other.state_dict(), version=1, kind="full"))
    gens = engine.generate(ps, SamplingParams(temperature=1.0, max_new_tokens=32, seed=1))
    ref = hf_score(other.cuda(), ps, gens)
    assert max(abs(a - b) for g, r in zip(gens, ref) for a, b in zip(g.logprobs, r)) < 1e-3
    engine.close()


@needs(1, "deepspeed")
def test_deepspeed_zero2_bf16_gradient_checkpointing_gpu(gpu_model_dir):
    from relaxrl.engines.deepspeed_trainer import DeepSpeedTrainerEngine
    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.sample import Sample, collate

    tok = load_tokenizer(gpu_model_dir)
    model = load_model(gpu_model_dir)
    ps = prompts(tok, 32)
    gens = HFGenerationEngine(copy.deepcopy(model).cuda(), tok).generate(ps, SamplingParams(max_new_tokens=32, seed=0))
    batch = collate([Sample(uid=str(i), group_id=str(i), index=0, prompt_ids=p, response_ids=g.response_ids,
                            behaviour_logprobs=g.logprobs, policy_version=0, finish_reason=g.finish_reason)
                     for i, (p, g) in enumerate(zip(ps, gens))], tok.pad_token_id)
    batch.scalars["tokens"] = float(batch.loss_mask.sum())
    trainer = DeepSpeedTrainerEngine(model.cuda(), lr=1e-4, micro_batch_size=8,
                                     options={"zero_stage": 2, "bf16": True, "gradient_checkpointing": True})

    def nll(logp, mb):
        return -(logp * mb.loss_mask).sum() / mb.scalars["tokens"], {}

    before = float((trainer.logprobs(batch) * batch.loss_mask).sum())
    times = [trainer.train_step(batch, nll)["train_time_s"] for _ in range(5)]
    after = float((trainer.logprobs(batch) * batch.loss_mask).sum())
    print(f"DeepSpeed ZeRO-2 bf16 + checkpointing: step {sum(times[1:]) / 4 * 1000:.0f} ms (32 rows x ~45 tokens)")
    assert after > before


@needs(2, "vllm")
def test_nccl_weight_sync_trainer_to_vllm(gpu_model_dir):
    """Trainer rank 0 on GPU 0 broadcasts bucketed weights over NCCL into a vLLM engine on GPU 1."""
    import os

    from relaxrl.engines.deepspeed_trainer import free_port
    from relaxrl.engines.vllm_generation import VLLMGenerationEngine
    from relaxrl.engines.weight_sync import nccl_group, plan_buckets, send_weights

    _TOK["tok"] = load_tokenizer(gpu_model_dir)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # the engine core process (spawned now) sees GPU 1 only
    try:
        engine = VLLMGenerationEngine(gpu_model_dir, dtype="float32",
                                      options={"gpu_memory_utilization": 0.3, "in_process": False})
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    trainer_model = load_model(gpu_model_dir).to("cuda:0")
    with torch.no_grad():
        for p in trainer_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = trainer_model.state_dict()
    plan = plan_buckets(state, bucket_bytes=64 << 20)
    port = free_port()
    joined = {}
    t = threading.Thread(target=lambda: joined.update(b=nccl_group("127.0.0.1", port, 0, 2, "cuda:0")))
    t.start()
    engine.join_weight_group("127.0.0.1", port, world_size=2)
    t.join()
    result = {}
    t = threading.Thread(target=lambda: result.update(s=send_weights(state, plan, joined["b"], "cuda:0")))
    t.start()
    engine.receive_weights(plan, version=1)
    t.join()
    stats = result["s"]
    print(f"NCCL sync: {stats.bytes / 1e6:.1f} MB in {stats.buckets} buckets, {stats.seconds * 1000:.1f} ms, {stats.gb_per_s:.2f} GB/s")
    ps = prompts(_TOK["tok"], 16)
    gens = engine.generate(ps, SamplingParams(max_new_tokens=16, seed=0))
    ref = hf_score(trainer_model, ps, gens)
    assert max(abs(a - b) for g, r in zip(gens, ref) for a, b in zip(g.logprobs, r)) < 1e-3
    assert engine.version == 1


@needs(1, "vllm")
def test_lora_vs_full_sync_bytes_gpu(gpu_model_dir):
    """LoRA adapter payload vs full payload for the same model: bytes and load time into vLLM."""
    from relaxrl.engines.torch_trainer import TorchTrainerEngine
    from relaxrl.engines.vllm_generation import VLLMGenerationEngine
    from relaxrl.models.lora import LoraConfig

    lora = LoraConfig(enabled=True, r=8, alpha=16)
    full = TorchTrainerEngine(load_model(gpu_model_dir).cuda()).export_weights()
    adapter = TorchTrainerEngine(load_model(gpu_model_dir).cuda(), lora=lora).export_weights()
    times = {}
    for kind, payload, cfg in (("full", full, None), ("lora", adapter, lora)):
        engine = VLLMGenerationEngine(gpu_model_dir, dtype="bfloat16", lora=cfg,
                                      options={"gpu_memory_utilization": 0.3, "in_process": False})
        payload.version = 1
        t0 = time.perf_counter()
        engine.load_weights(payload)
        times[kind] = time.perf_counter() - t0
        engine.close()
    print(f"full {full.nbytes / 1e6:.1f} MB in {times['full'] * 1000:.0f} ms; "
          f"LoRA {adapter.nbytes / 1e6:.2f} MB in {times['lora'] * 1000:.0f} ms")
    assert adapter.nbytes < 0.1 * full.nbytes


@needs(2, "deepspeed", "ray")
def test_trainer_group_two_ranks_on_ray_gpus(gpu_model_dir):
    """trainer.num_ranks=2 with DeepSpeed: two ranks in a Ray placement group give one update."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(num_gpus=2, num_cpus=4, ignore_reinit_error=True)
    pg = placement_group([{"CPU": 1, "GPU": 1}] * 2, strategy="PACK")
    ray.get(pg.ready())

    @ray.remote(num_cpus=1, num_gpus=1)
    def run(model_dir):
        from relaxrl.services.trainer_group import TrainerGroup

        group = TrainerGroup("deepspeed", model_dir, 2, dict(lr=1e-4, micro_batch_size=4, deepspeed={"zero_stage": 1}))
        return group.version

    ref = run.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                                           placement_group_capture_child_tasks=True))
    assert ray.get(ref.remote(gpu_model_dir)) == 0
    ray.shutdown()
