"""Stream faults over real LSL on loopback: a stall, a gap, a slow consumer, another clock base.

A sender thread streams a known signal with a sample-index channel, so every lost or repeated
sample, and every response scored on the wrong samples, shows.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pylsl
import pytest

from acquisition.epochs import ResponseWindow
from acquisition.errors import ClockBaseError, EpochLostError, StreamLostError
from acquisition.lsl import DataInlet, check_clock_base
from acquisition.responses import LSLResponses
from loop.clock import LSLClock

SFREQ = 500.0
# The response window: 0.1 to 0.3 s after the onset, baseline 0.1 s before it.
WINDOW = ResponseWindow(0.1, 0.3, -0.1, 0.0)


class Sender(threading.Thread):
    """Streams channel 0 = the sample index, channel 1 = 1.0 inside [start, end) else 0.0."""

    def __init__(self, name, stamp=pylsl.local_clock):
        super().__init__(daemon=True)
        info = pylsl.StreamInfo(name, "ECoG", 2, SFREQ, pylsl.cf_float32, name + "-src")
        self.outlet = pylsl.StreamOutlet(info)
        # While set, nothing is sent, and the samples of that time are never sent.
        self.hold = threading.Event()
        self.stamp = stamp
        self.pulses: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self):
        start = self.stamp()
        index = 0
        paused = False
        while not self.stop.is_set():
            now = self.stamp()
            if self.hold.is_set():
                paused = True
                time.sleep(0.01)
                continue
            if paused:
                # The sender came back: samples resume at the current time, none for the pause.
                index = int((now - start) * SFREQ)
                paused = False
            n_due = int((now - start) * SFREQ) - index
            if n_due > 0:
                times = start + (index + np.arange(n_due)) / SFREQ
                level = np.array([any(a <= t < b for a, b in self.pulses) for t in times], float)
                data = np.column_stack([index + np.arange(n_due), level]).astype(np.float32)
                self.outlet.push_chunk(data, times)
                index += n_due
            time.sleep(0.005)


@pytest.fixture
def sender_factory():
    senders = []

    def make(name, **options):
        sender = Sender(name, **options)
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.stop.set()
        sender.join(2.0)


def test_unix_time_stream_is_refused(unique_name, sender_factory):
    sender = sender_factory(unique_name, stamp=time.time)
    sender.start()
    inlet = DataInlet(unique_name, timeout_s=5.0)
    try:
        with pytest.raises(ClockBaseError, match="It looks like Unix time.*pylsl.local_clock"):
            check_clock_base(inlet, pylsl.local_clock, 5.0)
    finally:
        inlet.close()


def test_lsl_clock_stream_is_accepted(unique_name, sender_factory):
    sender = sender_factory(unique_name)
    sender.start()
    inlet = DataInlet(unique_name, timeout_s=5.0)
    try:
        data, times = check_clock_base(inlet, pylsl.local_clock, 5.0)
    finally:
        inlet.close()
    assert len(times) >= 1
    assert abs(times[-1] - pylsl.local_clock()) < 1.0
    assert data[0, 0] >= 0


def collect_trial(responses, sender, onset):
    # The pulse spans the response window with 50 ms to spare each side, so that the clock offset
    # between sender and receiver cannot move a sample at the window's edge out of it.
    sender.pulses.append((onset + 0.05, onset + 0.35))
    return responses.collect(onset)


def test_stall_reported_gap_flagged_and_stream_resumes(unique_name, sender_factory):
    sender = sender_factory(unique_name)
    sender.start()
    inlet = DataInlet(unique_name, timeout_s=5.0)
    faults, gaps, stalls, chunks = [], [], [], []
    clock = LSLClock()
    responses = LSLResponses(
        inlet, WINDOW, clock, on_chunk=lambda data, times: chunks.append(data[:, 0].copy()),
        stall_report_s=0.5, reconnect_timeout_s=10.0,
        on_fault=lambda time_, kind, message: faults.append((time_, kind, message)),
        on_gap=lambda start, end: gaps.append((start, end)), on_stall=lambda: stalls.append(1))
    try:
        # A trial before the pause is scored: the pulse is 1.0 in its window, 0.0 in its baseline.
        before = collect_trial(responses, sender, clock.now() + 0.2)
        # This trial's window falls in a 2.5 s pause: it is lost, not scored on the samples
        # around it.
        sender.hold.set()
        threading.Timer(2.5, sender.hold.clear).start()
        with pytest.raises(EpochLostError, match="overlap the gap"):
            collect_trial(responses, sender, clock.now() + 0.2)
        after = collect_trial(responses, sender, clock.now() + 0.2)
    finally:
        inlet.close()

    assert before[1] == pytest.approx(1.0)
    assert after[1] == pytest.approx(1.0)
    kinds = [kind for _, kind, _ in faults]
    assert kinds == ["stream_stalled", "stream_gap", "stream_resumed"]
    assert stalls == [1]
    # The stall was reported about 0.5 s after the last sample, far less than the 2.5 s pause.
    (gap_start, gap_end), = gaps
    stalled_at = faults[0][0]
    assert 0.5 <= stalled_at - gap_start < 1.0
    assert gap_end - gap_start == pytest.approx(2.5, abs=0.1)
    # No sample repeated, and the only missing ones are those of the pause.
    indices = np.concatenate(chunks).astype(int)
    steps = np.diff(indices)
    assert (steps >= 1).all()
    assert np.count_nonzero(steps > 1) == 1


def test_slow_consumer_catches_up_without_loss(unique_name, sender_factory):
    sender = sender_factory(unique_name)
    sender.start()
    inlet = DataInlet(unique_name, timeout_s=5.0)
    chunks = []
    clock = LSLClock()
    responses = LSLResponses(inlet, WINDOW, clock,
                             on_chunk=lambda data, times: chunks.append(data[:, 0].copy()))
    try:
        first = collect_trial(responses, sender, clock.now() + 0.2)
        # A slow model fit: nothing is pulled for 3 s while the stream goes on.
        time.sleep(3.0)
        onset = clock.now() + 0.2
        second = collect_trial(responses, sender, onset)
    finally:
        inlet.close()
    assert first[1] == pytest.approx(1.0)
    assert second[1] == pytest.approx(1.0)
    indices = np.concatenate(chunks).astype(int)
    np.testing.assert_array_equal(indices, np.arange(indices[0], indices[0] + len(indices)))
    # The second trial was scored on samples after its onset, not on the backlog.
    assert responses.buffer.last_time >= onset + WINDOW.end_s


def test_stream_that_never_returns_stops_the_session(unique_name, sender_factory):
    sender = sender_factory(unique_name)
    sender.start()
    inlet = DataInlet(unique_name, timeout_s=5.0)
    sender.hold.set()
    clock = LSLClock()
    responses = LSLResponses(inlet, WINDOW, clock, stall_report_s=0.3, reconnect_timeout_s=1.5)
    try:
        with pytest.raises(StreamLostError, match="neurosteer resume SESSION.h5"):
            collect_trial(responses, sender, clock.now() + 1.0)
    finally:
        inlet.close()
