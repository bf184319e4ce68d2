"""Epoching: cut per-trial responses out of a continuous stream by marker timestamps.

Pure computation, run in the controller process on data the inlet has already pulled; it never
reads a clock or a socket. A response is the mean over the response window minus the mean over the
pre-stimulus baseline, per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class IncompleteEpochError(ValueError):
    """The stream does not (yet) cover an epoch's windows."""


@dataclass(frozen=True)
class ResponseWindow:
    """The response and baseline windows of an epoch, in seconds relative to the onset."""

    tmin_s: float
    tmax_s: float
    baseline_start_s: float
    baseline_end_s: float

    def scaled(self, speed: float) -> ResponseWindow:
        """Return the window with every time divided by ``speed`` (dry runs)."""
        return ResponseWindow(self.tmin_s / speed, self.tmax_s / speed,
                              self.baseline_start_s / speed, self.baseline_end_s / speed)

    @property
    def start_s(self) -> float:
        return min(self.tmin_s, self.baseline_start_s)

    @property
    def end_s(self) -> float:
        return max(self.tmax_s, self.baseline_end_s)


def _window_mean(data, times, start, stop, sfreq, min_coverage):
    selected = (times >= start) & (times < stop)
    n_expected = (stop - start) * sfreq
    n_found = int(selected.sum())
    if n_found < min_coverage * n_expected or n_found == 0:
        raise IncompleteEpochError(
            f"{n_found} samples in [{start:.3f}, {stop:.3f}) s where about {n_expected:.0f} "
            "were expected."
        )
    return data[selected].mean(axis=0)


def epoch_response(
    data: np.ndarray,
    times: np.ndarray,
    onset: float,
    window: ResponseWindow,
    sfreq: float,
    min_coverage: float = 0.9,
) -> np.ndarray:
    """Return one trial's response per channel, ``(n_channels,)``.

    ``data`` is ``(n_samples, n_channels)`` with sample ``times`` on the same clock as ``onset``.
    Raises IncompleteEpochError when either window has fewer than ``min_coverage`` of its samples.
    """
    response = _window_mean(data, times, onset + window.tmin_s, onset + window.tmax_s, sfreq,
                            min_coverage)
    baseline = _window_mean(data, times, onset + window.baseline_start_s,
                            onset + window.baseline_end_s, sfreq, min_coverage)
    return response - baseline


def light_onset_lag(light: np.ndarray, times: np.ndarray, onset: float, search_s: float,
                    min_step: float) -> float:
    """Return the delay from ``onset`` to the first sample of ``light`` above its midpoint level.

    ``light`` is one photodiode channel ``(n_samples,)`` with sample ``times``. The midpoint lies
    halfway between the lowest and highest values in [onset, onset + search_s). Returns NaN when
    the channel does not rise by ``min_step`` there (no patch, or a covered photodiode), or when it
    is already above the midpoint at the onset.
    """
    after = np.flatnonzero((times >= onset) & (times < onset + search_s))
    if len(after) == 0:
        return float("nan")
    low, high = float(light[after].min()), float(light[after].max())
    if high - low < min_step:
        return float("nan")

    lit = after[light[after] >= (low + high) / 2]
    if lit[0] == after[0]:
        return float("nan")
    return float(times[lit[0]] - onset)


class StreamBuffer:
    """The most recent samples of one stream, enough to epoch the trials still pending."""

    def __init__(self, n_channels: int, sfreq: float, keep_s: float) -> None:
        self.n_channels = n_channels
        self.sfreq = sfreq
        self.keep_s = keep_s
        self._data = np.empty((0, n_channels), np.float32)
        self._times = np.empty(0, np.float64)

    @property
    def last_time(self) -> float:
        return float(self._times[-1]) if len(self._times) else float("-inf")

    def append(self, data: np.ndarray, times: np.ndarray) -> None:
        """Add samples and drop those older than ``keep_s`` before the newest one."""
        if len(times) == 0:
            return
        self._data = np.concatenate([self._data, data])
        self._times = np.concatenate([self._times, times])
        keep = self._times >= self._times[-1] - self.keep_s
        if not keep.all():
            self._data, self._times = self._data[keep], self._times[keep]

    def response(self, onset: float, window: ResponseWindow) -> np.ndarray:
        """Epoch one trial from the buffered samples (see :func:`epoch_response`)."""
        return epoch_response(self._data, self._times, onset, window, self.sfreq)

    def light_onset_lag(self, onset: float, channel: int, search_s: float,
                        min_step: float) -> float:
        """Measure the photodiode's delay after one onset (see :func:`light_onset_lag`)."""
        return light_onset_lag(self._data[:, channel], self._times, onset, search_s, min_step)
