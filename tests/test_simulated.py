"""The simulated subject's response model: amplitudes and single-trial signal-to-noise ratio."""

from __future__ import annotations

import numpy as np
import pytest

from acquisition.epochs import ResponseWindow, epoch_response
from acquisition.simulated import EcogRenderer, SimulatorConfig, channel_names


def config(**changes):
    base = dict(data_stream="d", marker_stream="m", source_id="s", pool_file="", log_file="",
                pool_n_words=None, lsl_config=None, n_channels=8, sfreq=1000.0,
                target_channels=(1, 4), snr=0.3, signal_sd=1.0, mean_level=2.0,
                latency_s=0.1, response_duration_s=1.0, baseline_s=0.5, seed=3)
    base.update(changes)
    return SimulatorConfig(**base)


def test_amplitudes_only_on_target_channels():
    renderer = EcogRenderer(config())
    amplitudes = renderer.amplitudes(1.5)
    assert np.flatnonzero(amplitudes).tolist() == [1, 4]
    np.testing.assert_allclose(amplitudes[[1, 4]], renderer.gains[[1, 4]] * 3.5)
    assert all(0.8 <= gain <= 1.2 for gain in renderer.gains[[1, 4]])


def test_noise_free_response_recovered_by_epoching():
    renderer = EcogRenderer(config(snr=1e9))
    times = 50.0 + np.arange(4000) / 1000.0
    renderer.add_onset(51.0, truth_z=-0.5)
    data = renderer.render(times)
    window = ResponseWindow(0.1, 1.1, -0.5, 0.0)
    response = epoch_response(data.astype(np.float64), times, 51.0, window, 1000.0)
    np.testing.assert_allclose(response[[1, 4]], renderer.gains[[1, 4]] * 1.5, rtol=1e-5)
    np.testing.assert_allclose(response[[0, 2, 3, 5, 6, 7]], 0.0, atol=1e-6)


@pytest.mark.parametrize("speed", [1.0, 10.0])
def test_single_trial_snr_matches_setting(speed):
    renderer = EcogRenderer(config(speed=speed, n_channels=64, target_channels=(0,)))
    duration = 400 * 1.6 / speed
    times = np.arange(int(duration * 1000)) / 1000.0
    data = renderer.render(times).astype(np.float64)
    window = ResponseWindow(0.1, 1.1, -0.5, 0.0).scaled(speed)
    onsets = 0.6 / speed + np.arange(399) * 1.6 / speed
    noise = np.array([epoch_response(data, times, onset, window, 1000.0) for onset in onsets])
    # 399 trials x 64 channels: the SD estimate is within about 1% of its true value.
    assert noise.std() == pytest.approx(1.0 / 0.3, rel=0.03)


def test_channel_names():
    assert channel_names(3) == ["ECOG001", "ECOG002", "ECOG003"]
