"""Tests of scanner pulse counting, the TR cross-check, and the key, LSL and serial pulse sources."""

from __future__ import annotations

import logging
import time

import pylsl
import pytest

from acquisition.errors import StreamLostError
from acquisition.lsl import MarkerOutlet
from acquisition.scanner import (
    IntervalKind,
    IrregularInterval,
    LSLTriggerSource,
    SerialTriggerSource,
    TriggerCounter,
    TriggerCrossCheck,
    TriggerMismatchError,
    TriggerSource,
    TriggerTimeoutError,
    wait_for_first_pulse,
)
from loop.clock import SteppedClock

TR_S = 2.0
POLL_TIMEOUT_S = 5.0


def poll_until(source: TriggerSource, n_pulses: int, timeout_s: float = POLL_TIMEOUT_S) -> list[float]:
    """Poll ``source`` until it has returned ``n_pulses`` pulses, or fail at the deadline."""
    pulses: list[float] = []
    deadline = time.monotonic() + timeout_s
    while len(pulses) < n_pulses:
        if time.monotonic() > deadline:
            pytest.fail(f"Got {len(pulses)} of {n_pulses} pulses from {source.description} in {timeout_s} s.")
        pulses.extend(source.poll())
        time.sleep(0.001)
    return pulses


def run_scanner(check: TriggerCrossCheck, pulse_times: list[float],
                messages: list[tuple[int, float]]) -> list:
    """Feed pulses and TR messages to ``check`` in time order, as a session loop would.

    Each message is ``(tr_index, arrival_time_s)``. Pulses up to an arrival are counted before it is
    checked. Returns what check_tr returned for each message.
    """
    results = []
    pending = list(pulse_times)
    for tr_index, arrival_time_s in messages:
        while pending and pending[0] <= arrival_time_s:
            check.counter.add_pulse(pending.pop(0))
        results.append(check.check_tr(tr_index, arrival_time_s))
    return results


# TriggerCounter


def test_counter_numbers_dummies_negative() -> None:
    counter = TriggerCounter(TR_S, n_dummy_scans=2)

    assert [counter.add_pulse(time_s) for time_s in (10.0, 12.0)] == [-2, -1]
    assert counter.first_volume_time is None
    assert counter.n_volumes == 0

    assert [counter.add_pulse(time_s) for time_s in (14.0, 16.0)] == [0, 1]
    assert counter.first_volume_time == 14.0
    assert counter.volume_time(-2) == 10.0
    assert counter.volume_time(1) == 16.0
    assert counter.volume_time(2) is None
    assert counter.expected_volume_time(5) == 24.0
    assert counter.n_pulses == 4
    assert counter.n_volumes == 2
    assert counter.irregular_intervals == []


def test_counter_before_first_volume() -> None:
    counter = TriggerCounter(TR_S, n_dummy_scans=1)
    counter.add_pulse(10.0)

    with pytest.raises(RuntimeError, match="Volume 0 has not started: 1 of 1 dummy-scan pulses counted"):
        counter.expected_volume_time(0)
    with pytest.raises(ValueError, match="tr_index -2 is before the first dummy scan"):
        counter.volume_time(-2)


def test_counter_flags_missed_pulse(caplog: pytest.LogCaptureFixture) -> None:
    counter = TriggerCounter(TR_S)

    with caplog.at_level(logging.WARNING, logger="acquisition.scanner"):
        indices = [counter.add_pulse(time_s) for time_s in (0.0, 2.0, 6.0, 8.0, 14.0)]

    # The pulses keep their count: nothing is inserted for the missing ones.
    assert indices == [0, 1, 2, 3, 4]
    assert counter.irregular_intervals == [
        IrregularInterval(IntervalKind.MISSED, 2, 2.0, 6.0, 4.0, n_missed=1),
        IrregularInterval(IntervalKind.MISSED, 4, 8.0, 14.0, 6.0, n_missed=2),
    ]
    assert counter.n_missed_pulses == 3
    assert counter.n_extra_pulses == 0
    assert len(caplog.records) == 2
    assert "volume 2 came 4.0000 s after the one at 2.0000 s, which is 2.00 TR" in caplog.records[0].message
    assert "later volume indices are 3 below the scanner's" in caplog.records[1].message


