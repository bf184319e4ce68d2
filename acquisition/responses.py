"""Response sources: how the controller gets one trial's response after its onset.

``LSLResponses`` runs in the controller process with the clock passed in. It pulls the data inlet
into a buffer, hands every chunk to the recorder, and epochs a trial once the stream covers its
windows. ``EpochedSimulator`` draws responses directly from the simulated subject's model
with no stream, for the in-process benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from acquisition.epochs import IncompleteEpochError, ResponseWindow, StreamBuffer
from acquisition.errors import EpochLostError, StreamLostError

# Smallest rise of a photodiode channel that counts as the patch lighting up, in the channel's
# units. NOTE: fits the simulated photodiode (0 to 1); a real one needs a setting for its range.
PHOTODIODE_MIN_STEP = 0.1
# A jump between consecutive samples longer than this many sample periods is a gap.
GAP_PERIODS = 10


class LSLResponses:
    """Per-trial responses epoched from an LSL data inlet, with the stream's faults recorded.

    A stream that sends nothing for ``stall_report_s`` (by the clock passed in) is reported once
    through ``on_fault`` and ``on_stall``. The wait goes on, because liblsl reconnects by itself
    when a stream with the same source id comes back. After ``reconnect_timeout_s`` without a
    sample, :meth:`collect` raises StreamLostError. Every gap in the sample times (the last sample
    before it, the first after it) goes to ``on_gap``, and a trial whose windows overlap a gap
    raises EpochLostError instead of being scored on the samples around it.
    """

    def __init__(self, inlet, window: ResponseWindow, clock,
                 on_chunk: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 stall_report_s: float = 1.0, reconnect_timeout_s: float = 60.0,
                 photodiode_channel: int | None = None, photodiode_search_s: float = 0.2,
                 on_fault: Callable[[float, str, str], None] | None = None,
                 on_gap: Callable[[float, float], None] | None = None,
                 on_stall: Callable[[], None] | None = None) -> None:
        self.inlet = inlet
        self.photodiode_channel = photodiode_channel
        # Display lags are physical times, so this window is not divided by the speed factor.
        self.photodiode_search_s = photodiode_search_s
        self.window = window
        self.clock = clock
        self.on_chunk = on_chunk
        self.stall_report_s = stall_report_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.on_fault = on_fault
        self.on_gap = on_gap
        self.on_stall = on_stall
        description = inlet.description
        self.name = description.name
        self.gap_s = GAP_PERIODS / description.sfreq
        keep_s = 4 * (window.end_s - window.start_s) + 5.0
        self.buffer = StreamBuffer(description.n_channels, description.sfreq, keep_s)
        # (last sample before, first sample after) of every gap so far.
        self.gaps: list[tuple[float, float]] = []
        self._stall_reported_at: float | None = None
        self._continued_from = float("-inf")

    def poll(self) -> int:
        """Move everything the inlet has buffered into the epoch buffer; return the sample count."""
        return self.take(*self.inlet.pull())

    def take(self, data: np.ndarray, times: np.ndarray) -> int:
        """Add samples pulled from the inlet (also those pulled before this object existed)."""
        if len(times):
            self._find_gaps(times)
            self.buffer.append(data, times)
            if self.on_chunk is not None:
                self.on_chunk(data, times)
            if self._stall_reported_at is not None:
                stalled_s = self.clock.now() - self._stall_reported_at + self.stall_report_s
                self._fault("stream_resumed", f"stream {self.name!r} sends again after about "
                                              f"{stalled_s:.1f} s")
                self._stall_reported_at = None
        return len(times)

    def continue_after(self, last_time: float) -> None:
        """Take ``last_time`` as the stream's last sample so far: a resumed session's recording
        continues one, and the time in between is recorded as a gap."""
        self._continued_from = last_time

    def _find_gaps(self, times: np.ndarray) -> None:
        last_time = self.buffer.last_time
        if not np.isfinite(last_time):
            last_time = self._continued_from
        previous = np.concatenate([[last_time], times[:-1]])
        for index in np.flatnonzero(times - previous > self.gap_s):
            if not np.isfinite(previous[index]):
                continue
            gap = (float(previous[index]), float(times[index]))
            self.gaps.append(gap)
            self._fault("stream_gap", f"stream {self.name!r} has no samples from {gap[0]:.3f} to "
                                      f"{gap[1]:.3f} ({gap[1] - gap[0]:.3f} s)")
            if self.on_gap is not None:
                self.on_gap(*gap)

    def _fault(self, kind: str, message: str) -> None:
        if self.on_fault is not None:
            self.on_fault(self.clock.now(), kind, message)

    def collect(self, onset: float, stimulus=None) -> np.ndarray:
        """Wait until the stream covers the trial, then return its response per channel.

        Raises EpochLostError when the trial's windows overlap a gap, and StreamLostError when no
        sample arrives for ``reconnect_timeout_s``.
        """
        start, needed = onset + self.window.start_s, onset + self.window.end_s
        last_progress = self.clock.now()
        while True:
            if self.poll():
                last_progress = self.clock.now()
            if self.buffer.last_time >= needed:
                return self._response(onset, start, needed)
            silent_s = self.clock.now() - last_progress
            if silent_s > self.stall_report_s and self._stall_reported_at is None:
                self._stall_reported_at = self.clock.now()
                self._fault("stream_stalled",
                            f"stream {self.name!r} has sent no sample for {silent_s:.1f} s (last "
                            f"sample at {self.buffer.last_time:.3f}); waiting up to "
                            f"{self.reconnect_timeout_s:g} s for it to come back")
                if self.on_stall is not None:
                    self.on_stall()
            if silent_s > self.reconnect_timeout_s:
                raise StreamLostError(
                    f"Stream {self.name!r} sent no sample for {self.reconnect_timeout_s:g} s (last "
                    f"sample at {self.buffer.last_time:.3f}, needed {needed:.3f}). Check the "
                    "amplifier or the simulated subject, then continue the session with "
                    "`neurosteer resume SESSION.h5`."
                )
            self.clock.sleep_until(self.clock.now() + 0.005)

    def _response(self, onset: float, start: float, end: float) -> np.ndarray:
        n_channels = self.buffer.n_channels
        for gap_start, gap_end in self.gaps:
            if gap_start < end and gap_end > start:
                raise EpochLostError(
                    f"its windows ({start:.3f} to {end:.3f}) overlap the gap in stream "
                    f"{self.name!r} from {gap_start:.3f} to {gap_end:.3f}", n_channels)
        try:
            return self.buffer.response(onset, self.window)
        except IncompleteEpochError as err:
            raise EpochLostError(f"stream {self.name!r} lacks samples: {err}", n_channels) from None

    def display_lag(self, onset: float) -> float:
        """Return the photodiode's delay after ``onset`` in seconds, NaN without a photodiode.

        Call after :meth:`collect` for that onset, so that the buffer covers the search window.
        """
        if self.photodiode_channel is None:
            return float("nan")
        # A pulse from 0 to 1: a rise of a tenth of that is no pulse.
        return self.buffer.light_onset_lag(onset, self.photodiode_channel,
                                           self.photodiode_search_s, PHOTODIODE_MIN_STEP)


class EpochedSimulator:
    """Responses drawn from the simulated subject's model without a stream (benchmarks only).

    Each channel's response is its noise-free amplitude plus Gaussian noise of SD
    ``signal_sd / snr``, the same single-trial statistics the streamed simulator produces.
    """

    def __init__(self, renderer, truth: Callable[[list[str]], np.ndarray],
                 rng: np.random.Generator) -> None:
        self.renderer = renderer
        self.truth = truth
        self.rng = rng
        self.noise_sd = renderer.config.signal_sd / renderer.config.snr

    def display_lag(self, onset: float) -> float:
        return float("nan")

    def collect(self, onset: float, stimulus) -> np.ndarray:
        amplitudes = self.renderer.amplitudes(float(self.truth([stimulus.text])[0]))
        return amplitudes + self.rng.normal(0.0, self.noise_sd, amplitudes.shape)
