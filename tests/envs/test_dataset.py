import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relaxrl.envs.base import Task
from relaxrl.envs.dataset import DatasetEnv
from relaxrl.envs.registry import make_env
from relaxrl.envs.verifiers import VERIFIERS, contains, exact, get_verifier, numeric

ROWS = [{"q": f"What is {i}+1?", "a": i + 1, "topic": "math" if i % 2 else "count"} for i in range(20)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def _env(path, **kw):
    return DatasetEnv(str(path), prompt_field="q", answer_field="a", **kw)


def test_splits_partition_the_rows(jsonl):
    env = _env(jsonl, eval_fraction=0.25)
    ev = list(env.tasks("eval", seed=0))
    assert len(ev) == 5 and [t.task_id for t in ev] == [f"eval-{i}" for i in range(5)]
    assert [t.prompt for t in ev] == [t.prompt for t in env.tasks("eval", seed=9)]  # seed-independent
    train = list(itertools.islice(env.tasks("train", seed=0), 15))
    assert {t.prompt for t in train}.isdisjoint({t.prompt for t in ev})
    assert len({t.prompt for t in train}) == 15  # one epoch covers every train row once
    for t in train + ev:
        i = t.meta["row"]
        assert (t.prompt, t.answer) == (ROWS[i]["q"], str(ROWS[i]["a"]))  # numbers become strings


def test_train_stream_is_endless_seeded_and_reshuffled(jsonl):
    env = _env(jsonl, eval_fraction=0.25)
    a = [t.prompt for t in itertools.islice(env.tasks("train", seed=1), 45)]
    assert a == [t.prompt for t in itertools.islice(env.tasks("train", seed=1), 45)]
    assert a != [t.prompt for t in itertools.islice(env.tasks("train", seed=2), 45)]
    epochs = [a[0:15], a[15:30], a[30:45]]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and epochs[0] != epochs[1]


def test_parquet_matches_jsonl(jsonl, parquet):
    j, p = _env(jsonl), _env(parquet)
    assert len(p) == 20
    assert list(j.tasks("eval", 0)) == list(p.tasks("eval", 0))
    assert list(itertools.islice(j.tasks("train", 0), 30)) == list(itertools.islice(p.tasks("train", 0), 30))


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    assert len(_env(path)) == 20


def test_domains(jsonl):
    per_row = _env(jsonl, domain_field="topic")
    assert {t.domain for t in itertools.islice(per_row.tasks("train", 0), 18)} == {"math", "count"}
    fixed = _env(jsonl, domain="qa")
    assert {t.domain for t in fixed.tasks("eval", 0)} == {"qa"}


def test_file_and_field_errors(tmp_path, jsonl):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        DatasetEnv(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"'prompt'.*columns present: \['q', 'a', 'topic'\]"):
        DatasetEnv(str(jsonl))
    with pytest.raises(ValueError, match="'topics'"):
        _env(jsonl, domain_field="topics")
    (tmp_path / "data.csv").write_text("q,a\n1,2\n")
    with pytest.raises(ValueError, match="'.csv'"):
        DatasetEnv(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="eval_fraction"):
        _env(jsonl, eval_fraction=1.0)
    with pytest.raises(ValueError, match="'fuzzy'"):
        _env(jsonl, verifier="fuzzy")


def test_small_eval_fraction_still_gives_one_row(jsonl):
    assert len(list(_env(jsonl, eval_fraction=0.01).tasks("eval", 0))) == 1
    assert list(_env(jsonl, eval_fraction=0.0).tasks("eval", 0)) == []


def test_verify_uses_the_named_verifier(jsonl):
    task = Task(task_id="t", prompt="p", answer="21")
    assert _env(jsonl).verify(" 21 ", task) == 1.0
    assert _env(jsonl).verify("21.0", task) == 0.0
    assert _env(jsonl, verifier="numeric").verify("21.0", task) == 1.0
    assert _env(jsonl, verifier="contains").verify("it is 21!", task) == 1.0


def test_verifiers():
    assert sorted(VERIFIERS) == ["contains", "exact", "format", "math", "numeric", "python_tests"]
    assert exact(" a b\n", "a b") == 1.0 and exact("a  b", "a b") == 0.0
    assert numeric("3.0000001", "3") == 1.0 and numeric("3.01", "3") == 0.0
    assert numeric("1e3", " 1000 ") == 1.0 and numeric("three", "3") == 0.0 and numeric("3", "n/a") == 0.0
    assert contains("x = 42.", "42") == 1.0 and contains("4 2", "42") == 0.0 and contains("anything", " ") == 0.0
    assert get_verifier("exact") is exact
    with pytest.raises(ValueError, match=r"unknown verifier 'regex'.*'exact', 'format', 'math'"):
        get_verifier("regex")


def test_registry_and_sft_pairs(jsonl):
    env = make_env("dataset", path=str(jsonl), prompt_field="q", answer_field="a")
    assert isinstance(env, DatasetEnv)
    pairs = env.sft_pairs(30, seed=0)
    evals = {t.prompt for t in env.tasks("eval", 0)}
    assert len(pairs) == 30 and not {p for p, _ in pairs} & evals
    assert all(a == str(int(p.split()[2].rstrip("?").split("+")[0]) + 1) for p, a in pairs)
