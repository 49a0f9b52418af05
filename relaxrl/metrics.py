"""Pure helpers for run metrics: busy-interval overlap and reward summaries."""

from __future__ import annotations

from typing import Iterable, Sequence

Interval = tuple[float, float]


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Union of intervals as sorted, disjoint intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def clip_intervals(intervals: Iterable[Interval], lo: float, hi: float) -> list[Interval]:
    """``intervals`` cut to the window ``[lo, hi]`` (parts outside dropped): busy fractions of a run
    count only what lies inside its wall time, so they cannot exceed 1."""
    return [(max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo)]


def total_length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in merge_intervals(intervals))


def overlap_length(xs: Iterable[Interval], ys: Iterable[Interval]) -> float:
    """Length of time covered by both the union of ``xs`` and the union of ``ys``."""
    a, b = merge_intervals(xs), merge_intervals(ys)
    i = j = 0
    both = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        both += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return both


def first_last_mean(values: Sequence[float], fraction: float = 0.1) -> tuple[float, float]:
    """Means of the first and last ``fraction`` of ``values`` (at least one value each)."""
    if not values:
        return float("nan"), float("nan")
    k = max(1, int(round(len(values) * fraction)))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def info_means(infos: Sequence[dict]) -> dict[str, float]:
    """``info/<key>``: the mean of each numeric per-sample reward-info value (e.g. parse validity)."""
    sums: dict[str, float] = {}
    for info in infos:
        for k, v in info.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + float(v)
    return {f"info/{k}": v / len(infos) for k, v in sums.items()} if infos else {}
