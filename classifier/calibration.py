"""Thresholds whose false-positive rate holds with high probability, not just on average.

A split-conformal threshold bounds the FPR in expectation over calibration sets; one unlucky
calibration set can still serve a gate that flags far more than alpha. A training-conditional
("PAC") threshold instead bounds the chance of that: P(true FPR > alpha) <= delta. Taking the
maximum of per-group thresholds (Mondrian) makes every group of retain prompts meet alpha,
not only their mixture.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import binom

from stats.intervals import wilson_interval


def _check(alpha: float, delta: float) -> None:
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError(f"alpha and delta must be in (0, 1), got alpha={alpha}, delta={delta}")


def minimum_n(alpha: float, delta: float) -> int:
    """The fewest calibration scores that allow any threshold: even with none above it, (1-alpha)^n <= delta."""
    _check(alpha, delta)
    return math.ceil(math.log(delta) / math.log1p(-alpha))


def allowed_above(n: int, alpha: float, delta: float) -> int:
    """The most calibration scores that may lie above the threshold, k, with BinomCDF(k; n, alpha) <= delta;
    -1 when even k = 0 is too many (n too small)."""
    _check(alpha, delta)
    if n <= 0:
        return -1
    feasible = np.flatnonzero(binom.cdf(np.arange(n), n, alpha) <= delta)
    return int(feasible[-1]) if feasible.size else -1


def pac_threshold(scores: Sequence[float] | np.ndarray, alpha: float, delta: float, name: str | None = None) -> float:
    """The smallest order statistic t of held-out negative scores such that flagging `score > t`
    has P(true FPR > alpha) <= delta; 1.0 (nothing flagged) with a warning when n is too small.

    If t is the (n-k)-th smallest of n scores, the true FPR exceeds alpha only when at most k of
    the n scores lie at or above the (1-alpha)-quantile, which has probability BinomCDF(k; n, alpha).
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    k = allowed_above(n, alpha, delta)
    if k < 0:
        warnings.warn(f"{name + ': ' if name else ''}{n} calibration scores are too few for alpha={alpha}, "
                      f"delta={delta}: the threshold is 1.0 (nothing is flagged); at least "
                      f"{minimum_n(alpha, delta)} are needed", stacklevel=2)
        return 1.0
    return float(ordered[n - k - 1])


def mondrian_threshold(scores_by_group: Mapping[str, Sequence[float] | np.ndarray], alpha: float,
                       delta: float) -> tuple[float, dict[str, dict[str, Any]]]:
    """Per-group PAC thresholds and the served one, their maximum, so that every group meets alpha.

    Each group's guarantee holds with probability 1 - delta; all of them at once hold with at least
    1 - (number of groups) * delta (choose delta accordingly for a joint statement).
    """
    if not scores_by_group:
        raise ValueError("mondrian_threshold needs at least one group of scores")
    report: dict[str, dict[str, Any]] = {}
    for group, scores in scores_by_group.items():
        n = len(scores)
        report[group] = {"n": n, "threshold": pac_threshold(scores, alpha, delta, name=f"group {group!r}"),
                         "allowed_above": allowed_above(n, alpha, delta), "n_needed": minimum_n(alpha, delta)}
    return max(entry["threshold"] for entry in report.values()), report


def rate_with_interval(hits: int, n: int) -> dict[str, Any]:
    """A rate with its Wilson 95% interval; None for both when there is nothing to count."""
    if n <= 0:
        return {"hits": hits, "n": n, "rate": None, "ci": None}
    return {"hits": hits, "n": n, "rate": hits / n, "ci": list(wilson_interval(hits, n))}
