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


def _panel(ax, r: dict, title: str) -> None:
    """Validity and accuracy vs λ of one clip strength, λ* dashed, the observed cliff shaded."""
    lams = sorted(float(k) for k in r["results"])
    by = {float(k): v for k, v in r["results"].items()}
    ax.plot(lams, [by[k]["validity"] for k in lams], "o-", label="parse validity")
    ax.plot(lams, [by[k]["accuracy"] for k in lams], "s-", label="accuracy on parsed outputs")
    ax.axhline(0.9 * by[1.0]["validity"], color="grey", ls=":", lw=1, label="90% of λ=1 validity")
    pred = r["predicted"]
    if math.isfinite(pred):
        ax.axvline(pred, color="red", ls="--", label=f"predicted λ* = {pred:.3f}")
    lo, hi = r["observed"]
    if lo is not None and math.isfinite(lo):
        ax.axvspan(lo, hi, color="orange", alpha=0.2, label=f"observed cliff [{lo:g}, {hi:g}]")
    s = r["scheduler"]
    ax.plot([s["lambda_mean"]], [s["validity"]], "r*", ms=12, label=f"scheduler (mean λ={s['lambda_mean']:.2f})")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 1, 2, 3, 4, 8) if 0.9 * min(lams) <= t <= 1.1 * max(lams)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("λ (log scale)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")


def draw(r: dict) -> Callable:
    """The figure of one report (results.json, or the dict ``bench/lambda_cliff.py`` returns): one
    panel per clip strength (the main test, then the cross-prediction when the report has one)."""
    def fig_of(plt):
        panels = [r] + ([r["cross"]] if r.get("cross") else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
        pre = r["prereg"]
        ref = f", clip against {r['clip_reference']}" if "clip_reference" in r else ""
        for ax, panel in zip(axes[0], panels):
            c = panel.get("c", pre["c"])
            _panel(ax, panel, f"λ* cliff toy: p={pre['p']:.3f} b={pre['b']:.4f} c={c:g}{ref}")
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
