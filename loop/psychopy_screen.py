"""The PsychoPy screen of the presentation loop: stimuli on refresh-locked frames.

Runs in the session's main thread on a machine with a display (an X server such as Xvfb will do),
driven by :class:`loop.presentation_loop.PresentationLoop`. Each onset is the flip that shows the
stimulus, and its time is mapped to the session (LSL) clock with an offset measured before the
trial. An onset lands up to one frame period after its due time, and the timing means nothing
without vertical sync, which Xvfb lacks.
"""

from __future__ import annotations

import logging
import math
import os
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loop.clock import Clock
from loop.errors import ConfigError
from loop.presentation import Stimulus
from loop.visuals import (
    PhotodiodePatch,
    PhotodiodeSettings,
    PreparedStimulus,
    TextLook,
    make_fixation,
    make_text_stim,
    prepare_stimulus,
    set_text,
)

if TYPE_CHECKING:
    from psychopy.visual import Window

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

# How far the measured refresh rate may stray from the rig's refresh_rate_hz, as a fraction.
REFRESH_RATE_TOLERANCE = 0.05


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
    monitor_name: str = "neurosteer"
    refresh_rate_hz: float | None = None

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


class PsychoPyScreen:
    """A PsychoPy window that shows each stimulus from the first frame at or after its due time.

    ``clock`` must read the LSL clock (:class:`loop.clock.LSLClock`), because the onsets passed to
    the loop's markers are on it. Between stimuli the window shows fixation or a message, and the
    photodiode patch (when set) is white exactly on the frames that show a stimulus.
    """

    def __init__(
        self,
        clock: Clock,
        window_settings: WindowSettings,
        look: TextLook,
        mode: Literal["sentence", "rsvp"] = "sentence",
        word_duration_s: float = 0.3,
        image_size_deg: float = 8.0,
        fixation_text: str = "+",
        photodiode: PhotodiodeSettings | None = None,
        keys: tuple[str, ...] = ("p", "escape"),
    ) -> None:
        self._clock = clock
        self._window_settings = window_settings
        self._look = look
        self._mode = mode
        self._word_duration_s = word_duration_s
        self._image_size_deg = image_size_deg
        self._fixation_text = fixation_text
        self._photodiode_settings = photodiode
        self._keys = list(keys)
        self._trigger_key: str | None = None
        self.on_trigger: Callable[[float], None] | None = None
        self.trigger_pulses: queue.Queue = queue.Queue()
        """Times of the trigger key's presses on the session clock, for a QueuedTriggerSource."""
        self._window: Window | None = None
        self._fixation = None
        self._message = None
        self._message_text: str | None = None
        self._patch: PhotodiodePatch | None = None
        self._flip_clock: Callable[[], float] | None = None
        self._clock_offset_s = 0.0
        self.frame_period_s = FALLBACK_FRAME_PERIOD_S
        self._last_flip = -math.inf
        self.onset_flip_times: list[float] = []
        """Flip time of each onset frame on PsychoPy's clock, as ``Window.flip()`` returned it."""

    @property
    def window(self) -> Window:
        """The open PsychoPy window, for screenshots, input devices and the pre-run text checks."""
        return self._require_open()

    @property
    def clock_offset_s(self) -> float:
        """Session clock minus PsychoPy's flip clock in seconds, measured again each trial."""
        return self._clock_offset_s

    def open(self) -> None:
        """Open the window, check its size and refresh rate, measure the clock offset, show fixation.

        Raises ConfigError when the window does not open at the rig's size or refreshes at
        another rate than the rig states, before any trial.
        """
        if self._window is not None:
            return

        # pyglet would open a hidden shadow window at import, which fails without a display.
        # Importing PsychoPy also creates ~/.psychopy3, so HOME must be writable.
        os.environ["PYGLET_SHADOW_WINDOW"] = "0"
        from psychopy import logging as psychopy_logging

        window = self._open_window()
        self._window = window
        try:
            self._check_window_size(window)
            self.frame_period_s = self._measure_frame_period(window)
        except Exception:
            self.close()
            raise

        # Window.flip() stamps its return value with psychopy.logging.defaultClock, which is the
        # clock of psychopy.core.getTime() unless a script replaces it with setDefaultClock().
        # NOTE: a setDefaultClock() call after open() would make the onset times wrong.
        self._flip_clock = psychopy_logging.defaultClock.getTime
        self._clock_offset_s, uncertainty_s = self._measure_clock_offset()

        self._fixation = make_fixation(window, self._look, self._fixation_text)
        self._message = make_text_stim(window, self._look, "")
        if self._photodiode_settings is not None:
            self._patch = PhotodiodePatch(window, self._photodiode_settings)
        self._draw_background()
        self._flip()
        logger.info(
            "Opened a %dx%d PsychoPy window on screen %d at %.2f Hz, with a clock offset of "
            "%.6f s (uncertainty %.1f us).",
            *window.size,
            self._window_settings.screen,
            1.0 / self.frame_period_s,
            self._clock_offset_s,
            uncertainty_s * 1e6,
        )

    def prepare(self, stimulus: Stimulus) -> PreparedStimulus:
        """Lay out ``stimulus``; this can take longer than a frame, so it runs before the wait."""
        return prepare_stimulus(self._require_open(), stimulus, self._look, self._mode,
                                self._word_duration_s, self._image_size_deg)

    def show(self, prepared: PreparedStimulus, due: float, duration_s: float,
             on_onset: Callable[[float], None]) -> int:
        """Show ``prepared`` from the first frame at or after ``due`` for ``duration_s``.

        ``due`` is on the session clock. Calls ``on_onset`` with the onset frame's flip time on the
        session clock right after that flip, and returns the dropped frames after the fixation
        frame that ends the stimulus.
        """
        window = self._require_open()
        if not math.isfinite(due):
            raise ValueError(f"due must be a finite time on the session clock, got {due!r}.")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(
                f"duration_s must be a positive number of seconds, got {duration_s!r}."
            )

        # PsychoPy's timer is psychtoolbox.GetSecs when psychtoolbox imports, else perf_counter
        # (psychopy/clock.py, 2026.2). Measuring the offset every trial (about 25 us) keeps a jump
        # of that timer with the system time from shifting the onsets of later trials.
        self._clock_offset_s, _ = self._measure_clock_offset()
        n_dropped_before = window.nDroppedFrames
        # Turning recording on skips the first interval, so the gap since the last trial is not
        # counted as a dropped frame.
        window.recordFrameIntervals = True
        self._message_text = None

        # Fixation until the frame before the due time.
        self._flip_until(self._draw_background, due - self._clock_offset_s)

        # Onset: the marker carries the flip time, not the time it is sent.
        self._draw_stimulus(prepared, 0.0)
        flip_time = self._flip()
        self.onset_flip_times.append(flip_time)
        on_onset(flip_time + self._clock_offset_s)

        # The stimulus until the frame before its offset, then fixation. Each frame draws what is
        # due at its own flip, one frame period after the last one.
        self._flip_until(
            lambda: self._draw_stimulus(prepared, self._last_flip + self.frame_period_s - flip_time),
            flip_time + duration_s,
        )
        self._draw_background()
        self._flip()

        window.recordFrameIntervals = False
        return window.nDroppedFrames - n_dropped_before

    def idle(self, until: float) -> None:
        """Flip one frame of fixation or the message; a refresh paces the loop, not ``until``."""
        self._require_open()
        self._draw_background()
        self._flip()

    def set_message(self, text: str | None) -> None:
        """Show ``text`` in place of fixation from the next frame on; None brings back fixation."""
        self._require_open()
        self._message_text = text
        if text is not None:
            set_text(self._message, text)

    def pressed_keys(self) -> list[str]:
        """Return the operator keys pressed since the last call (PsychoPy's key buffer).

        Presses of the trigger key (:meth:`take_trigger_key`) go to :attr:`trigger_pulses` instead,
        each with its buffer time mapped to the session clock.
        """
        from psychopy import event

        self._require_open()
        key_list = self._keys + ([self._trigger_key] if self._trigger_key else [])
        operator_keys = []
        for key, time in event.getKeys(keyList=key_list, timeStamped=True):
            if key == self._trigger_key:
                pulse = time + self._clock_offset_s
                self.trigger_pulses.put(pulse)
                if self.on_trigger is not None:
                    self.on_trigger(pulse)
            else:
                operator_keys.append(key)
        return operator_keys

    def take_trigger_key(self, key: str, on_trigger: Callable[[float], None] | None = None) -> None:
        """Route presses of ``key`` (a scanner's sync pulses) to :attr:`trigger_pulses`.

        PsychoPy's key buffer may only be read by the window's thread, because reading it also
        dispatches the window's events. ``on_trigger`` is called with each pulse's time, in that
        thread.
        """
        self._trigger_key = key
        self.on_trigger = on_trigger

    def close(self) -> None:
        """Close the window. A second call does nothing."""
        window, self._window = self._window, None
        if window is None:
            return
        window.close()
        self._fixation = self._message = self._patch = None
        logger.info("Closed the PsychoPy window.")

    def _draw_background(self) -> None:
        if self._message_text is not None:
            self._message.draw()
        else:
            self._fixation.draw()
        if self._patch is not None:
            self._patch.draw(on=False)

    def _draw_stimulus(self, prepared: PreparedStimulus, elapsed_s: float) -> None:
        prepared.draw(elapsed_s)
        if self._patch is not None:
            self._patch.draw(on=True)

    def _open_window(self) -> Window:
        from psychopy import monitors, visual

        settings = self._window_settings
        # A monitor the rig file describes is not saved in Monitor Center, and PsychoPy warns
        # "Monitor specification not found" on the console. The rig file's values are complete.
        from psychopy import logging as psychopy_logging

        console_level = psychopy_logging.console.level
        psychopy_logging.console.setLevel(psychopy_logging.ERROR)
        try:
            monitor = monitors.Monitor(
                settings.monitor_name,
                width=settings.monitor_width_cm,
                distance=settings.monitor_distance_cm,
                autoLog=False,
            )
        finally:
            psychopy_logging.console.setLevel(console_level)
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

    def _check_window_size(self, window: Window) -> None:
        expected = tuple(self._window_settings.size_pix)
        actual = tuple(int(side) for side in window.size)
        if actual != expected:
            raise ConfigError(
                f"The window opened at {actual[0]}x{actual[1]} pixels on screen "
                f"{self._window_settings.screen}, not at the rig's display.size_pix "
                f"{expected[0]}x{expected[1]}, so visual angles would be wrong. Set size_pix to "
                "the screen's resolution, or set the screen to that resolution."
            )

    def _measure_frame_period(self, window: Window) -> float:
        """Measure the refresh period and set the two attributes Window(checkTiming=True) sets."""
        expected_hz = self._window_settings.refresh_rate_hz
        rate_hz = window.getActualFrameRate(infoMsg="")
        if rate_hz is None:
            if expected_hz is not None:
                raise ConfigError(
                    f"Failed to measure a steady refresh rate on screen "
                    f"{self._window_settings.screen}, and the rig expects {expected_hz:g} Hz. "
                    "Check that vertical sync is on in the graphics driver."
                )
            logger.warning(
                "Failed to measure a steady refresh rate on screen %d, so assuming %.0f Hz. "
                "Check that vertical sync is on, because onsets are not frame-locked without it.",
                self._window_settings.screen,
                1.0 / FALLBACK_FRAME_PERIOD_S,
            )
            period_s = FALLBACK_FRAME_PERIOD_S
        else:
            if expected_hz is not None and abs(rate_hz / expected_hz - 1) > REFRESH_RATE_TOLERANCE:
                raise ConfigError(
                    f"Screen {self._window_settings.screen} refreshes at {rate_hz:.2f} Hz, not at "
                    f"the rig's display.refresh_rate_hz {expected_hz:g} Hz. Set the display mode, "
                    "turn vertical sync on, or correct refresh_rate_hz."
                )
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

    def _flip_until(self, draw: Callable[[], None], deadline: float) -> None:
        """Draw and flip frames until the next flip would land at or after ``deadline``.

        ``deadline`` is on PsychoPy's flip clock. Right after a flip with vertical sync the next one
        lands one frame period later. After a pause (between trials) it lands at the next refresh,
        which the current time underestimates by up to one period.
        """
        while True:
            next_flip = max(self._flip_clock(), self._last_flip + self.frame_period_s)
            if next_flip >= deadline - FRAME_TOLERANCE_S:
                return
            draw()
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