def test_counter_flags_extra_pulse(caplog: pytest.LogCaptureFixture) -> None:
    counter = TriggerCounter(TR_S)

    with caplog.at_level(logging.WARNING, logger="acquisition.scanner"):
        indices = [counter.add_pulse(time_s) for time_s in (0.0, 2.0, 2.5, 4.0, 6.0)]

    # The pulse at 4.0 s is one TR after 2.0 s, the last pulse not flagged as extra.
    assert indices == [0, 1, 2, 3, 4]
    assert counter.irregular_intervals == [IrregularInterval(IntervalKind.EXTRA, 2, 2.0, 2.5, 0.5)]
    assert counter.n_extra_pulses == 1
    assert counter.n_missed_pulses == 0
    assert len(caplog.records) == 1
    assert "an extra pulse" in caplog.records[0].message


def test_counter_flags_irregular_interval() -> None:
    counter = TriggerCounter(TR_S)

    for time_s in (0.0, 2.0, 5.0, 7.25):
        counter.add_pulse(time_s)

    # 7.25 - 5.0 = 1.125 TR is within the default tolerance of 0.25 TR.
    assert counter.irregular_intervals == [IrregularInterval(IntervalKind.IRREGULAR, 2, 2.0, 5.0, 3.0)]
    assert counter.n_irregular_intervals == 1


def test_counter_rejects_pulse_out_of_order() -> None:
    counter = TriggerCounter(TR_S)
    counter.add_pulse(10.0)

    with pytest.raises(ValueError, match="Pulse at 9.000000 s is before the last pulse at 10.000000 s"):
        counter.add_pulse(9.0)


# TriggerCrossCheck


def test_missed_first_trigger_detected() -> None:
    # The scanner started at 100 s, but the session began counting at its second pulse (102 s).
    scanner_pulses = [100.0 + TR_S * volume for volume in range(10)]
    check = TriggerCrossCheck(TriggerCounter(TR_S))
    messages = [(volume, scanner_pulses[volume] + 1.0) for volume in range(5)]

    with pytest.raises(TriggerMismatchError) as raised:
        run_scanner(check, scanner_pulses[1:], messages)

    error = raised.value
    assert error.offset_trs == 1
    assert error.tr_index == 1
    assert error.arrival_time_s == 103.0
    assert check.n_checked == 2
    assert check.n_mismatches == 2
    message = str(error)
    assert message.startswith(
        "The run is 1 TR off: the data's TR indices run 1 TR ahead of the counted scanner pulses"
    )
    assert "TR 0 arrived at 101.0000 s, before the pulse of volume 0 was counted (0 pulse(s) so far)." \
        in message
    assert "TR 1 arrived at 103.0000 s, before the pulse of volume 1 was counted (1 pulse(s) so far)." \
        in message
    assert "the first sync pulse was missed" in message
    assert "The volumes are not renumbered." in message


def test_missed_first_trigger_one_confirmation() -> None:
    scanner_pulses = [100.0 + TR_S * volume for volume in range(10)]
    check = TriggerCrossCheck(TriggerCounter(TR_S), n_confirm=1)

    with pytest.raises(TriggerMismatchError, match="The run is 1 TR off") as raised:
        run_scanner(check, scanner_pulses[1:], [(0, 101.0)])

    assert raised.value.tr_index == 0


def test_volumes_numbered_from_one_detected() -> None:
    pulses = [100.0 + TR_S * volume for volume in range(10)]
    check = TriggerCrossCheck(TriggerCounter(TR_S))
    messages = [(volume + 1, pulses[volume] + 1.0) for volume in range(5)]

    expected = "The run is 1 TR off: the data's TR indices run 1 TR ahead"
    with pytest.raises(TriggerMismatchError, match=expected) as raised:
        run_scanner(check, pulses, messages)

    assert raised.value.offset_trs == 1
    assert raised.value.tr_index == 2


def test_dummies_counted_as_volumes_detected() -> None:
    # The rig discards 3 dummy scans, but the pipeline numbers them as volumes 0 to 2.
    pulses = [100.0 + TR_S * pulse for pulse in range(12)]
    check = TriggerCrossCheck(TriggerCounter(TR_S, n_dummy_scans=3))
    messages = [(pulse, pulses[pulse] + 0.75) for pulse in range(6)]

    with pytest.raises(TriggerMismatchError) as raised:
        run_scanner(check, pulses, messages)

    assert raised.value.offset_trs == 3
    assert raised.value.tr_index == 1
    assert str(raised.value).startswith(
        "The run is 3 TR off: the data's TR indices run 3 TR ahead of the counted scanner pulses"
    )
    assert "counts dummy scans as volumes (the rig discards 3)" in str(raised.value)


