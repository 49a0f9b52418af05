"""One-process GPU check: HF generation + the torch trainer + GRPO on the Qwen2.5-0.5B-shaped model.

No Ray, Hydra, vLLM or DeepSpeed: a GPU machine with only torch, transformers and peft runs it
(``tests/bench/test_gpu_check.py`` runs ``--smoke`` with those imports blocked). It builds its
model directory itself (``relaxrl.models.build``, no hub), then for each step generates a batch of
GRPO groups, checks the trainer's log-probs against the generator's behaviour log-probs on the same
tokens, trains one step and syncs the new weights into the generator. It prints one line per step
and a last line::

    gpu_check: device=cuda dtype=bfloat16 gen_tokens_per_s=... train_tokens_per_s=... mfu=... peak_mem_gb=... logprob_max_diff=... ok=True

``mfu`` = 6 * N * trained tokens per second / ``--peak-flops`` (default 989e12: H100/H200 dense
bf16), N the parameters in matmuls (the LM head included, the input embedding not), attention's
quadratic term left out. Rates skip step 0 (CUDA start-up) when there is more than one step.
``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` (both engines live in this process); on a
CPU the process's peak RSS.

    python bench/gpu_check.py                 # GPU: 0.5B-shaped, bf16, cuda
    python bench/gpu_check.py --smoke         # CPU: tiny preset, fp32, two steps, seconds
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import resource
import sys
import time
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from relaxrl.algorithms.grpo import GRPO, GRPOConfig  # noqa: E402  (the module, not the registry package API)
from relaxrl.engines.base import SamplingParams  # noqa: E402
from relaxrl.engines.hf_generation import HFGenerationEngine  # noqa: E402
from relaxrl.engines.torch_trainer import TorchTrainerEngine  # noqa: E402
from relaxrl.models.build import prepare_model_dir  # noqa: E402
from relaxrl.models.chat import render_prompt_ids  # noqa: E402
from relaxrl.models.loading import load_model, load_tokenizer  # noqa: E402
from relaxrl.sample import Sample, TensorBatch, collate  # noqa: E402

PROMPTS = [
    "What is 17 + 25?", "Write a haiku about autumn.", "Explain recursion in one sentence.",
    "List three prime numbers.", "Translate 'good morning' into French.", "What is the capital of Japan?",
    "Summarise the rules of chess briefly.", "Give a Python one-liner that reverses a string.",
    "Why is the sky blue?", "Name a famous physicist.", "What does HTTP stand for?",
    "Write a limerick about a cat.", "How many days are in a leap year?", "Define entropy.",
    "Suggest a name for a bakery.", "What is 9 times 8?",
]  # fmt: skip
# Passing max |trainer - behaviour| log-prob on the same tokens and weights. fp32 differs only by
# summation order (~1e-6); bf16 rounds activations at 2^-8, so over 24 layers differences of a
# few 1e-2 are expected, and 0.1 (a ratio of 1.105) is where PPO's clip range starts to feel it.
LOGPROB_TOL = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.05}
SMOKE = dict(preset="qwen-tiny-152k", device="cpu", dtype="float32", train_dtype="float32",
             prompts=2, group_size=2, new_tokens=8, steps=2, micro_batch=4)  # fmt: skip


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="the model's dtype (generation, forward passes)")
    p.add_argument("--train-dtype", default="float32", help="what AdamW updates: float32 = fp32 master weights")
    p.add_argument("--prompts", type=int, default=16, help="prompt groups per step")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak dense FLOP/s of the device in --dtype")
    p.add_argument("--logprob-tol", type=float, default=None, help="default: by dtype, %s" % LOGPROB_TOL)
    p.add_argument("--cache-dir", default=None, help="model directory cache (default ~/.cache/relaxrl/real_models)")
    p.add_argument("--smoke", action="store_true", help="CPU: %s" % SMOKE)
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --smoke, or --device cpu)")
    return args


def accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def on_device(engine, device: torch.device):
    """``engine`` with its model on ``device``. Engines without a ``device`` argument (before it
    was added) leave the model where it was loaded, on the CPU: move it here."""
    if engine.device.type != device.type:
        engine.model.to(device)
    return engine


def make_engines(path: str, args: argparse.Namespace, device: torch.device):
    threads = 1 if device.type == "cpu" else None  # a small shared CPU: one thread; a GPU: torch's default
    gen_kw = {"device": str(device)} if accepts(HFGenerationEngine.__init__, "device") else {}
    gen = on_device(HFGenerationEngine(load_model(path, dtype=args.dtype), load_tokenizer(path),
                                       torch_threads=threads, **gen_kw), device)  # fmt: skip
    wanted = {"device": str(device), "dtype": args.dtype, "train_dtype": args.train_dtype}
    train_kw = {k: v for k, v in wanted.items() if accepts(TorchTrainerEngine.__init__, k)}
    trainer = TorchTrainerEngine(load_model(path, dtype=args.dtype), lr=1e-6, micro_batch_size=args.micro_batch,
                                 torch_threads=threads, **train_kw)  # fmt: skip
    return gen, on_device(trainer, device)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all of them, counted once, but the input
    embedding when it is not tied to the LM head (a lookup, no FLOPs)."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if embed is head else total - embed.numel()


def mfu(params: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: 6 FLOPs per parameter per token (forward + backward)."""
    return 6.0 * params * tokens_per_s / peak_flops


