"""Ridge encoding models against closed-form solutions and brute-force cross-validation."""

from __future__ import annotations

import numpy as np
import pytest

from synth.encoding import (
    PoolScorer,
    RidgeEncoder,
    Standardizer,
    alpha_grid,
    pearson_r,
    ridge_loo,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 12)) * rng.uniform(0.5, 50, size=12) + 3.0
    weights = rng.normal(size=12) / features.std(axis=0)
    clean = features @ weights
    responses = np.stack([clean + rng.normal(size=60) * 0.5 + 2.0,
                          -clean + rng.normal(size=60) * 5.0], axis=1)
    return features, responses


def brute_force_loo(features, response, alpha):
    predictions = np.empty(len(features))
    for left_out in range(len(features)):
        keep = np.arange(len(features)) != left_out
        x, y = features[keep], response[keep]
        x_mean, y_mean = x.mean(axis=0), y.mean()
        weights = np.linalg.solve((x - x_mean).T @ (x - x_mean) + alpha * np.eye(x.shape[1]),
                                  (x - x_mean).T @ (y - y_mean))
        predictions[left_out] = (features[left_out] - x_mean) @ weights + y_mean
    return predictions


def test_loo_matches_brute_force(data):
    features, responses = data
    standard = Standardizer.fit(features).transform(features)[:, :-1]
    loo = ridge_loo(standard, responses, alpha_grid(0.01, 1e4, 13))
    for target in range(2):
        expected = brute_force_loo(standard, responses[:, target], loo.best_alpha[target])
        np.testing.assert_allclose(loo.predictions[:, target], expected, rtol=1e-9, atol=1e-9)
        assert loo.cv_r[target] == pytest.approx(pearson_r(expected, responses[:, target]))


def test_loo_penalty_chosen_per_target(data):
    features, responses = data
    standard = Standardizer.fit(features).transform(features)[:, :-1]
    loo = ridge_loo(standard, responses, alpha_grid(0.01, 1e4, 13))
    # The noisier target needs the stronger penalty.
    assert loo.best_alpha[1] > loo.best_alpha[0]
    assert loo.best_alpha[0] == loo.alphas[np.argmin(loo.mse[:, 0])]


def test_fit_matches_closed_form(data):
    features, responses = data
    scaler = Standardizer.fit(features)
    encoder = RidgeEncoder(scaler, ["a", "b"])
    encoder.fit(features, responses, alpha_grid(0.01, 1e4, 13))
    design = (features - features.mean(axis=0)) / features.std(axis=0)
    for target in range(2):
        alpha = encoder.alphas[target]
        centred_y = responses[:, target] - responses[:, target].mean()
        expected = np.linalg.solve(design.T @ design + alpha * np.eye(12), design.T @ centred_y)
        np.testing.assert_allclose(encoder.weights[target, :-1], expected, rtol=1e-6, atol=1e-9)
        assert encoder.weights[target, -1] == pytest.approx(responses[:, target].mean(), abs=1e-6)


def test_online_update_equals_refit(data):
    features, responses = data
    scaler = Standardizer.fit(features)
    online = RidgeEncoder(scaler, ["a", "b"])
    online.fit(features[:40], responses[:40], alpha_grid(0.01, 1e4, 13))
    for row in range(40, 60):
        online.update(features[row:row + 1], responses[row:row + 1])
    design = scaler.transform(features)
    for target in range(2):
        penalty = np.full(13, online.alphas[target])
        penalty[-1] = 1e-8
        expected = np.linalg.solve(design.T @ design + np.diag(penalty),
                                   design.T @ responses[:, target])
        np.testing.assert_allclose(online.weights[target], expected, rtol=1e-7, atol=1e-8)
    assert online.n_samples == 60
    assert online.n_updates == 20


def test_pool_scorer_tracks_updates(data):
    features, responses = data
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(300, 12)) * features.std(axis=0) + features.mean(axis=0)
    encoder = RidgeEncoder(Standardizer.fit(pool), ["a", "b"])
    encoder.fit(features[:30], responses[:30], alpha_grid(0.01, 1e4, 13))
    scorer = PoolScorer(encoder, pool)
    for row in range(30, 60):
        scorer.apply_update(encoder.update(features[row:row + 1], responses[row:row + 1]))
    mean, sd = encoder.predict(pool)
    np.testing.assert_allclose(scorer.mean, mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scorer.sd, sd, rtol=1e-3, atol=1e-5)


def test_uncertainty_shrinks_where_sampled(data):
    features, responses = data
    encoder = RidgeEncoder(Standardizer.fit(features), ["a", "b"])
    encoder.fit(features[:20], responses[:20], alpha_grid(0.01, 1e4, 13))
    before = encoder.predict(features[50:51])[1][0, 0]
    for _ in range(5):
        encoder.update(features[50:51], responses[50:51])
    after = encoder.predict(features[50:51])[1][0, 0]
    assert after < before


def test_save_load_without_pickle(data, tmp_path):
    features, responses = data
    encoder = RidgeEncoder(Standardizer.fit(features), ["language", "other"])
    encoder.fit(features, responses, alpha_grid(0.01, 1e4, 13))
    encoder.update(features[:1], responses[:1])
    path = tmp_path / "model.npz"
    encoder.save(path)
    with np.load(path, allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)
    loaded = RidgeEncoder.load(path)
    assert loaded.target_names == ["language", "other"]
    assert (loaded.n_samples, loaded.n_updates) == (61, 1)
    np.testing.assert_array_equal(loaded.predict(features)[0], encoder.predict(features)[0])
    np.testing.assert_array_equal(loaded.precision_inverse, encoder.precision_inverse)


def test_loo_rejects_too_few_samples():
    with pytest.raises(ValueError, match="at least 3 samples"):
        ridge_loo(np.zeros((2, 3)), np.zeros(2), np.array([1.0]))
