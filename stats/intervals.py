"""Proportions with honest uncertainty, for every room (the gate's rates, the corruption's goals, the evaluation)."""
from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); sound at 0 and n."""
    if n <= 0:
        raise ValueError("the interval needs n > 0")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # The interval holds p exactly (at 0 and n, rounding could leave it a hair outside).
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))
