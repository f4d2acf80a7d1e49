"""The logistic-regression probe that the probing explainers fit on the model's features.

One fit for every linear probe of the project (``embedding.probe``, ``design.concept_bottleneck``):
a multinomial logistic regression with an L2 penalty (scikit-learn, lbfgs: deterministic for the
same data), kept as plain weights so that a caller can predict, or map the weights back to the raw
feature space and move features along them, without scikit-learn objects. Each caller standardises
its features and chooses the penalty and the iteration limit itself.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogisticProbe:
    """A fitted multinomial logistic regression: ``argmax(x @ weight + bias)`` over ``classes``."""

    classes: tuple[str, ...]
    weight: np.ndarray
    """``(features, classes)``; with two classes the first column is zero (scikit-learn fits one logit)."""
    bias: np.ndarray
    converged: bool
    """The solver reported success (no ``ConvergenceWarning``)."""
    iterations: int = 0
    """The solver's iterations (capped at the limit): a caller can count convergence by the limit instead."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        scores = np.asarray(x, dtype=np.float64) @ self.weight + self.bias
        return np.asarray(self.classes, dtype=object)[np.argmax(scores, axis=1)]


def train_logistic(x: np.ndarray, labels: Sequence[str], c: float, max_iter: int) -> LogisticProbe:
    """Multinomial logistic regression with an L2 penalty of inverse strength ``c`` and at most
    ``max_iter`` lbfgs iterations on ``x`` as given. One class in ``labels``: a constant predictor."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y = np.asarray([str(v) for v in labels], dtype=object)
    x = np.asarray(x, dtype=np.float64)
    classes = np.unique(y)
    if classes.size == 1:
        return LogisticProbe(tuple(classes), np.zeros((x.shape[1], 1)), np.zeros(1), True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fitted = LogisticRegression(C=c, max_iter=max_iter).fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    weight, bias = fitted.coef_.T, fitted.intercept_
    if classes.size == 2:  # scikit-learn keeps one logit for two classes: score 0 for the first
        weight, bias = np.concatenate([np.zeros_like(weight), weight], axis=1), np.concatenate([[0.0], bias])
    return LogisticProbe(tuple(str(v) for v in fitted.classes_), weight, bias, converged,
                         int(np.max(fitted.n_iter_)))
