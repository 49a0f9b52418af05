"""bench/scale.py's smoke version: the lean and full-logits paths on one small micro-batch."""

import re


def test_scale_smoke(capsys):
    import scale

    result = scale.main(["--smoke"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("scale: ")
    printed = dict(re.findall(r"(\w+)=([-\d.e+]+)", line))
    assert set(printed) == {"params", "peak_train_gb", "naive_peak_gb", "ratio", "loss_diff", "grad_diff", "pad_frac"}
    assert result["loss_diff"] < 1e-5 and result["grad_diff"] < 1e-5  # the same loss and gradient
    assert result["peak_train_gb"] < result["naive_peak_gb"]  # never the full logits, even this small
    assert result["pad_frac"] == scale.pad_fraction(scale.row_lengths(scale.SMOKE)) > 0.3
