"""The vision controller in-process: stepped clock, the embedded MobileNetV2, a known subject.

The subject's sites respond linearly to MobileNetV2 features of another layer than the
controller's, so every phase (calibration, synthesis blocks, evolution, evaluation) runs on real
images and a real network, quickly, with exact trial counts to check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loop.clock import SteppedClock
from loop.config import load_experiment
from loop.offline import DiscardMarkers
from loop.presentation import HeadlessPresenter
from loop.vision_controller import VisionController, condition_site
from synth.image_features import ImageFeatureExtractor
from synth.image_pool import ImagePool
from synth.natural_images import load_natural_images
from synth.vision_models import load_vision_model

from .test_config import REPO

pytestmark = pytest.mark.models

N_SITES = 4
N_NATURAL = 10
SIZE = 48


class FeatureSubject:
    """Sites that respond to features.6 of the image (the controller reads other layers)."""

    def __init__(self, extractor, n_sites, seed=0):
        rng = np.random.default_rng(seed)
        self.extractor = extractor
        self.weights = rng.normal(size=(extractor.n_features("features.6"), n_sites))
        self.weights /= np.sqrt(self.weights.shape[0])
        self.rng = rng
        self.images_seen = []

    def collect(self, onset, stimulus):
        self.images_seen.append(stimulus.stimulus_id)
        features = self.extractor.extract(stimulus.image)["features.6"][0]
        sites = features @ self.weights + self.rng.normal(0, 0.05, self.weights.shape[1])
        return np.concatenate([sites, [0.0]])

    def display_lag(self, onset):
        return float("nan")


@pytest.fixture(scope="module")
def controller_run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp_path = tmp_path_factory.mktemp("vision")
    text = (REPO / "experiments" / "vision_population_control.toml").read_text()
    replacements = {
        'layers = ["features.10", "features.13"]': 'layers = ["features.10", "features.13"]',
        "image_size = 96": f"image_size = {SIZE}",
        "n_steps = 40": "n_steps = 4",
        "population_size = 8": "population_size = 4",
        'target_channels = ["SITE001", "SITE002", "SITE003", "SITE004",\n'
        '                   "SITE005", "SITE006", "SITE007", "SITE008"]':
            'target_channels = ["SITE001", "SITE002", "SITE003", "SITE004"]',
    }
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "vision.toml"
    path.write_text(text)
    experiment = load_experiment(path)

    loaded = load_vision_model(device="cpu")
    extractor = ImageFeatureExtractor(loaded, ["features.10", "features.13"], grid_size=3,
                                      image_size=SIZE, use_cache=False)
    subject_features = ImageFeatureExtractor(loaded, ["features.6"], pooling="mean",
                                             image_size=SIZE, use_cache=False)
    pool = ImagePool()
    natural = load_natural_images(SIZE)
    for image, name in zip(natural.images[:N_NATURAL], natural.ids[:N_NATURAL], strict=True):
        pool.add(image, name, "natural")
    features = extractor.extract(np.stack(pool.images))
    subject = FeatureSubject(subject_features, N_SITES)
    clock = SteppedClock(100.0)
    stored = []

    def store_image(index):
        stored.append(index)
        return None

    controller = VisionController(
        experiment, pool, features, list(range(N_SITES)), HeadlessPresenter(clock, DiscardMarkers()),
        subject, clock, np.random.default_rng(3), extractor, store_image, synthesis_device="cpu")
    state = controller.run()
    return controller, state, subject, stored


def test_phases_and_trial_counts(controller_run):
    _, state, _, _ = controller_run
    phases = [record.phase for record in state.trials]
    # 10 natural images twice; 2 blocks of 4 sites x 2 objectives + 2 references; 2 generations
    # of 4 + 2 references; evaluation of 8 final images, the best evolved one and 10 natural
    # images, 3 times each.
    assert phases.count("calibration") == 2 * N_NATURAL
    assert phases.count("closed_loop") == 2 * (N_SITES * 2 + 2)
    assert phases.count("evolution") == 2 * (4 + 2)
    assert phases.count("evaluation") == 3 * (N_SITES * 2 + 1 + N_NATURAL)


def test_each_target_site_gets_both_objectives(controller_run):
    _, state, _, _ = controller_run
    evaluation = [record.condition for record in state.trials if record.phase == "evaluation"]
    for site in ("SITE001", "SITE002", "SITE003", "SITE004"):
        assert evaluation.count(f"stretch:{site}") == 3
        assert evaluation.count(f"one_hot_population:{site}") == 3
    assert evaluation.count("evolved:SITE001") == 3
    assert evaluation.count("natural") == 3 * N_NATURAL


def test_synthesised_images_join_the_pool(controller_run):
    controller, state, _, stored = controller_run
    kinds = controller.pool.kinds
    assert kinds[:N_NATURAL] == ["natural"] * N_NATURAL
    # Every synthesised image is shown; the GA's elites come back unchanged in the next generation
    # and keep their first index.
    shown = {record.stimulus_id for record in state.trials
             if record.condition not in ("natural", "reference")}
    assert kinds.count("synthesised") == len(shown)
    assert len(shown) >= 3 * 8 + 4
    assert sorted(stored) == list(range(len(controller.pool)))
    for layer, features in controller.pool_features.items():
        assert features.shape[0] == len(controller.pool), layer
    image = controller.pool.images[-1]
    assert image.dtype == np.uint8
    assert image.shape == (SIZE, SIZE, 3)


def test_model_learns_every_site(controller_run):
    controller, state, _, _ = controller_run
    assert controller.encoder.n_targets == N_SITES
    learned = [record for record in state.trials if record.phase != "evaluation"]
    assert controller.encoder.n_samples == len(learned)
    assert state.layer in ("features.10", "features.13")


def test_trial_response_is_the_targeted_site(controller_run):
    controller, state, _, _ = controller_run
    for record in state.trials:
        site = condition_site(record.condition)
        if site is None:
            continue
        assert site in controller.site_names
    stretch = [record for record in state.trials if record.condition == "stretch:SITE002"]
    position = controller.site_names.index("SITE002")
    sites = controller.site_responses[state.trials.index(stretch[0])]
    assert stretch[0].observed == pytest.approx(sites[position])
