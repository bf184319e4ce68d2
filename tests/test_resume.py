"""Resuming a stopped session in-process: replay from the file or the journal, then go on.

The subject's response to a stimulus is fixed (its noise is drawn once per sentence), so a session
stopped at trial K and resumed must show exactly the sequence an uninterrupted session shows.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from loop.clock import SteppedClock
from loop.config import load_experiment
from loop.controller import Controller
from loop.errors import ResumeError
from loop.offline import DiscardMarkers
from loop.presentation import HeadlessPresenter
from loop.recording import SessionRecorder, journal_path_for
from loop.recovery import recover_session, resumed_path
from loop.report import read_trials
from loop.session import resumed_recorder

from .test_config import shipped_with
from .test_controller import synthetic_pool

N_TRIALS = 150 + 2 * 36 + 150


class SubjectStopped(RuntimeError):
    """Raised by the subject to stop a session at a chosen trial."""


class FixedSubject:
    """Responses linear in the features plus noise drawn once per sentence."""

    def __init__(self, pool, features, seed=3, stop_at=None):
        rng = np.random.default_rng(seed)
        weights = rng.normal(size=features.shape[1])
        noise = rng.normal(size=len(pool))
        self.value = dict(zip(pool.texts, features @ weights + noise, strict=True))
        self.stop_at = stop_at
        self.n_collected = 0

    def collect(self, onset, stimulus):
        if self.n_collected == self.stop_at:
            raise SubjectStopped(f"stopped at trial {self.n_collected}")
        self.n_collected += 1
        value = self.value[stimulus.text]
        return np.array([value, value, 0.0])

    def display_lag(self, onset):
        return float("nan")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    experiment_path = shipped_with(tmp_path, "n_blocks = 4", "n_blocks = 2")
    pool, features = synthetic_pool()
    return tmp_path, experiment_path, load_experiment(experiment_path), pool, features


def run(setup, path, stop_at=None, replay=None, recorder=None, seed=5):
    _, _, experiment, pool, features = setup
    clock = SteppedClock(100.0)
    if recorder is None:
        recorder = SessionRecorder(path)
        recorder.write_metadata("experiment", "rig", {"seed": seed, "experiment_file": "e",
                                                      "rig_file": "r", "versions": {}})
    controller = Controller(experiment, pool, features, [0, 1],
                            HeadlessPresenter(clock, DiscardMarkers()),
                            FixedSubject(pool, features[6], stop_at=stop_at), clock,
                            np.random.default_rng(seed), recorder=recorder, replay=replay)
    status = "complete"
    try:
        controller.run()
    except SubjectStopped:
        status = "aborted"
    finally:
        recorder.close(status)
    return controller


def trial_sequence(path):
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
    return list(zip(trials["trial"].tolist(), trials["condition"].tolist(),
                    trials["stimulus_id"].tolist(), strict=True))


@pytest.fixture(scope="module")
def uninterrupted(setup):
    path = setup[0] / "uninterrupted.h5"
    run(setup, path)
    return trial_sequence(path)


def resume(setup, old_path, stamp="resumed"):
    recovered = recover_session(old_path)
    new_path = resumed_path(old_path, stamp)
    _, _, _, pool, _ = setup
    recorder = resumed_recorder(new_path, recovered, "experiment", "rig",
                                {"experiment_file": "e", "rig_file": "r", "versions": {}},
                                "identity", pool, SteppedClock(0.0))
    controller = run(setup, new_path, replay=recovered.trials, recorder=recorder)
    return recovered, new_path, controller


@pytest.mark.parametrize("stop_at", [40, 180, 300])
def test_resumed_session_matches_uninterrupted(setup, uninterrupted, stop_at):
    old_path = setup[0] / f"stopped_{stop_at}.h5"
    run(setup, old_path, stop_at=stop_at)
    assert trial_sequence(old_path) == uninterrupted[:stop_at]

    recovered, new_path, _ = resume(setup, old_path, f"at-{stop_at}")
    assert recovered.n_trials == stop_at
    assert recovered.source == "session file"
    assert recovered.damage == []
    # Every trial exactly once, in the order the uninterrupted session showed them.
    assert trial_sequence(new_path) == uninterrupted
    with h5py.File(new_path, "r") as file:
        assert file.attrs["status"] == "complete"
        assert file.attrs["resumed_from"] == str(old_path)
        assert file["resumes/n_trials"][()].tolist() == [stop_at]
        assert file["checkpoints/trial"][()].tolist() == list(range(N_TRIALS))
    # The old file is never written to.
    with h5py.File(old_path, "r") as file:
        assert file.attrs["status"] == "aborted"
        assert file["trials/trial"].shape == (stop_at,)


def test_damaged_file_recovered_from_journal(setup, uninterrupted):
    old_path = setup[0] / "damaged.h5"
    run(setup, old_path, stop_at=200)
    size = old_path.stat().st_size
    with open(old_path, "r+b") as file:
        file.truncate(size // 3)
    damaged_bytes = old_path.read_bytes()

    recovered, new_path, _ = resume(setup, old_path, "damaged")
    assert not recovered.file_readable
    assert recovered.source == "journal"
    assert recovered.n_trials == 200
    assert "cannot be opened" in recovered.damage_summary()
    assert trial_sequence(new_path) == uninterrupted
    assert old_path.read_bytes() == damaged_bytes
    with h5py.File(new_path, "r") as file:
        kinds = [kind.decode() for kind in file["faults/kind"][()]]
        assert "damaged_file" in kinds


def test_cut_last_journal_line_is_ignored(setup):
    old_path = setup[0] / "cut.h5"
    run(setup, old_path, stop_at=20)
    journal = journal_path_for(old_path)
    journal.write_bytes(journal.read_bytes() + b'{"record": {"trial": 20, "pha')
    recovered = recover_session(old_path)
    assert recovered.n_trials == 20
    assert recovered.damage == ["cut.journal.jsonl: its last line was cut by the crash and is "
                                "ignored"]


def test_journal_ahead_of_file_is_used(setup):
    old_path = setup[0] / "behind.h5"
    run(setup, old_path, stop_at=30)
    journal = journal_path_for(old_path)
    lines = journal.read_text(encoding="utf-8").splitlines()
    # The HDF5 row of the last trial is lost, as if the crash came between journal and file.
    with h5py.File(old_path, "r+") as file:
        for dataset in file["trials"].values():
            dataset.resize(29, axis=0)
    recovered = recover_session(old_path)
    assert recovered.source == "journal"
    assert recovered.n_trials == 30
    assert json.loads(lines[-1])["record"]["trial"] == 29


def test_replay_with_another_seed_is_refused(setup):
    old_path = setup[0] / "seeded.h5"
    run(setup, old_path, stop_at=10)
    recovered = recover_session(old_path)
    new_path = resumed_path(old_path, "other-seed")
    with pytest.raises(ResumeError, match="Replaying trial 0, the controller chose"):
        run(setup, new_path, replay=recovered.trials, seed=6)


def test_complete_session_is_not_resumed(setup, uninterrupted):
    with pytest.raises(ResumeError, match="complete session; there is nothing to resume"):
        recover_session(setup[0] / "uninterrupted.h5")
    assert not journal_path_for(setup[0] / "uninterrupted.h5").exists()


def test_missing_file_named(tmp_path):
    with pytest.raises(ResumeError, match="does not exist, and neither does its journal"):
        recover_session(tmp_path / "nothing.h5")


def test_copy_falls_back_to_reading_values(setup, tmp_path, monkeypatch):
    old_path = tmp_path / "heap.h5"
    run(setup, old_path, stop_at=180)
    with h5py.File(old_path, "r") as old:
        expected = {name: old[name][()] for name in ("markers/text", "model/updates/weights",
                                                    "config/experiment")}

    def failing_copy(self, *args, **kwargs):
        # What HDF5 raised on a killed session's file whose values still read.
        raise RuntimeError("Unable to synchronously copy object (bad heap index)")

    monkeypatch.setattr(h5py.Group, "copy", failing_copy)
    recovered = recover_session(old_path)
    recorder = resumed_recorder(resumed_path(old_path, "copied"), recovered, "experiment", "rig",
                                {"experiment_file": "e", "rig_file": "r", "versions": {}},
                                "identity", setup[3], SteppedClock(0.0))
    recorder.add_marker(1.0, "after")
    recorder.close("aborted")
    assert recovered.damage == []
    with h5py.File(resumed_path(old_path, "copied"), "r") as new:
        for name, values in expected.items():
            copied = new[name][()]
            if name == "markers/text":
                assert copied.tolist() == [*values.tolist(), b"after"]
            else:
                np.testing.assert_array_equal(copied, values)
