"""In-process sessions against the simulated subject: no LSL, no display, a stepped clock.

Runs in one process, for benchmarks and tests that compare selection policies over many seeds. The
responses have the same single-trial statistics as the streamed simulator (see
``acquisition.responses.EpochedSimulator``), and the controller is the one real sessions use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acquisition.responses import EpochedSimulator
from acquisition.simulated import EcogRenderer, channel_names
from loop.clock import SteppedClock
from loop.config import Experiment, SimulatorSettings
from loop.controller import Controller, ControllerState
from loop.presentation import HeadlessPresenter


class DiscardMarkers:
    """A marker sink for in-process runs: returns the marker text and sends nothing."""

    def push(self, event: dict, timestamp: float) -> str:
        from acquisition.lsl import encode_marker

        return encode_marker(event)


@dataclass(frozen=True)
class OfflineResult:
    """Evaluation of one in-process session against the pool's noise-free truth."""

    policy: str
    seed: int
    drive_truth: float
    suppress_truth: float
    baseline_truth: float
    drive_fraction: float
    suppress_fraction: float
    controlled_drive_fraction: float
    controlled_suppress_fraction: float
    state: ControllerState


def renderer_for(simulator: SimulatorSettings) -> EcogRenderer:
    """Return the simulated subject's response model for the rig's simulator settings."""
    from loop.session import simulator_config

    return EcogRenderer(simulator_config(simulator))


def run_offline(experiment: Experiment, simulator: SimulatorSettings, pool, pool_features,
                pool_truth: np.ndarray, policy: str, seed: int) -> OfflineResult:
    """Run one session in-process and score its evaluation sentences against the truth."""
    info = experiment.experiment.model_copy(update={"seed": seed})
    experiment = experiment.model_copy(update={"experiment": info})
    renderer = renderer_for(simulator)
    truth_of = dict(zip(pool.texts, pool_truth, strict=True))
    responses = EpochedSimulator(renderer, lambda texts: np.array([truth_of[t] for t in texts]),
                                 np.random.default_rng([seed, 2]))
    names = channel_names(simulator.n_channels)
    targets = [names.index(name) for name in experiment.response.target_channels]
    clock = SteppedClock()
    controller = Controller(experiment, pool, pool_features, targets,
                            HeadlessPresenter(clock, DiscardMarkers()), responses, clock,
                            np.random.default_rng(seed), policy=policy)
    state = controller.run()

    n = experiment.evaluation.n_per_condition
    ordered = np.sort(pool_truth)
    truth_by_condition = {}
    for condition in ("drive", "suppress", "baseline"):
        shown_truth = [truth_of[r.text] for r in state.trials
                 if r.phase == "evaluation" and r.condition == condition]
        truth_by_condition[condition] = float(np.mean(shown_truth))

    # Every drive (suppress) sentence shown after calibration, against the best (worst) as many.
    controlled = {}
    for condition in ("drive", "suppress"):
        shown_truth = [truth_of[r.text] for r in state.trials
                 if r.phase != "calibration" and r.condition == condition]
        oracle = ordered[-len(shown_truth):] if condition == "drive" else ordered[:len(shown_truth)]
        controlled[condition] = float(np.mean(shown_truth) / oracle.mean()) if shown_truth else float("nan")
    return OfflineResult(
        policy, seed, truth_by_condition["drive"], truth_by_condition["suppress"],
        truth_by_condition["baseline"], truth_by_condition["drive"] / ordered[-n:].mean(),
        truth_by_condition["suppress"] / ordered[:n].mean(), controlled["drive"],
        controlled["suppress"], state,
    )