def resolve_monitor(display, rig_path) -> WindowSettings:
    """Return the window settings of a rig's ``[display]`` table, checked against Monitor Center.

    A ``monitor_name`` must name a monitor saved in PsychoPy's Monitor Center. Its width, distance
    and resolution fill in what the rig leaves out, and any the rig also gives must agree within
    1%. Raises ConfigError naming the rig file and key otherwise.
    """
    width_cm, distance_cm, size_pix = (display.monitor_width_cm, display.viewing_distance_cm,
                                       display.size_pix)
    name = "neurosteer"
    if display.monitor_name is not None:
        from psychopy import monitors

        name = display.monitor_name
        saved = monitors.getAllMonitors()
        if name not in saved:
            raise ConfigError(
                f"{rig_path}: display.monitor_name: {name!r} is not saved in PsychoPy's Monitor "
                f"Center (saved: {', '.join(saved) or 'none'}). Save it there, or leave "
                "monitor_name out and give size_pix, monitor_width_cm and viewing_distance_cm."
            )
        monitor = monitors.Monitor(name, autoLog=False)
        stored = {"monitor_width_cm": monitor.getWidth(), "viewing_distance_cm": monitor.getDistance(),
                  "size_pix": monitor.getSizePix()}
        problems = []
        for key, value in stored.items():
            in_rig = getattr(display, key)
            if value is None and in_rig is None:
                problems.append(f"display.{key}: missing in Monitor Center and in the rig file")
            elif value is not None and in_rig is not None and not _agree(value, in_rig):
                problems.append(f"display.{key}: the rig file gives {in_rig}, Monitor Center "
                                f"{name!r} stores {value}")
        if problems:
            raise ConfigError("\n".join(f"{rig_path}: {problem}" for problem in problems))
        width_cm = width_cm or stored["monitor_width_cm"]
        distance_cm = distance_cm or stored["viewing_distance_cm"]
        size_pix = size_pix or tuple(stored["size_pix"])
    return WindowSettings(
        size_pix=tuple(int(side) for side in size_pix), fullscreen=display.fullscreen,
        screen=display.screen, background_color=display.background_color, units=display.units,
        monitor_width_cm=float(width_cm), monitor_distance_cm=float(distance_cm),
        monitor_name=name, refresh_rate_hz=display.refresh_rate_hz,
    )


def _agree(stored, in_rig) -> bool:
    if isinstance(in_rig, (tuple, list)):
        return [int(side) for side in stored] == [int(side) for side in in_rig]
    return abs(float(stored) / float(in_rig) - 1) <= 0.01
