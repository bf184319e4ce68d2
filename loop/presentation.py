"""The presentation interface and the headless presenter used by dry runs.

Runs in the controller process. A presenter shows one stimulus at its due time and sends the onset
marker stamped with the onset on the LSL clock. The PsychoPy presenter (``loop.psychopy_presenter``)
keeps the same contract with a real window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from loop.clock import Clock


@dataclass(frozen=True, eq=False)
class Stimulus:
    """One stimulus as the session shows it: a text, or an image with its text as a label.

    ``image`` is a file path or an array of shape (height, width) or (height, width, 3) with
    values in [0, 1] (floats) or [0, 255] (uint8). For an image, ``text`` names it in the markers.
    """

    stimulus_id: str
    text: str
    image: np.ndarray | str | Path | None = None
    # Where the image is stored for other programs (the simulated subject reads it from there);
    # onset markers carry it.
    image_file: str | None = None

    @property
    def is_image(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class Onset:
    """When a stimulus appeared on the LSL clock, how far that was from its due time, and what it was.

    ``late_s`` is signed: jitter in flip times can make it slightly negative. ``fallback`` is True
    when the stimulus handed over came too late and ``stimulus`` is the fallback shown in its place.
    """

    time: float
    late_s: float
    marker: str
    stimulus: Stimulus
    condition: str
    fallback: bool = False


@dataclass(frozen=True)
class FrameReport:
    """The display's record of a stimulus once it has gone: its offset and the frames it dropped."""

    trial: int
    offset: float
    n_dropped_frames: int


class MarkerSink(Protocol):
    def push(self, event: dict, timestamp: float) -> str:
        """Send one marker stamped with ``timestamp`` and return its text."""


class Presenter(Protocol):
    def open(self) -> None:
        """Prepare the display (and show fixation); called once before the first trial."""

    def present(
        self, trial: int, condition: str, stimulus: Stimulus, due: float, duration_s: float
    ) -> Onset:
        """Show ``stimulus`` at ``due``, send its onset marker, and return at or after the onset."""

    def expect(self, trial: int, due: float, duration_s: float, fallback: Stimulus) -> None:
        """Announce the next slot and the stimulus to show in it if the choice comes late."""

    def show_message(self, text: str, duration_s: float) -> None:
        """Show ``text`` in place of fixation for ``duration_s`` (instructions, rest)."""

    def take_reports(self) -> list[FrameReport]:
        """Return the frame reports of the stimuli that have ended since the last call."""

    def close(self) -> None:
        """Close the display; safe to call twice."""


def onset_marker(trial: int, condition: str, stimulus: Stimulus, duration_s: float) -> dict:
    """Return the onset marker of one trial; the text is exactly the text shown."""
    return {
        "type": "onset",
        "trial": trial,
        "condition": condition,
        "stimulus_id": stimulus.stimulus_id,
        "text": stimulus.text,
        "duration_s": duration_s,
    } | ({"image_file": stimulus.image_file} if stimulus.image_file else {})


class HeadlessPresenter:
    """Keeps the presenter's timing contract without a display: the marker goes out at the due time."""

    def __init__(self, clock: Clock, markers: MarkerSink) -> None:
        self._clock = clock
        self._markers = markers
        self._reports: list[FrameReport] = []

    def open(self) -> None:
        return None

    def present(
        self, trial: int, condition: str, stimulus: Stimulus, due: float, duration_s: float
    ) -> Onset:
        self._clock.sleep_until(due)
        onset = self._clock.now()
        event = onset_marker(trial, condition, stimulus, duration_s)
        marker = self._markers.push(event, onset)
        self._clock.sleep_until(onset + duration_s)
        self._reports.append(FrameReport(trial, self._clock.now(), 0))
        return Onset(time=onset, late_s=onset - due, marker=marker, stimulus=stimulus,
                     condition=condition)

    def expect(self, trial: int, due: float, duration_s: float, fallback: Stimulus) -> None:
        # Trials run one after the other here, so a choice is never late for its slot.
        return None

    def show_message(self, text: str, duration_s: float) -> None:
        return None

    def take_reports(self) -> list[FrameReport]:
        reports, self._reports = self._reports, []
        return reports

    def close(self) -> None:
        return None
