"""Framework overhead: RelaxRL at ``max_staleness=0`` against a bare single-process loop doing the
same work with the same engines and algorithm (generate → verify → train → load weights), no Ray.

The work per step is the experiment's (``+experiment=quickstart`` with 16 groups of 16 responses,
sent as one request per step as in ``bench/async_speedup.py``), measured with the quickstart's tiny
model and with a wider, deeper one (``--models``): the framework's cost per step is roughly fixed,
so what it is worth depends on the step it is added to. Bare loop and RelaxRL run the same seeds,
so they generate and train on the very same tokens; they alternate ``--repeats`` times (bare,
RelaxRL, bare, ...) so each ratio compares runs taken a minute apart on a noisy machine, and the
reported ratio is the median of the per-repeat ratios. Each stage's time per step is printed for
both, so the overhead can be read stage by stage.

    python bench/overhead.py            # full (~8 min on 2 cores)
    python bench/overhead.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from statistics import median

from common import REPORTED_SETTINGS, bench_dir, compose, run, steady_steps_per_s

from relaxrl import launch
from relaxrl.algorithms import make_algorithm
from relaxrl.driver import TaskStream
from relaxrl.engines.base import SamplingParams
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.engines.torch_trainer import TorchTrainerEngine
from relaxrl.envs.registry import make_env
from relaxrl.groups import GroupRequest, groups_per_request, prompts_of, samples_from_generations
from relaxrl.models.chat import PromptEncoder
from relaxrl.models.lora import LoraConfig
from relaxrl.queue import group_name
from relaxrl.sample import collate

STAGES = ("gen", "reward", "train", "sync")  # sync: weight export/publication and the load


def bare_loop(cfg, steps: int) -> tuple[list[float], dict[str, list[float]]]:
    """The same step as RelaxRL's roles, in plain Python; returns each step's end time (s) and each
    stage's seconds per step."""
    r, tr = cfg.rollout, launch.plain(cfg.trainer)
    model_dir = launch.prepare_model_dir(cfg)
    env, algorithm = make_env(**launch.plain(cfg.env)), make_algorithm(launch.plain(cfg.algorithm))
    lora = LoraConfig(**launch.plain(cfg.model.lora)) if cfg.model.lora.enabled else None
    gen = HFGenerationEngine.from_pretrained(model_dir, lora=lora, dtype=cfg.model.dtype, torch_threads=r.torch_threads)
    trainer = TorchTrainerEngine.from_trainer_config(model_dir, tr, dtype=cfg.model.dtype, temperature=r.temperature,
                                                     lora=lora, seed=cfg.seed)
    sampling = {"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens}
    tasks, tok = TaskStream(env, cfg.seed), gen.tokenizer
    prompt_ids = PromptEncoder(tok)  # as the driver renders prompts
    per_request = groups_per_request(r.groups_per_request, r.batch_max_groups, r.groups_per_step, r.num_replicas)
    ends, seq, stages = [], 0, defaultdict(list)
    for _ in range(steps):
        samples, spent = [], dict.fromkeys(STAGES, 0.0)
        # The step's groups in requests of per_request groups, one generate call each: the calls the
        # rollout role makes (Serve merges no requests then; see groups_per_request).
        for first in range(0, r.groups_per_step, per_request):
            t0 = time.perf_counter()
            requests, by_group = [], {}
            for _ in range(min(per_request, r.groups_per_step - first)):
                task = tasks.get(seq)
                by_group[group_name(seq)] = task
                requests.append(GroupRequest(group_id=group_name(seq), prompt_ids=prompt_ids(task.prompt),
                                             n=r.group_size, domain=task.domain, env=cfg.env.name,
                                             answer=task.answer, seed=cfg.seed * 1_000_003 + seq))
                seq += 1
            gens = gen.generate(prompts_of(requests), SamplingParams(seed=requests[0].seed, **sampling))
            groups = samples_from_generations(requests, gens, tok, gen.version, {})
            t1 = time.perf_counter()
            samples += [s.replace(reward=float(env.verify(s.response_text, by_group[s.group_id])))
                        for group in groups for s in group]
            t2 = time.perf_counter()
            spent["gen"] += t1 - t0
            spent["reward"] += t2 - t1
        t2 = time.perf_counter()
        trainer.train_step(algorithm.prepare(collate(samples, tok.pad_token_id)), algorithm.loss)
        t3 = time.perf_counter()
        gen.load_weights(trainer.export_weights())
        t4 = time.perf_counter()
        spent["train"], spent["sync"] = t3 - t2, t4 - t3
        for k, v in spent.items():
            stages[k].append(v)
        ends.append(time.time())
    return ends, stages


# Model sizes the work is measured at: the quickstart's own tiny model, and a wider, deeper one
# whose step (~7x longer) is closer to what a real step's compute is to the framework's fixed costs.
# Each with its steps per run and repeats (the wide model's runs are long, and steadier).
MODELS = {
    "quickstart": ([], 80, 5),
    "wide": (["model.tiny.hidden_size=256", "model.tiny.intermediate_size=1024", "model.tiny.num_layers=4"], 40, 1),
}


def relaxrl_stage_s(summary: dict) -> dict[str, float]:
    st = summary["stage_s_per_step"]
    return {"gen": st.get("gen", 0.0), "reward": st.get("reward", 0.0), "train": st.get("train", 0.0),
            "sync": st.get("publish", 0.0) + st.get("weights", 0.0)}


def measure(args: argparse.Namespace, model: str) -> dict:
    """Bare and RelaxRL samples/s on the same work, alternated ``repeats`` times; prints each repeat."""
    extra, steps, repeats = MODELS[model]
    steps, repeats = args.steps or steps, args.repeats or repeats
    common = ["+experiment=quickstart", "rollout.max_staleness=0", f"trainer.steps={steps}",
              "trainer.save_final=false", "logger.progress=false", *REPORTED_SETTINGS, *extra, *args.override]
    skip = max(1, steps // 10)  # start-up is not throughput
    rows = []
    for repeat in range(1, repeats + 1):
        cfg = compose(*common, f"run_dir={bench_dir('overhead')}")
        per_step = cfg.rollout.group_size * cfg.rollout.groups_per_step
        ends, bare_stages = bare_loop(cfg, steps)
        bare = (len(ends) - skip) / (ends[-1] - ends[skip - 1]) * per_step
        summary, records = run(cfg)
        relax = steady_steps_per_s(records) * per_step
        row = {"bare": bare, "relaxrl": relax, "ratio": relax / bare,
               "bare_stages": {k: median(v[skip:]) for k, v in bare_stages.items()},
               "relaxrl_stages": relaxrl_stage_s(summary)}
        rows.append(row)
        print(f"model={model} repeat={repeat}: step_ms bare={per_step / bare * 1000:.1f} "
              f"relaxrl={per_step / relax * 1000:.1f} ratio={row['ratio']:.3f}", flush=True)
    out = {k: median(r[k] for r in rows) for k in ("bare", "relaxrl", "ratio")}
    stage_ms = " ".join(f"{k}={1000 * median(r['bare_stages'][k] for r in rows):.1f}/"
                        f"{1000 * median(r['relaxrl_stages'][k] for r in rows):.1f}" for k in STAGES)
    print(f"model={model}: {per_step} samples/step, {steps} steps x {repeats} repeats, overrides {extra + args.override}")
    print(f"model={model}: stage_ms_per_step bare/relaxrl {stage_ms} (stage busy time; the step also holds "
          "the hand-offs between stages)")
    print(f"model={model}: step_ms bare={per_step / out['bare'] * 1000:.1f} relaxrl={per_step / out['relaxrl'] * 1000:.1f} "
          f"overhead_ms_per_step={per_step / out['relaxrl'] * 1000 - per_step / out['bare'] * 1000:.1f} "
          f"ratio={out['ratio']:.3f} (median of {repeats})", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0, help="steps per run (default: per model, see MODELS)")
    p.add_argument("--repeats", type=int, default=0, help="bare/RelaxRL pairs per model (default: per model)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["wide", "quickstart"],
                   help="model sizes to measure; the summary line is the last one's")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("override", nargs="*", default=["rollout.group_size=16", "rollout.groups_per_step=16",
                                                    "rollout.batch_max_groups=16", "rollout.max_new_tokens=16"],
                   help="Hydra overrides defining the work (default: a heavier quickstart step, one request per step)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats, args.models = 4, 1, ["quickstart"]
    for model in args.models:
        r = measure(args, model)
    print(f"overhead: bare_samples_per_s={r['bare']:.1f} relaxrl_samples_per_s={r['relaxrl']:.1f} "
          f"ratio={r['ratio']:.3f} model={args.models[-1]}")


if __name__ == "__main__":
    main()
