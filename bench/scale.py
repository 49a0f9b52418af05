"""What training costs at a real vocabulary: the peak memory of one training micro-batch's
forward+backward with the lean log-prob path (response positions only, chunked output head under
checkpointing) against the full-logits path, with equal loss and gradient.

    python bench/scale.py                 # 8 x 512 tokens, vocab 151,936, hidden 256, 4 layers
    python bench/scale.py --smoke         # a small shape, seconds (the test suite runs it)

Each path runs in its own fresh process (an allocator keeps freed memory, so a second
measurement in one process would see the first one's pages), sampling ``/proc/self/statm`` every
2 ms on a thread (tracemalloc does not see torch tensors); the rise is the peak over the resident
size right before the forward. The last line: ``scale: params=… peak_train_gb=… naive_peak_gb=…
ratio=… loss_diff=… grad_diff=… pad_frac=…`` (``pad_frac``: padded share of the micro-batch's
token slots when rows of uneven length are padded to the widest; bucketing them by length into
token-budget micro-batches is the trainer's ``trainer.max_tokens_per_micro_batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

FULL = dict(vocab=151_936, hidden=256, layers=4, heads=4, rows=8, width=512, prompt=128)
SMOKE = dict(vocab=20_000, hidden=64, layers=2, heads=2, rows=4, width=96, prompt=16)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Highest resident size seen while running, sampled every ``every_s`` on a thread."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakSampler":
        self.peak = resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def row_lengths(shape: dict) -> list[int]:
    """Uneven rows: one at full width, the rest between a quarter and three quarters of it."""
    rows, width = shape["rows"], shape["width"]
    return [width] + [int(width * (0.25 + 0.5 * i / max(rows - 2, 1))) for i in range(rows - 1)]


def build(shape: dict):
    """A random model of ``shape`` and one micro-batch with uneven response lengths (fixed seeds)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=max(1, shape["heads"] // 2),
                      intermediate_size=shape["hidden"] * 4, max_position_embeddings=shape["width"] + 8,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(1)
    rows, width, prompt = shape["rows"], shape["width"], shape["prompt"]
    lengths = row_lengths(shape)
    ids = torch.randint(0, shape["vocab"], (rows, width), generator=g)
    attn = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width - 1)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
        mask[i, prompt - 1:n - 1] = 1.0
    adv = torch.randn(rows, 1, generator=g)
    return model, ids, attn, mask, adv


def measure(path: str, shape: dict) -> dict:
    """One forward+backward of a policy-gradient-shaped loss on ``path`` (lean | naive)."""
    import torch

    from relaxrl.engines.lean_logprobs import selected_token_logprobs
    from relaxrl.engines.logprobs import token_logprobs

    model, ids, attn, mask, adv = build(shape)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    before = resident_bytes()
    with PeakSampler() as sampler:
        if path == "lean":
            logp, _ = selected_token_logprobs(model, ids, attn, mask, 1.0)
        else:
            logp = token_logprobs(model, ids, attn, 1.0)
        loss = -(logp * adv * mask).sum() / mask.sum()
        loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {"path": path, "rise_bytes": sampler.peak - before, "loss": float(loss.detach()),
            "grad": grad[:: max(1, grad.numel() // 200_000)].tolist(),  # a fixed subsample to compare
            "params": sum(p.numel() for p in model.parameters())}


def run_isolated(path: str, smoke: bool) -> dict:
    """``measure(path)`` in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", path] + (["--smoke"] if smoke else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pad_fraction(lengths: list[int]) -> float:
    """Padded share of the token slots when every row is padded to the widest."""
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a small shape, seconds")
    ap.add_argument("--measure", choices=("lean", "naive"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    shape = SMOKE if args.smoke else FULL
    if args.measure:
        print(json.dumps(measure(args.measure, shape)))
        return {}
    if args.smoke:  # one process: the figures are not isolated, the code paths are the same
        lean, naive = measure("lean", shape), measure("naive", shape)
    else:
        lean, naive = run_isolated("lean", False), run_isolated("naive", False)
    gb = 1024**3
    grad_diff = max(abs(a - b) for a, b in zip(lean["grad"], naive["grad"]))
    logits_gb = shape["rows"] * (shape["width"] - 1) * shape["vocab"] * 4 / gb
    result = {
        "params": lean["params"],
        "peak_train_gb": lean["rise_bytes"] / gb,
        "naive_peak_gb": naive["rise_bytes"] / gb,
        "ratio": lean["rise_bytes"] / max(naive["rise_bytes"], 1),
        "loss_diff": abs(lean["loss"] - naive["loss"]),
        "grad_diff": grad_diff,
        "pad_frac": pad_fraction(row_lengths(shape)),
    }
    print(f"micro-batch {shape['rows']} x {shape['width']} tokens, vocab {shape['vocab']:,}, hidden "
          f"{shape['hidden']}, {shape['layers']} layers ({result['params'] / 1e6:.1f}M params); fp32 logits of "
          f"the whole micro-batch would be {logits_gb:.2f} GB")
    print(f"forward+backward memory rise: lean {result['peak_train_gb']:.2f} GB, full logits "
          f"{result['naive_peak_gb']:.2f} GB (ratio {result['ratio']:.3f}); |loss diff| {result['loss_diff']:.2e}, "
          f"max |grad diff| {grad_diff:.2e}")
    print("scale: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
