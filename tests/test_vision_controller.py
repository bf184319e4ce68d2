"""The vision controller in-process: stepped clock, the embedded MobileNetV2, a known subject.

The subject's sites respond linearly to MobileNetV2 features of another layer than the
controller's, so every phase (calibration, synthesis blocks, evolution, evaluation) runs on real
images and a real network, quickly, with exact trial counts to check.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from loop.clock import SteppedClock
from loop.config import load_experiment
from loop.offline import DiscardMarkers
from loop.presentation import HeadlessPresenter
from loop.recording import SessionRecorder
from loop.recovery import recover_session, resumed_path
from loop.report import read_trials
from loop.session import resumed_recorder
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


class SubjectStopped(RuntimeError):
    """Raised by the subject to stop a session at a chosen trial."""


class FeatureSubject:
    """Sites that respond to features.6 of the image (the controller reads other layers).

    The noise of a response is drawn from the image's id, so an image always gets the same
    response, however many trials came before: a resumed session can match an uninterrupted one.
    """

    def __init__(self, extractor, n_sites, seed=0, stop_at=None):
        rng = np.random.default_rng(seed)
        self.extractor = extractor
        self.weights = rng.normal(size=(extractor.n_features("features.6"), n_sites))
        self.weights /= np.sqrt(self.weights.shape[0])
        self.images_seen = []
        self.stop_at = stop_at

    def collect(self, onset, stimulus):
        if len(self.images_seen) == self.stop_at:
            raise SubjectStopped(f"stopped at trial {self.stop_at}")
        self.images_seen.append(stimulus.stimulus_id)
        features = self.extractor.extract(stimulus.image)["features.6"][0]
        noise = np.random.default_rng(int(stimulus.stimulus_id[1:], 16)).normal(
            0, 0.05, self.weights.shape[1])
        return np.concatenate([features @ self.weights + noise, [0.0]])

    def display_lag(self, onset):
        return float("nan")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
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
    return experiment, extractor, subject_features, natural


def make_controller(parts, recorder=None, stop_at=None, replay=None, stored=None):
    experiment, extractor, subject_features, natural = parts
    pool = ImagePool()
    for image, name in zip(natural.images[:N_NATURAL], natural.ids[:N_NATURAL], strict=True):
        pool.add(image, name, "natural")
    features = extractor.extract(np.stack(pool.images))
    subject = FeatureSubject(subject_features, N_SITES, stop_at=stop_at)
    clock = SteppedClock(100.0)
    stored = [] if stored is None else stored

    def store_image(index):
        stored.append(index)
        if recorder is not None:
            recorder.add_image(pool.ids[index], pool.images[index], pool.texts[index],
                               pool.kinds[index])
        return None

    controller = VisionController(
        experiment, pool, features, list(range(N_SITES)), HeadlessPresenter(clock, DiscardMarkers()),
        subject, clock, np.random.default_rng(3), extractor, store_image, recorder=recorder,
        synthesis_device="cpu", replay=replay)
    return controller, subject


@pytest.fixture(scope="module")
def controller_run(parts):
    stored = []
    controller, subject = make_controller(parts, stored=stored)
    state = controller.run()
    return controller, state, subject, stored


def test_phases_and_trial_counts(controller_run):
    _, state, _, _ = controller_run
    phases = [record.phase for record in state.trials]
    # Calibration shows 10 natural images twice. Each of 2 blocks has 4 sites x 2 objectives + 2
    # references, and each of 2 generations 4 + 2 references. Evaluation shows 8 final images,
    # the best evolved one and 10 natural images, 3 times each.
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


def recorded_run(parts, path, stop_at=None, replay=None, recorder=None):
    if recorder is None:
        recorder = SessionRecorder(path)
        recorder.write_metadata("experiment", "rig", {"seed": 3, "versions": {}})
    controller, _ = make_controller(parts, recorder=recorder, stop_at=stop_at, replay=replay)
    status = "complete"
    try:
        controller.run()
    except SubjectStopped:
        status = "aborted"
    finally:
        recorder.close(status)


def sequence(path):
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
    return list(zip(trials["condition"].tolist(), trials["stimulus_id"].tolist(), strict=True))


@pytest.mark.parametrize("stop_at", [25, 45, 70])
def test_resumed_vision_session_matches_uninterrupted(parts, tmp_path, stop_at):
    recorded_run(parts, tmp_path / "whole.h5")
    recorded_run(parts, tmp_path / "stopped.h5", stop_at=stop_at)
    recovered = recover_session(tmp_path / "stopped.h5")
    assert recovered.n_trials == stop_at
    new_path = resumed_path(tmp_path / "stopped.h5", "resumed")
    recorder = resumed_recorder(new_path, recovered, "experiment", "rig", {"versions": {}},
                                "identity", ImagePool(), SteppedClock(0.0))
    recorded_run(parts, new_path, replay=recovered.trials, recorder=recorder)
    # The replay synthesised the same images from the recorded responses, so the session went on
    # with the trials the uninterrupted one showed.
    assert sequence(new_path) == sequence(tmp_path / "whole.h5")
    with h5py.File(new_path, "r") as file:
        ids = file["stimuli/stimulus_id"].asstr()[()].tolist()
    assert len(ids) == len(set(ids))


def test_image_proposed_twice_added_once(parts):
    controller, _ = make_controller(parts)
    n_before = len(controller.pool)
    image = np.full((SIZE, SIZE, 3), 90, np.uint8)
    indices = controller._add_images(np.stack([image, image]), ["twice", "twice"])
    assert indices == [n_before, n_before]
    assert len(controller.pool) == n_before + 1
    for features in controller.pool_features.values():
        assert features.shape[0] == n_before + 1
    assert controller.state.shown_mask.shape == (n_before + 1,)
