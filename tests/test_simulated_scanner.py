"""Tests of the simulated scanner's BOLD model (pure) and its settings from a rig file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from acquisition.hrf import canonical_hrf, event_regressors
from acquisition.simulated_scanner import BASELINE_SIGNAL, BoldRenderer, ScannerConfig, scanner_config
from loop.config import load_rig

REPO = Path(__file__).resolve().parent.parent


def make_config(**changes) -> ScannerConfig:
    settings = {"marker_stream": "m", "trigger_stream": "t", "zmq_address": "tcp://127.0.0.1:1",
                "roi_names": ("language", "control"), "target_roi": "language", "pool_file": "",
                "pool_n_words": None, "log_file": "", "lsl_config": None}
    return ScannerConfig(**(settings | changes))


def test_hrf_peaks_at_five_seconds():
    times = np.arange(0.0, 32.0, 0.01)
    hrf = canonical_hrf(times)
    assert times[hrf.argmax()] == pytest.approx(5.0, abs=0.01)
    assert np.trapezoid(hrf, times) == pytest.approx(1.0, abs=1e-3)
    assert hrf[times > 10].min() < 0, "no undershoot"


def test_sustained_boxcar_reaches_one():
    regressor = event_regressors(np.array([0.0]), np.array([200.0]), np.array([60.0, 150.0]))
    np.testing.assert_allclose(regressor[:, 0], [1.0, 1.0], atol=1e-6)


def test_noise_free_bold_is_baseline_drift_and_responses():
    config = make_config(drift_per_minute=0.6)
    renderer = BoldRenderer(config)
    amplitudes = [renderer.add_onset(4.0, 2.0, 1.0), renderer.add_onset(9.0, 2.0, -2.0)]
    np.testing.assert_allclose(amplitudes[0], [1.5, 1.0])
    np.testing.assert_allclose(amplitudes[1], [0.0, 1.0])

    time_s = 11.0
    regressors = event_regressors(np.array([4.0, 9.0]), np.array([2.0, 2.0]), np.array([time_s]))[0]
    expected = BASELINE_SIGNAL + 0.6 * time_s / 60 + regressors @ np.array(amplitudes)
    np.testing.assert_allclose(renderer.noise_free(time_s), expected, rtol=0, atol=1e-12)


def test_noise_has_configured_sd():
    config = make_config(thermal_noise_sd=0.4, physiological_noise_sd=0.0, drift_per_minute=0.0)
    renderer = BoldRenderer(config)
    times = np.arange(2000) * 2.0
    noise = np.array([renderer.volume(t) for t in times]) - BASELINE_SIGNAL
    # 2000 draws: the SD estimate is within 5% of 0.4 with probability far above 0.999.
    np.testing.assert_allclose(noise.std(axis=0), [0.4, 0.4], rtol=0.05)


def test_config_from_rig_file():
    rig = load_rig(REPO / "hardware_configs" / "simulated_fmri.toml")
    config = scanner_config(rig, 4.0, marker_stream="m", pool_file="p", pool_n_words=6,
                            log_file="l", lsl_config=None)
    assert config.roi_names == ("language", "control")
    assert config.tr_s == 2.0
    assert config.speed == 4.0
    assert config.n_dummy_scans == 4
    assert config.zmq_address == "tcp://127.0.0.1:5571"
    assert config.trigger_stream == "neurosteer-scanner-triggers"


def test_written_volumes_give_roi_values(tmp_path):
    from acquisition.simulated_scanner import write_roi_masks, write_roi_volume
    from acquisition.volumes import RoiMasks, VolumeWatcher

    masks = RoiMasks.from_files(write_roi_masks(tmp_path / "masks", ("language", "control")))
    folder = tmp_path / "volumes"
    folder.mkdir()
    values = {0: np.array([101.25, 99.5]), 1: np.array([102.0, 98.75])}
    for tr_index in (1, 0):
        write_roi_volume(folder, tr_index, values[tr_index])
    watcher = VolumeWatcher(folder, "vol_{tr:04d}.nii", settle_s=0.0)
    volumes = watcher.poll(0.0)
    assert [volume.tr_index for volume in volumes] == [0, 1]
    for volume in volumes:
        assert masks.roi_means(volume.data).tolist() == values[volume.tr_index].tolist()
