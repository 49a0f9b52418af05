"""Writing a bench's PNG without letting a missing matplotlib cost the run's results.

matplotlib is the ``bench`` extra, not a RelaxRL dependency. A bench prints its summary line
first and plots last; without matplotlib the plot is skipped with the install command instead of
an ImportError after minutes of runs. Notices go to stderr, so the summary stays the last line
of stdout (what the smoke checks and the docs read).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

INSTALL_HINT = "pip install -e '.[bench]'"


def pyplot(bench: str) -> Any | None:
    """matplotlib.pyplot on the non-interactive Agg backend, or None (with the install hint on stderr)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{bench}: no plot written: matplotlib is not installed; to get the plot: {INSTALL_HINT}",
              file=sys.stderr, flush=True)
        return None
    return plt


def save_plot(bench: str, path: str, draw: Callable[[Any], Any], dpi: int = 110) -> bool:
    """Call ``draw(plt)`` (it returns the figure) and save the figure to ``path``; False when no plot."""
    plt = pyplot(bench)
    if plt is None:
        return False
    fig = draw(plt)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"{bench}: plot {path}", file=sys.stderr, flush=True)
    return True
