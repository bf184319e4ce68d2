"""Tests of the PsychoPy screen in a real window under Xvfb, driven by the presentation loop.

Markers go over loopback LSL. Xvfb has no vertical sync, so a flip returns in about a millisecond
and PsychoPy's dropped-frame count means nothing there. These tests check what is drawn, in which
frame, and the marker times and text, not refresh timing.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pylsl
import pytest

from acquisition.lsl import MarkerOutlet, decode_marker
from loop.clock import LSLClock
from loop.config import DisplaySettings
from loop.errors import ConfigError
from loop.presentation import Onset, Stimulus
from loop.presentation_loop import PresentationLoop
from loop.psychopy_screen import (
    FRAME_TOLERANCE_S,
    PsychoPyScreen,
    WindowSettings,
    resolve_monitor,
)
from loop.visuals import PhotodiodeSettings, TextLook

# 40 cm wide at 57 cm: one degree of visual angle is very nearly 1 cm, here 20 pixels.
WINDOW = WindowSettings(size_pix=(800, 600), background_color="grey", units="deg",
                        monitor_width_cm=40.0, monitor_distance_cm=57.0)
LOOK = TextLook(font="Noto Sans", height_deg=1.25, wrap_width_deg=20.0, color="white")
PHOTODIODE = PhotodiodeSettings(corner="bottom_left", size_pix=40)
WIDTH_PIX, HEIGHT_PIX = WINDOW.size_pix
PIX_PER_DEG = 2 * 57.0 * np.tan(np.radians(0.5)) * 800 / 40.0
WRAP_WIDTH_PIX = LOOK.wrap_width_deg * PIX_PER_DEG
TEXT_HEIGHT_PIX = LOOK.height_deg * PIX_PER_DEG

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
    patch_level: float


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
        patch = image[-PHOTODIODE.size_pix:, :PHOTODIODE.size_pix, :3]
        self.frames.append(Frame(flip_time, *_find_ink(image), float(patch.mean())))
        return flip_time


def _find_ink(image: np.ndarray) -> tuple[int, tuple[int, int, int, int] | None]:
    ink = np.abs(image[..., :3] - 128).max(axis=-1) > INK_THRESHOLD
    # The photodiode patch is not ink: the corner square is checked on its own.
    ink[-PHOTODIODE.size_pix - 2:, :PHOTODIODE.size_pix + 2] = False
    if not ink.any():
        return 0, None
    rows = np.flatnonzero(ink.any(axis=1))
    columns = np.flatnonzero(ink.any(axis=0))
    return int(ink.sum()), (int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1]))


@dataclass
class Rig:
    """A screen with an open window in a presentation loop, its marker inlet, a flip recorder."""

    screen: PsychoPyScreen
    loop: PresentationLoop
    inlet: pylsl.StreamInlet
    recorder: FlipRecorder
    clock: LSLClock = field(default_factory=LSLClock)

    def pull_marker(self) -> tuple[str, float]:
        text, timestamp = self.inlet.pull_sample(timeout=LSL_TIMEOUT_S)
        assert text is not None, f"no marker arrived within {LSL_TIMEOUT_S} s"
        return text[0], timestamp

    def present_all(self, stimuli: list[Stimulus], lead_s: float = 0.1,
                    duration_s: float = DURATION_S) -> list[tuple[Onset, float]]:
        """Present ``stimuli`` one after the other through the loop; return onsets and due times."""
        presenter = self.loop.presenter()
        results: list[tuple[Onset, float]] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for trial, stimulus in enumerate(stimuli):
                    due = self.clock.now() + lead_s
                    results.append((presenter.present(trial, "drive", stimulus, due, duration_s),
                                    due))
                    # The next hand-over waits for this stimulus's offset and fixation frame.
                    self.clock.sleep_until(results[-1][0].time + duration_s + 0.05)
            except BaseException as err:  # handed back to the test
                errors.append(err)
            finally:
                presenter.stop()

        worker = threading.Thread(target=work)
        worker.start()
        self.loop.run(worker)
        worker.join(10)
        assert not errors, errors
        return results

    def present(self, text: str) -> tuple[Onset, float]:
        return self.present_all([Stimulus("s000", text)])[0]


def make_rig(look: TextLook = LOOK, mode: str = "sentence", **screen_options) -> Iterator[Rig]:
    clock = LSLClock()
    name = f"test-markers-{uuid.uuid4().hex}"
    outlet = MarkerOutlet(name, source_id=name)
    infos = pylsl.resolve_byprop("name", name, 1, LSL_TIMEOUT_S)
    assert infos, f"marker stream {name} not found on loopback"
    inlet = pylsl.StreamInlet(infos[0])
    inlet.open_stream(timeout=LSL_TIMEOUT_S)

    screen = PsychoPyScreen(clock, WINDOW, look, mode, photodiode=PHOTODIODE, **screen_options)
    screen.open()
    recorder = FlipRecorder(screen.window)
    loop = PresentationLoop(screen, clock, outlet)
    yield Rig(screen, loop, inlet, recorder, clock)

    recorder.stop()
    screen.close()
    # Close the inlet's connection before the outlet goes, or liblsl logs a broken connection.
    inlet.close_stream()
    outlet.close()


@pytest.fixture
def rig(xvfb_display: str) -> Iterator[Rig]:
    yield from make_rig()


def onset_frame_index(rig: Rig) -> int:
    flip_times = [frame.flip_time for frame in rig.recorder.frames]
    return flip_times.index(rig.screen.onset_flip_times[-1])


@pytest.mark.display
@pytest.mark.parametrize("text", ["Café crème für Jürgen.", LONG_SENTENCE])
def test_sentence_centred_within_wrap(rig: Rig, text: str) -> None:
    rig.present(text)

    frame = rig.recorder.frame_at(rig.screen.onset_flip_times[-1])
    assert frame.n_ink_pixels > 100, "the onset frame has no text"
    left, top, right, bottom = frame.ink_box
    # Centred text leaves a few pixels of asymmetry from glyph shapes and rounding.
    assert abs((left + right) / 2 - WIDTH_PIX / 2) < 0.02 * WIDTH_PIX
    assert abs((top + bottom) / 2 - HEIGHT_PIX / 2) < 0.03 * HEIGHT_PIX
    assert right - left + 1 <= WRAP_WIDTH_PIX


@pytest.mark.display
def test_long_sentence_wraps(rig: Rig) -> None:
    rig.present(LONG_SENTENCE)

    left, top, right, bottom = rig.recorder.frame_at(rig.screen.onset_flip_times[-1]).ink_box
    assert bottom - top > 2 * TEXT_HEIGHT_PIX, "the sentence did not wrap onto three lines"
    assert right - left + 1 > WRAP_WIDTH_PIX / 2, "the wrapped lines are narrower than expected"


def split_frames(rig: Rig) -> tuple[list[Frame], list[Frame], list[Frame]]:
    """Split the recorded frames into those before the onset, the stimulus's, and those after."""
    frames = rig.recorder.frames
    onset_index = onset_frame_index(rig)
    end = onset_index
    while end < len(frames) and frames[end].ink_box == frames[onset_index].ink_box:
        end += 1
    return frames[:onset_index], frames[onset_index:end], frames[end:]


