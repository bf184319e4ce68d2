"""Scanner sync pulses: their sources, their count, and the check against the data's TR indices.

Runs in the controller process. The pulse sources read a queue of key presses that the window's
frame loop fills (default key '5'), an LSL marker stream (the simulated scanner, or a TTL-to-LSL
bridge) or a serial line. Each returns every pulse with its own timestamp on the session clock (this
machine's LSL clock). :class:`TriggerCounter`
and :class:`TriggerCrossCheck` are pure: they take times as arguments and read no clock.
Timing alone cannot reveal every offset, and :class:`TriggerCrossCheck` documents which ones it detects.
"""

from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from acquisition.errors import StreamLostError
from acquisition.lsl import decode_marker, resolve_stream

if TYPE_CHECKING:
    from loop.clock import Clock

logger = logging.getLogger(__name__)

# Irregular intervals are logged for the first few of each kind, then once per this many.
REPEAT_LOG_FIRST = 5
REPEAT_LOG_EVERY = 100

# The serial reader thread blocks for at most this long per read, so close() returns within it.
SERIAL_READ_TIMEOUT_S = 0.05

# Seconds that wait_for_first_pulse sleeps between polls. A pulse keeps its own timestamp, so this
# only delays the return.
DEFAULT_POLL_INTERVAL_S = 0.002


class TriggerMismatchError(RuntimeError):
    """The data's TR indices do not match the counted scanner pulses.

    ``offset_trs`` is the data's TR index minus the volume index of the pulse that the arrival
    times fit, or None when no single offset fits them.
    """

    def __init__(self, message: str, offset_trs: int | None, tr_index: int, arrival_time_s: float) -> None:
        super().__init__(message)
        self.offset_trs = offset_trs
        self.tr_index = tr_index
        self.arrival_time_s = arrival_time_s


class TriggerTimeoutError(TimeoutError):
    """No scanner sync pulse arrived before the deadline."""


# Counting pulses


class IntervalKind(StrEnum):
    """Kind of an interval between two pulses that is not one TR."""

    MISSED = "missed"
    EXTRA = "extra"
    IRREGULAR = "irregular"


@dataclass(frozen=True)
class IrregularInterval:
    """An interval between pulses that is not one TR, as :class:`TriggerCounter` flagged it.

    ``volume_index`` is the index that the counter gave the pulse ending the interval.
    ``n_missed`` is the number of pulses that a MISSED interval lacks (1 for about 2 TR).
    """

    kind: IntervalKind
    volume_index: int
    start_s: float
    end_s: float
    interval_s: float
    n_missed: int = 0


