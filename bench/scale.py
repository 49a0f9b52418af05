"""What training costs at a real vocabulary.

1. One training micro-batch's forward+backward (8 x 512 tokens, vocab 151,936, hidden 256, 4
   layers): the peak memory rise with the lean log-prob path (response positions only, chunked
   output head under checkpointing) against the full-logits path, with equal loss and gradient.
2. GRPO steps end to end through Serve on the Qwen2.5-0.5B-shaped directory (``model=local``,
   built offline by ``relaxrl.models.build`` unless ``--model-dir`` is given), synchronous
   (``max_staleness=0``): each role's peak resident memory, the time split per step (generate,
   reward, train, publish, load), the weight bytes published per version; then the same steps in a
   bare in-process loop with the same engines (``bench/overhead.py``'s), and the step-time ratio.

    python bench/scale.py                 # both parts (~15 min on 2 cores)
    python bench/scale.py --smoke         # part 1 small, part 2's bare loop on a tiny preset, no Ray

Each path runs in its own fresh process (an allocator keeps freed memory, so a second
measurement in one process would see the first one's pages), sampling ``/proc/self/statm`` every
2 ms on a thread (tracemalloc does not see torch tensors); the rise is the peak over the resident
size right before the forward. The last line: ``scale: params=… peak_train_gb=… naive_peak_gb=…
mem_ratio=… loss_diff=… grad_diff=… pad_frac=… step_s=… publish_s=… publish_overhead=… reload_mem_ratio=… bare_step_s=… ratio=…`` (``pad_frac``: padded share of the micro-batch's
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

from relaxrl.memory import PeakResident  # noqa: E402

FULL = dict(vocab=151_936, hidden=256, layers=4, heads=4, rows=8, width=512, prompt=128)
SMOKE = dict(vocab=60_000, hidden=64, layers=2, heads=2, rows=4, width=96, prompt=16)
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
    with PeakResident() as sampler:
        if path == "lean":
            logp, _ = selected_token_logprobs(model, ids, attn, mask, 1.0)
        else:
            logp = token_logprobs(model, ids, attn, 1.0)
        loss = -(logp * adv * mask).sum() / mask.sum()
        loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {"path": path, "rise_bytes": sampler.peak - sampler.start, "loss": float(loss.detach()),
            "grad": grad[:: max(1, grad.numel() // 200_000)].tolist(),  # a fixed subsample to compare
            "params": sum(p.numel() for p in model.parameters())}


def run_isolated(path: str, smoke: bool) -> dict:
    """``measure(path)`` in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", path] + (["--smoke"] if smoke else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a small shape, seconds")
    ap.add_argument("--measure", choices=("lean", "naive"), help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--model-dir", help="the model directory of part 2 (default: build the 0.5B preset)")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps of part 2 (the first is not timed)")
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
    from relaxrl.engines.microbatch import padded_share

    lengths = row_lengths(shape)
    result = {
        "params": lean["params"],
        "peak_train_gb": lean["rise_bytes"] / gb,
        "naive_peak_gb": naive["rise_bytes"] / gb,
        "mem_ratio": lean["rise_bytes"] / max(naive["rise_bytes"], 1),
        "loss_diff": abs(lean["loss"] - naive["loss"]),
        "grad_diff": grad_diff,
        "pad_frac": padded_share(lengths, [range(len(lengths))]),  # one micro-batch, padded to its widest row
    }
    print(f"micro-batch {shape['rows']} x {shape['width']} tokens, vocab {shape['vocab']:,}, hidden "
          f"{shape['hidden']}, {shape['layers']} layers ({result['params'] / 1e6:.1f}M params); fp32 logits of "
          f"the whole micro-batch would be {logits_gb:.2f} GB")
    print(f"forward+backward memory rise: lean {result['peak_train_gb']:.2f} GB, full logits "
          f"{result['naive_peak_gb']:.2f} GB (ratio {result['mem_ratio']:.3f}); |loss diff| {result['loss_diff']:.2e}, "
          f"max |grad diff| {grad_diff:.2e}")
    result.update(end_to_end(args.model_dir, args.steps, args.smoke))
    print("scale: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


class RoleMemory:
    """Peak resident memory of each Serve role's processes (``ServeReplica:<role>-<run>``), sampled
    every ``every_s`` with psutil on a thread while a run goes on."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.peak, self._stop = every_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                title = " ".join(proc.info.get("cmdline") or [])
                if "ServeReplica:" in title and proc.info.get("memory_info") is not None:
                    role = title.split("ServeReplica:", 1)[1].split("-", 1)[0]
                    self.peak[role] = max(self.peak.get(role, 0), proc.info["memory_info"].rss)
            time.sleep(self.every_s)

    def __enter__(self) -> "RoleMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def dataset_file(path: str, rows: int = 64) -> str:
    """A small addition dataset (jsonl) for ``env=dataset``, written locally."""
    with open(path, "w") as f:
        for i in range(rows):
            a, b = i % 10, (i * 7) % 10
            f.write(json.dumps({"prompt": f"What is {a}+{b}? Answer with the number.", "answer": str(a + b)}) + "\n")
    return path


def publish_overhead(records: list[dict]) -> float:
    """Median over steps of the trainer's wait for the copy out of its new weights (``export_s``)
    over its train time: what publication adds to the trainer's step (the put into the object store
    runs after the trainer has moved on)."""
    import statistics

    return statistics.median(r["export_s"] / max(r["train_end"] - r["train_start"], 1e-9)
                             for r in records)


def step_seconds(ends: list[float]) -> float:
    """Median seconds per step after the first (which loads and warms up)."""
    import statistics

    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def end_to_end(model_dir: str | None, steps: int, smoke: bool) -> dict:
    """Part 2. With ``smoke``: the bare loop alone on the tiny 152k-vocabulary preset (no Ray)."""
    from common import bench_dir, compose, run  # bench/common.py, as the other benches
    from overhead import bare_loop

    work = bench_dir("scale")
    if model_dir is None:
        from relaxrl.models.build import prepare_model_dir  # built once, cached by preset and seed

        model_dir = prepare_model_dir("qwen-tiny-152k" if smoke else "qwen2.5-0.5b")
    overrides = ["model=local", f"model.path={model_dir}", "env=dataset",
                 f"env.path={dataset_file(os.path.join(work, 'train.jsonl'))}", f"trainer.steps={steps}",
                 "rollout.max_staleness=0", "rollout.group_size=4", "rollout.groups_per_step=2",
                 f"rollout.max_new_tokens={8 if smoke else 32}", "trainer.micro_batch_size=8", "trainer.lr=1e-6",
                 "logger.progress=false", "trainer.save_final=false", f"run_dir={os.path.join(work, 'run')}"]
    cfg = compose(*overrides)
    out: dict = {}
    if not smoke:
        with RoleMemory() as mem:
            summary, records = run(cfg)
        split = summary["stage_s_per_step"]
        timed = records[1:] or records  # the first step loads and warms up
        out.update(step_s=step_seconds([r["wall_s"] for r in records]),
                   publish_s=sum(r["publish_s"] for r in timed) / len(timed),
                   publish_overhead=publish_overhead(timed),
                   reload_mem_ratio=summary.get("reload_resident_ratio") or float("nan"))
        print(f"RelaxRL through Serve, {steps} steps of {cfg.rollout.groups_per_step * cfg.rollout.group_size} samples:"
              f" per step " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(split.items()))
              + f"; {records[-1]['publish_bytes'] / 1e9:.2f} GB published per version in parts of "
              f"{cfg.weight_sync.bucket_mb:g} MB")
        print(f"publication: the trainer waits {out['publish_overhead']:.1%} of its train time for the copy out "
              f"(export_s over train_s, median of {len(timed)} steps); the whole publication took "
              f"{out['publish_s']:.2f} s per version, the put overlapping what follows")
        print(f"rollout replica during a weight load: peak resident {out['reload_mem_ratio']:.3f}x the resident "
              "size just before it (the highest over the loads)")
        print("peak resident memory per role: " + ", ".join(f"{k} {v / 1024**3:.2f} GB"
                                                           for k, v in sorted(mem.peak.items())))
    with PeakResident() as bare_mem:
        ends, stages = bare_loop(cfg, steps)
    out["bare_step_s"] = step_seconds(ends)
    print(f"bare loop, same steps in one process: {out['bare_step_s']:.2f} s per step, peak resident "
          f"{bare_mem.peak / 1024**3:.2f} GB; per step " + ", ".join(f"{k} {sum(v) / len(v):.2f} s"
                                                                   for k, v in stages.items()))
    if not smoke:
        out["ratio"] = out["bare_step_s"] / out["step_s"]
    return out


if __name__ == "__main__":
    main()