def test_extra_dummies_discarded_detected() -> None:
    # The pipeline discards 4 volumes and the rig 2, so data TR i is the counter's volume i + 2.
    # A delay window under 1 TR contains one pulse per message, which makes the offset exact.
    pulses = [100.0 + TR_S * pulse for pulse in range(12)]
    counter = TriggerCounter(TR_S, n_dummy_scans=2)
    check = TriggerCrossCheck(counter, max_delay_trs=0.9)
    messages = [(volume, pulses[volume + 4] + 1.0) for volume in range(5)]

    with pytest.raises(TriggerMismatchError) as raised:
        run_scanner(check, pulses, messages)

    assert raised.value.offset_trs == -2
    assert str(raised.value).startswith(
        "The run is 2 TR off: the data's TR indices run 2 TR behind the counted scanner pulses"
    )
    message = str(raised.value)
    assert "TR 0 arrived at 109.0000 s, 2.50 TR after the pulse of volume 0 at 104.0000 s" in message
    assert "discards more dummy scans than the rig's n_dummy_scans (2)" in message


def test_normal_run_passes() -> None:
    # Processing delays from 0.3125 to 1.5 TR, as binary fractions so that the delays are exact.
    delays_s = [0.625, 1.0, 1.5, 2.0, 2.5, 3.0]
    pulses = [100.0 + TR_S * pulse for pulse in range(60)]
    check = TriggerCrossCheck(TriggerCounter(TR_S, n_dummy_scans=3))
    messages = [(volume, pulses[volume + 3] + delays_s[volume % 6]) for volume in range(50)]

    results = run_scanner(check, pulses, messages)

    assert results == [delays_s[volume % 6] for volume in range(50)]
    assert check.n_checked == 50
    assert check.n_mismatches == 0


