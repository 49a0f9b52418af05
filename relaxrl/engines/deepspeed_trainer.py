"""A DeepSpeed trainer engine behind the ``TrainerEngine`` contract (production training).

``deepspeed`` is imported only when an engine is built. Same optimizer (AdamW, linear warmup),
same loss plumbing and same log-prob function as ``TorchTrainerEngine``; DeepSpeed adds ZeRO
(stage from config), bf16 with fp32 master weights, gradient checkpointing and multi-rank data
parallelism (``torch.distributed`` already initialised by the caller, or a one-rank group here).

Checkpoints use the torch engine's layout: ``model/`` is an HF ``save_pretrained`` directory (or
the peft adapter directory), ``trainer_state.pt`` holds scheduler, version and RNG, and the
optimizer state in torch format whenever DeepSpeed keeps a plain torch optimizer (ZeRO 0 in fp32).
Sharded optimizer state (ZeRO >= 1, bf16) goes to ``deepspeed/`` in DeepSpeed's own format. So
either engine resumes the other's weights, version and schedule; the optimizer moments carry over
only where the formats agree (otherwise they restart, with a warning).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import defaultdict

import torch

from relaxrl.engines.base import LossFn, WeightPayload
from relaxrl.engines.device import log_model
from relaxrl.engines.lean_logprobs import batched_token_logprobs, selected_token_logprobs
from relaxrl.engines.microbatch import rank_micro_batches, row_lengths, take_rows
from relaxrl.engines.options import DeepSpeedOptions
from relaxrl.engines.payload import pack_weights
from relaxrl.engines.torch_trainer import (
    MODEL_DIR,
    STATE_FILE,
    batch_to,
    complete_model_dir,
    load_checkpoint_weights,
    note_skipped,
    sum_over_ranks,
)
from relaxrl.models.lora import LoraConfig, adapter_state_dict, apply_lora, is_lora
from relaxrl.sample import TensorBatch

log = logging.getLogger(__name__)
DS_DIR = "deepspeed"


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(
    *, micro_batch_size: int, world_size: int, zero_stage: int, bf16: bool, max_grad_norm: float
) -> dict:
    """The DeepSpeed config dict. Accumulation is driven per step (``set_gradient_accumulation_boundary``)
    because batch sizes vary, so DeepSpeed's own ``gradient_accumulation_steps`` stays 1."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm if math.isfinite(max_grad_norm) else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,  # torch AdamW: same optimizer as the torch engine
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def ensure_process_group(backend: str) -> None:
    """A one-rank ``torch.distributed`` group on localhost unless the caller (e.g. a trainer rank
    spawned by the actor service) already set RANK/WORLD_SIZE/MASTER_ADDR."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


class DeepSpeedTrainerEngine:
    """Implements ``TrainerEngine`` on a ``deepspeed.DeepSpeedEngine``."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        max_grad_norm: float = 1.0,
        warmup_steps: int = 0,
        micro_batch_size: int = 16,
        temperature: float = 1.0,
        lora: LoraConfig | None = None,
        seed: int = 0,
        torch_threads: int | None = 1,
        options: DeepSpeedOptions | dict | None = None,
        source_dir: str | None = None,  # the model directory: its tokenizer goes into each checkpoint
    ) -> None:
        import deepspeed
        import torch.distributed as dist

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        opts = DeepSpeedOptions(**options) if isinstance(options, dict) else (options or DeepSpeedOptions())
        self.options = opts
        ensure_process_group(opts.dist_backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(seed)
        if opts.bf16:
            model = model.to(torch.bfloat16)
        if opts.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None and lora.enabled and not is_lora(model):
            model = apply_lora(model, lora)
        self.lora_on = is_lora(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        warmup = max(0, int(warmup_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
        config = ds_config(
            micro_batch_size=micro_batch_size, world_size=self.world_size, zero_stage=opts.zero_stage,
            bf16=opts.bf16, max_grad_norm=self.max_grad_norm,
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.model = self.engine.module
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.version = 0
        self.source_dir = source_dir
        self.skipped_updates = 0
        self.model_dtype = next(self.model.parameters()).dtype
        log_model(log, "trainer", self.model, self.model_dtype,
                  f"DeepSpeed ZeRO-{opts.zero_stage}" + (", fp32 master weights" if opts.bf16 else ""))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "auto", **kwargs) -> "DeepSpeedTrainerEngine":
        from relaxrl.models.loading import load_model

        # DeepSpeed keeps its own fp32 master weights under deepspeed.bf16: model.train_dtype is the torch engine's.
        kwargs.pop("train_dtype", None)
        kwargs.pop("device", None)  # DeepSpeed places the model on its rank's device itself
        return cls(load_model(path, dtype=dtype), source_dir=kwargs.pop("source_dir", path), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _rank_plans(self, batch: TensorBatch) -> list[list[int]]:
        """This rank's micro-batches (rows of ``batch``), as many on every rank; ``[]`` is a filler
        (ZeRO-3 gathers parameters in every forward and reduces gradients at the boundary: a rank
        that ran fewer passes than the others would hang them)."""
        return rank_micro_batches(row_lengths(batch), self.world_size, self.rank, self.micro_batch_size)

    def train_step(self, batch: TensorBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over ``batch`` (this rank's rows, micro-batched, one boundary)."""
        start_time = time.perf_counter()
        self.engine.train()
        plans = self._rank_plans(batch)
        total_loss, weighted, local_rows = 0.0, defaultdict(float), 0
        lr = self.scheduler.get_last_lr()[0]
        for i, rows in enumerate(plans):
            mb = batch_to(take_rows(batch, rows or [0]), self.device)  # a filler: row 0, at weight 0
            self.engine.set_gradient_accumulation_boundary(i == len(plans) - 1)
            # The lean path, as the torch engine: log-probs at the loss mask's positions only, the
            # output head in chunks (full [B, T, vocab] logits at a 152k vocabulary are GBs a micro-batch).
            logp, _ = selected_token_logprobs(self.model, mb.input_ids, mb.attention_mask, mb.loss_mask,
                                              self.temperature)
            loss, metrics = loss_fn(logp, mb)
            # DeepSpeed averages gradients over ranks; the losses are whole-batch sums of shares.
            self.engine.backward(loss * (self.world_size if rows else 0.0))
            if not rows:
                continue
            total_loss += float(loss.detach())
            local_rows += len(rows)
            for k, v in metrics.items():
                weighted[k] += float(v) * mb.size
        if self.world_size > 1:  # every rank reports the whole batch's loss and row-weighted metrics
            weighted = sum_over_ranks(weighted, self.device)
            total_loss = sum_over_ranks({"loss": total_loss}, self.device)["loss"]
            local_rows = batch.size
        plain = self._plain_optimizer()
        # ZeRO 0 in fp32 keeps plain .grad tensors and reports no norm: measure it before the step.
        pre_norm = None
        if plain is not None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            pre_norm = float(torch.nn.utils.get_total_norm(grads))
        skipped = pre_norm is not None and not (math.isfinite(pre_norm) and math.isfinite(total_loss))
        if skipped:
            self.skipped_updates += 1
            note_skipped(self.version + 1, total_loss, pre_norm, self.skipped_updates)  # like the torch engine: a non-finite gradient would poison the weights
            plain.zero_grad(set_to_none=True)
            self.scheduler.step()
        else:
            self.engine.step()  # one optimizer step (clipping, scheduler) at the boundary
        grad_norm = self.engine.get_global_grad_norm() if pre_norm is None else pre_norm
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.version += 1
        out = {k: v / max(local_rows, 1) for k, v in weighted.items()}
        out.update(
            loss=total_loss,
            grad_norm=grad_norm,
            lr=lr,
            tokens=float(batch.loss_mask.sum()),
            skipped=float(skipped),
            skipped_updates=float(self.skipped_updates),
            train_time_s=time.perf_counter() - start_time,
        )
        return out

    def logprobs(self, batch: TensorBatch) -> torch.Tensor:
        """``[B, T-1]`` target-token log-probs (float32, on CPU), no grad."""
        return batched_token_logprobs(self.engine, batch, self.micro_batch_size, self.temperature)

    def _full_state(self) -> dict[str, torch.Tensor]:
        if self.options.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.model.state_dict()

    def export_weights(self) -> WeightPayload:
        if self.lora_on:
            return pack_weights(adapter_state_dict(self.model), version=self.version, kind="lora")
        return pack_weights(self._full_state(), version=self.version, kind="full")

    def _plain_optimizer(self):
        """The torch optimizer when DeepSpeed did not wrap it (ZeRO 0, fp32), else None."""
        opt = self.engine.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) and not self.options.bf16 else None

    def save_checkpoint(self, path: str) -> None:
        """The torch engine's layout (see the module docstring); rank 0 writes ``model/``."""
        os.makedirs(path, exist_ok=True)
        plain = self._plain_optimizer()
        if plain is None:
            self.engine.save_checkpoint(os.path.join(path, DS_DIR), tag="latest", save_latest=False)
        if self.rank != 0:
            return
        self.model.save_pretrained(os.path.join(path, MODEL_DIR), state_dict=self._full_state() if not self.lora_on else None)
        if not self.lora_on:
            complete_model_dir(os.path.join(path, MODEL_DIR), self.source_dir, self.model_dtype)
        state = {
            "optimizer": plain.state_dict() if plain is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "version": self.version,
            "rng": torch.get_rng_state(),
            "engine": "deepspeed",
            "zero_stage": self.options.zero_stage,
        }
        torch.save(state, os.path.join(path, STATE_FILE))

    def load_checkpoint(self, path: str) -> None:
        """Resume from a checkpoint of this engine or of ``TorchTrainerEngine``."""
        model_dir = os.path.join(path, MODEL_DIR)
        ds_dir = os.path.join(path, DS_DIR)
        plain = self._plain_optimizer()
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
        if plain is None and os.path.isdir(ds_dir):
            self.engine.load_checkpoint(ds_dir, tag="latest", load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            load_checkpoint_weights(self.model, model_dir, self.lora_on)
            with torch.no_grad():
                self._refresh_master_weights()
            if plain is not None and state.get("optimizer") is not None:
                plain.load_state_dict(state["optimizer"])
            elif state.get("optimizer") is not None or plain is not None:
                log.warning("optimizer state in %s has another format than this engine's; moments restart", path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        torch.set_rng_state(state["rng"])

    def _refresh_master_weights(self) -> None:
        """After loading module weights directly, copy them into ZeRO/bf16 fp32 master weights."""
        opt = self.engine.optimizer
        refresh = getattr(opt, "refresh_fp32_params", None) or getattr(opt, "_restore_from_bit16_weights", None)
        if refresh is not None:
            refresh()
