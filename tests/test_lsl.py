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
