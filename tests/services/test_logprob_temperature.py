"""One temperature for every log-prob producer (no Ray): the teacher roles score at the rollout's
temperature, as the trainer does, and DAgger's cross-entropy on teacher labels is taken at T=1.

The roles are the deployments' own Python classes (``.func_or_class``), called directly.
"""

import asyncio

import pytest

from relaxrl.algorithms.dagger import DAgger, DAggerConfig
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.engines.torch_trainer import TorchTrainerEngine
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.sample import Sample, collate
from relaxrl.services.teacher import Teacher, score_samples

T = 0.7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    d = tmp_path_factory.mktemp("policy")
    build_tiny_model(tok, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def samples():
    """Prompts and responses of different lengths, so rows are padded differently."""
    rows = [([2, 5, 6], [7, 8, 1]), ([2, 9], [10, 11, 12, 13, 1]), ([2, 5, 6, 14, 15], [16])]
    return [Sample(uid=f"g{i}/0", group_id=f"g{i}", index=0, prompt_ids=p, response_ids=r, domain="add",
                   behaviour_logprobs=[0.0] * len(r)) for i, (p, r) in enumerate(rows)]


def trainer_gap(model_dir, scored, field, temperature):
    """max |role's log-prob - trainer's| over the response tokens, the trainer at ``temperature``."""
    trainer = TorchTrainerEngine.from_pretrained(model_dir, temperature=temperature)
    batch = collate(scored, pad_id=HFGenerationEngine.from_pretrained(model_dir).pad_id)
    role = getattr(batch, field)
    return float(((role - trainer.logprobs(batch)).abs() * batch.loss_mask).max())


def test_teacher_role_scores_at_the_rollout_temperature_like_the_trainer(model_dir):
    teacher = Teacher.func_or_class({"ref": model_dir}, temperature=T)
    scored = asyncio.run(teacher.score(samples(), name="ref", field="ref_logprobs"))
    gap = trainer_gap(model_dir, scored, "ref_logprobs", T)
    print(f"teacher vs trainer at T={T}: max |dlogp| = {gap:.2e}")
    assert gap < 1e-6
    # The same tokens at T=1 are far off: the check above would catch a teacher scoring at T=1.
    assert trainer_gap(model_dir, scored, "ref_logprobs", 1.0) > 1e-2


def test_domain_teachers_scoring_step_uses_the_temperature_it_is_given(model_dir):
    """``DomainTeacher.score`` runs ``score_samples`` with its ``temperature`` (its multiplexed
    loader needs a Serve replica; its routing is tested on Serve in test_domain_teacher.py)."""
    engine = HFGenerationEngine.from_pretrained(model_dir)
    scored = score_samples(engine, samples(), "teacher_logprobs", temperature=T, top_k=2)
    assert trainer_gap(model_dir, scored, "teacher_logprobs", T) < 1e-6
    assert all(len(s.teacher_topk_ids) == len(s.response_ids) for s in scored)
    with pytest.raises(ValueError, match="teacher field must be one of"):
        score_samples(engine, samples(), "behaviour_logprobs", temperature=T)


def test_teacher_needs_its_temperature_named():
    with pytest.raises(TypeError, match="temperature"):
        Teacher.func_or_class({"ref": "unused"})


@pytest.mark.parametrize(
    "ce, grpo, rollout_t, expected",
    [(1.0, 0.0, T, 1.0),  # CE on labels alone: a target's likelihood, T=1 whatever the rollout samples at
     (0.0, 1.0, T, T),  # outcome-only GRPO: the ratio to behaviour log-probs sampled at T
     (1.0, 1.0, 1.0, 1.0),
     (0.0, 1.0, 0.0, 1.0)],  # greedy rollout: T=1 log-probs, as the engines report them
)
def test_dagger_declares_the_temperature_its_loss_needs(ce, grpo, rollout_t, expected):
    cfg = DAggerConfig(ce_weight=ce, grpo_weight=grpo, **({"teacher": "none", "beta_start": 0.0, "beta_end": 0.0}
                                                          if ce == 0 else {}))
    assert DAgger(cfg).logprob_temperature(rollout_t) == expected


def test_dagger_refuses_both_terms_at_a_temperature_other_than_one():
    with pytest.raises(ValueError, match="needs rollout.temperature=1"):
        DAgger(DAggerConfig(ce_weight=1.0, grpo_weight=0.5)).logprob_temperature(T)


def test_local_dagger_trains_its_cross_entropy_at_t1_and_samples_at_the_rollout_temperature(model_dir):
    """The in-process DAgger loop: the student samples at T, the trainer's CE is on T=1 log-probs,
    so the logged teacher-token log-prob is the model's own likelihood of the label."""
    from relaxrl.episodic.local import LocalEpisodes

    runner = LocalEpisodes(model_dir, {"name": "guess"}, DAggerConfig(), lr=1e-3, temperature=T)
    assert runner.temperature == T and runner.trainer.temperature == 1.0
    label = Sample(uid="l/0", group_id="l", index=0, prompt_ids=[2, 5, 6], response_ids=[7, 8, 1],
                   behaviour_logprobs=[0.0] * 3, policy_version=-1, reward=0.0)
    at_t1 = HFGenerationEngine.from_pretrained(model_dir).score([label.prompt_ids + label.response_ids], [3])
    expected = sum(at_t1.logprobs[0]) / 3
    metrics = asyncio.run(runner.train(samples=[label]))
    assert metrics["teacher_token_logprob"] == pytest.approx(expected, abs=1e-5)
    at_t = HFGenerationEngine.from_pretrained(model_dir).score([label.prompt_ids + label.response_ids], [3],
                                                               temperature=T)
    assert abs(sum(at_t.logprobs[0]) / 3 - expected) > 1e-2  # the two temperatures really differ here
