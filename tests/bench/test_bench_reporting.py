"""What the MOPD, DAgger and λ* benches report, on made-up results (no runs, no Ray): a method that
misses its target gives no step ratio, the summary line comes before the plot, and a missing
matplotlib skips the plot with the install command instead of raising."""

import json
import sys

import dagger_vs_bc
import lambda_cliff
import mopd_vs_grpo
import plot_lambda_cliff
import pytest
from smoke_checks import fields

from bench import plotting

HINT = "pip install -e '.[bench]'"


def curve(add: list[float], sub: list[float]) -> list[dict]:
    """An eval history from step 0, one row per step."""
    return [{"step": i, "domains": {"add": {"accuracy": a}, "sub": {"accuracy": s}}}
            for i, (a, s) in enumerate(zip(add, sub))]


def mopd_run(mopd_reach: int | None, grpo_reach: int | None, mopd_budget: int = 60, grpo_budget: int = 120) -> dict:
    """A seed's record whose MOPD / GRPO curves first have both domains at target at the given steps."""
    teachers = {"add": 0.5, "sub": 0.4}  # targets 0.475 / 0.38

    def hist(reach, budget):
        add = [0.1] * (budget + 1)
        sub = [0.39] * (budget + 1)
        if reach is not None:
            add[reach:] = [0.48] * (budget + 1 - reach)
        return curve(add, sub)

    return {"teachers": teachers, "budget": {"mopd": mopd_budget, "grpo_mix": grpo_budget},
            "curves": {"MOPD": hist(mopd_reach, mopd_budget), "GRPO on mixed data": hist(grpo_reach, grpo_budget)}}


# --- MOPD vs GRPO: honest ratios --------------------------------------------------------------------

def test_neither_reached_gives_no_ratio():
    # The shipped seed-0 run: neither method reached, and the old line printed step_ratio=0.50
    # (the ratio of the two budgets, 60 / 120).
    s = mopd_vs_grpo.summarize(mopd_vs_grpo.seed_results({0: mopd_run(None, None)}))
    assert s["step_ratio"] is None and s["mopd_steps"] is None and s["grpo_steps"] is None
    assert (s["both_reached"], s["mopd_reached"], s["grpo_reached"], s["seeds"]) == (0, 0, 0, 1)
    line = mopd_vs_grpo.summary_line(s)
    assert line.startswith("mopd_vs_grpo: step_ratio=none mopd_steps=none grpo_steps=none seeds=1 "), line
    assert "step_ratio" not in fields(line)  # nothing a parser could take for a measured ratio


def test_one_method_at_budget_gives_no_ratio_for_that_seed():
    r = mopd_vs_grpo.seed_results({0: mopd_run(None, 96)})[0]
    assert r.step_ratio is None and not r.mopd.reached and r.grpo.steps == 96
    line = mopd_vs_grpo.seed_line(r)
    assert "mopd reached=no steps=none (budget 60;" in line and "grpo reached=yes steps=96 " in line, line
    assert line.endswith("step_ratio=none"), line


def test_ratio_is_the_median_over_seeds_where_both_reached():
    runs = {0: mopd_run(17, 78), 1: mopd_run(30, 60), 2: mopd_run(None, 96)}
    s = mopd_vs_grpo.summarize(mopd_vs_grpo.seed_results(runs))
    assert s["step_ratio"] == pytest.approx((17 / 78 + 30 / 60) / 2)  # seed 2 does not count
    assert s["mopd_steps"] == pytest.approx(23.5) and s["grpo_steps"] == 78  # each over the seeds it reached
    assert (s["seeds"], s["both_reached"], s["mopd_reached"], s["grpo_reached"]) == (3, 2, 2, 3)
    v = fields(mopd_vs_grpo.summary_line(s))
    assert v == {"step_ratio": pytest.approx(0.36, abs=1e-9), "mopd_steps": 23.5, "grpo_steps": 78, "seeds": 3,
                 "both_reached": 2, "mopd_reached": 2, "grpo_reached": 3}


def test_a_start_already_at_target_compares_nothing():
    r = mopd_vs_grpo.seed_results({0: mopd_run(0, 0)})[0]
    assert r.mopd.reached and r.grpo.reached and r.step_ratio is None  # not 0/0, not 0/max(0, 1)


