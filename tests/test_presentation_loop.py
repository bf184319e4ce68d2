"""Tests of the presentation loop with a headless screen on the LSL clock, and the controller on it.

The loop runs in the test's main thread, as in a session, and a worker thread plays the controller.
Timing bounds are one-sided where the scheduler of a shared 2-core machine can only make things
later, never earlier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from loop.clock import LSLClock
from loop.controller import Controller
from loop.errors import DeadlineMissedError, RunEndedError
from loop.offline import DiscardMarkers
from loop.presentation import Stimulus
from loop.presentation_loop import RESUME_DELAY_S, HeadlessScreen, OperatorKeys, PresentationLoop
from tests.test_controller import LinearSubject, make_controller, synthetic_pool


class RecordingMarkers(DiscardMarkers):
    """A marker sink that keeps every marker it was given, with its timestamp."""

    def __init__(self) -> None:
        self.markers: list[tuple[dict, float]] = []

    def push(self, event: dict, timestamp: float) -> str:
        self.markers.append((event, timestamp))
        return super().push(event, timestamp)


def run_with_worker(loop: PresentationLoop, work: Callable[[], None]) -> BaseException | None:
    """Run ``work`` in a worker thread against ``loop`` (in this thread); return its error, if any."""
    errors: list[BaseException] = []
    presenter = loop.presenter()

    def target() -> None:
        try:
            work()
        except BaseException as err:  # handed back to the test
            errors.append(err)
        finally:
            presenter.stop()

    worker = threading.Thread(target=target)
    worker.start()
    try:
        loop.run(worker)
    finally:
        worker.join(10)
    return errors[0] if errors else None


@pytest.fixture
def loop() -> PresentationLoop:
    clock = LSLClock()
    return PresentationLoop(HeadlessScreen(clock), clock, RecordingMarkers(), ready_lead_s=0.01)


def test_onsets_at_due_times(loop: PresentationLoop) -> None:
    presenter = loop.presenter()
    onsets, dues = [], []

    def work() -> None:
        for trial in range(5):
            due = loop.clock.now() + 0.03
            dues.append(due)
            onsets.append(presenter.present(trial, "drive", Stimulus(f"s{trial}", f"Text {trial}."),
                                            due, 0.02))

    assert run_with_worker(loop, work) is None
    assert [onset.fallback for onset in onsets] == [False] * 5
    for onset, due in zip(onsets, dues, strict=True):
        assert onset.time >= due
        assert onset.late_s == onset.time - due
        # A loaded machine can wake the loop late; 20 ms is the controller's late-onset limit.
        assert onset.late_s < 0.020
    events = [event for event, _ in loop.markers.markers]
    assert [event["trial"] for event in events] == [0, 1, 2, 3, 4]
    assert [event["duration_s"] for event in events] == [0.02] * 5
    assert [stamp for _, stamp in loop.markers.markers] == [onset.time for onset in onsets]
    reports = presenter.take_reports()
    assert [report.trial for report in reports] == [0, 1, 2, 3, 4]
    for report, onset in zip(reports, onsets, strict=True):
        assert report.offset >= onset.time + 0.02
        assert report.n_dropped_frames == 0


def test_late_choice_replaced_by_fallback(loop: PresentationLoop) -> None:
    presenter = loop.presenter()
    fallback = Stimulus("fallback-1", "The fallback sentence.")
    chosen = Stimulus("chosen-1", "The chosen sentence.")
    results = {}

    def work() -> None:
        first = presenter.present(0, "drive", Stimulus("s0", "First."), loop.clock.now() + 0.02,
                                  0.02)
        due = first.time + 0.05
        presenter.expect(1, due, 0.02, fallback)
        # The choice comes 100 ms after its due time, so the fallback fills the slot.
        loop.clock.sleep_until(due + 0.1)
        results["late"] = presenter.present(1, "suppress", chosen, due, 0.02)
        results["due"] = due
        results["next"] = presenter.present(2, "drive", Stimulus("s2", "Third."),
                                            loop.clock.now() + 0.02, 0.02)

    assert run_with_worker(loop, work) is None
    late = results["late"]
    assert late.fallback is True
    assert late.stimulus is fallback
    assert late.condition == "fallback"
    assert late.time >= results["due"]
    assert late.time < results["due"] + 0.020
    assert results["next"].fallback is False
    assert loop.summary.n_fallbacks == 1
    events = [event for event, _ in loop.markers.markers]
    assert [(event["trial"], event["condition"], event["stimulus_id"]) for event in events] == [
        (0, "drive", "s0"), (1, "fallback", "fallback-1"), (2, "drive", "s2")]


def test_choice_in_time_cancels_fallback(loop: PresentationLoop) -> None:
    presenter = loop.presenter()
    results = {}

    def work() -> None:
        due = loop.clock.now() + 0.1
        presenter.expect(0, due, 0.02, Stimulus("fallback", "Fallback."))
        results["onset"] = presenter.present(0, "drive", Stimulus("s0", "Chosen."), due, 0.02)

    assert run_with_worker(loop, work) is None
    assert results["onset"].fallback is False
    assert results["onset"].stimulus.stimulus_id == "s0"
    assert loop.summary.n_fallbacks == 0
    assert len(loop.markers.markers) == 1


def test_end_key_ends_run(loop: PresentationLoop) -> None:
    presenter = loop.presenter()
    shown = []

    def work() -> None:
        for trial in range(100):
            due = loop.clock.now() + 0.02
            shown.append(presenter.present(trial, "drive", Stimulus(f"s{trial}", "Text."), due,
                                           0.01))
            if trial == 2:
                loop.screen.keys.append("escape")

    with pytest.raises(RunEndedError, match="operator ended the run"):
        run_with_worker(loop, work)
    assert loop.summary.ended_by_operator is True
    assert 3 <= len(shown) <= 4
    assert len(loop.markers.markers) == len(shown)


def test_controller_sees_run_ended(loop: PresentationLoop) -> None:
    presenter = loop.presenter()
    loop.screen.keys.append("escape")

    def work() -> None:
        presenter.present(0, "drive", Stimulus("s0", "Text."), loop.clock.now() + 1.0, 0.01)

    errors = []

    def record_error() -> None:
        try:
            work()
        except RunEndedError as err:
            errors.append(err)

    with pytest.raises(RunEndedError):
        run_with_worker(loop, record_error)
    assert len(errors) == 1
    assert loop.markers.markers == []


def test_pause_shifts_schedule(loop: PresentationLoop) -> None:
    loop.speed = 10.0
    presenter = loop.presenter()
    results = {}

    def work() -> None:
        loop.screen.keys.append("p")
        due = loop.clock.now() + 0.05
        results["due"] = due
        paused_at = loop.clock.now()
        # The loop reads the key first; the pause lasts 0.2 s.
        loop.clock.sleep_until(paused_at + 0.2)
        results["message"] = loop.screen.message
        loop.screen.keys.append("p")
        results["onset"] = presenter.present(0, "drive", Stimulus("s0", "After the pause."), due,
                                             0.01)

    assert run_with_worker(loop, work) is None
    assert results["message"] == OperatorKeys().pause_message.format(pause="p", end="escape")
    assert len(loop.summary.pauses) == 1
    start, end = loop.summary.pauses[0]
    assert end - start >= 0.15
    # The onset waits for the resume delay instead of coming at its old due time.
    assert results["onset"].time >= end + RESUME_DELAY_S / 10.0
    assert results["onset"].time > results["due"]
    assert loop.screen.message is None


class SlowSubject(LinearSubject):
    """A subject whose responses take ``delay_s`` to collect, so every next choice comes late."""

    def __init__(self, *args, clock, delay_s, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.delay_s = delay_s

    def collect(self, onset, stimulus):
        self.clock.sleep_until(self.clock.now() + self.delay_s)
        return super().collect(onset, stimulus)


def test_repeated_fallbacks_raise(tmp_path) -> None:
    controller, _ = make_controller(tmp_path, **{"rest_duration_s = 2.0": "rest_duration_s = 0.0"})
    clock = LSLClock()
    markers = RecordingMarkers()
    loop = PresentationLoop(HeadlessScreen(clock), clock, markers, ready_lead_s=0.005)
    pool, features = synthetic_pool()
    subject = SlowSubject(pool, features[6], noise_sd=1.0, seed=3, clock=clock, delay_s=0.2)
    # Speed 100: 20 ms stimuli 10 +- 2 ms apart, far shorter than the 200 ms response collection.
    controller = Controller(controller.experiment, pool, features, [0, 1], loop.presenter(),
                            subject, clock, np.random.default_rng(5), speed=100.0)

    error = run_with_worker(loop, controller.run)

    assert isinstance(error, DeadlineMissedError)
    assert "6 choices came too late" in str(error)
    assert "limit 5" in str(error)
    state = controller.state
    assert state.n_fallbacks == 6
    # The sixth fallback stops the session before its response is collected.
    assert [r.fallback for r in state.trials] == [False] + [True] * 5
    assert all(r.condition == "fallback" for r in state.trials[1:])
    assert len({r.text for r in state.trials}) == 6
    # Every stimulus shown, the sixth fallback too, is marked as shown, and no chosen one is.
    shown = {pool.texts[i] for i in np.flatnonzero(state.shown_mask)}
    assert len(shown) == 7
    assert {r.text for r in state.trials} < shown
    conditions = [event["condition"] for event, _ in markers.markers]
    assert conditions == ["calibration"] + ["fallback"] * 6
