"""Per-trial fMRI responses, estimated online from the per-TR ROI values of a real-time pipeline.

Runs in the controller's thread, with one receiver thread that only takes messages off the ZeroMQ
socket and stamps their arrival, so that a controller busy elsewhere (waiting for an onset) does
not make a TR look late. It drains the received TRs and the scanner's sync pulses, and stores each
TR under its own index on the pulse schedule. Late and missing TRs are flagged, and the schedule
never shifts. Every volume goes to an online GLM with the canonical HRF. A trial's
response becomes available once the volumes cover its haemodynamic response, about 12 s after its
onset, so the controller runs ahead of its data. Times passed in are on the LSL clock; the GLM works
in nominal seconds from volume 0, with the dry run's speed factor undone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from acquisition.errors import StreamLostError

logger = logging.getLogger(__name__)

# TRs after its acquisition ends that a volume's values may take before they count as late (1) or
# as missing (1.5). The pipeline's processing time comes on top of the acquisition.
LATE_AFTER_TRS = 1.0
TIMEOUT_AFTER_TRS = 1.5
# Upper bound on the TRs of one run that the TR table keeps (8 hours at a TR of 1 s).
MAX_TRS = 28_800
# How long the receiver thread waits on the socket per call, in seconds; also its stop latency.
RECEIVE_POLL_S = 0.01


class TriggerWatch:
    """Counts the scanner's sync pulses and checks each TR's values against them.

    A run whose data are one or more TRs off the counted pulses raises
    :class:`acquisition.scanner.TriggerMismatchError` instead of being shifted silently.
    """

    def __init__(self, source, counter, cross_check,
                 on_pulse: Callable[[float, int], None] | None = None) -> None:
        self.source = source
        self.counter = counter
        self.cross_check = cross_check
        self.on_pulse = on_pulse

    def poll(self, now: float) -> None:
        for pulse in self.source.poll():
            volume = self.counter.add_pulse(pulse)
            if self.on_pulse is not None:
                self.on_pulse(pulse, volume)

    def check(self, tr_index: int, arrival: float) -> None:
        self.cross_check.check_tr(tr_index, arrival)


@dataclass(frozen=True)
class VolumeRecord:
    """One TR as it arrived: for the session file."""

    tr_index: int
    arrival: float
    acquisition_time: float
    values: np.ndarray
    status: str


class FMRIResponses:
    """Per-trial ROI responses from per-TR values; the controller polls it instead of waiting.

    ``volume_zero`` is the LSL time of the pulse of volume 0 (after the dummy scans), ``tr_s`` the
    nominal TR, and ``speed`` the dry run's speed factor (1 for a real session).
    """

    delayed = True

    def __init__(self, subscriber, glm, clock, volume_zero: float, tr_s: float, speed: float = 1.0,
                 triggers=None, on_volume: Callable[[VolumeRecord], None] | None = None,
                 on_fault: Callable[[float, str, str], None] | None = None,
                 stall_timeout_trs: float = 5.0) -> None:
        from acquisition.zmq_bridge import TRTable

        self.subscriber = subscriber
        self.glm = glm
        self.clock = clock
        self.volume_zero = volume_zero
        self.tr_s = tr_s
        self.speed = speed
        self.triggers = triggers
        self.on_volume = on_volume
        self.on_fault = on_fault
        self.stall_timeout_s = stall_timeout_trs * tr_s / speed
        real_tr_s = tr_s / speed
        # A volume's values are expected once its acquisition has ended, one TR after its pulse.
        self.table = TRTable(MAX_TRS, glm.n_rois, volume_zero + real_tr_s, real_tr_s,
                             LATE_AFTER_TRS, TIMEOUT_AFTER_TRS)
        self._last_arrival = clock.now()
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._receive_error: BaseException | None = None
        self._receiver = threading.Thread(target=self._receive, name="neurosteer-tr-receiver",
                                          daemon=True)
        self._receiver.start()

    def nominal(self, time: float) -> float:
        """Return an LSL time as nominal seconds from volume 0."""
        return (time - self.volume_zero) * self.speed

    def register(self, trial: int, onset: float, duration_s: float) -> None:
        """Add a trial that was shown at ``onset`` (LSL clock) for ``duration_s`` (real seconds)."""
        self.glm.add_trial(trial, self.nominal(onset), duration_s * self.speed)

    def poll(self, timeout_s: float = 0.0) -> dict[int, np.ndarray]:
        """Take every TR that arrived and return the trials that became estimable, with responses.

        Returns {trial: (n_rois,) response}. Raises StreamLostError when no TR arrived for
        ``stall_timeout_trs`` TRs.
        """
        if self.triggers is not None:
            self.triggers.poll(self.clock.now())
        arrived = self._take_inbox(timeout_s)
        for message, arrival in arrived:
            self._take(message, arrival)
        now = self.clock.now()
        for tr_index in self.table.expire(now):
            self._fault(now, "tr_timeout", f"no values for TR {tr_index} within "
                        f"{TIMEOUT_AFTER_TRS:g} TR of its acquisition; it is a missing value")
        if arrived:
            self._last_arrival = arrived[-1][1]
        elif now - self._last_arrival > self.stall_timeout_s:
            raise StreamLostError(
                f"No per-TR values arrived for {now - self._last_arrival:.1f} s "
                f"({self.stall_timeout_s * self.speed / self.tr_s:g} TRs). Check the real-time "
                "pipeline (or the simulated scanner) and the rig's [zmq] address."
            )

        ready = self.glm.ready_trials()
        if not ready:
            return {}
        return dict(zip(ready, self.glm.estimate(ready), strict=True))

    def display_lag(self, onset: float) -> float:
        return float("nan")

    def estimate(self, trials: list[int]) -> np.ndarray:
        """Return the current GLM estimates of ``trials``, ``(n_trials, n_rois)``, from every volume."""
        return self.glm.estimate(trials)

    def close(self) -> None:
        """Stop the receiver thread; the subscriber itself is closed by its owner."""
        self._stop.set()
        self._receiver.join(1.0)

    def _receive(self) -> None:
        # The only user of the subscriber's socket once started: ZeroMQ sockets are not thread-safe.
        try:
            while not self._stop.is_set():
                for message in self.subscriber.poll(RECEIVE_POLL_S):
                    self._inbox.put((message, self.clock.now()))
        except BaseException as err:  # raised again in the controller's thread by poll()
            self._receive_error = err

    def _take_inbox(self, timeout_s: float) -> list:
        """Return the (message, arrival time) pairs received, waiting up to ``timeout_s`` for one."""
        if self._receive_error is not None:
            raise StreamLostError(f"Receiving per-TR values failed: {self._receive_error}") from (
                self._receive_error)
        arrived = []
        try:
            arrived.append(self._inbox.get(timeout=timeout_s) if timeout_s > 0
                           else self._inbox.get_nowait())
        except queue.Empty:
            return arrived
        while True:
            try:
                arrived.append(self._inbox.get_nowait())
            except queue.Empty:
                return arrived

    def _take(self, message, now: float) -> None:
        update = self.table.add(message, now)
        if self.triggers is not None:
            self.triggers.check(message.tr_index, now)
        if not update.stored:
            return
        values = np.array([np.nan if value is None else value for value in message.roi_values])
        if update.status == "late":
            self._fault(now, "tr_late", f"TR {message.tr_index} arrived {update.delay_s:.3f} s "
                        "after its expected time; it is stored under its own index")
        self.glm.add_volume(message.tr_index, (message.tr_index + 0.5) * self.tr_s, values)
        if self.on_volume is not None:
            self.on_volume(VolumeRecord(message.tr_index, now, message.acquisition_time, values,
                                        str(update.status)))

    def _fault(self, time: float, kind: str, message: str) -> None:
        if self.on_fault is not None:
            self.on_fault(time, kind, message)
        else:
            logger.warning("%s: %s", kind, message)
