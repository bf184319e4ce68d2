"""The HDF5 session file: trial rows, raw chunks, and files that stop early."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from loop.recording import SessionRecorder, TrialRecord
from loop.report import read_trials


def record(trial, text="Café crème für Jürgen.", condition="drive"):
    return TrialRecord(trial=trial, phase="closed_loop", block=1, condition=condition,
                       stimulus_id=f"s{trial}", text=text, due=10.0 + trial, onset=10.001 + trial,
                       late_s=0.001, late=False, fallback=False, display_lag_s=float("nan"),
                       response_delay_s=1.2, trials_ahead=0,
                       predicted=0.5 * trial,
                       predicted_sd=0.1, observed=1.5 * trial, epoch_ok=True,
                       marker='{"type":"onset"}')


def test_trials_round_trip(tmp_path):
    path = tmp_path / "session.h5"
    recorder = SessionRecorder(path)
    recorder.write_metadata("[experiment]\nname = 'x'\n", "[rig]\n", {"seed": 4, "versions": {"a": "1"}})
    for trial in range(3):
        recorder.add_trial(record(trial), np.arange(4) + trial)
    recorder.close()
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        assert file.attrs["status"] == "complete"
        assert file.attrs["seed"] == 4
        assert file["config/experiment"][()].decode() == "[experiment]\nname = 'x'\n"
        np.testing.assert_array_equal(file["trials/observed_channels"][()],
                                      [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]])
    assert trials["trial"].tolist() == [0, 1, 2]
    assert trials["text"].tolist() == ["Café crème für Jürgen."] * 3
    assert trials["observed"].tolist() == [0.0, 1.5, 3.0]
    assert trials["epoch_ok"].tolist() == [True, True, True]


def test_unclosed_file_keeps_flushed_trials(tmp_path):
    path = tmp_path / "session.h5"
    recorder = SessionRecorder(path)
    for trial in range(5):
        recorder.add_trial(record(trial), np.zeros(2))
    # Read a copy of the file as it is on disk while the writer still has it open.
    copy = tmp_path / "copy.h5"
    copy.write_bytes(path.read_bytes())
    with h5py.File(copy, "r") as file:
        assert file.attrs["status"] == "running"
        assert read_trials(file)["trial"].tolist() == [0, 1, 2, 3, 4]
    recorder.close("aborted")
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "aborted"


def test_stream_chunks_appended(tmp_path):
    recorder = SessionRecorder(tmp_path / "session.h5")
    recorder.add_stream("eeg", ["a", "b"], 100.0, "src")
    recorder.add_chunk("eeg", np.ones((3, 2), np.float32), np.array([1.0, 1.01, 1.02]))
    recorder.add_chunk("eeg", np.zeros((2, 2), np.float32), np.array([1.03, 1.04]))
    recorder.close()
    with h5py.File(tmp_path / "session.h5", "r") as file:
        assert file["streams/eeg/data"].shape == (5, 2)
        np.testing.assert_array_equal(file["streams/eeg/timestamps"][()],
                                      [1.0, 1.01, 1.02, 1.03, 1.04])
        assert file["streams/eeg"].attrs["sfreq"] == 100.0


def test_existing_file_never_overwritten(tmp_path):
    path = tmp_path / "session.h5"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="never overwritten"):
        SessionRecorder(path)
    assert path.read_bytes() == b"precious"
