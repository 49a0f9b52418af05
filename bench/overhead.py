"""Framework overhead: RelaxRL at ``max_staleness=0`` against a bare single-process loop doing the
same work with the same engines and algorithm (generate → verify → train → load weights), no Ray.

The work per step is the experiment's (``+experiment=quickstart`` with 16 groups of 16 responses),
measured with the quickstart's tiny model and with a wider, deeper one (``--models``): the
framework's cost per step is roughly fixed, so what it is worth depends on the step it is added to.
The per-step overhead is printed in ms too.

    python bench/overhead.py            # full (~6 min on 2 cores)
    python bench/overhead.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import time

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


def bare_loop(cfg, steps: int) -> list[float]:
    """The same step as RelaxRL's roles, in plain Python; returns each step's end time (s)."""
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
    ends, seq = [], 0
    for _ in range(steps):
        samples = []
        # The step's groups in requests of per_request groups, one generate call each: the calls the
        # rollout role makes (Serve merges no requests then; see groups_per_request).
        for first in range(0, r.groups_per_step, per_request):
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
            samples += [s.replace(reward=float(env.verify(s.response_text, by_group[s.group_id])))
                        for group in groups for s in group]
        trainer.train_step(algorithm.prepare(collate(samples, tok.pad_token_id)), algorithm.loss)
        gen.load_weights(trainer.export_weights())
        ends.append(time.time())
    return ends


# Model sizes the work is measured at: the quickstart's own tiny model, and a wider, deeper one
# whose step (~4x longer) is closer to what a real step's compute is to the framework's fixed costs.
MODELS = {
    "quickstart": [],
    "wide": ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=1024", "model.tiny.num_layers=4"],
}


def measure(args: argparse.Namespace, model: str) -> tuple[float, float]:
    """(bare, RelaxRL) samples/s on the same work; prints the step times."""
    common = ["+experiment=quickstart", "rollout.max_staleness=0", f"trainer.steps={args.steps}",
              "trainer.save_final=false", "logger.progress=false",
              *REPORTED_SETTINGS, *MODELS[model], *args.override]
    cfg = compose(*common, f"run_dir={bench_dir('overhead')}")
    per_step = cfg.rollout.group_size * cfg.rollout.groups_per_step
    ends = bare_loop(cfg, args.steps)
    skip = max(1, args.steps // 10)
    bare = (len(ends) - skip) / (ends[-1] - ends[skip - 1]) * per_step
    _, records = run(cfg)
    relax = steady_steps_per_s(records) * per_step
    step_ms = {"bare": per_step / bare * 1000, "relaxrl": per_step / relax * 1000}
    print(f"model={model}: {per_step} samples/step, overrides {MODELS[model] + args.override}")
    print(f"model={model}: step_ms bare={step_ms['bare']:.1f} relaxrl={step_ms['relaxrl']:.1f} "
          f"overhead_ms_per_step={step_ms['relaxrl'] - step_ms['bare']:.1f} ratio={relax / bare:.3f}", flush=True)
    return bare, relax


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["quickstart", "wide"],
                   help="model sizes to measure; the summary line is the last one's")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("override", nargs="*", default=["rollout.group_size=16", "rollout.groups_per_step=16",
                                                    "rollout.max_new_tokens=16"],
                   help="Hydra overrides defining the work (default: a heavier quickstart step)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.models = 4, ["quickstart"]
    for model in args.models:
        bare, relax = measure(args, model)
    print(f"overhead: bare_samples_per_s={bare:.1f} relaxrl_samples_per_s={relax:.1f} ratio={relax / bare:.3f} "
          f"model={args.models[-1]}")

if __name__ == "__main__":
    main()
