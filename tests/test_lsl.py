"""LSL streams on loopback: markers, the data inlet, and a missing stream."""

from __future__ import annotations

import time

import numpy as np
import pylsl
import pytest

from acquisition.errors import StreamNotFoundError
from acquisition.lsl import DataInlet, MarkerOutlet, decode_marker, encode_marker


def data_outlet(name, n_channels=4, sfreq=500.0):
    info = pylsl.StreamInfo(name, "ECoG", n_channels, sfreq, pylsl.cf_float32, name + "-src")
    channels = info.desc().append_child("channels")
    for index in range(n_channels):
        channels.append_child("channel").append_child_value("label", f"C{index}")
    return pylsl.StreamOutlet(info)


def pull_until(inlet, n_samples, timeout_s=5.0):
    data, times = [], []
    deadline = time.monotonic() + timeout_s
    while sum(len(t) for t in times) < n_samples and time.monotonic() < deadline:
        chunk, stamps = inlet.pull()
        if len(stamps):
            data.append(chunk)
            times.append(stamps)
        time.sleep(0.01)
    return np.concatenate(data), np.concatenate(times)


def test_data_inlet_receives_every_sample(unique_name):
    outlet = data_outlet(unique_name)
    inlet = DataInlet(unique_name, timeout_s=5.0)
    assert inlet.description.channel_names == ("C0", "C1", "C2", "C3")
    assert inlet.description.sfreq == 500.0
    time.sleep(0.2)
    sent = np.arange(2000 * 4, dtype=np.float32).reshape(2000, 4)
    stamps = pylsl.local_clock() + np.arange(2000) / 500.0
    for start in range(0, 2000, 100):
        outlet.push_chunk(sent[start:start + 100], stamps[start:start + 100])
    data, times = pull_until(inlet, 2000)
    inlet.close()
    del outlet
    np.testing.assert_array_equal(data, sent)
    # Same host: the clock correction is tiny (liblsl measured tens of microseconds here).
    np.testing.assert_allclose(times, stamps, atol=0.005)


def test_marker_round_trip_keeps_text(unique_name):
    outlet = MarkerOutlet(unique_name, unique_name + "-src")
    found = pylsl.resolve_byprop("name", unique_name, 1, 5.0)
    inlet = pylsl.StreamInlet(found[0])
    inlet.open_stream(timeout=5.0)
    time.sleep(0.2)
    event = {"type": "onset", "trial": 3, "text": "Café crème für Jürgen.", "condition": "drive"}
    sent_text = outlet.push(event, 1234.5)
    sample, stamp = inlet.pull_sample(timeout=5.0)
    inlet.close_stream()
    assert sample[0] == sent_text == encode_marker(event)
    assert decode_marker(sample[0]) == event
    assert stamp == pytest.approx(1234.5, abs=0.01)


def test_missing_stream_raises_with_advice(unique_name):
    started = time.monotonic()
    with pytest.raises(StreamNotFoundError, match=r"No LSL stream named .* within 0.5 s"):
        DataInlet(unique_name + "-absent", timeout_s=0.5)
    # One-sided bound: the call must return near its timeout, not block (30 s allows a busy CI host).
    assert time.monotonic() - started < 30.0


def test_decode_marker_rejects_non_objects():
    with pytest.raises(ValueError, match="not a JSON object"):
        decode_marker("[1, 2]")


def numeric_outlet(name, channel_format, n_channels=5, sfreq=1000.0):
    info = pylsl.StreamInfo(name, "ECoG", n_channels, sfreq, channel_format, name + "-src")
    return pylsl.StreamOutlet(info)


def pull_waiting(inlet, n_samples, max_samples=65536, timeout_s=10.0):
    """Collect ``n_samples`` with waiting pulls and return data, times and each pull's row count."""
    data, times, counts = [], [], []
    deadline = time.monotonic() + timeout_s
    while sum(counts) < n_samples and time.monotonic() < deadline:
        chunk, stamps = inlet.pull(max_samples=max_samples, timeout_s=1.0)
        assert chunk.dtype == np.float32
        assert stamps.dtype == np.float64
        assert len(chunk) == len(stamps)
        if len(stamps):
            data.append(chunk)
            times.append(stamps)
            counts.append(len(stamps))
    return np.concatenate(data), np.concatenate(times), counts


