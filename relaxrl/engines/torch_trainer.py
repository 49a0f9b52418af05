"""A plain-PyTorch trainer engine: AdamW, linear warmup, micro-batched gradient accumulation, and
data parallelism over an initialised ``torch.distributed`` group (each rank trains its share of the
rows, gradients are summed over the ranks before clipping, so every rank takes the same step)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from typing import Optional, Union

import torch
from safetensors.torch import load_file

from relaxrl.engines.base import LossFn, PrepareFn, WeightPayload
from relaxrl.engines.device import dtype_name, log_model, resolve_device, to_dtype
from relaxrl.engines.lean_logprobs import batched_token_logprobs, selected_token_logprobs
from relaxrl.engines.microbatch import rank_micro_batches, row_lengths, split_groups, take_rows
from relaxrl.engines.payload import cast_state_dict, load_full_state_dict, pack_weights
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


def master_dtype(model_dtype: torch.dtype, train_dtype: Union[str, torch.dtype]) -> torch.dtype:
    """The dtype the trainer keeps its weights and AdamW state in: float32 (fp32 master weights;
    forward and backward then run under autocast in ``model_dtype``) or ``model_dtype`` itself."""
    train = to_dtype(train_dtype)
    if train not in (torch.float32, model_dtype):
        raise ValueError(
            f"model.train_dtype={dtype_name(train)} with model.dtype={dtype_name(model_dtype)}: the trainer keeps "
            f"its weights in float32 (master weights) or in model.dtype itself"
        )
    if train != model_dtype and model_dtype == torch.float16:
        raise ValueError(
            "model.dtype=float16 with fp32 master weights needs loss scaling, which the torch trainer does not do: "
            "use model.dtype=bfloat16, or model.train_dtype=float16"
        )
    return train


# Files of a model directory that make up its tokenizer (copied into each checkpoint's model/).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "chat_template.*", "*.model", "*.tiktoken")


def complete_model_dir(model_dir: str, source_dir: Optional[str], dtype: torch.dtype) -> None:
    """Make a ``save_pretrained`` output a complete model directory: the tokenizer files of
    ``source_dir``, and config.json naming ``dtype`` (``save_pretrained`` writes the dtype of the
    parameters, which are the fp32 master weights under mixed precision)."""
    config_path = os.path.join(model_dir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        config["dtype"] = dtype_name(dtype)
        config.pop("torch_dtype", None)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    if source_dir is None or os.path.abspath(source_dir) == os.path.abspath(model_dir):
        return
    for pattern in TOKENIZER_FILES:
        for src in glob.glob(os.path.join(source_dir, pattern)):
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(model_dir, os.path.basename(src)))
    gen = os.path.join(source_dir, "generation_config.json")
    if os.path.isfile(gen) and not os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        shutil.copy2(gen, model_dir)


def dist_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised default ``torch.distributed`` group, else ``(1, 0)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_grads(params: list[torch.nn.Parameter], bucket_numel: int = 1 << 25) -> None:
    """Sum the gradients of ``params`` over the default group's ranks, in place: flat buckets of one
    dtype and device (one collective per bucket, not per tensor). A rank that computed no gradient
    for a parameter (no rows this update) contributes zeros, so every rank enters every collective."""
    import torch.distributed as dist

    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(list)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        runs = buckets[(p.grad.dtype, p.grad.device)]
        if not runs or sum(g.numel() for g in runs[-1]) + p.grad.numel() > bucket_numel:
            runs.append([])
        runs[-1].append(p.grad)
    for runs in buckets.values():
        for grads in runs:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """``values`` summed over the default group's ranks (float64), keyed by the union of the ranks'
    keys: a metric one rank never saw (no rows of its kind) counts 0 there rather than hanging."""
    import torch.distributed as dist

    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, sorted(values))
    names = sorted(set().union(*keys))
    summed = torch.tensor([float(values.get(k, 0.0)) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return dict(zip(names, summed.tolist()))


def note_skipped(step: int, loss: float, grad_norm: float, skipped_so_far: int) -> None:
    """The WARNING of an update dropped for a non-finite loss or gradient norm."""
    cause = f"loss={loss}" if not math.isfinite(loss) else f"grad_norm={grad_norm}"
    log.warning("train step %d: update skipped, non-finite %s (%d skipped so far)", step, cause, skipped_so_far)


class TorchTrainerEngine:
    """Implements ``TrainerEngine``. With LoRA on, only the adapter is trained and exported.

    ``dtype`` (default: the model's own) is the model's dtype: what the weights are exported and
    checkpointed in and what forward passes compute in. ``train_dtype`` is what the optimizer
    updates: float32 (the default) keeps fp32 master weights and runs forward and backward under
    ``torch.autocast`` in ``dtype`` when that is lower (bf16: an lr 1e-6 AdamW step on bf16
    weights changed ~2% of them, the rest rounded away); ``train_dtype=dtype`` trains the model's
    weights themselves.

    Data parallelism: built in every process of an initialised ``torch.distributed`` group (world
    size > 1; ``services/trainer_group.py`` starts one), each rank is given the same whole batch and
    trains its share of each (mini-)batch's rows (``rank_micro_batches``). Losses are normalised over
    the whole batch, so the shares' gradients add up: they are summed over the ranks before clipping
    and every rank takes the same AdamW step; metrics are summed too, so each rank reports the whole
    batch's. Rank 0 alone writes checkpoints."""

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
        max_tokens_per_micro_batch: int = 0,  # > 0: micro-batches bucketed by length under this token budget
        mini_batches: int = 1,  # AdamW updates per step, each on whole groups (PPO mini-batches)
        ppo_epochs: int = 1,  # passes over the step's mini-batches
        temperature: float = 1.0,  # the rollout's sampling temperature: log-probs use logits / T
        lora: LoraConfig | None = None,
        seed: int = 0,
        torch_threads: int | None = 1,
        device: str | None = None,  # None: cuda if this process sees a GPU, else cpu
        dtype: Union[str, torch.dtype, None] = None,
        train_dtype: Union[str, torch.dtype] = "float32",
        source_dir: str | None = None,  # the model directory: its tokenizer goes into each checkpoint
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if mini_batches < 1 or ppo_epochs < 1:
            raise ValueError(f"trainer.mini_batches and trainer.ppo_epochs must be >= 1, got {mini_batches}, {ppo_epochs}")
        torch.manual_seed(seed)  # adapter initialisation and any dropout
        self.model_dtype = to_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
        self.train_dtype = master_dtype(self.model_dtype, train_dtype)
        self.autocast_dtype = self.model_dtype if self.train_dtype != self.model_dtype else None
        model = model.to(device=resolve_device(device), dtype=self.train_dtype)
        if lora is not None and lora.enabled and not is_lora(model):
            model = apply_lora(model, lora)
        self.model = model
        self.lora_on = is_lora(model)
        self.source_dir = source_dir
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
        self.max_tokens_per_micro_batch = max(0, int(max_tokens_per_micro_batch))
        self.mini_batches, self.ppo_epochs = int(mini_batches), int(ppo_epochs)
        self.temperature = temperature
        self.world_size, self.rank = dist_world()
        self.version = 0
        self.skipped_updates = 0  # updates dropped for a non-finite loss or gradient norm
        note = ("fp32 master weights" if self.autocast_dtype is not None
                else "" if self.train_dtype == torch.float32 else f"no fp32 master copy: AdamW on {dtype_name(self.train_dtype)}")
        log_model(log, "trainer", self.model, self.model_dtype, note)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "auto", **kwargs) -> "TorchTrainerEngine":
        from relaxrl.models.loading import load_model, resolve_dtype

        dtype = resolve_dtype(path, dtype)
        return cls(load_model(path, dtype=dtype), dtype=dtype, source_dir=kwargs.pop("source_dir", path), **kwargs)

    @classmethod
    def from_trainer_config(cls, path: str, trainer: dict, *, dtype: str = "auto", **kwargs) -> "TorchTrainerEngine":
        """Built from a ``TrainerConfig`` as a dict (the actor role and the benchmarks' bare loop)."""
        keys = ("lr", "weight_decay", "beta1", "beta2", "max_grad_norm", "warmup_steps", "micro_batch_size")
        optional = {k: trainer[k] for k in ("max_tokens_per_micro_batch", "mini_batches", "ppo_epochs") if k in trainer}
        return cls.from_pretrained(path, dtype=dtype, **{k: trainer[k] for k in keys}, **optional,
                                   torch_threads=trainer.get("torch_threads", 1), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        """Mixed precision: the forward in the model's dtype over the fp32 master weights."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch: TensorBatch, loss_fn: LossFn, *, prepare: Optional[PrepareFn] = None,
                   proximal: bool = False) -> dict[str, float]:
        """One step over ``batch``: ``ppo_epochs`` passes over ``mini_batches`` mini-batches of whole
        groups, one AdamW update each (one update in all by default); the version goes up by one.

        ``loss_fn``'s losses are normalised over the batch it was prepared on: the whole batch with
        one mini-batch, else each mini-batch, which ``prepare`` (the algorithm's) is run on again.
        ``proximal``: the loss needs the policy at the start of the step (``extras["prox_logprobs"]``,
        the decoupled objective), which differs from the current one after the first update."""
        start_time = time.perf_counter()
        self.model.train()
        parts = self.mini_batches
        if parts > 1 and prepare is None:
            raise ValueError("trainer.mini_batches > 1 needs the algorithm's prepare() for each mini-batch")
        if proximal and parts * self.ppo_epochs > 1:
            batch.extras["prox_logprobs"] = self.logprobs(batch)
        minis = [batch] if parts == 1 else [prepare(take_rows(batch, rows, batch.input_ids.shape[1]))
                                            for rows in split_groups(batch.group_index, parts)]
        weighted, updates, totals = defaultdict(float), [], defaultdict(float)
        for _ in range(self.ppo_epochs):
            for mini in minis:
                updates.append(self._update(mini, loss_fn, weighted, totals))
        self.scheduler.step()
        self.version += 1
        if self.world_size > 1:  # each rank holds its rows' sums: report the whole batch's on every rank
            weighted = sum_over_ranks(weighted, self.device)
            totals = defaultdict(float, sum_over_ranks(totals, self.device))
        rows = batch.size * self.ppo_epochs
        out = {k: v / rows for k, v in weighted.items()}
        if totals["entropy_tokens"]:
            out["entropy"] = totals["entropy"] / totals["entropy_tokens"]
        skipped = sum(u["skipped"] for u in updates)
        out.update(
            loss=updates[0]["loss"] if len(updates) == 1 else sum(u["loss"] for u in updates) / len(updates),
            grad_norm=updates[-1]["grad_norm"],
            lr=updates[0]["lr"],
            tokens=float(batch.loss_mask.sum()),
            skipped=float(skipped),
            skipped_updates=float(self.skipped_updates),
            updates=float(len(updates)),
            pad_frac=1.0 - totals["real_tokens"] / max(totals["token_slots"], 1.0),
            train_time_s=time.perf_counter() - start_time,
        )
        return out

    def _update(self, batch: TensorBatch, loss_fn: LossFn, weighted: dict, totals: dict) -> dict:
        """One AdamW update over ``batch``: this rank's token-budget micro-batches (gradients
        accumulated), then, with several ranks, gradients and loss summed over them before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        lengths = row_lengths(batch)
        total_loss = 0.0
        for rows in rank_micro_batches(lengths, self.world_size, self.rank, self.micro_batch_size,
                                       self.max_tokens_per_micro_batch):
            if not rows:  # a filler: no collective runs inside the forward here, so it needs no pass
                continue
            mb = batch_to(take_rows(batch, rows), self.device)
            with self._autocast():
                logp, entropy = selected_token_logprobs(self.model, mb.input_ids, mb.attention_mask, mb.loss_mask,
                                                        self.temperature, with_entropy=True)
            loss, metrics = loss_fn(logp, mb)
            loss.backward()
            total_loss += float(loss.detach())
            selected = float(mb.loss_mask.sum())
            totals["entropy"] += float(entropy) * selected
            totals["entropy_tokens"] += selected
            totals["real_tokens"] += float(sum(lengths[i] for i in rows))
            totals["token_slots"] += float(mb.input_ids.numel())
            for k, v in metrics.items():
                weighted[k] += float(v) * mb.size
        if self.world_size > 1:  # before clipping: the norm and the step are the whole batch's, on every rank
            all_reduce_grads(self.params)
            summed = torch.tensor([total_loss], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(summed)
            total_loss = float(summed)  # so every rank makes the same skip decision
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not (math.isfinite(grad_norm) and math.isfinite(total_loss))
        if skipped:  # a non-finite gradient would poison the weights: drop this update, and say so
            self.skipped_updates += 1
            note_skipped(self.version + 1, total_loss, grad_norm, self.skipped_updates)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total_loss, "grad_norm": grad_norm, "lr": lr, "skipped": skipped}

    def logprobs(self, batch: TensorBatch) -> torch.Tensor:
        """``[B, T-1]`` target-token log-probs (at the trainer's temperature), no grad, on CPU: every
        real target position, the output head a chunk of positions at a time."""
        with self._autocast():
            return batched_token_logprobs(self.model, batch, self.micro_batch_size, self.temperature)

    def _weights(self) -> dict[str, torch.Tensor]:
        """The weights to export or save: the adapter with LoRA on, else the full state."""
        return adapter_state_dict(self.model) if self.lora_on else self.model.state_dict()

    def export_weights(self) -> WeightPayload:
        """The weights in the model's dtype (the rollout's), whatever the trainer keeps."""
        kind = "lora" if self.lora_on else "full"
        return pack_weights(self._weights(), version=self.version, kind=kind, dtype=self.model_dtype)

    def save_checkpoint(self, path: str) -> None:
        """Weights (a complete HF model dir in the model's dtype, tokenizer included, or the peft
        adapter dir), optimizer, scheduler, version, RNG, and the fp32 master weights when the
        saved ones are a rounding of them (so a resumed run continues from the master weights)."""
        if self.rank != 0:  # the ranks hold identical weights and optimizer state: one writer
            return
        os.makedirs(path, exist_ok=True)
        model_dir = os.path.join(path, MODEL_DIR)
        if self.lora_on:  # the adapter as trained (fp32 under mixed precision: small, and exact)
            self.model.save_pretrained(model_dir)
        else:
            self.model.save_pretrained(model_dir, state_dict=cast_state_dict(self.model.state_dict(), self.model_dtype))
            complete_model_dir(model_dir, self.source_dir, self.model_dtype)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "version": self.version,
            "rng": torch.get_rng_state(),
            "skipped_updates": self.skipped_updates,
        }
        if self.autocast_dtype is not None and not self.lora_on:
            state["master_weights"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
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
        # The schedule's lr, also when the optimizer state was not restored (a DeepSpeed checkpoint):
        # load_state_dict sets the scheduler's step, not the param groups' lr, which the steps use.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        if state.get("master_weights") is not None:
            with torch.no_grad():
                load_full_state_dict(self.model, {k: v.to(self.train_dtype) for k, v in state["master_weights"].items()})
        self.version = int(state["version"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