@pytest.mark.display
def test_frames_fixation_sentence_fixation(rig: Rig) -> None:
    (onset, due), = rig.present_all([Stimulus("s0", LONG_SENTENCE)])

    before, stimulus_frames, after = split_frames(rig)
    fixation_box = before[0].ink_box

    assert before, "no fixation frame came before the onset"
    assert after, "no fixation frame came after the stimulus"
    assert all(frame.ink_box == fixation_box for frame in before + after)
    assert fixation_box[2] - fixation_box[0] < TEXT_HEIGHT_PIX, "fixation frame wider than a +"
    assert stimulus_frames[0].ink_box[2] - stimulus_frames[0].ink_box[0] > WRAP_WIDTH_PIX / 2
    # Without vertical sync a flip may land before the predicted frame time, so the bounds allow
    # one measured frame period on top of the tolerance.
    slack_s = FRAME_TOLERANCE_S + rig.screen.frame_period_s
    onset_flip = stimulus_frames[0].flip_time
    assert onset.time >= due - slack_s
    assert after[0].flip_time - onset_flip >= DURATION_S - slack_s
    # Each stimulus frame is drawn only while the offset is not yet due, and the last one was
    # decided right after the flip before it. That flip's time is therefore before the offset,
    # however late a loaded machine makes the last flip itself land.
    assert len(stimulus_frames) >= 2
    assert stimulus_frames[-2].flip_time - onset_flip < DURATION_S - FRAME_TOLERANCE_S


