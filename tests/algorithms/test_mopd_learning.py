"""MOPD learns, in-process (no Ray): on its own samples a student is pulled onto the teacher of each
sample's domain, and so recovers the teacher's accuracy."""

import copy
import random

import torch

from relaxrl.algorithms.mopd import MOPD, MOPDConfig
from relaxrl.engines.base import SamplingParams
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.engines.torch_trainer import TorchTrainerEngine
from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.evaluation import evaluate_tasks
from relaxrl.models.chat import render_prompt_ids
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.models.warm_start import warm_start
from relaxrl.sample import Sample, collate

TINY = dict(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128)


def test_student_recovers_the_domain_teacher_by_distillation():
    tok = build_tokenizer()
    env = ArithmeticEnv(ops=["+"], max_operand=4, domain="add", eval_size=25)
    # As in a pipeline, student and teacher share an init: a short SFT; the teacher trained on further.
    base = build_tiny_model(tok, seed=1, **TINY)
    warm_start(base, tok, env.sft_pairs(800, seed=0), steps=40, lr=3e-3, batch_size=32, seed=0)
    teacher_model = copy.deepcopy(base)
    warm_start(teacher_model, tok, env.sft_pairs(800, seed=1), steps=120, lr=3e-3, batch_size=32, seed=1)
    teacher = HFGenerationEngine(teacher_model, tok)
    trainer = TorchTrainerEngine(base, lr=1e-3, micro_batch_size=64)
    student = HFGenerationEngine(trainer.model, tok)  # samples with the very weights being trained
    algo = MOPD(MOPDConfig(adv_clip=1.0))
    prompt = lambda text: render_prompt_ids(tok, text)  # noqa: E731
    tasks = list(env.tasks("eval", 0))
    teacher_acc = evaluate_tasks(teacher, env, tasks, prompt, max_new_tokens=3)["add"]["accuracy"]
    before = evaluate_tasks(student, env, tasks, prompt, max_new_tokens=3)["add"]["accuracy"]
    rng, train = random.Random(0), env.tasks("train", 0)
    kls = []
    for step in range(40):
        group = [next(train) for _ in range(16)]
        prompts = [prompt(t.prompt) for t in group for _ in range(2)]
        gens = student.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=3, seed=rng.randrange(10**6)))
        scored = teacher.score([p + g.response_ids for p, g in zip(prompts, gens)], [len(p) for p in prompts])
        samples = [Sample(uid=f"{step}/{i}", group_id=f"{step}/{i // 2}", index=i % 2, prompt_ids=p, domain="add",
                          response_ids=g.response_ids, behaviour_logprobs=g.logprobs, reward=0.0,
                          teacher_logprobs=t, policy_version=trainer.version)
                   for i, (p, g, t) in enumerate(zip(prompts, gens, scored.logprobs))]
        metrics = trainer.train_step(algo.prepare(collate(samples, tok.pad_token_id)), algo.loss)
        kls.append(metrics["teacher_kl"])
    after = evaluate_tasks(student, env, tasks, prompt, max_new_tokens=3)["add"]["accuracy"]
    print(f"teacher={teacher_acc:.2f} student before={before:.2f} after={after:.2f} "
          f"kl first5={sum(kls[:5]) / 5:.3f} last5={sum(kls[-5:]) / 5:.3f}")
    assert teacher_acc >= 0.5
    assert sum(kls[-5:]) < 0.7 * sum(kls[:5])  # reverse KL to the teacher falls by > 30%
    assert after >= 0.8 * teacher_acc and after >= before + 0.3
