"""The structured-output env: parser-based validity, accuracy, the two warm-start sources."""

import pytest
from omegaconf import OmegaConf

from relaxrl.envs.json_answer import STRUCTURAL_CHARS, JsonAnswerEnv, parse_answer
from relaxrl.envs.registry import make_env
from relaxrl.models.tiny import build_tokenizer


@pytest.mark.parametrize(
    "text,value",
    [('{"answer":12}', 12), ('{"answer": 7} ', 7), ('{"answer":12', None), ("12", None), ('{"answer":"12"}', None),
     ('{"answer":true}', None), ('{"answer":1,"x":2}', None), ('{answer:1}', None), ("", None), ("[1]", None)],
)
def test_parser(text, value):
    assert parse_answer(text) == value


def test_validity_accuracy_and_reward():
    env = make_env("json_answer")
    task = next(env.tasks("train", 0))
    right = '{"answer":%s}' % task.answer
    wrong = '{"answer":%d}' % (int(task.answer) + 1)
    assert env.response_info(right, task) == {"valid": 1.0, "correct": 1.0} and env.verify(right, task) == 1.0
    assert env.response_info(wrong, task) == {"valid": 1.0, "correct": 0.0} and env.verify(wrong, task) == 0.0
    assert env.response_info(right[:-1], task) == {"valid": 0.0, "correct": 0.0}


def test_warm_start_sources():
    env = JsonAnswerEnv(teacher_format_noise=0.1)
    clean = env.sft_pairs(500, seed=0)
    assert all(parse_answer(a) is not None for _, a in clean)
    noisy = env.teacher_pairs(2000, seed=0)
    broken = sum(parse_answer(a) is None for _, a in noisy) / len(noisy)
    assert 0.08 < broken < 0.12  # the configured fraction lacks its closing brace
    assert all(a.startswith('{"answer":') for _, a in noisy)
    with pytest.raises(ValueError, match="teacher_format_noise"):
        JsonAnswerEnv(teacher_format_noise=1.5)


def test_experiment_structural_ids_are_the_contract_tokens():
    tok = build_tokenizer()
    expected = set(tok.convert_tokens_to_ids(list(STRUCTURAL_CHARS))) | {tok.eos_token_id}
    exp = OmegaConf.load("relaxrl/conf/experiment/lambda_cliff.yaml")
    assert set(exp.algorithm.structural_token_ids) == expected
