"""A plain-PyTorch trainer engine: AdamW, linear warmup, micro-batched gradient accumulation."""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import time
from collections import defaultdict

import torch
from safetensors.torch import load_file

from relaxrl.engines.base import LossFn, WeightPayload
from relaxrl.engines.logprobs import batched_token_logprobs, token_logprobs
from relaxrl.engines.payload import load_full_state_dict, pack_weights
from relaxrl.models.lora import LoraConfig, adapter_state_dict, apply_lora, is_lora, load_adapter_state_dict
from relaxrl.sample import TensorBatch

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


def batch_to(batch: TensorBatch, device: torch.device) -> TensorBatch:
    """``batch`` with every tensor on ``device`` (a no-op copy on the same device)."""
    changes = {
        f.name: getattr(batch, f.name).to(device)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    changes["extras"] = {k: v.to(device) for k, v in batch.extras.items()}
    return dataclasses.replace(batch, **changes)


def load_checkpoint_weights(model: torch.nn.Module, model_dir: str, lora_on: bool) -> None:
    """Load a checkpoint's ``model/`` folder into ``model`` in place: the peft adapter when LoRA is on,
    else every ``*.safetensors`` file, cast to the model's dtype. Shared by both trainer engines,
    whose checkpoints have this one layout."""
    with torch.no_grad():
        if lora_on:
            from peft.utils import load_peft_weights

            load_adapter_state_dict(model, load_peft_weights(model_dir, device="cpu"))
            return
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update(load_file(f))
        dtype = next(model.parameters()).dtype
        load_full_state_dict(model, {k: v.to(dtype) for k, v in weights.items()})


class TorchTrainerEngine:
    """Implements ``TrainerEngine``. With LoRA on, only the adapter is trained and exported."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        max_grad_norm: float = 1.0,  # <= 0: no clipping (the norm is still reported)
        warmup_steps: int = 0,  # linear warmup from lr / warmup_steps to lr
        micro_batch_size: int = 16,
        temperature: float = 1.0,  # the rollout's sampling temperature: log-probs use logits / T
        lora: LoraConfig | None = None,
        seed: int = 0,
        torch_threads: int | None = 1,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        torch.manual_seed(seed)  # adapter initialisation and any dropout
        if lora is not None and lora.enabled and not is_lora(model):
            model = apply_lora(model, lora)
        self.model = model
        self.lora_on = is_lora(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
        )
        warmup = max(0, int(warmup_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.version = 0

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", **kwargs) -> "TorchTrainerEngine":
        from relaxrl.models.loading import load_model

        return cls(load_model(path, dtype=dtype), **kwargs)

    @classmethod
    def from_trainer_config(cls, path: str, trainer: dict, *, dtype: str = "float32", **kwargs) -> "TorchTrainerEngine":
        """Built from a ``TrainerConfig`` as a dict (the actor role and the benchmarks' bare loop)."""
        keys = ("lr", "weight_decay", "beta1", "beta2", "max_grad_norm", "warmup_steps", "micro_batch_size")
        return cls.from_pretrained(path, dtype=dtype, **{k: trainer[k] for k in keys},
                                   torch_threads=trainer.get("torch_threads", 1), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train_step(self, batch: TensorBatch, loss_fn: LossFn) -> dict[str, float]:
        """One AdamW step over ``batch``; ``loss_fn``'s losses are already whole-batch normalised."""
        start_time = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, weighted = 0.0, defaultdict(float)
        for start in range(0, batch.size, self.micro_batch_size):
            mb = batch_to(batch.rows(start, start + self.micro_batch_size), self.device)
            logp = token_logprobs(self.model, mb.input_ids, mb.attention_mask, self.temperature)
            loss, metrics = loss_fn(logp, mb)
            loss.backward()
            total_loss += float(loss.detach())
            for k, v in metrics.items():
                weighted[k] += float(v) * mb.size
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        skipped = not math.isfinite(grad_norm)
        if not skipped:  # a non-finite gradient would poison the weights: drop this update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.version += 1
        out = {k: v / batch.size for k, v in weighted.items()}
        out.update(
            loss=total_loss,
            grad_norm=grad_norm,
            lr=lr,
            tokens=float(batch.loss_mask.sum()),
            skipped=float(skipped),
            train_time_s=time.perf_counter() - start_time,
        )
        return out

    def logprobs(self, batch: TensorBatch) -> torch.Tensor:
        """``[B, T-1]`` target-token log-probs (at the trainer's temperature), no grad, on CPU."""
        return batched_token_logprobs(self.model, batch, self.micro_batch_size, self.temperature)

    def export_weights(self) -> WeightPayload:
        if self.lora_on:
            return pack_weights(adapter_state_dict(self.model), version=self.version, kind="lora")
        return pack_weights(self.model.state_dict(), version=self.version, kind="full")

    def save_checkpoint(self, path: str) -> None:
        """Weights (an HF model dir, or the peft adapter dir), optimizer, scheduler, version, RNG."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(os.path.join(path, MODEL_DIR))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "version": self.version,
            "rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, os.path.join(path, STATE_FILE))

    def load_checkpoint(self, path: str) -> None:
        """Restore everything ``save_checkpoint`` wrote: training continues exactly."""
        load_checkpoint_weights(self.model, os.path.join(path, MODEL_DIR), self.lora_on)
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # a ZeRO-sharded DeepSpeed checkpoint: its moments are in its own format (deepspeed/)
            log.warning("no torch-format optimizer state in %s: AdamW moments restart", path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
