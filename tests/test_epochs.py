"""Epoching against a synthetic stream with known onsets and known responses."""

from __future__ import annotations

import numpy as np
import pytest

from acquisition.epochs import IncompleteEpochError, ResponseWindow, StreamBuffer, epoch_response

SFREQ = 1000.0
WINDOW = ResponseWindow(tmin_s=0.1, tmax_s=0.6, baseline_start_s=-0.2, baseline_end_s=0.0)


def synthetic_stream(onsets, steps, duration_s=10.0, offset=0.0):
    times = 100.0 + np.arange(int(duration_s * SFREQ)) / SFREQ
    data = np.full((len(times), 3), offset, dtype=np.float64)
    data[:, 2] += 5.0 * np.sin(times)  # slow drift on one channel
    for onset, step in zip(onsets, steps, strict=True):
        active = (times >= onset + 0.1) & (times < onset + 0.6)
        data[active, :2] += step
    return data, times


def test_epoch_returns_known_steps():
    onsets = [101.0, 103.5, 106.25]
    steps = [np.array([2.0, -1.0]), np.array([0.5, 4.0]), np.array([-3.0, 0.0])]
    data, times = synthetic_stream(onsets, steps, offset=7.0)
    for onset, step in zip(onsets, steps, strict=True):
        response = epoch_response(data, times, onset, WINDOW, SFREQ)
        np.testing.assert_allclose(response[:2], step, atol=1e-12)


def test_epoch_baseline_removes_offset():
    data, times = synthetic_stream([102.0], [np.array([1.0, 1.0])], offset=50.0)
    response = epoch_response(data, times, 102.0, WINDOW, SFREQ)
    window = (times >= 102.1) & (times < 102.6)
    baseline = (times >= 101.8) & (times < 102.0)
    expected_drift = data[window, 2].mean() - data[baseline, 2].mean()
    assert response[2] == pytest.approx(expected_drift, abs=1e-12)
    assert response[0] == pytest.approx(1.0, abs=1e-12)


def test_epoch_incomplete_raises():
    data, times = synthetic_stream([101.0], [np.array([1.0, 1.0])], duration_s=1.3)
    with pytest.raises(IncompleteEpochError, match="samples in"):
        epoch_response(data, times, 100.95, WINDOW, SFREQ)


def test_epoch_gap_in_window_raises():
    data, times = synthetic_stream([103.0], [np.array([1.0, 1.0])])
    keep = (times < 103.2) | (times > 103.5)
    with pytest.raises(IncompleteEpochError):
        epoch_response(data[keep], times[keep], 103.0, WINDOW, SFREQ)


def test_buffer_epochs_across_chunks():
    onsets = [101.0, 104.0]
    steps = [np.array([1.5, 2.5]), np.array([-0.5, 3.0])]
    data, times = synthetic_stream(onsets, steps)
    buffer = StreamBuffer(n_channels=3, sfreq=SFREQ, keep_s=3.0)
    responses = []
    for start in range(0, len(times), 37):
        buffer.append(data[start:start + 37], times[start:start + 37])
        pending = [o for o in onsets if o + WINDOW.end_s <= buffer.last_time
                   and len(responses) < len(onsets) and o == onsets[len(responses)]]
        for onset in pending:
            responses.append(buffer.response(onset, WINDOW))
    assert len(responses) == 2
    for response, step in zip(responses, steps, strict=True):
        np.testing.assert_allclose(response[:2], step, atol=1e-12)


def test_window_scaled_by_speed():
    scaled = WINDOW.scaled(10.0)
    assert (scaled.tmin_s, scaled.tmax_s) == pytest.approx((0.01, 0.06))
    assert (scaled.baseline_start_s, scaled.baseline_end_s) == pytest.approx((-0.02, 0.0))
