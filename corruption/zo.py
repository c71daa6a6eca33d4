"""Zeroth-order minimisation: finite-difference gradient estimates of a black-box objective.

The unlearning score is measured through the served model and is not differentiable, so
the gradient is estimated from objective values alone. Strengths are positive and span orders
of magnitude, so both searches run on log(strength): a step is multiplicative.

- `ZerothOrderOptimizer`: drive one score to a goal. A central difference for a scalar
  parameter, and for a vector the average of central differences along random Gaussian
  directions; a perturbation of mu is large enough to see across the plateaus of a step-like score.
- `SPSASearch`: find the smallest strengths (a few of them: entity tokens, other tokens) that meet a
  two-sided goal (forget enough, stay fluent). Simultaneous-perturbation estimates (every
  coordinate moved at once by a random sign, two evaluations per step whatever the dimension) with a
  decaying step; it stops as soon as a point meets the goal, then bisects one overall scale down to
  the smallest corruption that still meets it. The caller's noise is keyed by the prompt, so the +
  and - evaluations of a step see the same noise draws (common random numbers) and their difference
  is the strength's effect, not the noise's.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ZOStep:
    step: int
    strength: list[float]
    objective: float
    gradient: list[float]  # w.r.t. log(strength)
    evaluations: int  # objective calls so far


@dataclass
class ZOResult:
    strength: list[float]  # the best point seen
    objective: float
    trace: list[ZOStep] = field(default_factory=list)
    stopped: str = ""  # why the search ended


class ZerothOrderOptimizer:
    """Minimise `objective(strength)` over strength > 0 within an evaluation budget.

    lr: step size on log(strength). mu: finite-difference perturbation on log(strength).
    n_directions: random directions per step for a vector parameter. target: stop as soon
    as the objective is at or below it. patience: stop after this many steps without a
    new best. max_strength: upper bound (noise beyond it only wrecks fluency).
    """

    def __init__(self, lr: float = 0.5, mu: float = 0.3, max_steps: int = 20, n_directions: int = 4,
                 target: float = 0.0, patience: int = 5, max_strength: float = 1e4, random_state: int = 0):
        if lr <= 0 or mu <= 0 or max_steps < 1 or n_directions < 1 or patience < 1:
            raise ValueError("lr, mu, max_steps, n_directions and patience must be positive")
        self.lr = lr
        self.mu = mu
        self.max_steps = max_steps
        self.n_directions = n_directions
        self.target = target
        self.patience = patience
        self.max_strength = max_strength
        self.random_state = random_state

    def minimize(self, objective: Callable[[np.ndarray], float], x0: float | list[float],
                 on_step: Callable[[ZOStep], None] | None = None) -> ZOResult:
        x0 = np.atleast_1d(np.asarray(x0, dtype=np.float64))
        if np.any(x0 <= 0):
            raise ValueError("the initial strength must be positive")
        rng = np.random.default_rng(self.random_state)
        upper = math.log(self.max_strength)
        theta = np.log(x0)
        calls = 0

        def f(t: np.ndarray) -> float:
            nonlocal calls
            calls += 1
            return float(objective(np.exp(np.minimum(t, upper))))

        value = f(theta)
        result = ZOResult(np.exp(theta).tolist(), value)
        since_best = 0
        for step in range(1, self.max_steps + 1):
            if value <= self.target:
                break
            gradient, reach = self._gradient(f, theta, rng)
            # off a plateau the estimate is small only because the probe had to reach far:
            # step the probe's distance downhill instead of creeping
            step_size = reach * np.sign(gradient) if reach > self.mu else self.lr * gradient
            theta = np.minimum(theta - step_size, upper)
            value = f(theta)
            record = ZOStep(step, np.exp(theta).tolist(), value, gradient.tolist(), calls)
            result.trace.append(record)
            if on_step is not None:
                on_step(record)
            if value < result.objective:
                result.strength, result.objective, since_best = record.strength, value, 0
            elif (since_best := since_best + 1) >= self.patience:
                result.stopped = f"no improvement in {self.patience} steps"
                return result
        result.stopped = "target reached" if result.objective <= self.target else "step budget spent"
        return result

    def _gradient(self, f: Callable[[np.ndarray], float], theta: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """The estimate, and how far the finite difference had to reach for it."""
        if theta.size == 1:
            mu = self.mu
            while True:  # on a plateau of a step-like score, look further out before giving up
                difference = f(theta + mu) - f(theta - mu)
                if difference != 0 or mu >= 8 * self.mu:
                    return np.array([difference / (2 * mu)]), mu
                mu *= 2
        estimate = np.zeros_like(theta)
        for _ in range(self.n_directions):
            u = rng.standard_normal(theta.size)
            estimate += (f(theta + self.mu * u) - f(theta - self.mu * u)) / (2 * self.mu) * u
        return estimate / self.n_directions, self.mu


@dataclass(frozen=True)
class Reading:
    """The two-sided goal at one point: how far each side misses it (0: that side is met)."""

    forget_excess: float  # the answer rate above what a model that never learned would give
    fluency_excess: float  # the degenerate-output rate above what the uncorrupted model gives, past its bound
    # the answer rate below what a model that never learned would give: guessable answers lost to the noise
    overforget_excess: float = 0.0

    @property
    def objective(self) -> float:
        return self.forget_excess + self.fluency_excess + self.overforget_excess

    @property
    def keep_excess(self) -> float:
        """How far the side that too much corruption breaks misses: fluency, and guessable answers kept."""
        return self.fluency_excess + self.overforget_excess

    @property
    def meets(self) -> bool:
        return self.objective == 0


@dataclass(frozen=True)
class SearchEvaluation:
    index: int  # 1, 2, ...: the order of evaluation
    phase: str  # "start", "spsa+", "spsa-", "step" or "bisection"
    step: int  # the SPSA step, or the bisection round
    strengths: list[float]
    reading: Reading


@dataclass
class SearchResult:
    strengths: list[float]  # the smallest point found that meets the goal, else the best seen
    reading: Reading
    met: bool
    stopped: str
    evaluations: list[SearchEvaluation] = field(default_factory=list)


class SPSASearch:
    """The smallest strengths meeting a goal `evaluate(strengths) -> Reading`, within a budget.

    lr, mu: the step and perturbation sizes on log(strength) at step k=1 (Spall's a and c), decaying as
    lr/k^0.602 and mu/k^0.101 (his standard exponents). The step goes lr/k^0.602 along the estimated
    downhill direction whatever the estimate's length: the objective is a difference of answer rates
    whose slope on log(strength) is small and varies, so a step proportional to it crawls (a first
    trial on the demo moved sigma 0.20 -> 0.31 in two steps while the named probes stayed at 0.45
    against a bound of 0.11), and the bisection undoes an overshoot. max_steps: SPSA steps (3
    evaluations each) before giving up. bisections: rounds of halving the overall scale once a point meets the goal. noise_floor:
    the smallest difference between the + and - objectives read as a slope; below it the two points
    are on a plateau (a rate that moves by a probe or two is noise), and the side that misses the goal
    says which way every strength goes. seed: the perturbation signs, so a run repeats exactly.
    """

    ALPHA, GAMMA = 0.602, 0.101

    def __init__(self, lr: float = 0.5, mu: float = 0.3, max_steps: int = 8, bisections: int = 4,
                 noise_floor: float = 0.02, max_strength: float = 1e4, seed: int = 0):
        if lr <= 0 or mu <= 0 or max_steps < 0 or bisections < 0 or noise_floor < 0:
            raise ValueError("lr and mu must be positive; max_steps, bisections and noise_floor not negative")
        self.lr = lr
        self.mu = mu
        self.max_steps = max_steps
        self.bisections = bisections
        self.noise_floor = noise_floor
        self.max_strength = max_strength
        self.seed = seed

    def settings(self) -> dict[str, float]:
        return {"lr": self.lr, "mu": self.mu, "max_steps": self.max_steps, "bisections": self.bisections,
                "noise_floor": self.noise_floor, "max_strength": self.max_strength, "seed": self.seed}

    def search(self, evaluate: Callable[[np.ndarray], Reading], x0: list[float],
               on_evaluation: Callable[[SearchEvaluation], None] | None = None) -> SearchResult:
        x0_array = np.asarray(x0, dtype=np.float64)
        if x0_array.ndim != 1 or np.any(x0_array <= 0):
            raise ValueError("the initial strengths must be a vector of positive numbers")
        rng = np.random.default_rng(self.seed)
        upper = math.log(self.max_strength)
        evaluations: list[SearchEvaluation] = []

        def measure(point: np.ndarray, phase: str, step: int) -> Reading:
            reading = evaluate(point)
            record = SearchEvaluation(len(evaluations) + 1, phase, step, point.tolist(), reading)
            evaluations.append(record)
            if on_evaluation is not None:
                on_evaluation(record)
            return reading

        theta = np.log(x0_array)
        current = measure(np.exp(theta), "start", 0)
        best, best_reading = np.exp(theta), current
        met = np.exp(theta) if current.meets else None
        step = 0
        while met is None and step < self.max_steps:
            step += 1
            a_k, c_k = self.lr / step ** self.ALPHA, self.mu / step ** self.GAMMA
            signs = rng.choice([-1.0, 1.0], size=theta.size)  # Rademacher: every coordinate moves at once
            plus_point, minus_point = (np.exp(np.minimum(theta + d * c_k * signs, upper)) for d in (1, -1))
            plus, minus = measure(plus_point, "spsa+", step), measure(minus_point, "spsa-", step)
            meeting = [(p, r) for p, r in ((minus_point, minus), (plus_point, plus)) if r.meets]
            if meeting:
                met = min((p for p, _ in meeting), key=lambda p: float(np.sum(np.log(p))))
                break
            difference = plus.objective - minus.objective
            if abs(difference) > self.noise_floor:
                uphill = difference * signs  # SPSA's gradient estimate, up to its length (1/sign == sign)
            else:  # a plateau: the side that misses says which way the whole corruption should go
                uphill = -np.sign(current.forget_excess - current.keep_excess) * np.ones_like(theta)
            norm = float(np.linalg.norm(uphill))
            if norm > 0:
                theta = np.minimum(theta - a_k * uphill / norm, upper)
            current = measure(np.exp(theta), "step", step)
            for point, reading in ((plus_point, plus), (minus_point, minus), (np.exp(theta), current)):
                if reading.objective < best_reading.objective:
                    best, best_reading = point, reading
            if current.meets:
                met = np.exp(theta)
        if met is None:
            return SearchResult(best.tolist(), best_reading, False,
                                f"goal not met in {self.max_steps} steps", evaluations)
        return self._bisect(met, measure, evaluations, stopped_after=step)

    def _bisect(self, met: np.ndarray, measure: Callable[[np.ndarray, str, int], Reading],
                evaluations: list[SearchEvaluation], stopped_after: int) -> SearchResult:
        """The smallest overall scale of `met` (which meets the goal) that still meets it: scale 0 is
        the uncorrupted model, taken as missing the goal."""
        low, high = 0.0, 1.0
        high_reading = next(e.reading for e in reversed(evaluations) if np.allclose(e.strengths, met))
        for round_ in range(1, self.bisections + 1):
            middle = (low + high) / 2
            reading = measure(met * middle, "bisection", round_)
            if reading.meets:
                high, high_reading = middle, reading
            else:
                low = middle
        return SearchResult((met * high).tolist(), high_reading, True,
                            f"goal met after {stopped_after} steps; scale {high:.4g} after "
                            f"{self.bisections} bisections", evaluations)
