"""bench/mopd_vs_grpo.py's smoke run (in-process, no Ray, seconds) and its teacher cache."""

import json
from dataclasses import replace

import mopd_vs_grpo
import pytest

from bench import _mopd_toy as toy


def test_smoke_run_reports_per_seed_then_the_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mopd_vs_grpo, "save_plot", lambda *a, **k: False)
    argv = ["--smoke", "--seeds", "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    summary = mopd_vs_grpo.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("stage add: step 0: add="), lines[0]  # the stages were built (not cached)
    evals = [x for x in lines if x.startswith("eval: ")]
    assert len(evals) == 1 and evals[0].startswith("eval: 32 fixed prompts per domain, standard error <= 0.0884"), evals
    assert lines[-2].startswith("seed 0: targets add=") and " mopd reached=" in lines[-2], lines[-2]
    assert lines[-1].startswith("mopd_vs_grpo: step_ratio=") and " seeds=1 " in lines[-1], lines[-1]
    saved = json.loads((tmp_path / "out" / "mopd_vs_grpo.json").read_text())
    assert saved["summary"] == summary and saved["config"]["eval_size"] == 32
    curve = saved["runs"]["0"]["curves"]["MOPD"]
    assert curve[0]["step"] == 0 and set(curve[0]["domains"]) == {"add", "sub"}
    assert 1 <= len(curve) <= 4  # step 0, then at most the smoke budget of 3 steps
    # A second run reuses the cached teachers and post-B checkpoint.
    cached = toy.build_checkpoints(mopd_vs_grpo.parse_overrides([], mopd_vs_grpo.SMOKE), str(tmp_path / "cache"))
    assert "teachers: cached " in capsys.readouterr().out and cached["teachers"] == saved["runs"]["0"]["teachers"]
    assert len(list((tmp_path / "cache").glob("mopd_toy-*.pt"))) == 1


def test_cache_key_follows_the_config_and_the_code():
    cfg = toy.ToyConfig()
    assert cfg.key("code") == toy.ToyConfig().key("code")
    assert cfg.key("code") != replace(cfg, rl_steps=(10, 81)).key("code")
    assert cfg.key("code") != cfg.key("code changed")
    # MOPD's advantage clip is not part of the stages: changing it reuses the teachers.
    assert cfg.key("code") == replace(cfg, adv_clip=3.0).key("code")


def test_overrides_are_typed_and_checked():
    cfg = mopd_vs_grpo.parse_overrides(["rl_steps=5,6", "lr=2e-4", "eval_size=100"])
    assert (cfg.rl_steps, cfg.lr, cfg.eval_size) == ((5, 6), 2e-4, 100)
    with pytest.raises(SystemExit, match="bad override 'lrr=1'"):
        mopd_vs_grpo.parse_overrides(["lrr=1"])


def test_standard_error_of_the_default_eval_set_is_below_0_02():
    assert toy.standard_error(0.5, toy.ToyConfig().eval_size) < 0.02
    assert toy.standard_error(0.9, 100) == pytest.approx(0.03)


def test_digits_task_envs_prompts_answers_and_checks():
    cfg = mopd_vs_grpo.parse_overrides([], mopd_vs_grpo.TASKS["digits"])
    assert cfg.domains == ("rev", "sort") and cfg.max_new_tokens == 5
    envs = toy.make_envs(cfg)
    rev, sort = next(envs["rev"].tasks("eval", 0)), next(envs["sort"].tasks("eval", 0))
    assert rev.prompt[4:] == "r=" and rev.answer == rev.prompt[:4][::-1]
    assert sort.prompt[4:] == "s=" and sort.answer == "".join(sorted(sort.prompt[:4]))
    evals = list(envs["mix"].tasks("eval", 0))
    assert len(evals) == 2 * cfg.eval_size and [t.domain for t in evals[:2]] == ["rev", "sort"]
    assert envs["mix"].verify(" " + rev.answer, evals[0]) == 1.0 and envs["mix"].verify(rev.answer[:3], evals[0]) == 0.0
    assert toy.ToyConfig(task="digits", digit_ops="rot,sort", max_new_tokens=5).domains == ("rot", "sort")
    with pytest.raises(ValueError, match="max_new_tokens=3 < digits"):
        toy.ToyConfig(task="digits")
    with pytest.raises(ValueError, match="digit_ops='rev,rev'"):
        toy.ToyConfig(task="digits", digit_ops="rev,rev", max_new_tokens=5)
    with pytest.raises(ValueError, match="unknown task 'words'"):
        toy.ToyConfig(task="words")
