"""IsoFLOP fits (Hoffmann et al. approach 2, as SMDM uses it; docs/algorithms.md, 'Scaling-law fit').

Per compute budget C: a parabola of the final loss in log N; its vertex is (N*(C), L*(C)).
Across budgets: straight lines in log-log space, L*(C) = A C^(-a) and N*(C) = B C^(b).
Confidence intervals: bootstrap over runs (each budget's runs resampled with replacement, the
whole fit redone). The compute multiplier of model 1 against model 2 at loss L is the ratio of
the budgets at which their frontiers reach L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from unmask.errors import UnmaskError


@dataclass(frozen=True)
class Vertex:
    """The IsoFLOP minimum of one budget. ``interior``: the parabola opens upwards and its vertex
    lies within the sizes run (otherwise the best run is used and the vertex is not trusted)."""

    budget: float
    n_opt: float
    loss_opt: float
    interior: bool


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * C^exponent (fitted as a line in log-log space)."""

    coef: float
    exponent: float

    def __call__(self, c: float | np.ndarray) -> float | np.ndarray:
        return self.coef * np.asarray(c, dtype=float) ** self.exponent

    def inverse(self, y: float | np.ndarray) -> float | np.ndarray:
        """The C at which the law reaches y."""
        return (np.asarray(y, dtype=float) / self.coef) ** (1.0 / self.exponent)


def isoflop_vertex(budget: float, sizes: np.ndarray, losses: np.ndarray) -> Vertex:
    """The minimum of a parabola in log N through (sizes, losses) of one budget (>= 3 distinct sizes)."""
    sizes, losses = np.asarray(sizes, dtype=float), np.asarray(losses, dtype=float)
    if len(np.unique(sizes)) < 3:
        raise UnmaskError(f"budget {budget:.3g}: an IsoFLOP parabola needs at least 3 distinct model sizes, got {len(np.unique(sizes))}")
    x = np.log(sizes)
    a, b, c = np.polyfit(x, losses, 2)
    if a > 0:
        xv = -b / (2 * a)
        if x.min() <= xv <= x.max():
            return Vertex(budget, float(math.exp(xv)), float(c - b * b / (4 * a)), True)
    best = int(np.argmin(losses))
    return Vertex(budget, float(sizes[best]), float(losses[best]), False)


def power_law(c: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least squares of log y on log C: y = coef * C^exponent (>= 2 distinct budgets)."""
    c, y = np.asarray(c, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(c)) < 2:
        raise UnmaskError("a power law needs at least 2 distinct compute budgets")
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return PowerLaw(float(math.exp(intercept)), float(slope))


def frontier(budgets: np.ndarray, sizes: np.ndarray, losses: np.ndarray) -> tuple[list[Vertex], PowerLaw, PowerLaw]:
    """Vertices per budget and the fits L*(C) = A C^(-a), N*(C) = B C^b of runs (budget, size, loss)."""
    budgets, sizes, losses = (np.asarray(v, dtype=float) for v in (budgets, sizes, losses))
    vertices = [isoflop_vertex(c, sizes[budgets == c], losses[budgets == c]) for c in np.unique(budgets)]
    cs = np.array([v.budget for v in vertices])
    return vertices, power_law(cs, np.array([v.loss_opt for v in vertices])), power_law(cs, np.array([v.n_opt for v in vertices]))


def compute_multiplier(slow: PowerLaw, fast: PowerLaw, budget: float | np.ndarray) -> float | np.ndarray:
    """How many times the compute ``budget`` the ``slow`` loss frontier needs to reach the loss the
    ``fast`` frontier reaches at ``budget``: slow.inverse(fast(C)) / C."""
    return slow.inverse(fast(budget)) / np.asarray(budget, dtype=float)


def bootstrap(
    budgets: np.ndarray, sizes: np.ndarray, losses: np.ndarray, statistic, samples: int = 1000, seed: int = 0
) -> np.ndarray:
    """``statistic(budgets, sizes, losses)`` (a float or 1-d array) over ``samples`` resamples of the
    runs, each budget's runs drawn with replacement; resamples the statistic cannot be computed on
    (fewer than 3 distinct sizes in a budget) are dropped. Returns (kept, ...)."""
    budgets, sizes, losses = (np.asarray(v, dtype=float) for v in (budgets, sizes, losses))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(budgets == c) for c in np.unique(budgets)]
    values = []
    for _ in range(samples):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        try:
            values.append(np.asarray(statistic(budgets[idx], sizes[idx], losses[idx]), dtype=float))
        except (UnmaskError, np.linalg.LinAlgError, FloatingPointError, ValueError):
            continue
    return np.array(values)


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap values (nan if there are none)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return float(lo), float(hi)
