"""Plot validity and accuracy vs λ from ``bench/lambda_cliff.py``'s results.json, λ* marked.

    python bench/plot_lambda_cliff.py runs/lambda_cliff/results.json docs/img/lambda_cliff.png

``bench/lambda_cliff.py`` writes this plot itself (``--plot``); this script redraws it from a results
file. Needs matplotlib (the ``bench`` extra: ``pip install -e '.[bench]'``); without it, it says so.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.plotting import save_plot  # noqa: E402  (after the path insert)


def draw(r: dict) -> Callable:
    """The figure of one report (results.json, or the dict ``bench/lambda_cliff.py`` returns)."""
    def fig_of(plt):
        lams = sorted(float(k) for k in r["results"])
        valid = [r["results"][str(k)]["validity"] for k in lams]
        acc = [r["results"][str(k)]["accuracy"] for k in lams]
        base_valid = r["results"]["1.0"]["validity"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(lams, valid, "o-", label="parse validity")
        ax.plot(lams, acc, "s-", label="accuracy on parsed outputs")
        ax.axhline(0.9 * base_valid, color="grey", ls=":", lw=1, label="90% of λ=1 validity")
        pred = r["predicted"]
        if math.isfinite(pred):
            ax.axvline(pred, color="red", ls="--", label=f"predicted λ* = {pred:.2f}")
        lo, hi = r["observed"]
        if lo is not None and math.isfinite(lo):
            ax.axvspan(lo, hi, color="orange", alpha=0.2, label=f"observed cliff [{lo:g}, {hi:g}]")
        s = r["scheduler"]
        ax.plot([s["lambda_mean"]], [s["validity"]], "r*", ms=12, label=f"scheduler (mean λ={s['lambda_mean']:.2f})")
        ax.set_xlabel("λ")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"λ* cliff toy: p={r['prereg']['p']:.3f} b={r['prereg']['b']:.3f} c={r['prereg']['c']:g}")
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        return fig
    return fig_of


def main(results_path: str, png_path: str) -> bool:
    with open(results_path) as f:
        report = json.load(f)
    return save_plot("plot_lambda_cliff", png_path, draw(report), dpi=120)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python bench/plot_lambda_cliff.py RESULTS_JSON PNG")
    main(*sys.argv[1:3])
