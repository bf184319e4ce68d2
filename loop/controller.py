"""The closed-loop controller: calibration, closed-loop blocks and evaluation.

Runs in the session's main process. Everything it touches is passed in: the presenter (which sends
markers), the response source (an LSL inlet or an in-process simulator), the recorder, the clock and
a seeded Generator. The same controller therefore runs a real session, a dry run and the
benchmarks.
Per trial it presents the stimulus, waits for its response window, updates the encoding model by a
rank-one step and chooses the next stimulus before the next onset is due.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from acquisition.errors import EpochLostError
from loop import registry
from loop.config import Experiment
from loop.errors import DeadlineMissedError, ResumeError
from loop.presentation import Onset, Stimulus
from loop.recording import TrialRecord
from loop.selection import select_diverse, select_random, select_top
from synth.encoding import PoolScorer, RidgeEncoder, Standardizer, alpha_grid, ridge_loo
from synth.pool import CandidatePool

logger = logging.getLogger(__name__)

# closed_loop: update after every trial, refit after every block.
# open_loop: the same schedule, every choice made by the calibration model (the method of
#   Tuckute et al. 2024); the responses are recorded but never used.
# calibration_only: the whole budget spent on diverse calibration, then evaluation.
# random: the same schedule with random drive and suppress sentences.
POLICIES = ("closed_loop", "open_loop", "calibration_only", "random")
# An onset later than this counts as late (a bit over one frame at 60 Hz).
LATE_ONSET_S = 0.020
# With a delayed response source, the next stimulus is chosen this long before its onset, in
# seconds. Until then the controller takes the responses that become estimable.
SELECTION_LEAD_S = 0.1
# Maximum wait for per-TR values in one poll, in seconds.
RESPONSE_POLL_S = 0.05


@dataclass
class _PendingTrial:
    """A trial shown whose response has not been recorded yet."""

    trial: int
    phase: str
    block: int
    condition: str
    index: int
    stimulus: Stimulus
    due: float
    onset: Onset
    predicted: float
    predicted_sd: float
    update: bool


@dataclass
class ControllerState:
    """The controller's record of the session so far, which reports and benchmarks read back."""

    shown_mask: np.ndarray
    indices: list[int] = field(default_factory=list)
    responses: list[float] = field(default_factory=list)
    trial_ids: list[int] = field(default_factory=list)
    layer: int | None = None
    layer_cv_r: dict[int, float] = field(default_factory=dict)
    trials: list[TrialRecord] = field(default_factory=list)
    n_late_onsets: int = 0
    n_fallbacks: int = 0


