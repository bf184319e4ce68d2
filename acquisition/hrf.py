"""The canonical haemodynamic response and the event regressors built from it.

Pure computation, shared by the online GLM (which estimates per-trial responses from ROI time
series) and the simulated scanner (which makes BOLD time series from per-trial truths), so that
both use one response shape. It reads no clock and opens no file.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.stats import gamma

# SPM's canonical HRF (spm_hrf.m, SPM12): a gamma peaking at 5 s (shape 6, scale 1) minus a sixth of a
# gamma peaking at 15 s (shape 16, scale 1), over 32 s.
PEAK_SHAPE = 6.0
UNDERSHOOT_SHAPE = 16.0
UNDERSHOOT_RATIO = 1.0 / 6.0
HRF_LENGTH_S = 32.0

# Time step of the fine grid the regressors are built on, in seconds.
RESOLUTION_S = 0.05


def canonical_hrf(times_s: np.ndarray) -> np.ndarray:
    """Return SPM's canonical HRF at ``times_s`` after an impulse, scaled to integrate to 1 s^-1.

    With that scaling a sustained stimulus of amplitude 1 drives a steady BOLD change of 1.
    """
    times_s = np.asarray(times_s, dtype=float)
    shape = gamma.pdf(times_s, PEAK_SHAPE) - UNDERSHOOT_RATIO * gamma.pdf(times_s, UNDERSHOOT_SHAPE)
    shape[(times_s < 0) | (times_s > HRF_LENGTH_S)] = 0.0
    grid = np.arange(0.0, HRF_LENGTH_S, RESOLUTION_S / 10)
    area = np.trapezoid(gamma.pdf(grid, PEAK_SHAPE) - UNDERSHOOT_RATIO
                        * gamma.pdf(grid, UNDERSHOOT_SHAPE), grid)
    return shape / area


@functools.cache
def _cumulative_hrf() -> tuple[np.ndarray, np.ndarray]:
    """Return a time grid over the HRF's length and the HRF's integral from 0 to each grid time."""
    grid = np.arange(0.0, HRF_LENGTH_S + RESOLUTION_S, RESOLUTION_S)
    cumulative = np.concatenate([[0.0], np.cumsum(
        (canonical_hrf(grid[:-1]) + canonical_hrf(grid[1:])) / 2 * RESOLUTION_S)])
    grid.flags.writeable = False
    cumulative.flags.writeable = False
    return grid, cumulative


def event_regressors(onsets_s: np.ndarray, durations_s: np.ndarray,
                     sample_times_s: np.ndarray) -> np.ndarray:
    """Return one regressor per event, sampled at ``sample_times_s``: ``(n_samples, n_events)``.

    Each event is a boxcar of amplitude 1 from its onset for its duration, convolved with
    :func:`canonical_hrf` on a grid of ``RESOLUTION_S``. Times are in seconds on one clock.
    """
    onsets_s = np.asarray(onsets_s, dtype=float)
    durations_s = np.broadcast_to(np.asarray(durations_s, dtype=float), onsets_s.shape)
    sample_times_s = np.asarray(sample_times_s, dtype=float)
    if np.any(durations_s <= 0):
        raise ValueError(f"durations_s must be positive, got {durations_s[durations_s <= 0][:3]}.")

    # The response at time t to a boxcar [a, b) is the integral of the HRF over [t - b, t - a].
    # The cumulative integral of the HRF turns each one into a difference of two lookups.
    grid, cumulative = _cumulative_hrf()

    def integral_to(lag: np.ndarray) -> np.ndarray:
        return np.interp(lag, grid, cumulative, left=0.0, right=cumulative[-1])

    lag_start = sample_times_s[:, None] - onsets_s[None, :]
    lag_end = lag_start - durations_s[None, :]
    return integral_to(lag_start) - integral_to(lag_end)