class TriggerCounter:
    """Counts scanner sync pulses and numbers them as volumes, after ``n_dummy_scans`` dummies.

    The first ``n_dummy_scans`` pulses are the dummy scans and get the negative indices
    ``-n_dummy_scans`` to ``-1``, so the pulse of volume 0 is the first one after them. Every pulse
    gets the next index, including one that arrives too early: the counter flags irregular
    intervals but never renumbers the pulses.

    Each interval is measured from the last pulse that was not flagged as extra, in units of
    ``tr_s``. Within ``interval_tolerance`` of 1 it is regular. Below that it is EXTRA, for example a
    bouncing contact or a second pulse per volume. Within the tolerance of an integer n >= 2 it is
    MISSED and lacks n - 1 pulses. Anything else is IRREGULAR. Every flagged interval is stored in
    ``irregular_intervals`` and logged at WARNING.
    """

    def __init__(self, tr_s: float, n_dummy_scans: int = 0, interval_tolerance: float = 0.25) -> None:
        if not (math.isfinite(tr_s) and tr_s > 0):
            raise ValueError(f"tr_s must be a positive number of seconds, got {tr_s!r}.")
        if n_dummy_scans < 0:
            raise ValueError(f"n_dummy_scans must be 0 or more, got {n_dummy_scans!r}.")
        if not 0 < interval_tolerance < 0.5:
            raise ValueError(
                f"interval_tolerance must be between 0 and 0.5 TR, got {interval_tolerance!r}, "
                "because intervals of 1 and 2 TR must not both fall within it."
            )
        self.tr_s = tr_s
        self.n_dummy_scans = n_dummy_scans
        self.interval_tolerance = interval_tolerance
        self.pulse_times: list[float] = []
        """Time of every pulse counted, dummies included, in the order they were added."""
        self.irregular_intervals: list[IrregularInterval] = []
        self.n_missed_pulses = 0
        self.n_extra_pulses = 0
        self.n_irregular_intervals = 0
        # Intervals are measured from this pulse, the last one not flagged as extra.
        self._reference_time_s: float | None = None

    @property
    def n_pulses(self) -> int:
        """Pulses counted so far, dummies included."""
        return len(self.pulse_times)

    @property
    def n_volumes(self) -> int:
        """Volumes counted so far, dummies excluded."""
        return max(0, len(self.pulse_times) - self.n_dummy_scans)

    @property
    def first_volume_time(self) -> float | None:
        """Time of the pulse of volume 0 (the first after the dummies), or None before it."""
        return self.volume_time(0)

    def add_pulse(self, time_s: float) -> int:
        """Count a pulse at ``time_s`` and return its volume index (negative for a dummy scan).

        Raises ValueError for a time before the last pulse, because sources return pulses in order.
        """
        if not math.isfinite(time_s):
            raise ValueError(f"time_s must be a finite time in seconds, got {time_s!r}.")
        if self.pulse_times and time_s < self.pulse_times[-1]:
            raise ValueError(
                f"Pulse at {time_s:.6f} s is before the last pulse at {self.pulse_times[-1]:.6f} s. "
                "Add pulses in the order of their times."
            )
        volume_index = len(self.pulse_times) - self.n_dummy_scans
        self.pulse_times.append(time_s)

        if self._reference_time_s is None:
            self._reference_time_s = time_s
            return volume_index
        flagged = self._classify_interval(self._reference_time_s, time_s, volume_index)
        if flagged is None or flagged.kind != IntervalKind.EXTRA:
            self._reference_time_s = time_s
        if flagged is not None:
            self._record(flagged)
        return volume_index

    def volume_time(self, tr_index: int) -> float | None:
        """Return the time of the pulse counted as volume ``tr_index``, or None before it arrives.

        Negative indices down to ``-n_dummy_scans`` are the dummy scans.
        """
        pulse_number = tr_index + self.n_dummy_scans
        if pulse_number < 0:
            raise ValueError(
                f"tr_index {tr_index} is before the first dummy scan (index {-self.n_dummy_scans})."
            )
        if pulse_number >= len(self.pulse_times):
            return None
        return self.pulse_times[pulse_number]

    def expected_volume_time(self, tr_index: int) -> float:
        """Return ``first_volume_time + tr_index * tr_s``: when volume ``tr_index`` should start.

        Raises RuntimeError before the pulse of volume 0 has been counted.
        """
        first = self.first_volume_time
        if first is None:
            raise RuntimeError(
                f"Volume 0 has not started: {self.n_pulses} of {self.n_dummy_scans} dummy-scan "
                "pulses counted. Wait for the first volume's pulse before scheduling on it."
            )
        return first + tr_index * self.tr_s

    def _classify_interval(self, start_s: float, end_s: float, volume_index: int) -> IrregularInterval | None:
        interval_s = end_s - start_s
        ratio = interval_s / self.tr_s
        nearest = round(ratio)
        if ratio < 1 - self.interval_tolerance:
            kind, n_missed = IntervalKind.EXTRA, 0
        elif abs(ratio - nearest) > self.interval_tolerance:
            kind, n_missed = IntervalKind.IRREGULAR, 0
        elif nearest >= 2:
            kind, n_missed = IntervalKind.MISSED, nearest - 1
        else:
            return None
        return IrregularInterval(kind, volume_index, start_s, end_s, interval_s, n_missed)

    def _record(self, flagged: IrregularInterval) -> None:
        self.irregular_intervals.append(flagged)
        if flagged.kind == IntervalKind.MISSED:
            self.n_missed_pulses += flagged.n_missed
            explanation = (
                f"{flagged.n_missed} pulse(s) missing, so later volume indices are "
                f"{self.n_missed_pulses} below the scanner's"
            )
        elif flagged.kind == IntervalKind.EXTRA:
            self.n_extra_pulses += 1
            explanation = (
                "an extra pulse (a bouncing contact, or a second pulse per volume), so later volume "
                f"indices are {self.n_extra_pulses} above the scanner's"
            )
        else:
            self.n_irregular_intervals += 1
            explanation = "neither one TR nor a whole number of TRs"

        n_of_kind = sum(1 for item in self.irregular_intervals if item.kind == flagged.kind)
        if n_of_kind <= REPEAT_LOG_FIRST or n_of_kind % REPEAT_LOG_EVERY == 0:
            logger.warning(
                "Scanner pulse of volume %d came %.4f s after the one at %.4f s, which is %.2f TR "
                "(TR %.4f s): %s. Pulses are not renumbered (%d %s interval(s) so far).",
                flagged.volume_index, flagged.interval_s, flagged.start_s, flagged.interval_s / self.tr_s,
                self.tr_s, explanation, n_of_kind, flagged.kind.value,
            )