@pytest.mark.parametrize("buffer_samples", [1, 7, DataInlet.PULL_BUFFER_SAMPLES])
def test_waiting_pull_returns_exact_samples(unique_name, monkeypatch, buffer_samples):
    # 2,100 samples exceed every buffer size here, so the pulls refill the buffer.
    monkeypatch.setattr(DataInlet, "PULL_BUFFER_SAMPLES", buffer_samples)
    outlet = numeric_outlet(unique_name, pylsl.cf_float32)
    inlet = DataInlet(unique_name, timeout_s=5.0)
    sent = np.random.default_rng(3).standard_normal((2100, 5)).astype(np.float32)
    stamps = pylsl.local_clock() + np.arange(2100) / 1000.0
    for start in range(0, 2100, 700):
        outlet.push_chunk(sent[start:start + 700], stamps[start:start + 700])
    data, times, _ = pull_waiting(inlet, 2100)
    leftover, _ = inlet.pull()
    inlet.close()
    del outlet
    assert data.shape == (2100, 5)
    np.testing.assert_array_equal(data, sent)
    # Same host: only liblsl's clock correction (tens of microseconds) separates the times.
    np.testing.assert_allclose(times, stamps, atol=0.005)
    assert len(leftover) == 0


def test_pull_respects_max_samples(unique_name, monkeypatch):
    # A 7-row buffer makes each pull of up to 20 samples span three liblsl calls.
    monkeypatch.setattr(DataInlet, "PULL_BUFFER_SAMPLES", 7)
    outlet = numeric_outlet(unique_name, pylsl.cf_float32)
    inlet = DataInlet(unique_name, timeout_s=5.0)
    sent = np.arange(500 * 5, dtype=np.float32).reshape(500, 5)
    outlet.push_chunk(sent)
    data, _, counts = pull_waiting(inlet, 500, max_samples=20)
    inlet.close()
    del outlet
    assert max(counts) <= 20
    np.testing.assert_array_equal(data, sent)


@pytest.mark.parametrize("channel_format", [pylsl.cf_double64, pylsl.cf_int16, pylsl.cf_int32])
def test_pull_converts_numeric_formats(unique_name, channel_format):
    outlet = numeric_outlet(unique_name, channel_format)
    inlet = DataInlet(unique_name, timeout_s=5.0)
    # Integers up to 1,500 are exact in every format here and in float32.
    sent = np.arange(300 * 5).reshape(300, 5) - 200
    outlet.push_chunk(sent)
    data, _, _ = pull_waiting(inlet, 300)
    inlet.close()
    del outlet
    np.testing.assert_array_equal(data, sent.astype(np.float32))


def test_waiting_pull_returns_first_sample(unique_name):
    outlet = numeric_outlet(unique_name, pylsl.cf_float32)
    inlet = DataInlet(unique_name, timeout_s=5.0)
    outlet.push_sample([1.0, 2.0, 3.0, 4.0, 5.0])
    started = time.monotonic()
    data, stamps = inlet.pull(timeout_s=30.0)
    elapsed_s = time.monotonic() - started
    inlet.close()
    del outlet
    np.testing.assert_array_equal(data, [[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert len(stamps) == 1
    # One-sided: a pull that waited for max_samples would take the whole 30 s timeout.
    assert elapsed_s < 15.0


def test_waiting_pull_times_out_empty(unique_name):
    outlet = numeric_outlet(unique_name, pylsl.cf_float32)
    inlet = DataInlet(unique_name, timeout_s=5.0)
    started = time.monotonic()
    data, stamps = inlet.pull(timeout_s=0.3)
    elapsed_s = time.monotonic() - started
    inlet.close()
    del outlet
    assert data.shape == (0, 5)
    assert data.dtype == np.float32
    assert stamps.shape == (0,)
    # liblsl waits until its deadline on the same monotonic clock, so the wait is not cut short.
    assert elapsed_s >= 0.3 * 0.9
    # One-sided: the wait must end near its timeout (15 s allows a busy CI host).
    assert elapsed_s < 15.0


def test_pull_rejects_invalid_arguments(unique_name):
    outlet = numeric_outlet(unique_name, pylsl.cf_float32)
    inlet = DataInlet(unique_name, timeout_s=5.0)
    with pytest.raises(ValueError, match="max_samples must be at least 1, got 0"):
        inlet.pull(max_samples=0)
    with pytest.raises(ValueError, match="timeout_s must be 0 .* or positive, got -1"):
        inlet.pull(timeout_s=-1.0)
    inlet.close()
    del outlet


def test_data_inlet_rejects_string_stream(unique_name):
    outlet = MarkerOutlet(unique_name, unique_name + "-src")
    with pytest.raises(ValueError, match="not numeric"):
        DataInlet(unique_name, timeout_s=5.0)
    outlet.close()
