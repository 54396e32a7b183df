"""Probability calibration: temperature scaling (Guo et al., ICML 2017), as pure functions.

Why: the network's sigmoid output is what "Certainty of Finding" (the SR) and the FHIR/HL7
probability report. A network trained with cross-entropy and class weighting is typically
over- or under-confident, so "0.9" would not mean "nine in ten such images show pneumonia".
Temperature scaling divides the logit by one scalar T fitted by minimising the negative
log-likelihood on held-out images: ``p_cal = sigmoid(logit(p) / T)``. It is monotone, so the
ranking (AUC) and every decision are unchanged when the threshold is mapped the same way; it only
changes what the numbers mean.

The runtime (:mod:`inference.engine`) decides on the *raw* probability against the raw threshold
and reports the calibrated one next to the calibrated threshold, so a float rounding at the
boundary can never flip a decision. Fitting and the calibration metrics (ECE, Brier, NLL) live
here too so the training scripts and the tests use the same definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Probabilities are clipped to [EPS, 1 - EPS] before the logit: a float32 sigmoid saturates at
#: exactly 1.0 for logits above ~17, and logit(1.0) is infinite.
EPS = 1e-7

FloatLike = npt.ArrayLike


@dataclass(frozen=True, slots=True)
class Calibration:
    """``model.json`` → ``calibration``: method ``temperature`` (the only one implemented).

    ``temperature`` 1.0 is the identity. ``fitted_on`` says on which images it was fitted (the
    model card must say whether that set also chose the threshold, which makes it optimistic).
    """

    method: str = "temperature"
    temperature: float = 1.0
    fitted_on: str = ""

    def __post_init__(self) -> None:
        if self.method != "temperature":
            raise ValueError(f'calibration method must be "temperature", got {self.method!r}')
        if not (math.isfinite(self.temperature) and 0.05 <= self.temperature <= 20.0):
            raise ValueError(f"calibration temperature must lie in [0.05, 20], got {self.temperature!r}")

    def apply(self, probability: float) -> float:
        """The calibrated probability of one raw probability."""
        return apply_temperature(probability, self.temperature)


def logit(p: FloatLike) -> npt.NDArray[np.float64]:
    """log(p / (1 - p)) of probabilities clipped to [EPS, 1 - EPS], in float64."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


def sigmoid(z: FloatLike) -> npt.NDArray[np.float64]:
    """1 / (1 + exp(-z)), overflow-free for large |z|."""
    x = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.asarray(np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), dtype=np.float64)


def apply_temperature(probability: float, temperature: float) -> float:
    """``sigmoid(logit(p) / T)`` of one probability; T = 1 returns *probability* unchanged."""
    if temperature == 1.0:
        return float(probability)
    return float(sigmoid(logit(probability) / temperature))


def nll(labels: FloatLike, probabilities: FloatLike) -> float:
    """Mean binary negative log-likelihood (nats) of *probabilities* for 0/1 *labels*."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1.0 - EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def brier(labels: FloatLike, probabilities: FloatLike) -> float:
    """Brier score: mean squared difference between probability and 0/1 outcome (lower is better)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    return float(np.mean((p - y) ** 2))


def expected_calibration_error(labels: FloatLike, probabilities: FloatLike, bins: int = 10) -> float:
    """ECE with *bins* equal-width bins of the positive-class probability (Naeini et al. 2015).

    ``sum_b (n_b / n) * |mean(y in b) - mean(p in b)|``; bin b holds ``(b-1)/bins < p <= b/bins``
    (the first bin also holds 0). Empty bins contribute nothing.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.size == 0:
        raise ValueError("expected_calibration_error: no samples")
    index = np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            total += count / y.size * abs(float(y[members].mean()) - float(p[members].mean()))
    return total


def fit_temperature(labels: FloatLike, probabilities: FloatLike) -> float:
    """The T > 0 minimising the NLL of ``sigmoid(logit(p) / T)``.

    The NLL is convex in 1/T (a logistic regression without intercept on the logit), so a
    golden-section search on log T over [0.05, 20] after a coarse grid finds the optimum.
    """
    y = np.asarray(labels, dtype=np.float64)
    z = logit(probabilities)
    if y.size == 0 or y.min() == y.max():
        raise ValueError("fit_temperature: needs both classes")

    def loss(log_t: float) -> float:
        return nll(y, sigmoid(z / math.exp(log_t)))

    grid = np.linspace(math.log(0.05), math.log(20.0), 61)
    best = int(np.argmin([loss(float(g)) for g in grid]))
    lo, hi = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, grid.size - 1)])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(60):
        if loss(c) < loss(d):
            b = d
        else:
            a = c
        c, d = b - ratio * (b - a), a + ratio * (b - a)
    return math.exp((a + b) / 2.0)
