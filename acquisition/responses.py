"""Response sources: how the controller gets one trial's response after its onset.

``LSLResponses`` runs in the controller process with the clock passed in. It pulls the data inlet
into a buffer, hands every chunk to the recorder, and epochs a trial once the stream covers its
windows. ``EpochedSimulator`` draws responses directly from the simulated subject's model
with no stream, for the in-process benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from acquisition.epochs import ResponseWindow, StreamBuffer
from acquisition.errors import StreamLostError

# Smallest rise of a photodiode channel that counts as the patch lighting up, in the channel's
# units. NOTE: fits the simulated photodiode (0 to 1); a real one needs a setting for its range.
PHOTODIODE_MIN_STEP = 0.1


class LSLResponses:
    """Per-trial responses epoched from an LSL data inlet."""

    def __init__(self, inlet, window: ResponseWindow, clock,
                 on_chunk: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 stall_timeout_s: float = 2.0, photodiode_channel: int | None = None,
                 photodiode_search_s: float = 0.2) -> None:
        self.inlet = inlet
        self.photodiode_channel = photodiode_channel
        # Display lags are physical times, so this window is not divided by the speed factor.
        self.photodiode_search_s = photodiode_search_s
        self.window = window
        self.clock = clock
        self.on_chunk = on_chunk
        self.stall_timeout_s = stall_timeout_s
        description = inlet.description
        keep_s = 4 * (window.end_s - window.start_s) + 5.0
        self.buffer = StreamBuffer(description.n_channels, description.sfreq, keep_s)

    def poll(self) -> int:
        """Move everything the inlet has buffered into the epoch buffer; return the sample count."""
        data, times = self.inlet.pull()
        if len(times):
            self.buffer.append(data, times)
            if self.on_chunk is not None:
                self.on_chunk(data, times)
        return len(times)

    def collect(self, onset: float, stimulus=None) -> np.ndarray:
        """Wait until the stream covers the trial, then return its response per channel.

        Raises StreamLostError when no new sample arrives for ``stall_timeout_s``.
        """
        needed = onset + self.window.end_s
        last_progress = self.clock.now()
        while True:
            if self.poll():
                last_progress = self.clock.now()
            if self.buffer.last_time >= needed:
                return self.buffer.response(onset, self.window)
            if self.clock.now() - last_progress > self.stall_timeout_s:
                raise StreamLostError(
                    f"Stream {self.inlet.description.name!r} sent no sample for "
                    f"{self.stall_timeout_s:g} s (last sample at {self.buffer.last_time:.3f}, "
                    f"needed {needed:.3f}). Check the amplifier or the simulated subject."
                )
            self.clock.sleep_until(self.clock.now() + 0.005)

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
