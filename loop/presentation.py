"""The presentation interface and the headless presenter used by dry runs.

Runs in the controller process. A presenter shows one stimulus at its due time and sends the onset
marker stamped with the onset on the LSL clock. The PsychoPy presenter (``loop.psychopy_presenter``)
keeps the same contract with a real window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loop.clock import Clock


@dataclass(frozen=True)
class Stimulus:
    """One stimulus of the candidate pool as the session shows it."""

    stimulus_id: str
    text: str


@dataclass(frozen=True)
class Onset:
    """When a stimulus appeared, on the LSL clock, and how far that was from its due time."""

    time: float
    late_s: float
    marker: str
    n_dropped_frames: int = 0


class MarkerSink(Protocol):
    def push(self, event: dict, timestamp: float) -> str:
        """Send one marker stamped with ``timestamp`` and return its text."""


class Presenter(Protocol):
    def open(self) -> None:
        """Prepare the display (and show fixation); called once before the first trial."""

    def present(
        self, trial: int, condition: str, stimulus: Stimulus, due: float, duration_s: float
    ) -> Onset:
        """Show ``stimulus`` at ``due``, send its onset marker, and return after its offset."""

    def show_message(self, text: str) -> None:
        """Show a message between phases (instructions, rest)."""

    def close(self) -> None:
        """Close the display; safe to call twice."""


def onset_marker(trial: int, condition: str, stimulus: Stimulus) -> dict:
    """Return the onset marker of one trial; the text is exactly the text shown."""
    return {
        "type": "onset",
        "trial": trial,
        "condition": condition,
        "stimulus_id": stimulus.stimulus_id,
        "text": stimulus.text,
    }


class HeadlessPresenter:
    """Keeps the presenter's timing contract without a display: the marker goes out at the due time."""

    def __init__(self, clock: Clock, markers: MarkerSink) -> None:
        self._clock = clock
        self._markers = markers

    def open(self) -> None:
        return None

    def present(
        self, trial: int, condition: str, stimulus: Stimulus, due: float, duration_s: float
    ) -> Onset:
        self._clock.sleep_until(due)
        onset = self._clock.now()
        marker = self._markers.push(onset_marker(trial, condition, stimulus), onset)
        self._clock.sleep_until(onset + duration_s)
        return Onset(time=onset, late_s=max(0.0, onset - due), marker=marker)

    def show_message(self, text: str) -> None:
        return None

    def close(self) -> None:
        return None
