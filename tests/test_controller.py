"""The controller in-process: stepped clock, synthetic features, responses with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from loop.clock import SteppedClock
from loop.config import load_experiment
from loop.controller import Controller
from loop.errors import DeadlineMissedError
from loop.offline import DiscardMarkers
from loop.presentation import HeadlessPresenter, Onset
from synth.pool import CandidatePool, stimulus_id

from .test_config import shipped_with


class LinearSubject:
    """Responses that are a linear function of the layer-6 features plus Gaussian noise."""

    def __init__(self, pool, features, noise_sd, seed):
        rng = np.random.default_rng(seed)
        self.weights = rng.normal(size=features.shape[1])
        self.truth = dict(zip(pool.texts, features @ self.weights, strict=True))
        self.noise_sd = noise_sd
        self.rng = rng

    def collect(self, onset, stimulus):
        value = self.truth[stimulus.text] + self.rng.normal(0, self.noise_sd)
        return np.array([value, value, 0.0])

    def display_lag(self, onset):
        return float("nan")


def synthetic_pool(n=600, width=20, seed=0):
    rng = np.random.default_rng(seed)
    texts = [f"Sentence {index} of the synthetic pool." for index in range(n)]
    pool = CandidatePool(texts, [stimulus_id(t) for t in texts], "synthetic")
    shared = rng.normal(size=(n, width))
    features = {6: shared, 9: shared[:, ::-1] + rng.normal(size=(n, width)) * 3}
    return pool, features


def make_controller(tmp_path, policy="closed_loop", presenter=None, **changes):
    path = shipped_with(tmp_path, "n_blocks = 4", "n_blocks = 2")
    text = path.read_text()
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    experiment = load_experiment(path)
    pool, features = synthetic_pool()
    subject = LinearSubject(pool, features[6], noise_sd=1.0, seed=3)
    clock = SteppedClock(100.0)
    presenter = presenter or HeadlessPresenter(clock, DiscardMarkers())
    controller = Controller(experiment, pool, features, [0, 1], presenter, subject, clock,
                            np.random.default_rng(5), policy=policy)
    return controller, subject


def test_phases_and_trial_counts(tmp_path):
    controller, _ = make_controller(tmp_path)
    state = controller.run()
    phases = [record.phase for record in state.trials]
    assert phases == ["calibration"] * 150 + ["closed_loop"] * 72 + ["evaluation"] * 150
    conditions = [r.condition for r in state.trials if r.phase == "closed_loop"]
    assert conditions.count("drive") == conditions.count("suppress") == 24
    assert controller.encoder.n_updates == 72


def test_no_sentence_shown_twice(tmp_path):
    controller, _ = make_controller(tmp_path)
    state = controller.run()
    texts = [record.text for record in state.trials]
    assert len(set(texts)) == len(texts)


def test_repeats_allowed_when_asked(tmp_path):
    controller, _ = make_controller(tmp_path, **{"allow_repeats = false": "allow_repeats = true"})
    state = controller.run()
    closed = [r.text for r in state.trials if r.phase == "closed_loop"]
    evaluation = [r.text for r in state.trials if r.phase == "evaluation"]
    assert len(set(closed)) < len(closed)
    assert not set(evaluation) & {r.text for r in state.trials if r.phase != "evaluation"}


def test_chooses_informative_layer(tmp_path):
    controller, _ = make_controller(tmp_path)
    state = controller.run()
    assert state.layer == 6
    assert state.layer_cv_r[6] > state.layer_cv_r[9]


def test_drive_and_suppress_reach_the_extremes(tmp_path):
    controller, subject = make_controller(tmp_path)
    state = controller.run()
    truth = np.array(list(subject.truth.values()))
    evaluation = {c: [subject.truth[r.text] for r in state.trials
                      if r.phase == "evaluation" and r.condition == c]
                  for c in ("drive", "suppress", "baseline")}
    assert np.mean(evaluation["drive"]) > np.percentile(truth, 85)
    assert np.mean(evaluation["suppress"]) < np.percentile(truth, 15)
    assert np.percentile(truth, 25) < np.mean(evaluation["baseline"]) < np.percentile(truth, 75)


def test_onsets_follow_the_schedule(tmp_path):
    controller, _ = make_controller(tmp_path)
    state = controller.run()
    onsets = np.array([r.onset for r in state.trials])
    intervals = np.diff(onsets)
    runs = [(r.phase, r.block) for r in state.trials]
    same_run = np.array([a == b for a, b in zip(runs[:-1], runs[1:], strict=True)])
    # Stimulus 2.0 s plus interval 1.0 s with a uniform jitter of +-0.2 s.
    assert intervals[same_run].min() >= 2.8 - 1e-9
    assert intervals[same_run].max() <= 3.2 + 1e-9
    # Between runs: the stimulus (2.0 s), the rest message (2.0 s), then one interval (1.0 s).
    # Calibration to block 1, block 1 to 2, block 2 to evaluation.
    assert np.count_nonzero(~same_run) == 3
    np.testing.assert_allclose(intervals[~same_run], 5.0)
    assert all(r.late_s == 0.0 for r in state.trials)
    assert not any(r.late or r.fallback for r in state.trials)


class LatePresenter(HeadlessPresenter):
    def present(self, trial, condition, stimulus, due, duration_s):
        onset = super().present(trial, condition, stimulus, due, duration_s)
        return Onset(onset.time + 0.05, 0.05, onset.marker, onset.stimulus, onset.condition)


def test_repeated_late_onsets_raise(tmp_path):
    clock = SteppedClock()
    controller, _ = make_controller(tmp_path,
                                    presenter=LatePresenter(clock, DiscardMarkers()))
    with pytest.raises(DeadlineMissedError, match=r"11 onsets were late by more than 20 ms"):
        controller.run()
    assert len(controller.state.trials) == 10


def test_open_loop_keeps_calibration_model(tmp_path):
    controller, _ = make_controller(tmp_path, policy="open_loop")
    state = controller.run()
    assert [r.phase for r in state.trials].count("closed_loop") == 72
    assert controller.encoder.n_updates == 0
    assert controller.encoder.n_samples == 150


def test_calibration_only_spends_whole_budget(tmp_path):
    controller, _ = make_controller(tmp_path, policy="calibration_only")
    state = controller.run()
    phases = [r.phase for r in state.trials]
    assert phases == ["calibration"] * (150 + 72) + ["evaluation"] * 150
    assert controller.encoder.n_updates == 0


def test_closed_loop_model_learns_from_every_trial(tmp_path):
    controller, _ = make_controller(tmp_path, policy="closed_loop")
    controller.run()
    assert controller.encoder.n_samples == 150 + 72


def test_rejects_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match="policy must be one of"):
        make_controller(tmp_path, policy="greedy")