def test_report_of_a_pre_seeds_results_file(tmp_path, capsys, monkeypatch):
    # docs/img/mopd_vs_grpo.json was written before --seeds: one seed's keys at the top level.
    old = {**mopd_run(None, None), "targets": {}, "reach": {}, "stage_final_eval": {}, "wall_s": 1.0}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    monkeypatch.setattr(mopd_vs_grpo, "save_plot", lambda *a, **k: False)
    mopd_vs_grpo.main(["--report", str(path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("seed 0: ") and "mopd reached=no" in out[0] and "grpo reached=no" in out[0]
    assert out[-1].startswith("mopd_vs_grpo: step_ratio=none "), out[-1]
    saved = json.loads((tmp_path / "out" / "mopd_vs_grpo.json").read_text())
    assert saved["summary"]["both_reached"] == 0 and set(saved["runs"]) == {"0"}


# --- Summary line before the plot; no matplotlib, no crash -------------------------------------------

def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


def test_save_plot_without_matplotlib_prints_the_hint(tmp_path, capsys, monkeypatch):
    no_matplotlib(monkeypatch)
    drawn = []
    assert plotting.save_plot("some_bench", str(tmp_path / "p.png"), drawn.append) is False
    assert not drawn and not (tmp_path / "p.png").exists()
    err = capsys.readouterr().err
    assert "some_bench: no plot written" in err and HINT in err, err


def dagger_results() -> dict:
    """Three seeds' runs; the medians are DAgger 0.5 and BC 0.75, neither seed 0's alone."""
    def method(labels, success):
        return {"labels": labels, "episodes": 8, "cpu_s": 1.0,
                "final": {"success": success, "success_greedy": success},
                "curve": [{"labels": labels // 2, "step": 2, "success": 0.0, "success_greedy": 0.0},
                          {"labels": labels, "step": 4, "success": success, "success_greedy": success}]}
    return {s: {"dagger": method(24, d), "bc": method(24, b), "grpo": method(0, 0.0)}
            for s, (d, b) in enumerate([(0.9, 0.7), (0.5, 0.75), (0.1, 0.8)])}


def dagger_args(tmp_path):
    import argparse

    return argparse.Namespace(plot=str(tmp_path / "d.png"), json="", env="guess")


def summary_seen_at_plot(monkeypatch, capsys, module, attr="save_plot") -> list[str]:
    """Replace the module's plot call by one that records what had been printed when it was called."""
    seen = []
    monkeypatch.setattr(module, attr, lambda *a, **k: seen.append(capsys.readouterr().out))
    return seen


def test_dagger_report_prints_the_summary_before_plotting(tmp_path, capsys, monkeypatch):
    seen = summary_seen_at_plot(monkeypatch, capsys, dagger_vs_bc)
    dagger_vs_bc.report(dagger_results(), dagger_args(tmp_path), wall_s=1.0)
    assert len(seen) == 1, "the plot was not asked for"
    lines = seen[0].strip().splitlines()
    assert lines[-1] == "dagger_vs_bc: dagger_success=0.500 bc_success=0.750 grpo_success=0.000 labels=24 seeds=3"
    assert "seed 0: dagger=0.900 bc=0.700 grpo=0.000" in lines  # each seed's numbers printed too


def test_dagger_report_without_matplotlib_keeps_its_results(tmp_path, capsys, monkeypatch):
    # Before: the plot's ImportError came after all the runs and before the summary line.
    no_matplotlib(monkeypatch)
    dagger_vs_bc.report(dagger_results(), dagger_args(tmp_path), wall_s=1.0)
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("dagger_vs_bc: dagger_success=0.500 ")
    assert HINT in captured.err and not (tmp_path / "d.png").exists()


def test_mopd_report_prints_the_summary_before_plotting(tmp_path, capsys, monkeypatch):
    seen = summary_seen_at_plot(monkeypatch, capsys, mopd_vs_grpo)
    mopd_vs_grpo.report({0: mopd_run(17, 78), 1: mopd_run(None, None)}, str(tmp_path))
    assert len(seen) == 1
    lines = seen[0].strip().splitlines()
    assert [x.split(":")[0] for x in lines] == ["seed 0", "seed 1", "mopd_vs_grpo"], lines


def test_mopd_report_without_matplotlib(tmp_path, capsys, monkeypatch):
    no_matplotlib(monkeypatch)
    mopd_vs_grpo.report({0: mopd_run(None, None)}, str(tmp_path))
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("mopd_vs_grpo: step_ratio=none ")
    assert HINT in captured.err and (tmp_path / "mopd_vs_grpo.json").exists()


def lambda_report() -> dict:
    res = {"validity": 0.9, "accuracy": 0.5, "lambda_mean": 1.0, "lambda_star_last": 0.2, "samples": 8}
    return {"prereg": {"p": 0.92, "b": 0.999, "c": 2.0}, "grid": [1.0, 3.0],
            "results": {"1.0": res, "3.0": {**res, "validity": 0.5, "lambda_mean": 3.0}},
            "scheduler": {**res, "lambda_mean": 0.15, "validity": 0.95}, "observed": [1.0, 3.0], "predicted": 0.164,
            "prediction_inside": False, "scheduler_validity_ratio": 0.95 / 0.9}


def test_lambda_cliff_prints_the_summary_before_plotting(tmp_path, capsys, monkeypatch):
    seen = summary_seen_at_plot(monkeypatch, capsys, lambda_cliff)
    lambda_cliff.finish(lambda_report(), tmp_path / "results.json", tmp_path / "lambda_cliff.png")
    assert len(seen) == 1
    assert seen[0].strip().splitlines()[-1].startswith("lambda_cliff: predicted=0.164 observed_lo=1.000 "
                                                       "observed_hi=3.000 scheduler_validity=0.950 ")


def test_lambda_cliff_plots_without_matplotlib(tmp_path, capsys, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(lambda_report()))
    no_matplotlib(monkeypatch)
    lambda_cliff.finish(lambda_report(), path, tmp_path / "lambda_cliff.png")
    assert plot_lambda_cliff.main(str(path), str(tmp_path / "again.png")) is False
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("lambda_cliff: predicted=0.164 ")
    assert captured.err.count(HINT) == 2 and not list(tmp_path.glob("*.png"))


# --- With matplotlib: each bench's figure from its own results shape --------------------------------

def test_each_bench_writes_its_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert plotting.save_plot("mopd_vs_grpo", str(tmp_path / "m.png"),
                              mopd_vs_grpo.draw({0: mopd_run(3, None, 4, 6), 1: mopd_run(None, 2, 4, 6)}))
    assert plotting.save_plot("dagger_vs_bc", str(tmp_path / "d.png"), dagger_vs_bc.draw(dagger_results(), "guess"))
    assert plotting.save_plot("lambda_cliff", str(tmp_path / "l.png"), plot_lambda_cliff.draw(lambda_report()))
    for name in ("m", "d", "l"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
