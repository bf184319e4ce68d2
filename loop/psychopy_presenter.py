"""Show sentences in a real PsychoPy window with onsets locked to screen refreshes.

Runs in the controller process on a machine with a display (an X server such as Xvfb will do).
It sends each onset marker to the marker stream, stamped with the flip time mapped to the LSL
clock. An onset lands up to one frame period after its due time, and the timing means nothing
without vertical sync, which Xvfb lacks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loop.clock import Clock
from loop.presentation import MarkerSink, Onset, Stimulus, onset_marker

if TYPE_CHECKING:
    from psychopy.visual import TextStim, Window

logger = logging.getLogger(__name__)

PSYCHOPY_UNITS = ("height", "norm", "pix", "deg", "degFlat", "degFlatPos", "cm")

# A flip predicted this close before a deadline counts as the deadline's frame, so that rounding in
# the frame period cannot add a whole frame. PsychoPy Builder scripts use the same value
# (frameTolerance in psychopy/experiment/flow.py, PsychoPy 2026.2).
FRAME_TOLERANCE_S = 0.001

# Frame period assumed when the refresh rate cannot be measured, as PsychoPy's Window assumes.
FALLBACK_FRAME_PERIOD_S = 1.0 / 60.0

# Clock readings per offset measurement: 10 take about 25 us (Python 3.11, 2-core VM).
N_CLOCK_READINGS = 10


@dataclass(frozen=True)
class WindowSettings:
    """The stimulus window and the monitor geometry that PsychoPy needs for visual-angle units."""

    size_pix: tuple[int, int] = (1280, 1024)
    fullscreen: bool = False
    screen: int = 0
    background_color: str = "grey"
    units: str = "height"
    monitor_width_cm: float = 53.0
    monitor_distance_cm: float = 60.0

    def __post_init__(self) -> None:
        if len(self.size_pix) != 2 or any(side <= 0 for side in self.size_pix):
            raise ValueError(
                "size_pix must be two positive pixel counts (width, height), "
                f"got {self.size_pix!r}."
            )
        if self.screen < 0:
            raise ValueError(f"screen must be a screen index of 0 or more, got {self.screen!r}.")
        if self.units not in PSYCHOPY_UNITS:
            raise ValueError(
                f"units must be one of {', '.join(PSYCHOPY_UNITS)}, got {self.units!r}."
            )
        for name in ("monitor_width_cm", "monitor_distance_cm"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be a positive length in cm, got {value!r}.")


@dataclass(frozen=True)
class TextSettings:
    """The look of sentences, messages and the fixation cross, with lengths in window units."""

    font: str = "Arial"
    height: float = 0.05
    wrap_width: float = 1.2
    color: str = "white"
    fixation_text: str = "+"

    def __post_init__(self) -> None:
        for name in ("height", "wrap_width"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(
                    f"{name} must be a positive length in the window's units, got {value!r}."
                )


class PsychoPyPresenter:
    """Shows each stimulus on the first frame at or after its due time and sends its onset marker.

    The onset is the time ``Window.flip()`` returned for the stimulus frame, mapped to the session
    clock with an offset measured just before the trial. ``clock`` must read the LSL clock
    (:class:`loop.clock.LSLClock`) because the markers carry these times. ``Onset.late_s`` is
    signed, and jitter in the flip times can make it slightly negative. Between trials the window
    shows the fixation cross. Call :meth:`present` at least one frame before ``due``, because
    the first flip of a call may have to wait for a refresh.
    """

    def __init__(
        self,
        clock: Clock,
        markers: MarkerSink,
        window_settings: WindowSettings | None = None,
        text_settings: TextSettings | None = None,
    ) -> None:
        self._clock = clock
        self._markers = markers
        self._window_settings = window_settings or WindowSettings()
        self._text_settings = text_settings or TextSettings()
        self._window: Window | None = None
        self._sentence: TextStim | None = None
        self._fixation: TextStim | None = None
        self._message: TextStim | None = None
        self._flip_clock: Callable[[], float] | None = None
        self._clock_offset_s = 0.0
        self._frame_period_s = FALLBACK_FRAME_PERIOD_S
        self._last_flip = -math.inf
        self.onset_flip_times: list[float] = []
        """Flip time of each onset frame on PsychoPy's clock, as ``Window.flip()`` returned it."""

    @property
    def window(self) -> Window:
        """The open PsychoPy window, for screenshots and input devices."""
        return self._require_open()

    @property
    def clock_offset_s(self) -> float:
        """Session clock minus PsychoPy's flip clock in seconds, measured again each trial."""
        return self._clock_offset_s

    @property
    def frame_period_s(self) -> float:
        """The refresh period measured at :meth:`open`, in seconds."""
        return self._frame_period_s

    def open(self) -> None:
        """Open the window, measure its refresh rate and the clock offset, and show fixation."""
        if self._window is not None:
            return

        # pyglet would open a hidden shadow window at import, which fails without a display.
        # Importing PsychoPy also creates ~/.psychopy3, so HOME must be writable.
        os.environ["PYGLET_SHADOW_WINDOW"] = "0"
        from psychopy import logging as psychopy_logging

        window = self._open_window()
        self._window = window
        self._frame_period_s = self._measure_frame_period(window)

        # Window.flip() stamps its return value with psychopy.logging.defaultClock, which is the
        # clock of psychopy.core.getTime() unless a script replaces it with setDefaultClock().
        # NOTE: a setDefaultClock() call after open() would make the onset times wrong.
        self._flip_clock = psychopy_logging.defaultClock.getTime
        self._clock_offset_s, uncertainty_s = self._measure_clock_offset()

        self._sentence = make_text_stim(window, self._text_settings, "")
        self._message = make_text_stim(window, self._text_settings, "")
        self._fixation = make_text_stim(window, self._text_settings, self._text_settings.fixation_text)
        self._fixation.draw()
        self._flip()
        logger.info(
            "Opened a %dx%d PsychoPy window on screen %d at %.2f Hz, with a clock offset of "
            "%.6f s (uncertainty %.1f us).",
            *window.size,
            self._window_settings.screen,
            1.0 / self._frame_period_s,
            self._clock_offset_s,
            uncertainty_s * 1e6,
        )

    def present(
        self, trial: int, condition: str, stimulus: Stimulus, due: float, duration_s: float
    ) -> Onset:
        """Show ``stimulus`` from the first frame at or after ``due`` for ``duration_s``.

        Returns after the fixation frame that ends the stimulus. ``due`` is on the session clock.
        """
        window = self._require_open()
        if not math.isfinite(due):
            raise ValueError(f"due must be a finite time on the session clock, got {due!r}.")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(
                f"duration_s must be a positive number of seconds, got {duration_s!r}."
            )

        # Setting the text lays out and rasterises the glyphs, which can take longer than a frame,
        # so it happens before the wait and the frames below only draw.
        self._sentence.text = stimulus.text
        event = onset_marker(trial, condition, stimulus)
        # PsychoPy's timer is psychtoolbox.GetSecs when psychtoolbox imports, else perf_counter
        # (psychopy/clock.py, 2026.2). Measuring the offset every trial (about 25 us) keeps a jump
        # of that timer with the system time from shifting the onsets of later trials.
        self._clock_offset_s, _ = self._measure_clock_offset()
        n_dropped_before = window.nDroppedFrames
        # Turning recording on skips the first interval, so the gap since the last trial is not
        # counted as a dropped frame.
        window.recordFrameIntervals = True

        # Fixation until the frame before the due time.
        self._flip_until(self._fixation, due - self._clock_offset_s)

        # Onset: the marker carries the flip time, not the time it is sent.
        self._sentence.draw()
        flip_time = self._flip()
        onset = flip_time + self._clock_offset_s
        marker = self._markers.push(event, onset)
        self.onset_flip_times.append(flip_time)

        # The stimulus until the frame before its offset, then fixation.
        self._flip_until(self._sentence, flip_time + duration_s)
        self._fixation.draw()
        self._flip()

        window.recordFrameIntervals = False
        n_dropped_frames = window.nDroppedFrames - n_dropped_before
        return Onset(
            time=onset, late_s=onset - due, marker=marker, n_dropped_frames=n_dropped_frames
        )

    def show_message(self, text: str) -> None:
        """Show ``text`` on its own and return at once. It stays until the next frame."""
        self._require_open()
        self._message.text = text
        self._message.draw()
        self._flip()

    def close(self) -> None:
        """Close the window. A second call does nothing."""
        window, self._window = self._window, None
        if window is None:
            return
        window.close()
        self._sentence = self._message = self._fixation = None
        logger.info("Closed the PsychoPy window.")

    def _open_window(self) -> Window:
        from psychopy import monitors, visual

        settings = self._window_settings
        monitor = monitors.Monitor(
            "neurosteer",
            width=settings.monitor_width_cm,
            distance=settings.monitor_distance_cm,
            autoLog=False,
        )
        monitor.setSizePix(list(settings.size_pix))
        window = visual.Window(
            size=list(settings.size_pix),
            fullscr=settings.fullscreen,
            screen=settings.screen,
            color=settings.background_color,
            units=settings.units,
            monitor=monitor,
            waitBlanking=True,
            checkTiming=False,
            autoLog=False,
        )
        window.mouseVisible = False
        return window

    def _measure_frame_period(self, window: Window) -> float:
        """Measure the refresh period and set the two attributes Window(checkTiming=True) sets."""
        rate_hz = window.getActualFrameRate(infoMsg="")
        if rate_hz is None:
            logger.warning(
                "Failed to measure a steady refresh rate on screen %d, so assuming %.0f Hz. "
                "Check that vertical sync is on, because onsets are not frame-locked without it.",
                self._window_settings.screen,
                1.0 / FALLBACK_FRAME_PERIOD_S,
            )
            period_s = FALLBACK_FRAME_PERIOD_S
        else:
            period_s = 1.0 / rate_hz
        window.monitorFramePeriod = period_s
        window.refreshThreshold = 1.2 * period_s
        return period_s

    def _require_open(self) -> Window:
        if self._window is None:
            raise RuntimeError("The PsychoPy window is not open. Call open() first.")
        return self._window

    def _flip(self) -> float:
        self._last_flip = self._window.flip()
        return self._last_flip

    def _flip_until(self, stimulus: TextStim, deadline: float) -> None:
        """Flip frames of ``stimulus`` until the next flip would land at or after ``deadline``.

        ``deadline`` is on PsychoPy's flip clock. Right after a flip with vertical sync the next one
        lands one frame period later. After a pause (between trials) it lands at the next refresh,
        which the current time underestimates by up to one period.
        """
        while True:
            next_flip = max(self._flip_clock(), self._last_flip + self._frame_period_s)
            if next_flip >= deadline - FRAME_TOLERANCE_S:
                return
            stimulus.draw()
            self._flip()

    def _measure_clock_offset(self) -> tuple[float, float]:
        """Return the session clock minus the flip clock, and its uncertainty, in seconds.

        Each reading takes the flip clock, the session clock and the flip clock again. The reading
        with the shortest gap between its two flip-clock times bounds the offset most tightly.
        """
        best_offset, best_gap = 0.0, math.inf
        for _ in range(N_CLOCK_READINGS):
            before = self._flip_clock()
            session_time = self._clock.now()
            after = self._flip_clock()
            if after - before < best_gap:
                best_offset = session_time - (before + after) / 2
                best_gap = after - before
        # The offset lies within half the gap of the value returned.
        return best_offset, best_gap / 2


def make_text_stim(window: Window, settings: TextSettings, text: str) -> TextStim:
    """Create the TextStim that shows ``text``; the pre-run checks lay text out with it too."""
    from psychopy import visual

    return visual.TextStim(
        window,
        text=text,
        font=settings.font,
        height=settings.height,
        wrapWidth=settings.wrap_width,
        color=settings.color,
        alignText="center",
        anchorHoriz="center",
        anchorVert="center",
        autoLog=False,
    )
