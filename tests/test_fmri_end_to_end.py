"""A short fMRI dry run: the simulated scanner's pulses over LSL and per-TR values over ZeroMQ.

The simulated scanner runs in its own process (spawn). With its noise switched off, every trial's
GLM estimate must equal the noise-free amplitude it logged, which checks the whole chain: onset
markers, the scanner's BOLD model, the ZeroMQ values, the pulse schedule and the online GLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from acquisition.simulated import log_file_for, read_log
from loop.report import read_trials, write_report
from loop.session import SessionOptions, run_session

pytestmark = pytest.mark.models

REPO = Path(__file__).resolve().parent.parent
SPEED = 10.0


def small_fmri_experiment(tmp_path: Path, unique: str, port: int, noise: bool,
                          trigger: str = "lsl") -> tuple[Path, Path]:
    experiment = (REPO / "experiments" / "language_drive_suppress_fmri.toml").read_text()
    replacements = {
        "builtin:pool_gemma3_270m_6w.txt": str(REPO / "tests" / "data" / "pool_small.txt"),
        "n_trials = 150": "n_trials = 12",
        "n_blocks = 3": "n_blocks = 1",
        "n_drive = 6": "n_drive = 2",
        "n_suppress = 6": "n_suppress = 2",
        "n_baseline = 6": "n_baseline = 2",
        "n_per_condition = 40": "n_per_condition = 2",
        "layers = [6, 9, 12, 15]": "layers = [4, 8]",
    }
    if not noise:
        # Noise-free BOLD needs no pull towards the mean, so the estimates are the amplitudes.
        replacements["glm_ridge = 0.1"] = "glm_ridge = 1e-6"
    for old, new in replacements.items():
        assert old in experiment
        experiment = experiment.replace(old, new)
    rig = (REPO / "hardware_configs" / "simulated_fmri.toml").read_text()
    rig = rig.replace('"neurosteer-markers"', f'"{unique}-markers"')
    rig = rig.replace('"neurosteer-scanner-triggers"', f'"{unique}-triggers"')
    rig = rig.replace("tcp://127.0.0.1:5571", f"tcp://127.0.0.1:{port}")
    rig = rig.replace('trigger = "lsl"', f'trigger = "{trigger}"')
    if not noise:
        for key in ("thermal_noise_sd = 0.25", "physiological_noise_sd = 0.15",
                    "drift_per_minute = 0.5"):
            assert key in rig
            rig = rig.replace(key, key.split("=")[0] + "= 0.0")
    experiment_path, rig_path = tmp_path / "experiment.toml", tmp_path / "rig.toml"
    experiment_path.write_text(experiment)
    rig_path.write_text(rig)
    return experiment_path, rig_path


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def noise_free_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fmri")
    experiment, rig = small_fmri_experiment(tmp_path, "neurosteer-fmri-e2e", free_port(), False)
    path = run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=SPEED))
    log = read_log(log_file_for(path))
    return path, log


def test_fmri_session_complete(noise_free_run):
    path, log = noise_free_run
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "complete"
        assert file.attrs["modality"] == "fmri"
        trials = read_trials(file)
        tr_index = file["fmri/volumes/tr_index"][()]
        statuses = file["fmri/volumes/status"].asstr()[()]
    assert trials["trial"].tolist() == list(range(24))
    assert [row["trial"] for row in log] == list(range(24))
    # Every TR arrives, once, in order, and none is late or missing on a quiet machine.
    assert tr_index.tolist() == list(range(len(tr_index)))
    assert set(statuses) == {"on_time"}


def test_glm_recovers_noise_free_amplitudes(noise_free_run):
    path, log = noise_free_run
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        channels = file["trials/observed_channels"][()]
    amplitudes = np.array([row["amplitudes"] for row in log])
    # Noise-free BOLD from the same HRF: the estimates equal the amplitudes up to the GLM's
    # drift terms and the onset times' 1 ms rounding in the markers.
    np.testing.assert_allclose(channels, amplitudes, atol=0.05)
    np.testing.assert_allclose(trials["observed"], amplitudes[:, 0], atol=0.05)


def test_refit_uses_refreshed_estimates(noise_free_run):
    path, log = noise_free_run
    with h5py.File(path, "r") as file:
        refreshed_trials = file["fmri/refreshed/trial"][()]
        refreshed = file["fmri/refreshed/estimates"][()]
    amplitudes = np.array([row["amplitudes"] for row in log])
    # After the evaluation every trial is estimated again from all volumes, for the report.
    assert refreshed_trials.tolist() == list(range(24))
    np.testing.assert_allclose(refreshed, amplitudes, atol=0.05)


def test_selection_runs_ahead_of_data(noise_free_run):
    path, _ = noise_free_run
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
    # A response is estimable 12 s after its onset, and trials start 3 to 5 s apart. So two to
    # four more trials are shown before it is known, except at the end of a run, where the
    # controller waits.
    assert (trials["response_delay_s"] * SPEED >= 12.0).all()
    assert np.median(trials["trials_ahead"]) >= 2
    report = write_report(path)[2].read_text()
    assert "selection ran ahead of the data" in report


@pytest.mark.display
def test_key_triggers_from_mri_emulator(tmp_path, xvfb_display):
    experiment, rig = small_fmri_experiment(tmp_path, "neurosteer-fmri-keys", free_port(), False,
                                            trigger="key")
    path = run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=SPEED,
                                                       display=True))
    log = read_log(log_file_for(path))
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "complete"
        channels = file["trials/observed_channels"][()]
        markers = [json.loads(text) for text in file["markers/text"].asstr()[()]]
        marker_times = file["markers/timestamp"][()]
        statuses = file["fmri/volumes/status"].asstr()[()]
    pulses = [(event["volume"], time) for event, time in zip(markers, marker_times, strict=True)
              if event["type"] == "pulse"]
    # The emulator's key presses are counted from the first dummy scan, every TR (0.2 s here).
    assert [volume for volume, _ in pulses[:6]] == [-4, -3, -2, -1, 0, 1]
    # The emulator's thread keeps its own TR grid. On a loaded machine it can wake over 0.1 s
    # late and then catches up, so single intervals vary, but the grid holds.
    times = np.array([time for _, time in pulses])
    assert np.median(np.diff(times)) == pytest.approx(2.0 / SPEED, abs=0.002)
    assert (times[-1] - times[0]) / (len(times) - 1) == pytest.approx(2.0 / SPEED, abs=0.002)
    assert set(statuses) == {"on_time"}
    amplitudes = np.array([row["amplitudes"] for row in log])
    np.testing.assert_allclose(channels, amplitudes, atol=0.05)