@pytest.mark.display
def test_photodiode_patch_lit_on_stimulus_frames(rig: Rig) -> None:
    rig.present_all([Stimulus("s0", "A sentence to time.")])

    before, stimulus_frames, after = split_frames(rig)
    assert len(stimulus_frames) >= 2
    assert [frame.patch_level for frame in stimulus_frames] == [255.0] * len(stimulus_frames)
    assert {frame.patch_level for frame in before + after} == {0.0}


@pytest.mark.display
def test_marker_times_are_flip_times(rig: Rig) -> None:
    results = rig.present_all([Stimulus(f"s{trial}", f"Sentence number {trial}.")
                               for trial in range(3)])

    recorded_flips = {frame.flip_time for frame in rig.recorder.frames}
    for (onset, due), flip_time in zip(results, rig.screen.onset_flip_times, strict=True):
        text, timestamp = rig.pull_marker()
        assert flip_time in recorded_flips, "the onset time is not a value Window.flip() returned"
        # The offset is measured again before each trial; the marker carries that trial's mapping.
        assert timestamp == pytest.approx(flip_time + rig.screen.clock_offset_s, abs=1e-4)
        assert timestamp == onset.time
        assert text == onset.marker
        assert onset.late_s == onset.time - due
    assert len(rig.screen.onset_flip_times) == 3
    reports = rig.loop.presenter().take_reports()
    assert [report.trial for report in reports] == [0, 1, 2]
    assert all(report.n_dropped_frames >= 0 for report in reports)


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

    # The screen measured its offset moments earlier. The 1 ms allows for the process being
    # preempted between the reads of either measurement.
    assert abs(offset - rig.screen.clock_offset_s) < 1e-3 + gap


@pytest.mark.display
@pytest.mark.parametrize(
    "sentence",
    [
        "Café crème für Jürgen.",
        "Cafe\u0301 with a combining accent stays decomposed.",
        "Ελληνικά and “curly quotes” — all of it.",
        "שלום עולם",
    ],
)
def test_marker_text_is_exact_sentence(rig: Rig, sentence: str) -> None:
    (onset, _), = rig.present_all([Stimulus("s007", sentence)])
    text, _ = rig.pull_marker()

    event = decode_marker(text)
    assert text == onset.marker
    assert sentence.encode("utf-8") in text.encode("utf-8")
    assert event["text"] == sentence
    assert event["type"] == "onset"
    assert event["trial"] == 0
    assert event["condition"] == "drive"
    assert event["stimulus_id"] == "s007"
    assert event["duration_s"] == DURATION_S


@pytest.mark.display
def test_rsvp_words_in_turn(xvfb_display: str) -> None:
    word_duration_s, duration_s = 0.1, 0.4
    for rig in make_rig(mode="rsvp", word_duration_s=word_duration_s):
        rig.present_all([Stimulus("s0", "one two three")], duration_s=duration_s)
        onset_flip = rig.screen.onset_flip_times[-1]
        boxes: dict[int, set] = {}
        for frame in rig.recorder.frames:
            elapsed = frame.flip_time - onset_flip
            slot = elapsed / word_duration_s
            # A frame shows what is due at its predicted flip time. Xvfb flips without vertical
            # sync and can land a few ms off that prediction, so frames within 20 ms of a word
            # change or of the offset may show either side of it.
            if elapsed < 0 or elapsed > duration_s - 0.02 or abs(slot - round(slot)) < 0.2:
                continue
            boxes.setdefault(int(slot), set()).add(frame.ink_box)
    # Words 0-2, each on its own, then nothing until the offset.
    assert set(boxes) == {0, 1, 2, 3}
    assert boxes[3] == {None}
    widths = {index: {box[2] - box[0] for box in boxes[index]} for index in range(3)}
    assert [len(found) for found in widths.values()] == [1, 1, 1]
    assert len({*widths[0], *widths[1], *widths[2]}) == 3
    # "three" is wider than "one" and "two".
    assert min(widths[2]) > max(widths[0] | widths[1])


