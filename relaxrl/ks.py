"""The two-sample Kolmogorov–Smirnov test, pure Python (no SciPy dependency): do two samples of
numbers (e.g. response lengths generated and trained on) come from one distribution?"""

from __future__ import annotations

import bisect
import math
from typing import Sequence


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """``D = sup_x |F_a(x) - F_b(x)|`` of the two empirical distribution functions (ties counted
    on both sides at once, as SciPy's ``ks_2samp``)."""
    if not a or not b:
        raise ValueError(f"the KS test needs two non-empty samples, got {len(a)} and {len(b)} values")
    xa, xb = sorted(a), sorted(b)
    return max(abs(bisect.bisect_right(xa, x) / len(xa) - bisect.bisect_right(xb, x) / len(xb))
               for x in set(xa) | set(xb))


def kolmogorov_q(lam: float) -> float:
    """``Q(lam) = P(K > lam) = 2 * sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lam^2)``, the Kolmogorov
    distribution's tail (1 for small ``lam``, where the series has not converged)."""
    if lam < 0.18:  # Q(0.18) = 1 - 1e-13
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * lam * lam)
        total += sign * term
        if term < 1e-12 * total:
            return max(0.0, min(1.0, 2.0 * total))
        sign = -sign
    return 1.0


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(D, p)``: the statistic and its asymptotic p-value with Stephens' small-sample correction,
    ``p = Q((sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D)``, ``ne = n_a n_b / (n_a + n_b)`` (Numerical
    Recipes' ``kstwo``). Accurate for samples of a few dozen on; the responses of a run are far more."""
    d = ks_statistic(a, b)
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return d, kolmogorov_q((en + 0.12 + 0.11 / en) * d)
