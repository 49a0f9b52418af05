"""The in-process batched policy and a model-checkpoint teacher on concurrent episodes."""

import asyncio

from relaxrl.engines.base import SamplingParams
from relaxrl.engines.batched_policy import BatchedPolicy
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.envs.episodes import ModelTeacher, action_text, label_samples, run_episodes
from relaxrl.envs.guess import GuessEnv
from relaxrl.models.tiny import build_tiny_model, build_tokenizer


def test_concurrent_episodes_share_generate_calls_and_a_model_teacher_labels_greedily():
    tok = build_tokenizer()
    engine = HFGenerationEngine(build_tiny_model(tok, seed=1), tok)
    student = BatchedPolicy(engine, SamplingParams(temperature=1.0, seed=3))
    greedy = BatchedPolicy(engine, SamplingParams(temperature=0.0))
    teacher = ModelTeacher(greedy, tok)
    eps = asyncio.run(run_episodes(lambda: GuessEnv(high=15, max_turns=3), list(range(6)), tokenizer=tok,
                                   student=student, teacher=teacher, beta=0.5))
    actions = sum(t.actor == "student" for e in eps for t in e.turns)
    assert actions > 0 and student.calls < actions  # several episodes' actions per generate call
    # Each label is the checkpoint's greedy action in exactly the state it labels.
    for e in eps:
        for s, t in zip(label_samples(e, tok), e.turns):
            (g,) = engine.generate([s.prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=4))
            assert t.label == action_text(tok, g)
            if t.actor == "teacher":
                assert t.action == t.label
