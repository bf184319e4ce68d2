"""Tests of the PsychoPy presenter in a real window under Xvfb, with markers over loopback LSL.

Xvfb has no vertical sync, so a flip returns in about a millisecond and PsychoPy's dropped-frame
count means nothing there. These tests check what is drawn, in which frame, and the marker times and
text, not refresh timing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pylsl
import pytest

from acquisition.lsl import MarkerOutlet, decode_marker
from loop.clock import LSLClock
from loop.presentation import Onset, Stimulus
from loop.psychopy_presenter import (
    FRAME_TOLERANCE_S,
    PsychoPyPresenter,
    TextSettings,
    WindowSettings,
)

WINDOW = WindowSettings(size_pix=(800, 600), background_color="grey", units="height")
TEXT = TextSettings(font="DejaVu Sans", height=0.05, wrap_width=0.8, color="white")
WIDTH_PIX, HEIGHT_PIX = WINDOW.size_pix
# In "height" units one unit is the window height in pixels.
WRAP_WIDTH_PIX = TEXT.wrap_width * HEIGHT_PIX
TEXT_HEIGHT_PIX = TEXT.height * HEIGHT_PIX

# A pixel is ink when a channel differs from the grey background (128) by more than this.
INK_THRESHOLD = 60
DURATION_S = 0.2
LSL_TIMEOUT_S = 5.0

LONG_SENTENCE = (
    "The committee postponed its decision until the engineers could measure how the bridge "
    "responded to wind gusts over a whole winter."
)


@dataclass
class Frame:
    """A recorded flip, with its return value and the ink of its frame.

    ``ink_box`` is (left, top, right, bottom) in pixels from the top left, or None when blank.
    """

    flip_time: float
    n_ink_pixels: int
    ink_box: tuple[int, int, int, int] | None


class FlipRecorder:
    """Wraps ``window.flip`` to screenshot each frame from the back buffer just before its flip.

    Under Xvfb the front buffer reads back black after a flip, so the back buffer is the only
    view of what a flip shows.
    """

    def __init__(self, window) -> None:
        self.frames: list[Frame] = []
        self._window = window
        self._flip = window.flip
        window.flip = self._record

    def stop(self) -> None:
        # Removing the instance attribute brings back Window.flip.
        del self._window.flip

    def frame_at(self, flip_time: float) -> Frame:
        matches = [frame for frame in self.frames if frame.flip_time == flip_time]
        assert len(matches) == 1, f"{len(matches)} recorded flips returned {flip_time}"
        return matches[0]

    def _record(self, clearBuffer: bool = True) -> float:  # noqa: N803 (PsychoPy's name)
        image = np.asarray(self._window.getMovieFrame(buffer="back"), dtype=np.int16)
        self._window.movieFrames.clear()
        flip_time = self._flip(clearBuffer=clearBuffer)
        self.frames.append(Frame(flip_time, *_find_ink(image)))
        return flip_time


def _find_ink(image: np.ndarray) -> tuple[int, tuple[int, int, int, int] | None]:
    ink = np.abs(image[..., :3] - 128).max(axis=-1) > INK_THRESHOLD
    if not ink.any():
        return 0, None
    rows = np.flatnonzero(ink.any(axis=1))
    columns = np.flatnonzero(ink.any(axis=0))
    return int(ink.sum()), (int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1]))


@dataclass
class Rig:
    """A presenter with an open window, the inlet of its marker stream, and a flip recorder."""

    presenter: PsychoPyPresenter
    inlet: pylsl.StreamInlet
    recorder: FlipRecorder
    clock: LSLClock = field(default_factory=LSLClock)

    def pull_marker(self) -> tuple[str, float]:
        text, timestamp = self.inlet.pull_sample(timeout=LSL_TIMEOUT_S)
        assert text is not None, f"no marker arrived within {LSL_TIMEOUT_S} s"
        return text[0], timestamp

    def present(self, trial: int, text: str, lead_s: float = 0.05) -> tuple[Onset, float]:
        """Present ``text`` ``lead_s`` from now and return its onset and due time."""
        due = self.clock.now() + lead_s
        stimulus = Stimulus(stimulus_id=f"s{trial:03d}", text=text)
        onset = self.presenter.present(trial, "drive", stimulus, due, DURATION_S)
        return onset, due


@pytest.fixture
def rig(xvfb_display: str) -> Iterator[Rig]:
    clock = LSLClock()
    name = f"test-markers-{uuid.uuid4().hex}"
    outlet = MarkerOutlet(name, source_id=name)
    infos = pylsl.resolve_byprop("name", name, 1, LSL_TIMEOUT_S)
    assert infos, f"marker stream {name} not found on loopback"
    inlet = pylsl.StreamInlet(infos[0])
    inlet.open_stream(timeout=LSL_TIMEOUT_S)

    presenter = PsychoPyPresenter(clock, outlet, WINDOW, TEXT)
    presenter.open()
    recorder = FlipRecorder(presenter.window)
    yield Rig(presenter, inlet, recorder, clock)

    recorder.stop()
    presenter.close()
    # Close the inlet's connection before the outlet goes, or liblsl logs a broken connection.
    inlet.close_stream()
    outlet.close()


@pytest.mark.display
@pytest.mark.parametrize("text", ["Café crème für Jürgen.", LONG_SENTENCE])
def test_sentence_centred_within_wrap(rig: Rig, text: str) -> None:
    rig.present(trial=1, text=text)

    frame = rig.recorder.frame_at(rig.presenter.onset_flip_times[-1])
    assert frame.n_ink_pixels > 100, "the onset frame has no text"
    left, top, right, bottom = frame.ink_box
    # Centred text leaves a few pixels of asymmetry from glyph shapes and rounding.
    assert abs((left + right) / 2 - WIDTH_PIX / 2) < 0.02 * WIDTH_PIX
    assert abs((top + bottom) / 2 - HEIGHT_PIX / 2) < 0.03 * HEIGHT_PIX
    assert right - left + 1 <= WRAP_WIDTH_PIX


@pytest.mark.display
def test_long_sentence_wraps(rig: Rig) -> None:
    rig.present(trial=1, text=LONG_SENTENCE)

    left, top, right, bottom = rig.recorder.frame_at(rig.presenter.onset_flip_times[-1]).ink_box
    assert bottom - top > 2 * TEXT_HEIGHT_PIX, "the sentence did not wrap onto three lines"
    assert right - left + 1 > WRAP_WIDTH_PIX / 2, "the wrapped lines are narrower than expected"


@pytest.mark.display
def test_frames_fixation_sentence_fixation(rig: Rig) -> None:
    onset, due = rig.present(trial=1, text=LONG_SENTENCE)

    flip_times = [frame.flip_time for frame in rig.recorder.frames]
    onset_index = flip_times.index(rig.presenter.onset_flip_times[-1])
    before = rig.recorder.frames[:onset_index]
    stimulus_frames = rig.recorder.frames[onset_index:-1]
    after = rig.recorder.frames[-1]
    fixation_box = rig.recorder.frames[0].ink_box
    sentence_box = stimulus_frames[0].ink_box

    assert before, "no fixation frame came before the onset"
    assert all(frame.ink_box == fixation_box for frame in before)
    assert fixation_box[2] - fixation_box[0] < TEXT_HEIGHT_PIX, "fixation frame wider than a +"
    assert all(frame.ink_box == sentence_box for frame in stimulus_frames)
    assert after.ink_box == fixation_box
    # Without vertical sync a flip may land before the predicted frame time, so the bounds allow
    # one measured frame period on top of the tolerance.
    slack_s = FRAME_TOLERANCE_S + rig.presenter.frame_period_s
    assert onset.time >= due - slack_s
    assert after.flip_time - stimulus_frames[0].flip_time >= DURATION_S - slack_s


@pytest.mark.display
def test_marker_times_are_flip_times(rig: Rig) -> None:
    for trial in range(3):
        onset, due = rig.present(trial, f"Sentence number {trial}.")
        text, timestamp = rig.pull_marker()

        flip_time = rig.presenter.onset_flip_times[-1]
        recorded_flips = {frame.flip_time for frame in rig.recorder.frames}
        assert flip_time in recorded_flips, "the onset time is not a value Window.flip() returned"
        assert timestamp == flip_time + rig.presenter.clock_offset_s
        assert timestamp == onset.time
        assert text == onset.marker
        assert onset.late_s == onset.time - due
        assert onset.n_dropped_frames >= 0

    assert len(rig.presenter.onset_flip_times) == 3


@pytest.mark.display
def test_clock_offset_matches_lsl_clock(rig: Rig) -> None:
    from psychopy import core

    gaps_and_offsets = []
    for _ in range(20):
        before = core.getTime()
        lsl_time = pylsl.local_clock()
        after = core.getTime()
        gaps_and_offsets.append((after - before, lsl_time - (before + after) / 2))
    gap, offset = min(gaps_and_offsets)

    # The presenter measured its offset moments earlier. The 1 ms allows for the process being
    # preempted between the reads of either measurement.
    assert abs(offset - rig.presenter.clock_offset_s) < 1e-3 + gap


@pytest.mark.display
@pytest.mark.parametrize(
    "sentence",
    [
        "Café crème für Jürgen.",
        "Cafe\u0301 with a combining accent stays decomposed.",
        "Ελληνικά, 日本語 and “curly quotes” — all of it.",
    ],
)
def test_marker_text_is_exact_sentence(rig: Rig, sentence: str) -> None:
    onset, _ = rig.present(trial=7, text=sentence)
    text, _ = rig.pull_marker()

    event = decode_marker(text)
    assert text == onset.marker
    assert sentence.encode("utf-8") in text.encode("utf-8")
    assert event["text"] == sentence
    assert event["type"] == "onset"
    assert event["trial"] == 7
    assert event["condition"] == "drive"
    assert event["stimulus_id"] == "s007"


@pytest.mark.display
def test_show_message_draws_text(rig: Rig) -> None:
    rig.presenter.show_message("Rest for a moment.")

    frame = rig.recorder.frames[-1]
    assert frame.n_ink_pixels > 100
    left, _, right, _ = frame.ink_box
    assert abs((left + right) / 2 - WIDTH_PIX / 2) < 0.02 * WIDTH_PIX


@pytest.mark.display
def test_close_twice_and_present_after_close(xvfb_display: str) -> None:
    outlet = MarkerOutlet(f"test-markers-{uuid.uuid4().hex}", source_id="close-test")
    presenter = PsychoPyPresenter(LSLClock(), outlet, WINDOW, TEXT)
    presenter.open()
    presenter.close()
    presenter.close()

    with pytest.raises(RuntimeError, match="not open"):
        presenter.present(0, "drive", Stimulus("s0", "Too late."), 0.0, DURATION_S)
    outlet.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (lambda: WindowSettings(size_pix=(0, 600)), "size_pix"),
        (lambda: WindowSettings(units="furlong"), "units"),
        (lambda: WindowSettings(monitor_distance_cm=0.0), "monitor_distance_cm"),
        (lambda: TextSettings(height=-0.1), "height"),
        (lambda: TextSettings(wrap_width=0.0), "wrap_width"),
    ],
)
def test_invalid_settings_rejected(settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings()
