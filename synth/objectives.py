"""Objectives: what the controller tries to do to its targets, as small composable pieces.

Pure computation. ``evaluate(mean, sd)`` scores predicted means and SDs ``(n_candidates, n_targets)``
for sentence selection and returns each candidate's value and that value's predictive SD (targets
taken as independent). ``score(responses)`` scores responses ``(n_images, n_targets)`` given as a
numpy array or a torch tensor, so image synthesis can follow the gradient of the same objects. A
target here is a recording site (or ROI). ``Drive``, ``Suppress``, ``Stretch`` and
``OneHotPopulation`` act on one target; ``Weighted`` adds any of them with weights, and so do ``+``,
``-`` and multiplication by a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Keeps the square root in OneHotPopulation differentiable when every other site is at baseline.
_SQUARE_EPSILON = 1e-12


class _Composable:
    """Adds ``a + b``, ``a - b``, ``weight * a`` and ``-a``, each returning a ``Weighted``."""

    def __add__(self, other):
        if not hasattr(other, "score"):
            return NotImplemented
        return Weighted(_weighted_terms(self) + _weighted_terms(other))

    def __sub__(self, other):
        if not hasattr(other, "score"):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, weight):
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            return NotImplemented
        return Weighted(tuple((float(weight) * w, term) for w, term in _weighted_terms(self)))

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0


def _weighted_terms(objective) -> tuple[tuple[float, object], ...]:
    if isinstance(objective, Weighted):
        return objective.terms
    return ((1.0, objective),)


def _constant_like(values, responses):
    """Return ``values`` as an array of the same kind, dtype and device as ``responses``."""
    if isinstance(responses, np.ndarray):
        return np.asarray(values, dtype=np.float64)
    import torch

    return torch.as_tensor(values, dtype=responses.dtype, device=responses.device)


def _check_target(target: int, n_targets: int) -> None:
    if not 0 <= target < n_targets:
        raise ValueError(f"Objective target {target} is out of range for responses of "
                         f"{n_targets} targets; use a target index from 0 to {n_targets - 1}.")


@dataclass(frozen=True)
class Drive(_Composable):
    """Raise one target's response."""

    target: int = 0

    def evaluate(self, mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mean[:, self.target], sd[:, self.target]

    def score(self, responses):
        """Return the target's response, ``(n_images,)``."""
        _check_target(self.target, responses.shape[1])
        return responses[:, self.target]


@dataclass(frozen=True)
class Suppress(_Composable):
    """Lower one target's response."""

    target: int = 0

    def evaluate(self, mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return -mean[:, self.target], sd[:, self.target]

    def score(self, responses):
        """Return the negated target response, ``(n_images,)``."""
        _check_target(self.target, responses.shape[1])
        return -responses[:, self.target]


@dataclass(frozen=True)
class Stretch(_Composable):
    """Raise one target's response beyond the best natural image's response.

    The value is the margin ``response - natural_best``, so it is positive exactly when a stimulus
    beats every natural image. Its gradient equals that of ``Drive``, and the margin makes values
    comparable across targets.
    """

    target: int
    natural_best: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.natural_best):
            raise ValueError(f"Stretch needs a finite natural_best, got {self.natural_best!r}.")

    def evaluate(self, mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mean[:, self.target] - self.natural_best, sd[:, self.target]

    def score(self, responses):
        """Return the margin of the target's response over ``natural_best``, ``(n_images,)``."""
        _check_target(self.target, responses.shape[1])
        return responses[:, self.target] - self.natural_best


@dataclass(frozen=True)
class OneHotPopulation(_Composable):
    """Raise one target while every other target stays at its baseline.

    The value is ``r_t - held_weight * sqrt(mean_j (r_j - baseline_j)²)`` over the other targets
    ``j``: the target's response minus the RMS deviation of the rest from their baselines (their
    mean response to natural images, say). This follows the one-hot population state of Bashivan,
    Kar & DiCarlo (2019), one site active and the others clamped at baseline. Unlike the target's
    share of the summed response, it stays meaningful when responses are negative or standardised.
    """

    target: int
    baseline: tuple[float, ...]
    held_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "baseline", tuple(float(b) for b in self.baseline))
        if not all(math.isfinite(b) for b in self.baseline):
            raise ValueError(f"OneHotPopulation needs a finite baseline for every target, got "
                             f"{self.baseline}.")
        _check_target(self.target, len(self.baseline))
        if not (math.isfinite(self.held_weight) and self.held_weight >= 0):
            raise ValueError(f"held_weight must be finite and >= 0, got {self.held_weight!r}.")

    @property
    def _others(self) -> list[int]:
        return [j for j in range(len(self.baseline)) if j != self.target]

    def _check_width(self, n_targets: int) -> None:
        if n_targets != len(self.baseline):
            raise ValueError(f"OneHotPopulation has a baseline for {len(self.baseline)} targets, "
                             f"but the responses have {n_targets}; give one baseline per target.")

    def score(self, responses):
        """Return the target's response minus the others' RMS deviation from baseline, ``(n_images,)``."""
        self._check_width(responses.shape[1])
        others = self._others
        if not others:
            return responses[:, self.target]
        baseline = _constant_like([self.baseline[j] for j in others], responses)
        spread = (((responses[:, others] - baseline) ** 2).mean(axis=1) + _SQUARE_EPSILON) ** 0.5
        return responses[:, self.target] - self.held_weight * spread

    def evaluate(self, mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the value of the means and its SD to first order (delta method)."""
        self._check_width(mean.shape[1])
        value = self.score(mean)
        variance = sd[:, self.target] ** 2
        others = self._others
        if others:
            deviation = mean[:, others] - np.asarray([self.baseline[j] for j in others])
            spread = np.sqrt((deviation**2).mean(axis=1) + _SQUARE_EPSILON)
            # d spread / d r_j = (r_j - baseline_j) / (n_others * spread)
            slopes = deviation / (len(others) * spread[:, None])
            variance = variance + self.held_weight**2 * ((slopes * sd[:, others]) ** 2).sum(axis=1)
        return value, np.sqrt(variance)


@dataclass(frozen=True)
class Weighted(_Composable):
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

    def score(self, responses):
        """Return the weighted sum of the terms' scores, ``(n_images,)``."""
        if not self.terms:
            raise ValueError("Weighted has no terms; give at least one (weight, objective) pair.")
        total = None
        for weight, objective in self.terms:
            term = weight * objective.score(responses)
            total = term if total is None else total + term
        return total


def objective_for(condition: str, target: int = 0):
    """Return the objective of a condition name (``drive`` or ``suppress``)."""
    objectives = {"drive": Drive(target), "suppress": Suppress(target)}
    if condition not in objectives:
        raise ValueError(f"No objective for condition {condition!r}; expected one of "
                         f"{sorted(objectives)}.")
    return objectives[condition]


OBJECTIVE_NAMES = ("drive", "suppress", "stretch", "one_hot_population")
_TERM_KEYS = {
    "drive": {"name", "site", "weight"},
    "suppress": {"name", "site", "weight"},
    "stretch": {"name", "site", "weight", "natural_best"},
    "one_hot_population": {"name", "site", "weight", "baseline", "held_weight"},
}


def objective_from_spec(
    spec: Mapping | Sequence[Mapping],
    n_sites: int | None = None,
    natural_responses: np.ndarray | None = None,
):
    """Build an objective from config-style terms.

    ``spec`` is one term or a list of terms, each a mapping with ``name`` (one of
    ``OBJECTIVE_NAMES``), ``site`` (a target index) and an optional ``weight`` (default 1). A list
    becomes their weighted sum. ``stretch`` takes ``natural_best`` and ``one_hot_population`` takes
    ``baseline`` (one value per site) and ``held_weight``. When those are missing they come from
    ``natural_responses``, the responses to natural images ``(n_natural, n_sites)``: the site's
    maximum and every site's mean. A single term of weight 1 returns the bare objective.
    """
    if isinstance(spec, Mapping):
        terms, single = [spec], True
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        terms, single = list(spec), False
    else:
        raise ValueError(f"An objective spec must be a mapping or a list of mappings, "
                         f"got {type(spec).__name__}.")
    if not terms:
        raise ValueError("The objective spec has no terms; give at least one {name, site} term.")

    if natural_responses is not None:
        natural_responses = np.asarray(natural_responses, dtype=np.float64)
        if natural_responses.ndim != 2 or len(natural_responses) == 0:
            raise ValueError(f"natural_responses must be (n_natural, n_sites) with n_natural >= 1, "
                             f"got shape {natural_responses.shape}.")
        if n_sites is None:
            n_sites = natural_responses.shape[1]
        elif natural_responses.shape[1] != n_sites:
            raise ValueError(f"natural_responses has {natural_responses.shape[1]} sites but "
                             f"n_sites is {n_sites}.")

    weighted = [_build_term(index, term, n_sites, natural_responses)
                for index, term in enumerate(terms)]
    if single and weighted[0][0] == 1.0:
        return weighted[0][1]
    return Weighted(tuple(weighted))


def _build_term(index: int, term, n_sites: int | None, natural_responses: np.ndarray | None):
    where = f"objective term {index}"
    if not isinstance(term, Mapping):
        raise ValueError(f"{where} must be a mapping with name and site, got {term!r}.")
    name = term.get("name")
    if name not in _TERM_KEYS:
        raise ValueError(f"{where} has name {name!r}; expected one of {list(OBJECTIVE_NAMES)}.")
    unknown = sorted(set(term) - _TERM_KEYS[name])
    if unknown:
        raise ValueError(f"{where} ({name}) has unknown keys {unknown}; allowed keys are "
                         f"{sorted(_TERM_KEYS[name])}.")

    site = term.get("site")
    if isinstance(site, bool) or not isinstance(site, int | np.integer) or site < 0:
        raise ValueError(f"{where} ({name}) needs site, a target index >= 0, got {site!r}.")
    if n_sites is not None and site >= n_sites:
        raise ValueError(f"{where} ({name}) has site {site}, but there are only {n_sites} sites "
                         f"(0 to {n_sites - 1}).")
    weight = term.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ValueError(f"{where} ({name}) has weight {weight!r}; use a finite number.")

    if name == "drive":
        return float(weight), Drive(int(site))
    if name == "suppress":
        return float(weight), Suppress(int(site))
    if name == "stretch":
        natural_best = term.get("natural_best")
        if natural_best is None:
            if natural_responses is None:
                raise ValueError(f"{where} (stretch) needs natural_best, or pass natural_responses "
                                 "so it can be taken as the best natural image's response.")
            natural_best = float(natural_responses[:, site].max())
        return float(weight), Stretch(int(site), float(natural_best))

    baseline = term.get("baseline")
    if baseline is None:
        if natural_responses is None:
            raise ValueError(f"{where} (one_hot_population) needs baseline, one value per site, or "
                             "pass natural_responses so it can be their mean response.")
        baseline = natural_responses.mean(axis=0)
    baseline = tuple(float(b) for b in np.atleast_1d(np.asarray(baseline, dtype=np.float64)))
    if n_sites is not None and len(baseline) != n_sites:
        raise ValueError(f"{where} (one_hot_population) has {len(baseline)} baseline values for "
                         f"{n_sites} sites; give one per site.")
    held_weight = float(term.get("held_weight", 1.0))
    return float(weight), OneHotPopulation(int(site), baseline, held_weight)