def toy_reward(response_ids: Sequence[int]) -> float:
    """Any reward that differs within a group gives GRPO non-zero advantages: the even-id fraction."""
    return sum(1 for t in response_ids if t % 2 == 0) / max(len(response_ids), 1)


def to_samples(step: int, prompts: Sequence[Sequence[int]], gens, group_size: int) -> list[Sample]:
    out = []
    for i, (prompt, g) in enumerate(zip(prompts, gens)):
        group = f"s{step}g{i // group_size}"
        out.append(Sample(uid=f"{group}/{i % group_size}", group_id=group, index=i % group_size,
                          prompt_ids=list(prompt), response_ids=list(g.response_ids),
                          behaviour_logprobs=list(g.logprobs), policy_version=step,
                          finish_reason=g.finish_reason, reward=toy_reward(g.response_ids)))  # fmt: skip
    return out


def logprob_gap(trainer_logprobs: torch.Tensor, batch: TensorBatch) -> tuple[float, float, float]:
    """Max and mean |trainer - behaviour| over the response tokens, and the behaviour log-probs' std
    there (what a misaligned or wrong computation would be off by: a check is only worth as much)."""
    mask = batch.loss_mask > 0
    diff = (trainer_logprobs.float() - batch.behaviour_logprobs).abs()[mask]
    spread = batch.behaviour_logprobs[mask].std() if int(mask.sum()) > 1 else torch.tensor(0.0)
    return float(diff.max()), float(diff.mean()), float(spread)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    tol = args.logprob_tol if args.logprob_tol is not None else LOGPROB_TOL[args.dtype]
    start = time.perf_counter()
    path = prepare_model_dir(args.preset, args.cache_dir)
    print(f"model dir {path} ready in {time.perf_counter() - start:.1f} s", flush=True)
    gen, trainer = make_engines(path, args, device)
    n_params = matmul_params(trainer.model)
    print(f"engines ready: {args.preset} on {device}, dtype={args.dtype} train_dtype={args.train_dtype}, "
          f"{n_params / 1e6:.1f}M matmul params", flush=True)  # fmt: skip
    algo = GRPO(GRPOConfig())
    prompt_ids = [render_prompt_ids(gen.tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.prompts)]
    prompts = [p for p in prompt_ids for _ in range(args.group_size)]
    params = dict(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens)
    timed = {"gen_s": 0.0, "gen_tokens": 0, "train_s": 0.0, "train_tokens": 0}
    max_diff, mean_diffs, spreads = 0.0, [], []
    for step in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        gens = gen.generate(prompts, SamplingParams(seed=step, **params))
        sync(device)
        gen_s = time.perf_counter() - t0
        batch = collate(to_samples(step, prompts, gens, args.group_size), gen.pad_id)
        d_max, d_mean, spread = logprob_gap(trainer.logprobs(batch), batch)  # same weights, same tokens
        max_diff, mean_diffs, spreads = max(max_diff, d_max), mean_diffs + [d_mean], spreads + [spread]
        batch = algo.prepare(batch)
        sync(device)
        t1 = time.perf_counter()
        metrics = trainer.train_step(batch, algo.loss)
        sync(device)
        train_s = time.perf_counter() - t1
        gen.load_weights(trainer.export_weights())  # the next step generates with the new weights
        sync(device)
        sync_s = time.perf_counter() - t1 - train_s
        gen_tokens = sum(len(g.response_ids) for g in gens)
        train_tokens = int(batch.attention_mask.sum())
        if step > 0 or args.steps == 1:  # step 0 pays CUDA's start-up
            timed["gen_s"] += gen_s
            timed["gen_tokens"] += gen_tokens
            timed["train_s"] += train_s
            timed["train_tokens"] += train_tokens
        print(f"step {step}: gen_s={gen_s:.3f} gen_tokens={gen_tokens} train_s={train_s:.3f} "
              f"train_tokens={train_tokens} sync_s={sync_s:.3f} loss={metrics['loss']:.4g} "
              f"grad_norm={metrics['grad_norm']:.4g} logprob_max_diff={d_max:.3g} logprob_mean_diff={d_mean:.3g} "
              f"logprob_spread={spread:.3g}", flush=True)  # fmt: skip
    gen_rate = timed["gen_tokens"] / timed["gen_s"]
    train_rate = timed["train_tokens"] / timed["train_s"]
    mean_diff, spread = sum(mean_diffs) / len(mean_diffs), min(spreads)
    # Within tolerance, and far below what wrong log-probs would be off by (random weights make every
    # log-prob near -log(V), so a tiny difference alone would prove little).
    ok = math.isfinite(max_diff) and max_diff <= tol and 10 * mean_diff < spread
    result = dict(device=device.type, dtype=args.dtype, gen_tokens_per_s=gen_rate, train_tokens_per_s=train_rate,
                  mfu=mfu(n_params, train_rate, args.peak_flops), peak_mem_gb=peak_memory_gb(device),
                  logprob_max_diff=max_diff, logprob_mean_diff=mean_diff, logprob_tol=tol,
                  wall_s=time.perf_counter() - start, ok=ok)  # fmt: skip
    print("gpu_check: " + " ".join(f"{k}={_fmt(v)}" for k, v in result.items()), flush=True)
    return result


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