class Controller:
    """Runs one session's trial schedule against a presenter and a response source."""

    def __init__(
        self,
        experiment: Experiment,
        pool: CandidatePool,
        pool_features: dict[int, np.ndarray],
        target_indices: list[int],
        presenter,
        responses,
        clock,
        rng: np.random.Generator,
        recorder=None,
        speed: float = 1.0,
        policy: str = "closed_loop",
        on_trial: Callable[[TrialRecord], None] | None = None,
        on_phase: Callable[[str, int], None] | None = None,
        reselect_layer: bool = True,
        replay: list[dict] | None = None,
        on_resume: Callable[[int], None] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
        self.experiment = experiment
        self.pool = pool
        self.pool_features = pool_features
        self.target_indices = list(target_indices)
        self.presenter = presenter
        self.responses = responses
        self.clock = clock
        self.rng = rng
        self.recorder = recorder
        self.speed = speed
        self.policy = policy
        self.on_trial = on_trial
        self.on_phase = on_phase
        self.reselect_layer = reselect_layer
        encoding = experiment.encoding
        self.alphas = alpha_grid(encoding.alpha_min, encoding.alpha_max, encoding.n_alphas)
        self.state = ControllerState(shown_mask=np.zeros(len(pool), dtype=bool))
        self.encoder: RidgeEncoder | None = None
        self.scorer: PoolScorer | None = None
        self._next_due: float | None = None
        self._rest_until = -np.inf
        self._trial_index = 0
        # Fallback stimuli come from their own stream of random numbers, so that announcing them
        # does not change the controller's choices.
        self._fallback_rng = rng.spawn(1)[0]
        self._fallback_index: int | None = None
        # Stimuli a phase has planned to show (calibration, evaluation): never used as fallbacks.
        self._planned = np.zeros(len(pool), dtype=bool)
        # Responses that arrive seconds after the onset (fMRI) are polled instead of awaited.
        self._delayed = getattr(responses, "delayed", False)
        self._pending: dict[int, _PendingTrial] = {}
        # A resumed session first replays the trials its earlier file holds: the same choices,
        # random draws and model updates, from the recorded responses, with nothing shown or
        # recorded. The trial after the last one replayed is the one the stopped session would
        # have shown next.
        self._replay = deque(replay or [])
        self._on_resume = on_resume
        self._live_recorder = recorder
        if self._replay:
            if self._delayed:
                raise ResumeError("An fMRI session cannot be resumed: the scanner run and its GLM "
                                  "start again. Start a new session.")
            self.recorder = None

    # Timing

    def _seconds(self, value: float) -> float:
        return value / self.speed

    def _advance_due(self, onset: float) -> None:
        timing = self.experiment.timing
        jitter = self.rng.uniform(-timing.iti_jitter_s, timing.iti_jitter_s)
        self._next_due = onset + self._seconds(timing.stimulus_duration_s + timing.iti_s + jitter)

    def _show_message(self, text: str, duration_s: float) -> None:
        """Show ``text`` for ``duration_s`` (before the speed factor); the next run starts after it."""
        if not text or self._replay:
            return
        duration_s = self._seconds(duration_s)
        self.presenter.show_message(text, duration_s)
        self._rest_until = self.clock.now() + duration_s

    # One trial

    def _run_trial(self, phase: str, block: int, condition: str, index: int,
                   predicted: float, predicted_sd: float, update: bool,
                   next_in_run: bool) -> None:
        """Present one stimulus, then record its response and update the model (or, for a delayed
        source, take the responses that become estimable until shortly before the next onset).

        ``next_in_run`` is True when another trial follows on the same schedule, so its slot is
        announced with a fallback stimulus in case the next choice comes late.
        """
        self._record_frame_reports()
        if self._replay:
            self._replay_trial(phase, block, condition, index, predicted, predicted_sd, update,
                               next_in_run)
            return
        stimulus = self._stimulus(index)
        was_shown = bool(self.state.shown_mask[index])
        self.state.shown_mask[index] = True
        self._planned[index] = False
        if self._next_due is None:
            # The first trial of a phase or block: its schedule starts one interval from now, or
            # from the end of the message on screen.
            start = max(self.clock.now(), self._rest_until)
            self._next_due = start + self._seconds(self.experiment.timing.iti_s)
        due = self._next_due
        duration_s = self._seconds(self.experiment.timing.stimulus_duration_s)
        handover = self.clock.now()
        onset = self.presenter.present(self._trial_index, condition, stimulus, due, duration_s)
        if onset.fallback:
            # The loop showed the announced fallback in this slot; the choice stays available.
            self.state.shown_mask[index] = was_shown
            index, condition, stimulus = self._fallback_index, onset.condition, onset.stimulus
            self.state.shown_mask[index] = True
            predicted, predicted_sd = self._prediction(index)
        if self.recorder is not None:
            self.recorder.add_marker(onset.time, onset.marker)
        if onset.late_s > LATE_ONSET_S:
            self._late_onset(onset)
        if onset.fallback:
            self._fallback_shown(onset, handover - due)
        self._advance_due(onset.time)
        if next_in_run:
            self._announce_next_slot(duration_s)

        pending = _PendingTrial(
            trial=self._trial_index, phase=phase, block=block, condition=condition, index=index,
            stimulus=stimulus, due=due, onset=onset, predicted=predicted,
            predicted_sd=predicted_sd, update=update)
        self._trial_index += 1
        if not self._delayed:
            try:
                channels = self.responses.collect(onset.time, stimulus)
            except EpochLostError as err:
                self._lost_epoch(pending, err)
                return
            self._finish_trial(pending, channels)
            return

        # A delayed source (fMRI) scores the trial seconds later. Until shortly before the next
        # onset, the responses that become estimable update the model the next choice uses.
        self.responses.register(pending.trial, onset.time, duration_s)
        self._pending[pending.trial] = pending
        if next_in_run:
            self._take_responses_until(self._next_due - SELECTION_LEAD_S)
        else:
            self._take_responses(0.0)

    def _replay_trial(self, phase: str, block: int, condition: str, index: int,
                      predicted: float, predicted_sd: float, update: bool,
                      next_in_run: bool) -> None:
        """Take one trial of a resumed session from its earlier file, as :meth:`_run_trial` ran it."""
        row = self._replay.popleft()
        if int(row["trial"]) != self._trial_index:
            raise ResumeError(f"The earlier file's trial {row['trial']} comes where trial "
                              f"{self._trial_index} was expected; the file is not in order.")
        self._planned[index] = False
        if row["fallback"]:
            # The choice was replaced by the announced fallback and stays available.
            index, condition = self._fallback_index, "fallback"
            predicted, predicted_sd = self._prediction(index)
        expected = self.pool.ids[index]
        if row["stimulus_id"] != expected:
            raise ResumeError(
                f"Replaying trial {self._trial_index}, the controller chose {expected!r} where the "
                f"session showed {row['stimulus_id']!r}. The experiment file, the candidate pool, "
                "the model's features or neurosteer's version differ from the session's, so it "
                "cannot continue as it would have. Restore them, or start a new session.")
        self.state.shown_mask[index] = True
        if row["late"]:
            self.state.n_late_onsets += 1
        if row["fallback"]:
            self.state.n_fallbacks += 1
        self._advance_due(float(row["onset"]))
        if next_in_run:
            self._announce_next_slot(self._seconds(self.experiment.timing.stimulus_duration_s),
                                     show=False)
        stimulus = self._stimulus(index)
        onset = Onset(time=float(row["onset"]), late_s=float(row["late_s"]), marker=row["marker"],
                      stimulus=stimulus, condition=condition, fallback=bool(row["fallback"]))
        pending = _PendingTrial(
            trial=self._trial_index, phase=phase, block=block, condition=condition, index=index,
            stimulus=stimulus, due=float(row["due"]), onset=onset, predicted=predicted,
            predicted_sd=predicted_sd, update=update)
        self._trial_index += 1
        record = TrialRecord.from_row(row)
        self._keep_trial(pending, record, row["observed_channels"])
        checkpoint = row.get("checkpoint")
        if checkpoint is not None and checkpoint != self._checkpoint():
            raise ResumeError(
                f"After replaying trial {record.trial}, the controller's random state differs "
                "from the one the session recorded, so the next choices would not be the ones it "
                "would have made. The experiment file, the seed or neurosteer's version differ "
                "from the session's; restore them, or start a new session.")
        if not self._replay:
            self._go_live()

    def _go_live(self) -> None:
        """End the replay: from the next trial on, stimuli are shown and recorded again."""
        self.recorder = self._live_recorder
        # The schedule starts again from now, after the instructions.
        self._next_due = None
        self._rest_until = -np.inf
        logger.info("Replayed the %d trials of the earlier file; the session goes on with trial %d.",
                    self._trial_index, self._trial_index)
        if self._on_resume is not None:
            self._on_resume(self._trial_index)
        presentation = self.experiment.presentation
        self._show_message(presentation.instructions, presentation.instructions_duration_s)

    def _checkpoint(self) -> dict:
        """The state a resumed session must reach by replay: both random generators' states."""
        return {"rng": _jsonable(self.rng.bit_generator.state),
                "fallback_rng": _jsonable(self._fallback_rng.bit_generator.state)}

    def _finish_trial(self, pending: _PendingTrial, channels: np.ndarray) -> TrialRecord:
        """Record a trial's response and update the model with it."""
        return self._store_trial(pending, channels, self._observed(pending, channels),
                                 epoch_ok=True,
                                 display_lag_s=self.responses.display_lag(pending.onset.time))

    def _store_trial(self, pending: _PendingTrial, channels: np.ndarray, observed: float,
                     epoch_ok: bool, display_lag_s: float) -> TrialRecord:
        """Write a trial's row (journal and file), then keep it in the state."""
        onset = pending.onset
        record = TrialRecord(
            trial=pending.trial, phase=pending.phase, block=pending.block,
            condition=pending.condition, stimulus_id=pending.stimulus.stimulus_id,
            text=pending.stimulus.text, due=pending.due, onset=onset.time, late_s=onset.late_s,
            late=onset.late_s > LATE_ONSET_S, fallback=onset.fallback,
            display_lag_s=display_lag_s, response_delay_s=self.clock.now() - onset.time,
            trials_ahead=self._trial_index - 1 - pending.trial, predicted=pending.predicted,
            predicted_sd=pending.predicted_sd, observed=observed, epoch_ok=epoch_ok,
            marker=onset.marker,
        )
        if self.recorder is not None:
            self.recorder.add_trial(record, channels, self._checkpoint())
        self._keep_trial(pending, record, channels)
        return record

    def _lost_epoch(self, pending: _PendingTrial, err: EpochLostError) -> None:
        """Record a trial whose response was lost to a stream gap; the model does not learn from it.

        The schedule starts again from now, so that the stimuli after a stall are not all late.
        """
        if self.recorder is not None:
            self.recorder.add_fault(self.clock.now(), "trial_flagged",
                                    f"trial {pending.trial} has no response: {err}. It is kept "
                                    "flagged, and the model did not learn from it.")
        self._store_trial(pending, np.full(err.n_channels, np.nan), float("nan"), epoch_ok=False,
                          display_lag_s=float("nan"))
        self._next_due = None

    def _keep_trial(self, pending: _PendingTrial, record: TrialRecord,
                    channels: np.ndarray) -> None:
        """Add a recorded trial to the state and, for a learning trial, update the model."""
        self.state.trials.append(record)
        if self.on_trial is not None:
            self.on_trial(record)
        if not record.epoch_ok:
            return
        self.state.indices.append(pending.index)
        self.state.trial_ids.append(pending.trial)
        self._learn(pending, record, channels)

    def _stimulus(self, index: int) -> Stimulus:
        return Stimulus(self.pool.ids[index], self.pool.texts[index])

    def _observed(self, pending: _PendingTrial, channels: np.ndarray) -> float:
        """Return a trial's response: the mean over the target channels."""
        return float(np.mean(channels[self.target_indices]))

    def _learn(self, pending: _PendingTrial, record: TrialRecord, channels: np.ndarray) -> None:
        """Keep a trial's response and, for a learning trial, update the model by one step."""
        observed = float(record.observed)
        self.state.responses.append(observed)
        if pending.update and self.encoder is not None:
            directions = self.encoder.update(
                self.pool_features[self.state.layer][pending.index][None], np.array([[observed]]))
            self.scorer.apply_update(directions)
            self._record_update("online", pending.trial)

    def _take_responses(self, timeout_s: float) -> int:
        """Finish the pending trials whose responses have become estimable; return how many."""
        ready = self.responses.poll(timeout_s)
        for trial in sorted(ready):
            self._finish_trial(self._pending.pop(trial), ready[trial])
        return len(ready)

    def _take_responses_until(self, deadline: float) -> None:
        while True:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                return
            self._take_responses(min(remaining, RESPONSE_POLL_S))

    def _wait_for_responses(self) -> None:
        """Wait until every trial shown so far has its response (the end of a run)."""
        while self._pending:
            self._take_responses(RESPONSE_POLL_S)

    def _announce_next_slot(self, duration_s: float, show: bool = True) -> None:
        """Draw the fallback for the next slot and, unless replaying, announce it to the display."""
        if self.experiment.allow_repeats:
            available = ~self._planned
        else:
            available = ~self.state.shown_mask & ~self._planned
        self._fallback_index = int(select_random(available, 1, self._fallback_rng)[0])
        if not show:
            return
        fallback = self._stimulus(self._fallback_index)
        self.presenter.expect(self._trial_index + 1, self._next_due, duration_s, fallback)

    def _record_frame_reports(self) -> None:
        reports = self.presenter.take_reports()
        if self.recorder is not None:
            for report in reports:
                self.recorder.add_frame_report(report)

    def _late_onset(self, onset) -> None:
        self.state.n_late_onsets += 1
        message = f"trial {self._trial_index} started {onset.late_s:.3f} s after its due time"
        self._deadline_fault(
            onset.time, "late_onset", message, self.state.n_late_onsets,
            self.experiment.timing.max_late_onsets,
            f"onsets were late by more than {LATE_ONSET_S * 1000:.0f} ms",
            "The machine cannot keep this schedule: lengthen timing.iti_s, lower --speed, or "
            "close other programs.")

    def _fallback_shown(self, onset, handover_s: float) -> None:
        """Count a fallback; ``handover_s`` is when the choice was handed over, from its due time."""
        self.state.n_fallbacks += 1
        message = (f"trial {self._trial_index}: the chosen stimulus was handed over "
                   f"{handover_s:+.3f} s from its due time, too late, so the fallback "
                   f"{onset.stimulus.stimulus_id!r} was shown")
        self._deadline_fault(
            onset.time, "fallback", message, self.state.n_fallbacks,
            self.experiment.timing.max_fallbacks,
            "choices came too late and were replaced by fallback stimuli",
            "Selection takes longer than the interval between trials: lengthen timing.iti_s, "
            "lower --speed, or use a smaller pool.")

    def _deadline_fault(self, time: float, kind: str, message: str, count: int, limit: int,
                        summary: str, advice: str) -> None:
        """Record one missed deadline; raise DeadlineMissedError once ``count`` passes ``limit``."""
        if self.recorder is not None:
            self.recorder.add_fault(time, kind, message)
        if count > limit:
            raise DeadlineMissedError(
                f"{count} {summary} (limit {limit}; the last one: {message}). {advice}")

    def _prediction(self, index: int) -> tuple[float, float]:
        if self.scorer is None:
            return float("nan"), float("nan")
        return float(self.scorer.mean[index, 0]), float(self.scorer.sd[index, 0])

    def _record_update(self, kind: str, trial: int | None = None) -> None:
        if self.recorder is None:
            return
        encoder = self.encoder
        trial = self._trial_index - 1 if trial is None else trial
        self.recorder.add_model_update(trial, kind, encoder.n_samples,
                                       encoder.alphas, encoder.cv_r, encoder.noise_var,
                                       encoder.weights)

    # Phases

    def _phase(self, name: str, n_trials: int) -> None:
        logger.info("Phase %s: %d trials.", name, n_trials)
        self._next_due = None
        if self.on_phase is not None:
            self.on_phase(name, n_trials)

    def calibrate(self, n_trials: int) -> None:
        """Present diverse pool sentences, then choose the layer and fit the encoding model."""
        self._phase("calibration", n_trials)
        layers = sorted(self.pool_features)
        middle = layers[len(layers) // 2]
        standard = Standardizer.fit(self.pool_features[middle])
        diverse = select_diverse(standard.transform(self.pool_features[middle])[:, :-1],
                                 ~self.state.shown_mask, n_trials, self.rng)
        self._planned[diverse] = True
        for position, index in enumerate(diverse):
            self._run_trial("calibration", 0, "calibration", int(index), float("nan"),
                            float("nan"), update=False, next_in_run=position < len(diverse) - 1)
        self._rest()
        self.fit(choose_layer=True)

    def fit(self, choose_layer: bool = False) -> None:
        """Fit the encoding model from scratch on every response so far (penalties by LOO)."""
        responses = np.asarray(self.state.responses)[:, None]
        indices = np.asarray(self.state.indices, dtype=int)
        if choose_layer:
            for layer in sorted(self.pool_features):
                standard = Standardizer.fit(self.pool_features[layer])
                design = standard.transform(self.pool_features[layer][indices])[:, :-1]
                self.state.layer_cv_r[layer] = float(ridge_loo(design, responses,
                                                               self.alphas).cv_r[0])
            best = max(self.state.layer_cv_r, key=self.state.layer_cv_r.get)
            if best != self.state.layer:
                self.encoder = self.scorer = None
            self.state.layer = best
            logger.info("Layer cross-validated r: %s; chose layer %d.",
                        {k: round(v, 3) for k, v in self.state.layer_cv_r.items()},
                        self.state.layer)
            if self.recorder is not None:
                layers = sorted(self.state.layer_cv_r)
                self.recorder.add_layer_selection(
                    len(indices), np.array(layers),
                    np.array([self.state.layer_cv_r[k] for k in layers]), best)
        features = self.pool_features[self.state.layer]
        if self.encoder is None:
            self.encoder = RidgeEncoder(Standardizer.fit(features), ["target"])
        self.encoder.fit(features[indices], responses, self.alphas)
        if self.scorer is None:
            self.scorer = PoolScorer(self.encoder, features)
        else:
            self.scorer.refresh()
        self._record_update("fit")
        logger.info("Encoding model: alpha %.3g, cross-validated r %.3f on %d trials.",
                    self.encoder.alphas[0], self.encoder.cv_r[0], self.encoder.n_samples)
        self._warn_about_fit()

    def _warn_about_fit(self) -> None:
        """Log when the model cannot be trusted to choose: no predictive power, or a penalty at the
        edge of its grid."""
        encoder, cv_r = self.encoder, float(self.encoder.cv_r[0])
        if cv_r <= 0:
            logger.warning(
                "The encoding model predicts no better than the mean (leave-one-out r %.3f on %d "
                "trials), so its choices are close to random. An r near -1 means the penalty left "
                "only the intercept, whose leave-one-out predictions are anti-correlated with the "
                "responses by construction. More calibration trials usually help.",
                cv_r, encoder.n_samples)
        alpha = float(encoder.alphas[0])
        if alpha <= self.alphas[0] or alpha >= self.alphas[-1]:
            edge = "smallest" if alpha <= self.alphas[0] else "largest"
            logger.warning(
                "The ridge penalty chosen (%.3g) is the %s of encoding.alpha_min..alpha_max, so the "
                "best one may lie outside it. Widen the range. With a small penalty the predictive "
                "SD is large, and encoding.exploration then outweighs the predictions.", alpha,
                edge)

    def _choose(self, condition: str, exploration: float) -> int:
        """Return the next stimulus of ``condition``: its objective, then the selection rule."""
        if self.experiment.allow_repeats:
            available = np.ones(len(self.pool), dtype=bool)
        else:
            available = ~self.state.shown_mask
        objective = registry.CONDITIONS.get(condition).objective
        if objective is None or self.policy == "random":
            return int(select_random(available, 1, self.rng)[0])
        value, sd = objective(self.scorer.mean, self.scorer.sd)
        rule = self.experiment.closed_loop.selection
        choice = registry.Choice(condition, value, sd, available, exploration, self.rng)
        index = int(registry.SELECTIONS.get(rule)(choice))
        if not available[index]:
            raise ValueError(f"The selection rule {rule!r} chose candidate {index}, which is not "
                             "available (already shown, or out of the pool). A rule must return "
                             "an index where choice.available is True.")
        return index

    def closed_loop(self) -> None:
        """Blocks of drive, suppress and baseline trials, updating the model after every trial.

        Under the ``open_loop`` policy the blocks run the same way with the calibration model,
        never updated; under ``random`` every sentence is drawn at random.
        """
        settings = self.experiment.closed_loop
        conditions = (["drive"] * settings.n_drive + ["suppress"] * settings.n_suppress
                      + ["baseline"] * settings.n_baseline)
        for name, count in settings.extra_conditions.items():
            conditions += [name] * count
        learning = self.policy == "closed_loop"
        arrange = registry.ORDERS.get(settings.order)
        self._phase("closed_loop", settings.n_blocks * len(conditions))
        for block in range(1, settings.n_blocks + 1):
            order = arrange(list(conditions), self.rng)
            for position, condition in enumerate(order):
                index = self._choose(str(condition), self.experiment.encoding.exploration)
                predicted, predicted_sd = self._prediction(index)
                self._run_trial("closed_loop", block, str(condition), index, predicted,
                                predicted_sd, update=learning,
                                next_in_run=position < len(order) - 1)
            self._rest()
            if learning:
                # The refit runs during the rest between blocks; the next block starts after both.
                self.fit(choose_layer=self.reselect_layer)
            self._next_due = None
            if block < settings.n_blocks and self._stop_after(block, len(order)):
                return

    def _stop_after(self, block: int, n_trials: int) -> bool:
        """Ask the experiment's stop rule whether the closed loop ends after ``block``."""
        rule = self.experiment.closed_loop.stop_rule
        if rule == "never":
            return False
        trials = self.state.trials[-n_trials:]
        result = registry.BlockResult(
            block=block, n_blocks=self.experiment.closed_loop.n_blocks,
            conditions=[record.condition for record in trials],
            observed=[float(record.observed) for record in trials],
            predicted=[float(record.predicted) for record in trials],
            cv_r=float(self.encoder.cv_r[0]) if self.encoder is not None else float("nan"))
        if not registry.STOP_RULES.get(rule)(result):
            return False
        logger.info("The stop rule %r ended the closed loop after block %d of %d.", rule, block,
                    result.n_blocks)
        if self.recorder is not None:
            self.recorder.file.attrs["closed_loop_stopped_after_block"] = block
        return True

    def evaluate(self) -> None:
        """Fresh drive, suppress and baseline sentences chosen by the final model, in mixed order."""
        n = self.experiment.evaluation.n_per_condition
        n_conditions = 3 + (0 if self.policy == "random"
                            else len(self.experiment.closed_loop.extra_conditions))
        self._phase("evaluation", n_conditions * n)
        available = ~self.state.shown_mask
        if self.policy == "random":
            chosen = select_random(available, 3 * n, self.rng)
            plan = list(zip(["drive"] * n + ["suppress"] * n + ["baseline"] * n, chosen,
                            strict=True))
        else:
            # Each condition's best n by its objective, without exploration; random conditions
            # draw theirs. A sentence goes to the first condition that takes it.
            plan = []
            for name in ("drive", "suppress", "baseline",
                         *self.experiment.closed_loop.extra_conditions):
                objective = registry.CONDITIONS.get(name).objective
                if objective is None:
                    chosen = select_random(available, n, self.rng)
                else:
                    chosen = select_top(*objective(self.scorer.mean, self.scorer.sd), available,
                                        0.0, n)
                available[chosen] = False
                plan += [(name, i) for i in chosen]
        self._planned[[int(index) for _, index in plan]] = True
        order = self.rng.permutation(len(plan))
        for count, position in enumerate(order):
            condition, index = plan[position]
            predicted, predicted_sd = self._prediction(int(index))
            self._run_trial("evaluation", 0, condition, int(index), predicted, predicted_sd,
                            update=False, next_in_run=count < len(order) - 1)
        self._wait_for_responses()
        self._refresh_responses()

    def _rest(self) -> None:
        """Show the rest message and wait for the responses still pending, before a refit."""
        presentation = self.experiment.presentation
        self._show_message(presentation.rest, presentation.rest_duration_s)
        self._wait_for_responses()
        self._refresh_responses()

    def _refresh_responses(self) -> None:
        """Re-estimate every response so far from all the data of a delayed source (fMRI).

        A GLM estimate made 12 s after an onset rests on the volumes received by then, and the first
        trials of a run have few volumes to separate drift from response. The refit after a phase
        or block uses the estimates from every volume received since. The trial table keeps the
        estimates as they were when each trial was first recorded.
        """
        if not self._delayed or not self.state.trial_ids:
            return
        estimates = self.responses.estimate(self.state.trial_ids)
        self.state.responses = [float(value) for value in
                                estimates[:, self.target_indices].mean(axis=1)]
        if self.recorder is not None:
            self.recorder.write_array("fmri/refreshed/trial", np.array(self.state.trial_ids))
            self.recorder.write_array("fmri/refreshed/estimates", estimates)
            self.recorder.write_array("fmri/refreshed/observed", np.array(self.state.responses))

    def run(self) -> ControllerState:
        """Run calibration, the closed loop and evaluation, as the policy prescribes."""
        # One BLAS thread: the matrices here are small, and with other busy processes (the
        # simulated subject, the display) two OpenBLAS threads on 2 cores made a 300 x 640 SVD
        # about 4 times slower than one thread did.
        with threadpool_limits(limits=1, user_api="blas"):
            return self._run()

    def _run(self) -> ControllerState:
        self.presenter.open()
        presentation = self.experiment.presentation
        self._show_message(presentation.instructions, presentation.instructions_duration_s)
        calibration = self.experiment.calibration.n_trials
        if self.policy == "calibration_only":
            loop = self.experiment.closed_loop
            calibration += loop.n_blocks * (loop.n_drive + loop.n_suppress + loop.n_baseline)
            self.calibrate(calibration)
        else:
            self.calibrate(calibration)
            self.closed_loop()
        self.evaluate()
        self._record_frame_reports()
        return self.state


def _jsonable(state):
    """Return a bit generator's state with numpy values as plain Python, comparable after JSON."""
    if isinstance(state, dict):
        return {key: _jsonable(value) for key, value in state.items()}
    if isinstance(state, np.generic):
        return state.item()
    if isinstance(state, np.ndarray):
        return state.tolist()
    return state