def test_single_stall_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    pulses = [100.0 + TR_S * pulse for pulse in range(20)]
    check = TriggerCrossCheck(TriggerCounter(TR_S))
    # TR 3 arrives 3.5 TR after its pulse, later than max_delay_trs, and the run goes on.
    messages = [(volume, pulses[volume] + (7.0 if volume == 3 else 1.0)) for volume in range(10)]

    with caplog.at_level(logging.WARNING, logger="acquisition.scanner"):
        results = run_scanner(check, pulses, messages)

    assert results == [1.0, 1.0, 1.0, None, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert check.n_mismatches == 1
    assert [record.message for record in caplog.records] == [
        "TR 3 arrived at 113.0000 s, 3.50 TR after the pulse of volume 3 at 106.0000 s, outside the "
        "allowed 0 to 3 TR."
    ]


def test_missed_first_trigger_slow_pipeline() -> None:
    # With delays over 1 TR, the arrival times of a missed first trigger fit the default rule, so
    # only a minimum delay of 1 TR (no volume before its acquisition ends) reveals it.
    scanner_pulses = [100.0 + TR_S * volume for volume in range(10)]
    messages = [(volume, scanner_pulses[volume] + 2.5) for volume in range(5)]

    default_check = TriggerCrossCheck(TriggerCounter(TR_S))
    assert run_scanner(default_check, scanner_pulses[1:], messages) == [0.5] * 5

    strict_check = TriggerCrossCheck(TriggerCounter(TR_S), min_delay_trs=1.0)
    with pytest.raises(TriggerMismatchError, match="The run is 1 TR off") as raised:
        run_scanner(strict_check, scanner_pulses[1:], messages)
    assert raised.value.offset_trs == 1


def test_cross_check_rejects_bad_arguments() -> None:
    counter = TriggerCounter(TR_S)

    with pytest.raises(ValueError, match="min_delay_trs"):
        TriggerCrossCheck(counter, max_delay_trs=1.0, min_delay_trs=1.0)
    with pytest.raises(ValueError, match="tr_index must be an integer of 0 or more, got -1"):
        TriggerCrossCheck(counter).check_tr(-1, 100.0)


# Pulse sources


def test_lsl_source_reads_pulse_markers(unique_name: str) -> None:
    outlet = MarkerOutlet(unique_name, unique_name)
    source = LSLTriggerSource(unique_name, marker_type="pulse", timeout_s=POLL_TIMEOUT_S)
    try:
        assert outlet.wait_for_consumers(POLL_TIMEOUT_S)
        now = pylsl.local_clock()
        stamps = [now - 0.5, now - 0.25, now]
        outlet.push({"type": "pulse", "volume": 0}, stamps[0])
        outlet.push({"type": "onset", "trial": 0}, stamps[1])
        outlet.push({"type": "pulse", "volume": 1}, stamps[2])

        pulses = poll_until(source, 2)

        # pylsl updates time_correction() in the background, so the estimate may change between
        # two polls. Its docstring (pylsl 1.18) puts the precision below 1 ms.
        correction_s = source.clock_correction_s
        assert len(pulses) == 2
        assert abs(pulses[0] - (stamps[0] + correction_s)) < 0.001
        assert abs(pulses[1] - (stamps[2] + correction_s)) < 0.001
        assert source.n_ignored == 1
        # Both ends read this machine's clock, so the estimate is only the exchange's jitter.
        assert abs(correction_s) < 0.001
    finally:
        source.close()
        outlet.close()


def test_serial_source_stamps_bytes_in_order() -> None:
    source = SerialTriggerSource("loop://", 115200, b"5")
    try:
        pulses = []
        for payload in (b"5", b"x5", b"5"):
            before = pylsl.local_clock()
            source.port.write(payload)
            new_pulses = poll_until(source, 1)
            after = pylsl.local_clock()

            assert len(new_pulses) == 1
            # The reader stamps a byte after it was written and before poll() returned it.
            assert before <= new_pulses[0] <= after
            pulses.extend(new_pulses)

        assert pulses == sorted(pulses)
        assert source.n_ignored == 1
    finally:
        source.close()


def test_serial_source_manual_mode_exact() -> None:
    clock = SteppedClock(5.0)
    source = SerialTriggerSource("loop://", 9600, 0x35, clock=clock, start_thread=False)
    try:
        source.port.write(b"5a5")
        clock.advance(1.0)
        assert source.poll() == [6.0, 6.0]

        source.port.write(b"5")
        clock.advance(1.5)
        assert source.poll() == [7.5]
        assert source.poll() == []
        assert source.n_ignored == 1
    finally:
        source.close()


def test_serial_source_closed_port() -> None:
    source = SerialTriggerSource("loop://", 9600, b"5", start_thread=False)
    source.port.close()

    expected = "Reading serial port loop:// at 9600 baud, trigger byte 0x35 failed"
    with pytest.raises(StreamLostError, match=expected):
        source.poll()
    source.close()


@pytest.mark.parametrize("trigger_byte", [b"55", 256, -1])
def test_serial_source_rejects_trigger_byte(trigger_byte) -> None:
    with pytest.raises(ValueError, match="trigger_byte must be"):
        SerialTriggerSource("loop://", 9600, trigger_byte, start_thread=False)


# Waiting for the first pulse


def test_wait_for_first_pulse_timeout() -> None:
    clock = SteppedClock(10.0)
    source = SerialTriggerSource("loop://", 9600, b"5", clock=clock, start_thread=False)
    try:
        with pytest.raises(TriggerTimeoutError) as raised:
            wait_for_first_pulse(source, clock, timeout_s=1.0)
    finally:
        source.close()

    assert str(raised.value) == (
        "No scanner pulse arrived from serial port loop:// at 9600 baud, trigger byte 0x35 within 1 s. "
        "Check that the scanner sequence has started, that its trigger output reaches this computer, "
        "and that the rig's trigger settings name this input."
    )
    assert clock.now() == 11.0


def test_wait_for_first_pulse_skips_stale(caplog: pytest.LogCaptureFixture) -> None:
    clock = SteppedClock(5.0)
    source = SerialTriggerSource("loop://", 9600, b"5", clock=clock, start_thread=False)
    try:
        # A press at 5 s, before the wait, and two pulses read at 10 s, when the wait starts.
        source.port.write(b"5")
        source.acquire()
        clock.advance(5.0)
        source.port.write(b"55")

        with caplog.at_level(logging.WARNING, logger="acquisition.scanner"):
            first = wait_for_first_pulse(source, clock, timeout_s=1.0)

        assert first == 10.0
        assert source.poll() == [10.0]
        assert source.poll() == []
        assert len(caplog.records) == 1
        assert caplog.records[0].message.startswith("Discarded 1 scanner pulse(s) from serial port loop://")
    finally:
        source.close()
