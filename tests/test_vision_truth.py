"""The simulated vision subject's ground truth, and how well the controller's features predict it."""

from __future__ import annotations

import numpy as np
import pytest

from acquisition.vision_truth import TRUTH_LAYER, VisionTruth
from synth.encoding import RidgeEncoder, Standardizer, alpha_grid
from synth.image_features import ImageFeatureExtractor
from synth.natural_images import load_natural_images

pytestmark = [pytest.mark.models, pytest.mark.usefixtures("torch_one_thread")]

N_SITES = 16


@pytest.fixture(scope="module")
def natural() -> np.ndarray:
    return load_natural_images().images


@pytest.fixture(scope="module")
def truth(mobilenet, natural, tmp_path_factory) -> VisionTruth:
    return VisionTruth(N_SITES, seed=0, reference=natural, model=mobilenet,
                       cache_dir=tmp_path_factory.mktemp("cache"))


def test_reference_responses_are_normalised(truth, natural):
    responses = truth.reference_responses
    assert responses.shape == (len(natural), N_SITES)
    np.testing.assert_allclose(responses.mean(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(responses.std(axis=0), 0.5, rtol=1e-6)
    assert responses.min() >= 0.0
    np.testing.assert_allclose(truth(natural), responses, rtol=1e-10)


def test_same_seed_same_subject(truth, mobilenet, natural):
    again = VisionTruth(N_SITES, seed=0, reference=natural, model=mobilenet, use_cache=False)
    np.testing.assert_allclose(again.reference_responses, truth.reference_responses, rtol=1e-6)
    assert again.sites[3].centre_xy == truth.sites[3].centre_xy
    np.testing.assert_array_equal(again.sites[3].channels, truth.sites[3].channels)
    other = VisionTruth(N_SITES, seed=1, reference=natural, model=mobilenet, use_cache=False)
    assert other.sites[0].centre_xy != truth.sites[0].centre_xy


def test_site_tuning_is_sparse_and_local(truth):
    assert truth.layer == TRUTH_LAYER == "features.10"
    fields = truth.receptive_fields()
    assert fields.shape == (N_SITES, 8, 8)
    np.testing.assert_allclose(fields.sum(axis=(1, 2)), 1.0)
    for site, field in zip(truth.sites, fields, strict=True):
        assert len(site.channels) == 6
        assert len(set(site.channels.tolist())) == 6
        np.testing.assert_allclose(np.linalg.norm(site.channel_weights), 1.0)
        row, column = np.unravel_index(np.argmax(field), field.shape)
        assert column == int(site.centre_xy[0] * 8)
        assert row == int(site.centre_xy[1] * 8)


def test_occluding_the_field_matters_most(truth, natural):
    # Grey out a disk at a site's centre, or the same disk mirrored through the image centre. Only
    # sites whose two disks do not overlap are compared.
    size = natural.shape[1]
    rows, columns = np.mgrid[0:size, 0:size] / size
    compared = 0
    for index, site in enumerate(truth.sites):
        x, y = site.centre_xy
        radius = 2 * site.rf_sd
        if np.hypot(1 - 2 * x, 1 - 2 * y) < 2 * radius:
            continue
        best, response = truth.best_natural_image(index)
        occluded = []
        for centre_x, centre_y in ((x, y), (1 - x, 1 - y)):
            image = natural[best].copy()
            image[(columns - centre_x) ** 2 + (rows - centre_y) ** 2 < radius**2] = 128
            occluded.append(image)
        inside, outside = truth(np.stack(occluded))[:, index]
        assert abs(response - inside) > abs(response - outside), index
        compared += 1
    assert compared >= 4


def test_best_natural_image(truth, natural):
    for site in (0, 7, N_SITES - 1):
        index, response = truth.best_natural_image(site)
        assert index == int(np.argmax(truth.reference_responses[:, site]))
        assert response == truth.reference_responses[:, site].max()
    subset = natural[10:20]
    index, response = truth.best_natural_image(2, subset)
    assert 0 <= index < 10
    assert response == pytest.approx(truth(subset)[:, 2].max())
    with pytest.raises(ValueError, match="site must be in 0..15"):
        truth.best_natural_image(N_SITES)


def test_invalid_settings_rejected(mobilenet, natural):
    with pytest.raises(ValueError, match="n_sites must be at least 1"):
        VisionTruth(0, seed=0, reference=natural, model=mobilenet)
    with pytest.raises(ValueError, match="response_sd=9.0 cannot be reached with 3 reference images"):
        VisionTruth(2, seed=0, reference=natural[:3], model=mobilenet, response_sd=9.0,
                    use_cache=False)
    with pytest.raises(ValueError, match="needs a \\(C, H, W\\) map"):
        VisionTruth(2, seed=0, reference=natural, model=mobilenet, layer="classifier.1")


def test_controller_ridge_predicts_truth(truth, mobilenet, natural, tmp_path):
    # The controller's default features (a 3 × 3 grid of features.13) are not the truth's
    # (features.10 through receptive fields), so this measures a real model mismatch.
    extractor = ImageFeatureExtractor(mobilenet, ["features.13"], cache_dir=tmp_path)
    features = extractor.extract(natural)["features.13"]
    assert features.shape == (len(natural), 864)
    encoder = RidgeEncoder(Standardizer.fit(features), [f"site{k}" for k in range(N_SITES)])
    loo = encoder.fit(features, truth.reference_responses, alpha_grid(1.0, 1e6, 19))
    # Measured with seed 0 on 36 images: 15 of 16 sites positive, median leave-one-out r 0.31.
    assert np.sum(loo.cv_r > 0) >= 12
    assert np.median(loo.cv_r) > 0.2