@pytest.mark.display
def test_image_shown_at_size(rig: Rig) -> None:
    pattern = np.zeros((60, 90, 3))
    pattern[:30] = [1.0, 0.0, 0.0]
    pattern[30:] = [0.0, 0.0, 1.0]
    rig.screen._image_size_deg = 6.0
    rig.present_all([Stimulus("img-0", "red over blue", image=pattern)])

    frame = rig.recorder.frame_at(rig.screen.onset_flip_times[-1])
    left, top, right, bottom = frame.ink_box
    # The longer side (90 columns) spans 6 degrees; the aspect ratio is kept.
    assert right - left + 1 == pytest.approx(6.0 * PIX_PER_DEG, abs=2)
    assert bottom - top + 1 == pytest.approx(4.0 * PIX_PER_DEG, abs=2)
    assert abs((left + right) / 2 - WIDTH_PIX / 2) <= 1


@pytest.mark.display
def test_operator_keys_read_from_window(rig: Rig) -> None:
    from psychopy import event

    event._onPygletKey("p", 0, emulated=True)
    event._onPygletKey("x", 0, emulated=True)
    assert rig.screen.pressed_keys() == ["p"]
    assert rig.screen.pressed_keys() == []


@pytest.mark.display
def test_trigger_key_routed_to_queue(rig: Rig) -> None:
    from psychopy import event

    from acquisition.scanner import QueuedTriggerSource

    echoed: list[float] = []
    rig.screen.take_trigger_key("5", echoed.append)
    source = QueuedTriggerSource(rig.screen.trigger_pulses, "key '5'")
    event.getKeys()
    for key in ("5", "a", "5", "p", "5"):
        event._onPygletKey(key, 0, emulated=True)
    presses = [(key, press_time) for key, _, press_time in event._keyBuffer]

    assert rig.screen.pressed_keys() == ["p"]

    expected = [press_time + rig.screen.clock_offset_s for key, press_time in presses if key == "5"]
    assert source.poll() == expected
    assert echoed == expected
    # Keys that are neither operator keys nor the trigger stay in the buffer for their readers.
    assert [(key, press_time) for key, _, press_time in event._keyBuffer] == [
        (key, press_time) for key, press_time in presses if key == "a"]
    assert source.poll() == []
    event.getKeys()


@pytest.mark.display
def test_trigger_key_on_lsl_clock(rig: Rig) -> None:
    from psychopy import event

    rig.screen.take_trigger_key("5")
    event.getKeys()
    before = pylsl.local_clock()
    event._onPygletKey("5", 0, emulated=True)
    after = pylsl.local_clock()

    rig.screen.pressed_keys()

    pulse = rig.screen.trigger_pulses.get_nowait()
    # The screen measured its clock offset to within microseconds when it opened, so 1 ms covers
    # the offset and the time between the clock reads and the press.
    assert before - 0.001 <= pulse <= after + 0.001


@pytest.mark.display
def test_message_replaces_fixation(rig: Rig) -> None:
    rig.screen.set_message("Rest for a moment.")
    rig.screen.idle(0.0)

    frame = rig.recorder.frames[-1]
    fixation = rig.recorder.frames[0] if rig.recorder.frames[:-1] else None
    assert frame.n_ink_pixels > 100
    left, _, right, _ = frame.ink_box
    assert abs((left + right) / 2 - WIDTH_PIX / 2) < 0.02 * WIDTH_PIX
    assert right - left > 5 * TEXT_HEIGHT_PIX
    rig.screen.set_message(None)
    rig.screen.idle(0.0)
    assert rig.recorder.frames[-1].ink_box[2] - rig.recorder.frames[-1].ink_box[0] < TEXT_HEIGHT_PIX
    assert fixation is None or fixation.ink_box == rig.recorder.frames[-1].ink_box


