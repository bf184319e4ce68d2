"""The presentation loop: the display's frame loop, fed through a queue by the controller's thread.

Runs in the session's main thread, because PsychoPy windows must live there on macOS. The
controller runs in a worker thread and talks to this loop only through :class:`QueuedPresenter`.
The loop prepares each stimulus, shows it on the first frame at or after its due time, sends its
onset marker and hands the onset back. Nothing in the loop writes files, loads models or waits on
the network, and it reads the operator's keys between trials. When the next stimulus has not been
handed over ``ready_lead_s`` before its onset, the loop shows the fallback stimulus that the
controller announced for that slot, so the schedule never slips.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from loop.clock import Clock
from loop.errors import RunEndedError
from loop.presentation import FrameReport, MarkerSink, Onset, Stimulus, onset_marker

logger = logging.getLogger(__name__)

# How long the loop sleeps at most between two looks at its queue when no frame is due, in
# seconds. A PsychoPy screen flips every frame instead.
IDLE_STEP_S = 0.002

# How much later than its due time the schedule restarts after a pause, in seconds (divided by the
# speed factor), so that fixation is on screen before the next stimulus.
RESUME_DELAY_S = 1.0

# How often a controller thread waiting for an onset checks that the loop still runs, in seconds.
REPLY_POLL_S = 0.5


class Screen(Protocol):
    """The display the loop draws on: a PsychoPy window, or none for headless dry runs."""

    frame_period_s: float

    def open(self) -> None:
        """Open the display and show fixation."""

    def prepare(self, stimulus: Stimulus) -> Any:
        """Lay out ``stimulus`` for drawing and return the handle :meth:`show` takes."""

    def show(self, prepared: Any, due: float, duration_s: float,
             on_onset: Callable[[float], None]) -> int:
        """Show ``prepared`` from the first frame at or after ``due`` for ``duration_s``.

        Calls ``on_onset`` with the onset time on the session clock as soon as the onset frame is
        on screen, and returns the number of dropped frames after the stimulus's offset.
        """

    def idle(self, until: float) -> None:
        """Keep the background (fixation or a message) on screen for one frame, or until ``until``."""

    def set_message(self, text: str | None) -> None:
        """Show ``text`` in place of fixation from the next frame on; None brings back fixation."""

    def pressed_keys(self) -> list[str]:
        """Return the operator keys pressed since the last call."""

    def close(self) -> None:
        """Close the display; a second call does nothing."""


@dataclass(frozen=True)
class OperatorKeys:
    """Keys the operator uses during a run: pause and resume with one key, end with another."""

    pause: str = "p"
    end: str = "escape"
    pause_message: str = "Paused. Press {pause} to go on or {end} to end the run."


# Commands from the controller thread to the loop.


@dataclass
class _Present:
    trial: int
    condition: str
    stimulus: Stimulus
    due: float
    duration_s: float
    reply: queue.Queue
    prepared: Any = None


@dataclass(frozen=True)
class _Expect:
    trial: int
    due: float
    duration_s: float
    fallback: Stimulus


@dataclass(frozen=True)
class _Message:
    text: str
    duration_s: float


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class _Withdraw:
    """Cancel the announced slot: no fallback is shown until the next announcement."""


@dataclass
class LoopSummary:
    """Counts and pauses the loop recorded during a run, for the session file."""

    n_fallbacks: int = 0
    pauses: list[tuple[float, float]] = field(default_factory=list)
    ended_by_operator: bool = False


class PresentationLoop:
    """Shows the trials that the controller thread hands over, frame by frame, until stopped."""

    def __init__(self, screen: Screen, clock: Clock, markers: MarkerSink,
                 keys: OperatorKeys | None = None, speed: float = 1.0,
                 ready_lead_s: float | None = None) -> None:
        self.screen = screen
        self.clock = clock
        self.markers = markers
        self.keys = keys or OperatorKeys()
        self.speed = speed
        self._ready_lead_s = ready_lead_s
        self._commands: queue.Queue = queue.Queue()
        self._reports: queue.Queue = queue.Queue()
        self._requests: dict[int, _Present] = {}
        self._expected: _Expect | None = None
        self._fallback_prepared: Any = None
        self._fallback_onsets: dict[int, Onset] = {}
        self._paused_since: float | None = None
        self._message_until: float | None = None
        self._stopped = False
        self._running = threading.Event()
        self.summary = LoopSummary()

    @property
    def ready_lead_s(self) -> float:
        """How long before its due time a stimulus must be handed over, in seconds."""
        if self._ready_lead_s is not None:
            return self._ready_lead_s
        # Two frames by default, because laying out a sentence can take longer than one.
        return 2 * self.screen.frame_period_s

    def presenter(self) -> QueuedPresenter:
        """Return the presenter that the controller thread calls."""
        return QueuedPresenter(self._commands, self._reports, self._running)

    def run(self, worker: threading.Thread | None = None) -> LoopSummary:
        """Run frames until the controller stops the loop, the operator ends the run, or ``worker`` dies.

        Raises :class:`RunEndedError` when the operator ended the run (the end key or Ctrl+C).
        """
        self._running.set()
        try:
            while not self._stopped:
                if worker is not None and not worker.is_alive():
                    break
                self.step()
        except KeyboardInterrupt:
            self._end("Ctrl+C")
        finally:
            self._running.clear()
        if self.summary.ended_by_operator:
            raise RunEndedError("The operator ended the run.")
        return self.summary

    def step(self) -> None:
        """Run one pass of the loop: commands, keys, then one trial or one idle frame."""
        # Commands first, so that a stimulus handed over just now can still make its onset.
        self._take_commands()
        if self._stopped:
            return

        # A message (instructions, rest) gives way to fixation at its end.
        if self._message_until is not None and self.clock.now() >= self._message_until:
            self._message_until = None
            self.screen.set_message(None)

        # Operator keys, read between trials only.
        for key in self.screen.pressed_keys():
            self._on_key(key)
        if self._stopped:
            return
        if self._paused_since is not None:
            self.screen.idle(self.clock.now() + IDLE_STEP_S)
            return

        # The next trial: handed over in time, or the fallback for a slot that was not.
        now = self.clock.now()
        request = min(self._requests.values(), key=lambda r: r.trial, default=None)
        expected = self._expected
        if request is not None and (expected is None or request.trial <= expected.trial):
            if request.due - now <= self.screen.frame_period_s + self.ready_lead_s:
                self._show_request(request)
                return
            self.screen.idle(request.due - self.screen.frame_period_s - self.ready_lead_s)
            return
        if expected is not None:
            if now >= expected.due - self.ready_lead_s:
                self._show_fallback(expected)
                return
            self.screen.idle(expected.due - self.ready_lead_s)
            return
        self.screen.idle(now + IDLE_STEP_S)

    # Commands

    def _take_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Present):
                self._on_present(command)
            elif isinstance(command, _Expect):
                self._expected = command
                self._fallback_prepared = self.screen.prepare(command.fallback)
            elif isinstance(command, _Message):
                self._message_until = self.clock.now() + command.duration_s
                self.screen.set_message(command.text)
            elif isinstance(command, _Withdraw):
                self._expected = self._fallback_prepared = None
            elif isinstance(command, _Stop):
                self._stopped = True

    def _on_present(self, request: _Present) -> None:
        fallback_onset = self._fallback_onsets.pop(request.trial, None)
        if fallback_onset is not None:
            # The slot went by with the fallback: the controller learns what was shown instead.
            request.reply.put(fallback_onset)
            return
        if self._paused_since is not None:
            request.due = max(request.due, self._resume_time())
        self._requests[request.trial] = request
        request.prepared = self.screen.prepare(request.stimulus)

    # Keys

    def _on_key(self, key: str) -> None:
        if key == self.keys.end:
            self._end(f"the {key!r} key")
        elif key == self.keys.pause and self._paused_since is None:
            self._paused_since = self.clock.now()
            self._message_until = None
            self.screen.set_message(self.keys.pause_message.format(pause=self.keys.pause,
                                                                   end=self.keys.end))
            logger.info("Run paused by the operator.")
        elif key == self.keys.pause:
            self._resume()

    def _resume(self) -> None:
        start, now = self._paused_since, self.clock.now()
        self._paused_since = None
        self.summary.pauses.append((start, now))
        self.screen.set_message(None)
        resume_at = self._resume_time()
        for request in self._requests.values():
            request.due = max(request.due, resume_at)
        if self._expected is not None and self._expected.due < resume_at:
            self._expected = _Expect(self._expected.trial, resume_at, self._expected.duration_s,
                                     self._expected.fallback)
        logger.info("Run resumed after a pause of %.1f s.", now - start)

    def _resume_time(self) -> float:
        return self.clock.now() + RESUME_DELAY_S / self.speed

    def _end(self, cause: str) -> None:
        logger.warning("The operator ended the run with %s.", cause)
        self.summary.ended_by_operator = True
        self._stopped = True
        for request in self._requests.values():
            request.reply.put(RunEndedError(f"The operator ended the run with {cause}."))
        self._requests.clear()

    # Trials

    def _show_request(self, request: _Present) -> None:
        del self._requests[request.trial]
        if self._expected is not None and self._expected.trial <= request.trial:
            self._expected = self._fallback_prepared = None
        self._show(request.trial, request.condition, request.stimulus, request.prepared, request.due,
                   request.duration_s, fallback=False, deliver=request.reply.put)

    def _show_fallback(self, expected: _Expect) -> None:
        prepared, self._fallback_prepared = self._fallback_prepared, None
        self._expected = None
        self.summary.n_fallbacks += 1
        logger.warning("Trial %d: the next stimulus was not ready %.0f ms before its onset, so "
                       "the fallback %r is shown.", expected.trial, self.ready_lead_s * 1000,
                       expected.fallback.stimulus_id)

        def store(onset: Onset) -> None:
            self._fallback_onsets[expected.trial] = onset

        self._show(expected.trial, "fallback", expected.fallback, prepared, expected.due,
                   expected.duration_s, fallback=True, deliver=store)

    def _show(self, trial: int, condition: str, stimulus: Stimulus, prepared: Any, due: float,
              duration_s: float, fallback: bool, deliver: Callable[[Onset], None]) -> None:
        event = onset_marker(trial, condition, stimulus, duration_s)

        def on_onset(time: float) -> None:
            # The marker carries the time of the onset frame, not the time it is sent.
            marker = self.markers.push(event, time)
            deliver(Onset(time=time, late_s=time - due, marker=marker, stimulus=stimulus,
                          condition=condition, fallback=fallback))

        n_dropped_frames = self.screen.show(prepared, due, duration_s, on_onset)
        self._reports.put(FrameReport(trial=trial, offset=self.clock.now(),
                                      n_dropped_frames=n_dropped_frames))


class QueuedPresenter:
    """The controller thread's side of the presentation loop; it keeps the Presenter contract.

    :meth:`present` returns as soon as the onset frame is on screen, so the controller can collect
    the response and choose the next stimulus while this one is still shown.
    """

    def __init__(self, commands: queue.Queue, reports: queue.Queue,
                 loop_running: threading.Event) -> None:
        self._commands = commands
        self._reports = reports
        self._loop_running = loop_running

    def open(self) -> None:
        return None

    def present(self, trial: int, condition: str, stimulus: Stimulus, due: float,
                duration_s: float) -> Onset:
        """Hand ``stimulus`` over for ``due`` and return its onset (or the fallback's).

        Raises :class:`RunEndedError` when the loop stops before showing it (the operator ended
        the run, or the display failed).
        """
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._commands.put(_Present(trial, condition, stimulus, due, duration_s, reply))
        # No timeout of its own: a pause can last minutes. The wait ends when the loop stops.
        while True:
            try:
                result = reply.get(timeout=REPLY_POLL_S)
                break
            except queue.Empty:
                if not self._loop_running.is_set():
                    raise RunEndedError(
                        f"The presentation loop stopped before it showed trial {trial}."
                    ) from None
        if isinstance(result, BaseException):
            raise result
        return result

    def expect(self, trial: int, due: float, duration_s: float, fallback: Stimulus) -> None:
        """Announce the next slot, so that ``fallback`` can fill it if the choice comes late."""
        self._commands.put(_Expect(trial, due, duration_s, fallback))

    def show_message(self, text: str, duration_s: float) -> None:
        """Show ``text`` in place of fixation for ``duration_s``."""
        self._commands.put(_Message(text, duration_s))

    def withdraw(self) -> None:
        """Cancel the announced slot, e.g. while the data stream is stalled: nothing is shown in
        it unless the controller hands a stimulus over."""
        self._commands.put(_Withdraw())

    def take_reports(self) -> list[FrameReport]:
        """Return the frame reports of the stimuli that have ended since the last call."""
        reports = []
        while True:
            try:
                reports.append(self._reports.get_nowait())
            except queue.Empty:
                return reports

    def stop(self) -> None:
        """Let the loop return; trials handed over but not yet shown are dropped."""
        self._commands.put(_Stop())

    def close(self) -> None:
        return None


class HeadlessScreen:
    """A screen for dry runs without a display: onsets at their due time, no frames."""

    frame_period_s = 0.001

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.message: str | None = None
        self.keys: list[str] = []
        """Keys to report at the next :meth:`pressed_keys` call; tests append to it."""

    def open(self) -> None:
        return None

    def prepare(self, stimulus: Stimulus) -> Stimulus:
        return stimulus

    def show(self, prepared: Stimulus, due: float, duration_s: float,
             on_onset: Callable[[float], None]) -> int:
        self._clock.sleep_until(due)
        onset = self._clock.now()
        on_onset(onset)
        self._clock.sleep_until(onset + duration_s)
        return 0

    def idle(self, until: float) -> None:
        self._clock.sleep_until(min(until, self._clock.now() + IDLE_STEP_S))

    def set_message(self, text: str | None) -> None:
        self.message = text

    def pressed_keys(self) -> list[str]:
        keys, self.keys = self.keys, []
        return keys

    def close(self) -> None:
        return None
