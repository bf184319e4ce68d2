"""Stimulus selection: which available candidates to show next.

Pure computation on pool predictions, a mask of candidates not yet shown, and a seeded numpy
Generator passed in. Selection over a 10,000-sentence pool takes well under a millisecond; the
figures are in ``benchmarks/pool_scoring.py``.
"""

from __future__ import annotations

import numpy as np


def select_top(value: np.ndarray, sd: np.ndarray, available: np.ndarray, exploration: float,
               n: int) -> np.ndarray:
    """Return the ``n`` available candidates with the highest ``value + exploration * sd``.

    ``exploration`` is the weight of the predictive SD (an upper confidence bound); 0 exploits the
    prediction only.
    """
    score = np.where(available, value + exploration * sd, -np.inf)
    n = min(n, int(available.sum()))
    if n <= 0:
        raise ValueError("No candidate is left to select; the pool is exhausted.")
    top = np.argpartition(-score, n - 1)[:n]
    return top[np.argsort(-score[top], kind="stable")]


def select_random(available: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` available candidates drawn uniformly without replacement."""
    candidates = np.flatnonzero(available)
    if len(candidates) < n:
        raise ValueError(f"Only {len(candidates)} candidates are left; {n} were requested.")
    return rng.choice(candidates, size=n, replace=False)


def select_diverse(features: np.ndarray, available: np.ndarray, n: int,
                   rng: np.random.Generator, n_components: int = 32) -> np.ndarray:
    """Return ``n`` candidates spread over feature space (k-means++ seeding on principal axes).

    ``features`` is ``(n_pool, n_features)`` and already standardised.
    """
    candidates = np.flatnonzero(available)
    if len(candidates) < n:
        raise ValueError(f"Only {len(candidates)} candidates are left; {n} were requested.")
    centred = features[candidates] - features[candidates].mean(axis=0)
    # Principal axes from at most about 1,000 rows: enough for 32 axes, and the SVD stays cheap.
    _, _, components = np.linalg.svd(centred[:: max(1, len(centred) // 1000)],
                                      full_matrices=False)
    projected = centred @ components[:n_components].T
    chosen = [int(rng.integers(len(candidates)))]
    distance = np.sum((projected - projected[chosen[0]]) ** 2, axis=1)
    for _ in range(n - 1):
        probabilities = distance / distance.sum()
        pick = int(rng.choice(len(candidates), p=probabilities))
        chosen.append(pick)
        distance = np.minimum(distance, np.sum((projected - projected[pick]) ** 2, axis=1))
    return candidates[np.array(chosen)]
