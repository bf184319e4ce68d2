"""Stimulus selection over pool predictions."""

from __future__ import annotations

import numpy as np
import pytest

from loop.selection import select_diverse, select_random, select_top
from synth.objectives import Drive, Suppress, Weighted, objective_for


def test_select_top_exploits():
    value = np.array([0.1, 0.9, 0.5, 0.7])
    sd = np.array([1.0, 0.0, 0.0, 0.0])
    available = np.array([True, True, True, True])
    assert select_top(value, sd, available, 0.0, 2).tolist() == [1, 3]


def test_select_top_explores_uncertain():
    value = np.array([0.1, 0.9, 0.5, 0.7])
    sd = np.array([1.0, 0.0, 0.0, 0.0])
    available = np.array([True, True, True, True])
    assert select_top(value, sd, available, 1.0, 1).tolist() == [0]


def test_select_top_skips_shown():
    value = np.array([0.1, 0.9, 0.5, 0.7])
    available = np.array([True, False, True, False])
    assert select_top(value, np.zeros(4), available, 0.0, 2).tolist() == [2, 0]


def test_select_top_exhausted_pool():
    with pytest.raises(ValueError, match="exhausted"):
        select_top(np.zeros(3), np.zeros(3), np.zeros(3, bool), 0.0, 1)


def test_select_random_without_repeats():
    available = np.zeros(100, bool)
    available[::3] = True
    chosen = select_random(available, 20, np.random.default_rng(0))
    assert len(set(chosen.tolist())) == 20
    assert all(available[chosen])


def test_select_diverse_spreads_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 50
    features = np.concatenate([centre + rng.normal(size=(100, 4)) for centre in centres])
    chosen = select_diverse(features, np.ones(400, bool), 4, np.random.default_rng(1),
                            n_components=4)
    assert sorted((chosen // 100).tolist()) == [0, 1, 2, 3]


def test_objectives_combine():
    mean = np.array([[1.0, 2.0], [3.0, -1.0]])
    sd = np.array([[0.3, 0.4], [0.0, 0.0]])
    value, value_sd = Weighted(((1.0, Drive(0)), (2.0, Suppress(1)))).evaluate(mean, sd)
    np.testing.assert_allclose(value, [1.0 - 4.0, 3.0 + 2.0])
    np.testing.assert_allclose(value_sd, [np.hypot(0.3, 0.8), 0.0])
    assert objective_for("suppress") == Suppress(0)
    with pytest.raises(ValueError, match="No objective for condition 'baseline'"):
        objective_for("baseline")
