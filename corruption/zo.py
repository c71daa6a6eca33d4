"""Zeroth-order minimisation: finite-difference gradient estimates of a black-box objective.

The unlearning score is measured through the served model and is not differentiable, so
the gradient is estimated from objective values alone: a central difference for a scalar
parameter, and for a vector the average of central differences along random Gaussian
directions (a two-point random-direction estimate). Strengths are positive and span orders
of magnitude, so the search runs on log(strength): a step is multiplicative, and a
perturbation of mu is large enough to see across the plateaus of a step-like score.
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