# Cross-checking the data's TR indices


@dataclass(frozen=True)
class _Arrival:
    tr_index: int
    arrival_time_s: float
    # Description of the broken rule, written when the message arrived.
    description: str
    # Offsets (data TR index minus counted volume index) that this arrival time fits, as an
    # inclusive range. An empty range is (1, 0), and an open top end is math.inf.
    low: float
    high: float


class TriggerCrossCheck:
    """Checks the TR index of each data message against the pulses of a :class:`TriggerCounter`.

    The rule: the message for volume i must arrive at least ``min_delay_trs`` and at most
    ``max_delay_trs`` TRs after the pulse counted as volume i. A message that breaks the rule is
    logged at WARNING. When ``n_confirm`` messages in a row break it, :meth:`check_tr` raises
    TriggerMismatchError with the offset k that fits all of them, the data's TR index minus the
    counted volume index. k > 0 means the data runs ahead of the pulses: the first pulse was
    missed, or the pipeline numbers volumes from 1, or it counts dummy scans as volumes. k < 0
    means it runs behind, for example because the pipeline discards more dummy scans than the rig.
    Nothing is ever renumbered. One message alone does not raise, because a pipeline stall or a late
    key timestamp can break the rule once.

    Pulses before the first one counted may have been missed, so an arrival before any counted
    pulse fits every offset that points before it. Call :meth:`check_tr` after adding the pulses
    polled in the same loop pass, so that every pulse before the arrival has been counted.

    NOTE: timing cannot reveal every offset. Data ahead is detected only while some delays are
    below 1 TR plus ``min_delay_trs`` (a ``min_delay_trs`` of 1 suits a pipeline that reports a
    volume after its acquisition ends). Data behind is detected only when k TRs plus the delay
    exceed ``max_delay_trs``. The k reported is the offset of smallest size that fits, which is
    exact when ``max_delay_trs - min_delay_trs`` is below 1 TR and may be too small otherwise.
    """

    def __init__(self, counter: TriggerCounter, max_delay_trs: float = 3.0, min_delay_trs: float = 0.0,
                 n_confirm: int = 2) -> None:
        if not 0 <= min_delay_trs < max_delay_trs:
            raise ValueError(
                f"min_delay_trs ({min_delay_trs!r}) must be 0 or more and below max_delay_trs "
                f"({max_delay_trs!r})."
            )
        if n_confirm < 1:
            raise ValueError(f"n_confirm must be at least 1, got {n_confirm!r}.")
        self.counter = counter
        self.max_delay_trs = max_delay_trs
        self.min_delay_trs = min_delay_trs
        self.n_confirm = n_confirm
        self.n_checked = 0
        self.n_mismatches = 0
        self._streak: list[_Arrival] = []

    def check_tr(self, tr_index: int, arrival_time_s: float) -> float | None:
        """Check the message for volume ``tr_index`` that arrived at ``arrival_time_s``.

        Returns its delay after the pulse of that volume in seconds, or None when it breaks the
        rule. Raises TriggerMismatchError when ``n_confirm`` messages in a row break it.
        """
        if isinstance(tr_index, bool) or not isinstance(tr_index, int) or tr_index < 0:
            raise ValueError(f"tr_index must be an integer of 0 or more, got {tr_index!r}.")
        if not math.isfinite(arrival_time_s):
            raise ValueError(f"arrival_time_s must be a finite time in seconds, got {arrival_time_s!r}.")
        self.n_checked += 1

        # Which offsets does this arrival time fit?
        low, high = self._fitting_offsets(tr_index, arrival_time_s)
        if low <= 0 <= high:
            self._streak.clear()
            return arrival_time_s - self.counter.volume_time(tr_index)

        # A mismatch: remember it, and raise once n_confirm in a row agree.
        self.n_mismatches += 1
        arrival = _Arrival(tr_index, arrival_time_s, self._describe_arrival(tr_index, arrival_time_s),
                           low, high)
        self._streak.append(arrival)
        logger.warning("%s", arrival.description)
        if len(self._streak) >= self.n_confirm:
            raise self._mismatch_error()
        return None

    def _fitting_offsets(self, tr_index: int, arrival_time_s: float) -> tuple[float, float]:
        """Return the inclusive range of offsets whose pulse lies in the delay window before the arrival."""
        pulse_times = self.counter.pulse_times
        earliest_s = arrival_time_s - self.max_delay_trs * self.counter.tr_s
        latest_s = arrival_time_s - self.min_delay_trs * self.counter.tr_s
        first = bisect.bisect_left(pulse_times, earliest_s)
        last = bisect.bisect_right(pulse_times, latest_s) - 1
        to_volume = -self.counter.n_dummy_scans

        # Uncounted pulses before the first counted one may lie in the window.
        open_below = not pulse_times or pulse_times[0] > earliest_s
        if first > last:
            if open_below and (not pulse_times or pulse_times[0] > latest_s):
                return tr_index - to_volume + 1, math.inf
            return 1, 0
        high = math.inf if open_below else tr_index - (first + to_volume)
        return tr_index - (last + to_volume), high

    def _mismatch_error(self) -> TriggerMismatchError:
        low = max(arrival.low for arrival in self._streak)
        high = min(arrival.high for arrival in self._streak)
        last = self._streak[-1]
        details = " ".join(arrival.description for arrival in self._streak)
        if low > high:
            return TriggerMismatchError(
                f"The data's TR indices fit no fixed offset from the counted scanner pulses. {details} "
                f"{self._counter_notes()}Stop the run: check the trigger input and the pipeline's "
                f"volume numbering, or raise max_delay_trs ({self.max_delay_trs:g}) if the pipeline "
                "is slower than that.",
                None, last.tr_index, last.arrival_time_s,
            )
        offset = int(low if low > 0 else high)
        if offset > 0:
            causes = (
                "the first sync pulse was missed (the scanner was already running when the session "
                "started waiting), the pipeline numbers volumes from 1, or it counts dummy scans as "
                f"volumes (the rig discards {self.counter.n_dummy_scans})"
            )
            direction = "ahead of"
        else:
            causes = (
                "the pipeline discards more dummy scans than the rig's n_dummy_scans "
                f"({self.counter.n_dummy_scans}), or the session counted pulses that are not volumes"
            )
            direction = "behind"
        return TriggerMismatchError(
            f"The run is {abs(offset)} TR off: the data's TR indices run {abs(offset)} TR {direction} "
            f"the counted scanner pulses (the smallest offset that fits the arrival times). {details} "
            f"Likely causes: {causes}. {self._counter_notes()}The volumes are not renumbered. Stop the "
            "run, correct the trigger input, the rig's n_dummy_scans or the pipeline's volume "
            "numbering, then start the run again with the session waiting before the scanner starts.",
            offset, last.tr_index, last.arrival_time_s,
        )

    def _describe_arrival(self, tr_index: int, arrival_time_s: float) -> str:
        pulse_s = self.counter.volume_time(tr_index)
        if pulse_s is None:
            return (
                f"TR {tr_index} arrived at {arrival_time_s:.4f} s, before the pulse of volume "
                f"{tr_index} was counted ({self.counter.n_pulses} pulse(s) so far)."
            )
        delay_trs = (arrival_time_s - pulse_s) / self.counter.tr_s
        return (
            f"TR {tr_index} arrived at {arrival_time_s:.4f} s, {delay_trs:.2f} TR after the pulse of "
            f"volume {tr_index} at {pulse_s:.4f} s, outside the allowed {self.min_delay_trs:g} to "
            f"{self.max_delay_trs:g} TR."
        )

    def _counter_notes(self) -> str:
        counter = self.counter
        if counter.n_missed_pulses == 0 and counter.n_extra_pulses == 0:
            return ""
        return (
            f"The pulse counter also flagged {counter.n_missed_pulses} missed and "
            f"{counter.n_extra_pulses} extra pulse(s) during the run. "
        )


