"""Objectives: what the controller tries to do to its targets, as small composable pieces.

Pure computation on predicted means and SDs ``(n_candidates, n_targets)``. ``Drive`` and
``Suppress`` move one target; ``Weighted`` adds any of them with weights. Each returns the
objective's value per candidate and that value's predictive SD (targets taken as independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Drive:
    """Raise one target's response."""

    target: int = 0

    def evaluate(self, mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mean[:, self.target], sd[:, self.target]


@dataclass(frozen=True)
class Suppress:
    """Lower one target's response."""

    target: int = 0

    def evaluate(self, mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return -mean[:, self.target], sd[:, self.target]


@dataclass(frozen=True)
class Weighted:
    """A weighted sum of objectives."""

    terms: tuple[tuple[float, object], ...]

    def evaluate(self, mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        value = np.zeros(mean.shape[0])
        variance = np.zeros(mean.shape[0])
        for weight, objective in self.terms:
            term_value, term_sd = objective.evaluate(mean, sd)
            value += weight * term_value
            variance += (weight * term_sd) ** 2
        return value, np.sqrt(variance)


def objective_for(condition: str, target: int = 0):
    """Return the objective of a condition name (``drive`` or ``suppress``)."""
    objectives = {"drive": Drive(target), "suppress": Suppress(target)}
    if condition not in objectives:
        raise ValueError(f"No objective for condition {condition!r}; expected one of "
                         f"{sorted(objectives)}.")
    return objectives[condition]
