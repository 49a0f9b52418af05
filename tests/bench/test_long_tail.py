"""bench/long_tail.py: its pure pieces, and its smoke run (HF, seconds) through both rollout paths."""

import random

import long_tail


def test_tasks_have_exactly_the_long_share():
    tasks = long_tail.make_tasks(50, [[1, 2], [3]], short=4, long_factor=8, long_frac=0.1, seed=3)
    assert sum(t.max_new_tokens == 32 for t in tasks) == 5 and sum(t.max_new_tokens == 4 for t in tasks) == 45
    assert tasks == long_tail.make_tasks(50, [[1, 2], [3]], short=4, long_factor=8, long_frac=0.1, seed=3)


def test_ks_pvalue_separates_distributions():
    rng = random.Random(0)
    a = [rng.randint(0, 20) for _ in range(200)]
    assert long_tail.ks_pvalue(a, list(a)) == 1.0
    assert long_tail.ks_pvalue(a, [x + 10 for x in a]) < 1e-6


def test_smoke_prints_the_summary_line(capsys):
    long_tail.main(["--smoke"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.removeprefix("long_tail: ").split())
    assert last.startswith("long_tail: ") and set(fields) == {"batch_tokens_per_s", "stream_tokens_per_s", "ratio",
                                                              "ks_p"}
    assert float(fields["batch_tokens_per_s"]) > 0 and float(fields["stream_tokens_per_s"]) > 0