# Pulse sources


class TriggerSource(ABC):
    """A source of scanner sync pulses, each stamped on the session clock when it was received."""

    description: str
    """Name of the input for messages, such as "key '5' in PsychoPy's key buffer"."""

    def __init__(self) -> None:
        self._held_back: list[float] = []

    def poll(self) -> list[float]:
        """Return the pulses received since the last call, oldest first, without blocking."""
        pulses, self._held_back = self._held_back, []
        pulses.extend(self._read_pulses())
        return pulses

    def unread(self, times_s: Iterable[float]) -> None:
        """Put pulses back, so that the next :meth:`poll` returns them first."""
        self._held_back[:0] = list(times_s)

    @abstractmethod
    def _read_pulses(self) -> list[float]:
        """Return the pulses received since the last call, without blocking."""

    @abstractmethod
    def close(self) -> None:
        """Release the device or stream. A second call does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _default_now(clock: Clock | None) -> Callable[[], float]:
    if clock is not None:
        return clock.now
    import pylsl

    return pylsl.local_clock


class QueuedTriggerSource(TriggerSource):
    """Pulses that another thread puts into a queue, such as the key presses the window's frame loop
    takes from PsychoPy's key buffer (which only the window's thread may read)."""

    def __init__(self, pulses: queue.Queue, description: str) -> None:
        super().__init__()
        self._pulses = pulses
        self.description = description

    def _read_pulses(self) -> list[float]:
        pulses = []
        while True:
            try:
                pulses.append(self._pulses.get_nowait())
            except queue.Empty:
                return pulses

    def close(self) -> None:
        """Nothing to release: the queue belongs to its producer."""


class LSLTriggerSource(TriggerSource):
    """Pulses that arrive as samples of an LSL marker stream, such as the simulated scanner's.

    With ``marker_type`` None every sample is a pulse. Otherwise each sample is decoded as a JSON
    marker (:func:`acquisition.lsl.decode_marker`) and only those of that type are pulses. Others
    are counted in ``n_ignored``. Sample times are corrected to this machine's LSL clock with the
    inlet's clock offset estimate, stored in ``clock_correction_s`` at each poll.
    """

    def __init__(self, stream_name: str, marker_type: str | None = None, timeout_s: float = 10.0) -> None:
        super().__init__()
        import pylsl

        info = resolve_stream(stream_name, timeout_s)
        self.description = f"LSL stream {stream_name!r}"
        if marker_type is not None:
            self.description += f" (markers of type {marker_type!r})"
        self.marker_type = marker_type
        self.n_ignored = 0
        self._inlet = pylsl.StreamInlet(info, max_buflen=360)
        self._inlet.open_stream(timeout=timeout_s)
        # The first estimate blocks for about 0.5 s, so it is taken here rather than at the first poll.
        self.clock_correction_s = self._inlet.time_correction(timeout=timeout_s)
        """Sender's LSL clock to this machine's, in seconds, added to each sample time."""

    def _read_pulses(self) -> list[float]:
        if self._inlet is None:
            raise RuntimeError(f"The trigger source for {self.description} is closed.")
        samples, stamps = self._inlet.pull_chunk(timeout=0.0)
        if not stamps:
            return []
        # After the first estimate this returns the latest one without blocking.
        self.clock_correction_s = self._inlet.time_correction(timeout=1.0)
        pulses = []
        for sample, stamp in zip(samples, stamps, strict=True):
            if self.marker_type is not None and not self._is_pulse(sample[0]):
                self.n_ignored += 1
                continue
            pulses.append(stamp + self.clock_correction_s)
        return pulses

    def _is_pulse(self, value) -> bool:
        try:
            return decode_marker(str(value))["type"] == self.marker_type
        except ValueError:
            return False

    def close(self) -> None:
        if self._inlet is not None:
            self._inlet.close_stream()
            self._inlet = None


class SerialTriggerSource(TriggerSource):
    """Pulses that arrive as a byte on a serial line, from a trigger interface or a USB TTL box.

    ``port`` is a device (``/dev/ttyUSB0``, ``COM3``) or a pyserial URL (``loop://``). Bytes equal to
    ``trigger_byte`` are pulses and other bytes are counted in ``n_ignored``. A reader thread stamps
    each read with the session clock as soon as the read returns. With ``start_thread=False``, bytes
    are read and stamped at each :meth:`acquire` or :meth:`poll` instead, which tests use.

    NOTE: bytes that arrive together in one read share its timestamp, and the stamp includes the
    driver's latency (a USB serial adapter buffers for 1 to 16 ms unless its latency timer is low).
    """

    def __init__(self, port: str, baudrate: int, trigger_byte: int | bytes, clock: Clock | None = None,
                 start_thread: bool = True) -> None:
        super().__init__()
        import serial

        if isinstance(trigger_byte, bytes):
            if len(trigger_byte) != 1:
                raise ValueError(f"trigger_byte must be a single byte, got {trigger_byte!r}.")
            trigger_byte = trigger_byte[0]
        if not 0 <= trigger_byte <= 255:
            raise ValueError(f"trigger_byte must be a byte value from 0 to 255, got {trigger_byte!r}.")
        self.trigger_byte = trigger_byte
        self.description = f"serial port {port} at {baudrate} baud, trigger byte {trigger_byte:#04x}"
        self.n_ignored = 0
        self._now = _default_now(clock)
        self._port = serial.serial_for_url(port, baudrate=baudrate, timeout=SERIAL_READ_TIMEOUT_S)
        self._serial_error_types = (serial.SerialException, OSError)
        self._lock = threading.Lock()
        self._received: list[float] = []
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._read_forever, name=f"trigger-{port}", daemon=True)
            self._thread.start()

    @property
    def port(self):
        """The open pyserial port, for writing to a ``loop://`` port in tests."""
        return self._port

    def acquire(self) -> None:
        """Read the bytes waiting now and stamp them with the current time, without blocking.

        Raises StreamLostError when the port cannot be read.
        """
        try:
            n_waiting = self._port.in_waiting
            data = self._port.read(n_waiting) if n_waiting else b""
        except self._serial_error_types as err:
            raise self._lost_error(err) from err
        if data:
            self._store(data, self._now())

    def _read_forever(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._port.read(1)
                if not first:
                    continue
                time_s = self._now()
                rest = self._port.read(self._port.in_waiting) if self._port.in_waiting else b""
            except self._serial_error_types as err:
                if not self._stop.is_set():
                    with self._lock:
                        self._error = err
                return
            self._store(first + rest, time_s)

    def _store(self, data: bytes, time_s: float) -> None:
        n_pulses = data.count(self.trigger_byte)
        with self._lock:
            self._received.extend([time_s] * n_pulses)
            self.n_ignored += len(data) - n_pulses

    def _read_pulses(self) -> list[float]:
        if self._thread is None:
            self.acquire()
        with self._lock:
            pulses, self._received = self._received, []
            error = self._error
        if error is not None:
            raise self._lost_error(error) from error
        return pulses

    def _lost_error(self, error: Exception) -> StreamLostError:
        return StreamLostError(
            f"Reading {self.description} failed: {error}. Check the cable and the port name, "
            "then restart the run."
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * SERIAL_READ_TIMEOUT_S)
            self._thread = None
        if self._port.is_open:
            self._port.close()


def wait_for_first_pulse(source: TriggerSource, clock: Clock, timeout_s: float,
                         poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> float:
    """Wait for the first pulse stamped at or after the start of the wait and return its time.

    Pulses stamped before the wait started are discarded and logged at WARNING, because they come
    from before the session was ready (a stale key press, or a scanner already running). Later
    pulses returned by the same poll are put back into ``source`` for the caller's next poll.
    Raises TriggerTimeoutError when no pulse arrives within ``timeout_s``.
    """
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    start_s = clock.now()
    deadline_s = start_s + timeout_s
    logger.info("Waiting up to %g s for the first scanner pulse from %s.", timeout_s, source.description)

    while True:
        pulses = source.poll()
        fresh = [time_s for time_s in pulses if time_s >= start_s]
        n_stale = len(pulses) - len(fresh)
        if n_stale:
            logger.warning(
                "Discarded %d scanner pulse(s) from %s stamped before the wait started (first at "
                "%.4f s, wait started at %.4f s). If the scanner was already running, the data's TR "
                "indices will run ahead of the counted pulses.",
                n_stale, source.description, pulses[0], start_s,
            )
        if fresh:
            source.unread(fresh[1:])
            logger.info("First scanner pulse at %.4f s.", fresh[0])
            return fresh[0]

        now_s = clock.now()
        if now_s >= deadline_s:
            raise TriggerTimeoutError(
                f"No scanner pulse arrived from {source.description} within {timeout_s:g} s. Check "
                "that the scanner sequence has started, that its trigger output reaches this "
                "computer, and that the rig's trigger settings name this input."
            )
        clock.sleep_until(min(now_s + poll_interval_s, deadline_s))