@pytest.mark.display
def test_close_twice_and_show_after_close(xvfb_display: str) -> None:
    screen = PsychoPyScreen(LSLClock(), WINDOW, LOOK)
    screen.open()
    screen.close()
    screen.close()

    with pytest.raises(RuntimeError, match="not open"):
        screen.prepare(Stimulus("s0", "Too late."))


@pytest.mark.display
def test_window_size_mismatch_rejected(xvfb_display: str) -> None:
    # Full screen on the 1280x1024 Xvfb screen cannot give an 800x600 window.
    settings = WindowSettings(size_pix=(800, 600), fullscreen=True, monitor_width_cm=40.0,
                              monitor_distance_cm=57.0)
    screen = PsychoPyScreen(LSLClock(), settings, LOOK)
    with pytest.raises(ConfigError, match="not at the rig's display.size_pix 800x600"):
        screen.open()
    assert screen._window is None


@pytest.mark.display
def test_refresh_rate_mismatch_rejected(xvfb_display: str) -> None:
    # Xvfb has no vertical sync: it either flips far faster than 1 Hz or has no steady rate.
    settings = WindowSettings(size_pix=(800, 600), monitor_width_cm=40.0,
                              monitor_distance_cm=57.0, refresh_rate_hz=1.0)
    screen = PsychoPyScreen(LSLClock(), settings, LOOK)
    with pytest.raises(ConfigError, match="refresh"):
        screen.open()


@pytest.fixture
def monitor_center(tmp_path, monkeypatch):
    """PsychoPy's Monitor Center in a temporary folder, with one saved monitor ``lab3``."""
    from psychopy import monitors
    from psychopy.monitors import calibTools

    monkeypatch.setattr(calibTools, "monitorFolder", str(tmp_path))
    monitor = monitors.Monitor("lab3", width=50.0, distance=57.0, autoLog=False)
    monitor.setSizePix([800, 600])
    monitor.save()
    return tmp_path


def test_monitor_center_fills_in(monitor_center, tmp_path) -> None:
    display = DisplaySettings(monitor_name="lab3")
    settings = resolve_monitor(display, tmp_path / "rig.toml")
    assert settings.monitor_width_cm == 50.0
    assert settings.monitor_distance_cm == 57.0
    assert settings.size_pix == (800, 600)
    assert settings.monitor_name == "lab3"


def test_monitor_center_disagreement_rejected(monitor_center, tmp_path) -> None:
    display = DisplaySettings(monitor_name="lab3", monitor_width_cm=53.0, size_pix=(1280, 1024))
    with pytest.raises(ConfigError) as caught:
        resolve_monitor(display, tmp_path / "rig.toml")
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{tmp_path / 'rig.toml'}: display.monitor_width_cm: the rig file gives 53.0, Monitor "
        "Center 'lab3' stores 50.0",
        f"{tmp_path / 'rig.toml'}: display.size_pix: the rig file gives (1280, 1024), Monitor "
        "Center 'lab3' stores [800, 600]",
    ]


def test_unknown_monitor_rejected(monitor_center, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"'lab9' is not saved in PsychoPy's Monitor Center "
                                          r"\(saved: lab3\)"):
        resolve_monitor(DisplaySettings(monitor_name="lab9"), tmp_path / "rig.toml")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (lambda: WindowSettings(size_pix=(0, 600)), "size_pix"),
        (lambda: WindowSettings(units="furlong"), "units"),
        (lambda: WindowSettings(monitor_distance_cm=0.0), "monitor_distance_cm"),
    ],
)
def test_invalid_settings_rejected(settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings()
