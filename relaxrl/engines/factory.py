"""Builds the configured engine of a role: ``hf``/``vllm`` for generation, ``torch``/``deepspeed``
for training. vllm and deepspeed are imported only when asked for, with a clear error if absent."""

from __future__ import annotations

from typing import Any, Optional

from relaxrl.engines.options import GENERATION_ENGINES, TRAINER_ENGINES, check_engine
from relaxrl.models.lora import LoraConfig


def _require(package: str, engine: str, role: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"{role}.engine={engine} needs the {package!r} package, which is not installed: "
            f"pip install 'relaxrl[gpu]' on a GPU machine (see docs/engines.md), or use {role}.engine="
            f"{'hf' if role == 'rollout' else 'torch'}"
        )


def check_sampling(engine: str, sampling: dict) -> None:
    """Fail at start-up on sampling settings an engine cannot honour exactly."""
    if engine == "vllm" and float(sampling.get("top_p", 1.0)) < 1.0:
        raise ValueError(
            f"rollout.top_p={sampling['top_p']} with rollout.engine=vllm: vLLM's log-probs would include "
            "top-p truncation and the trainer's do not; set rollout.top_p=1.0 or rollout.engine=hf"
        )


def make_generation_engine(
    engine: str,
    model_dir: str,
    *,
    lora: Optional[dict] = None,
    dtype: str = "auto",
    torch_threads: int = 1,
    vllm: Optional[dict] = None,
    seed: int = 0,
    device: Optional[str] = None,  # hf: None = cuda if this process sees a GPU, else cpu
) -> Any:
    check_engine("rollout", engine, GENERATION_ENGINES)
    lora_cfg = LoraConfig(**lora) if lora else None
    if engine == "hf":
        from relaxrl.engines.hf_generation import HFGenerationEngine

        return HFGenerationEngine.from_pretrained(model_dir, lora=lora_cfg, dtype=dtype, torch_threads=torch_threads,
                                                  device=device, role="rollout")
    _require("vllm", engine, "rollout")
    from relaxrl.engines.vllm_generation import VLLMGenerationEngine

    return VLLMGenerationEngine(model_dir, lora=lora_cfg, dtype=dtype, options=vllm, seed=seed)


def make_trainer_engine(
    engine: str,
    model_dir: str,
    *,
    dtype: str = "auto",
    lora: Optional[dict] = None,
    deepspeed: Optional[dict] = None,
    **kwargs: Any,
) -> Any:
    """``kwargs``: the trainer engines' shared options (lr, micro_batch_size, temperature, seed,
    ``train_dtype``, ``device``, ...); ``dtype="auto"`` is the model directory's own dtype."""
    check_engine("trainer", engine, TRAINER_ENGINES)
    lora_cfg = LoraConfig(**lora) if lora else None
    if engine == "torch":
        from relaxrl.engines.torch_trainer import TorchTrainerEngine

        return TorchTrainerEngine.from_pretrained(model_dir, dtype=dtype, lora=lora_cfg, **kwargs)
    _require("deepspeed", engine, "trainer")
    from relaxrl.engines.deepspeed_trainer import DeepSpeedTrainerEngine

    return DeepSpeedTrainerEngine.from_pretrained(model_dir, dtype=dtype, lora=lora_cfg, options=deepspeed, **kwargs)
