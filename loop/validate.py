"""Check an experiment and a rig before a session, and print its plan: ``neurosteer validate``.

Runs in the ``neurosteer`` command on the stimulus PC. It reads both files and checks what can be
checked without running trials: the model, the pool, the channels or ROIs and the timing against
the TR, and with options the streams and the window. It lists every problem found in one run. It
opens a window only with ``--display`` and resolves streams only with ``--streams``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loop.config import Experiment, Rig, load_experiment, load_rig, resolve_data_path
from loop.errors import ConfigError

# The HRF peaks about 5 s after a brief stimulus, so an fMRI response needs at least this long.
MIN_ESTIMABLE_AFTER_S = 6.0


@dataclass
class Validation:
    """Problems found, one line each with file and key, and the session's plan once both files load."""

    problems: list[str] = field(default_factory=list)
    plan: list[tuple[str, int, float]] = field(default_factory=list)
    """(phase, trials, expected seconds) in order, before any speed factor."""

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(experiment_path: Path, rig_path: Path, streams: bool = False,
             display: bool = False) -> Validation:
    """Check ``experiment_path`` with ``rig_path`` and return every problem and the plan."""
    result = Validation()
    experiment = _load(load_experiment, experiment_path, result)
    rig = _load(load_rig, rig_path, result)
    if experiment is None or rig is None:
        return result

    from loop.session import check_rig_fits_stimuli

    try:
        check_rig_fits_stimuli(experiment, experiment_path, rig, rig_path)
    except ConfigError as err:
        result.problems.append(str(err))
    if experiment.vision is not None:
        _check_vision(experiment, experiment_path, rig, result)
        result.plan = plan(experiment, rig)
        return result
    _check_model(experiment, experiment_path, result)
    pool = _check_pool(experiment, experiment_path, result)
    _check_targets(experiment, experiment_path, rig, rig_path, result)
    if rig.is_fmri:
        _check_fmri_timing(experiment, experiment_path, rig, rig_path, result)
    if streams and not rig.rig.kind.startswith("simulated"):
        _check_streams(rig, rig_path, result)
    if display:
        _check_display(experiment, experiment_path, rig, rig_path, pool, result)
    result.plan = plan(experiment, rig)
    return result


def plan(experiment: Experiment, rig: Rig) -> list[tuple[str, int, float]]:
    """Return each phase's trial count and expected duration in seconds (no speed factor).

    Trials are one mean onset interval apart. Each run starts one interval after the rest message,
    and an fMRI run also waits for its last response before the refit.
    """
    timing, presentation = experiment.timing, experiment.presentation
    interval_s = timing.stimulus_duration_s + timing.iti_s
    wait_s = experiment.response.estimable_after_s if rig.is_fmri else 0.0
    end_of_run_s = presentation.rest_duration_s + timing.iti_s + wait_s

    loop = experiment.closed_loop
    phases = [("instructions", 0, presentation.instructions_duration_s if presentation.instructions
               else 0.0)]
    if experiment.vision is not None:
        runs = _vision_runs(experiment)
    else:
        per_block = (loop.n_drive + loop.n_suppress + loop.n_baseline
                     + sum(loop.extra_conditions.values()))
        n_evaluation = (3 + len(loop.extra_conditions)) * experiment.evaluation.n_per_condition
        runs = ([("calibration", experiment.calibration.n_trials)]
                + [(f"closed-loop block {block}", per_block)
                   for block in range(1, loop.n_blocks + 1)]
                + [("evaluation", n_evaluation)])
    for name, n_trials in runs:
        phases.append((name, n_trials, n_trials * interval_s + end_of_run_s))
    return phases


def _vision_runs(experiment: Experiment) -> list[tuple[str, int]]:
    """Return a vision session's runs and their trial counts (synthesis time not included)."""
    from loop.vision_session import BUILTIN_NATURAL

    vision = experiment.vision
    # The shipped set has 36 images; a folder's count is known once it is read.
    n_natural = 36 if vision.natural_images == BUILTIN_NATURAL else _folder_count(experiment)
    n_sites = len(vision.synthesis.target_sites or experiment.response.target_channels)
    n_synthesised = n_sites * len(vision.synthesis.objectives)
    evolution = vision.evolution
    runs = [("calibration", n_natural * vision.calibration_repeats)]
    runs += [(f"synthesis block {block}", n_synthesised + vision.synthesis.n_references)
             for block in range(1, vision.synthesis.n_blocks + 1)]
    runs += [(f"evolution generation {generation}",
              evolution.population_size + evolution.n_references)
             for generation in range(1, evolution.n_generations + 1)]
    n_final = n_synthesised + (1 if evolution.n_generations else 0) + n_natural
    runs.append(("evaluation", n_final * vision.evaluation_repeats))
    return runs


def _folder_count(experiment: Experiment) -> int:
    from synth.natural_images import ImageSetError, load_image_folder

    try:
        return len(load_image_folder(Path(experiment.vision.natural_images),
                                     experiment.vision.image_size))
    except ImageSetError:
        return 0


def _check_vision(experiment: Experiment, experiment_path: Path, rig: Rig,
                  result: Validation) -> None:
    """Check the natural images, the vision model and its layers, and the rig's sites."""
    from loop.vision_session import check_vision_channels, load_natural_set
    from synth.errors import ModelNotFoundError
    from synth.vision_models import load_vision_model

    try:
        load_natural_set(experiment, experiment_path)
    except ConfigError as err:
        result.problems.extend(str(err).splitlines())
    if rig.vision_simulator is not None:
        try:
            check_vision_channels(experiment, experiment_path, rig)
        except ConfigError as err:
            result.problems.append(str(err))
    vision = experiment.vision
    try:
        # Loading MobileNetV2 takes a fraction of a second, so its layers are checked for real.
        loaded = load_vision_model(vision.model, "cpu")
    except (ModelNotFoundError, ImportError) as err:
        result.problems.append(f"{experiment_path}: vision.model: {err}")
        return
    missing = [layer for layer in vision.layers if layer not in loaded.model.layer_names()]
    if missing:
        result.problems.append(f"{experiment_path}: vision.layers: {missing} are not modules of "
                               f"{vision.model}.")


def format_plan(result: Validation, speed: float = 1.0) -> str:
    """Return the plan as a table, with the durations divided by ``speed``."""
    lines = [f"{'phase':<22} {'trials':>6} {'duration':>10}"]
    for phase, n_trials, seconds in result.plan:
        lines.append(f"{phase:<22} {n_trials:>6} {_minutes(seconds / speed):>10}")
    total_trials = sum(n for _, n, _ in result.plan)
    total_s = sum(s for _, _, s in result.plan) / speed
    lines.append(f"{'total':<22} {total_trials:>6} {_minutes(total_s):>10}")
    if speed != 1:
        lines.append(f"(durations divided by the speed factor {speed:g})")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def _load(loader, path: Path, result: Validation):
    try:
        return loader(path)
    except ConfigError as err:
        result.problems.extend(str(err).splitlines())
        return None


def _check_model(experiment: Experiment, experiment_path: Path, result: Validation) -> None:
    from loop.session import resolve_model_name
    from synth.errors import ModelNotFoundError
    from synth.models import resolve_model_path

    name = resolve_model_name(experiment.model.name, experiment_path.parent)
    try:
        # NOTE: this finds the model's files (and converts an embedded model once) but does not
        # load the weights. A damaged weight file is found only when the session loads it.
        resolve_model_path(name)
    except ModelNotFoundError as err:
        result.problems.append(f"{experiment_path}: model.name: {err}")


def _check_pool(experiment: Experiment, experiment_path: Path, result: Validation):
    from synth.pool import PoolFileError, load_pool_file

    pool_path = resolve_data_path(experiment.pool.file, experiment_path.parent)
    try:
        pool = load_pool_file(pool_path, experiment.pool.column, experiment.pool.n_words)
    except PoolFileError as err:
        result.problems.append(f"{experiment_path}: pool.file: {err}")
        return None

    loop = experiment.closed_loop
    per_block = loop.n_drive + loop.n_suppress + loop.n_baseline + sum(loop.extra_conditions.values())
    needed = (experiment.calibration.n_trials
              + (3 + len(loop.extra_conditions)) * experiment.evaluation.n_per_condition
              + (0 if experiment.allow_repeats else loop.n_blocks * per_block))
    if len(pool) < needed:
        result.problems.append(
            f"{experiment_path}: pool.file: {len(pool)} sentences, but the plan shows {needed} "
            "different ones. Use a larger pool, or fewer trials.")
    return pool


def _check_targets(experiment: Experiment, experiment_path: Path, rig: Rig, rig_path: Path,
                   result: Validation) -> None:
    targets = experiment.response.target_channels
    if rig.is_fmri:
        names = list(rig.zmq.roi_names)
        described = f"ROIs of the rig's zmq.roi_names {rig.zmq.roi_names}"
    elif rig.simulator is not None:
        from acquisition.simulated import channel_names

        names = channel_names(rig.simulator.n_channels, rig.simulator.photodiode_lag_s is not None)
        ecog = channel_names(rig.simulator.n_channels)
        described = f"channels of the simulated subject ({ecog[0]}..{ecog[-1]}, {names[-1]})" \
            if len(names) > len(ecog) else f"channels of the simulated subject ({ecog[0]}..{ecog[-1]})"
    else:
        return  # a live stream's channels are known only once it is resolved (--streams)
    missing = [name for name in targets if name not in names]
    if missing:
        result.problems.append(f"{experiment_path}: response.target_channels: {missing} are not {described}.")
    if rig.simulator is not None:
        responsive = [names[index] for index in rig.simulator.target_channels]
        silent = [name for name in targets if name in names and name not in responsive]
        if silent:
            result.problems.append(
                f"{experiment_path}: response.target_channels: {silent} do not respond in the "
                f"simulated subject of {rig_path.name}, whose responsive channels "
                f"(simulator.target_channels) are {responsive[0]}..{responsive[-1]}, so a dry run "
                "would show no control. Change simulator.target_channels in the rig, or the "
                "targets.")

    photodiode = rig.display.photodiode if rig.display is not None else None
    if photodiode is not None and photodiode.channel is not None and rig.simulator is not None \
            and photodiode.channel not in names:
        result.problems.append(
            f"{rig_path}: display.photodiode.channel: {photodiode.channel!r} is not a channel of the "
            "simulated subject; set simulator.photodiode_lag_s to add one.")


def _check_fmri_timing(experiment: Experiment, experiment_path: Path, rig: Rig, rig_path: Path,
                       result: Validation) -> None:
    tr_s = rig.scanner.tr_s
    response = experiment.response
    if response.estimable_after_s < MIN_ESTIMABLE_AFTER_S + tr_s:
        result.problems.append(
            f"{experiment_path}: response.estimable_after_s: {response.estimable_after_s:g} s is too "
            f"early for TR {tr_s:g} s; the HRF peaks about 5 s after onset, so use at least "
            f"{MIN_ESTIMABLE_AFTER_S + tr_s:g} s.")
    shortest_interval_s = (experiment.timing.stimulus_duration_s + experiment.timing.iti_s
                           - experiment.timing.iti_jitter_s)
    if shortest_interval_s < tr_s:
        result.problems.append(
            f"{experiment_path}: timing: onsets can come {shortest_interval_s:g} s apart, less than "
            f"one TR ({tr_s:g} s in {rig_path}), so trials would share volumes too closely to "
            "separate. Lengthen timing.iti_s or shorten the jitter.")
    if response.drift_cutoff_s < 2 * tr_s:
        result.problems.append(
            f"{experiment_path}: response.drift_cutoff_s: {response.drift_cutoff_s:g} s is shorter "
            f"than two TRs ({2 * tr_s:g} s).")


def _check_streams(rig: Rig, rig_path: Path, result: Validation) -> None:
    from acquisition.errors import StreamNotFoundError
    from acquisition.lsl import configure_lsl, resolve_stream
    from loop.config import lsl_config_path

    configure_lsl(lsl_config_path(rig, rig_path))
    names = ([rig.scanner.trigger_stream] if rig.is_fmri and rig.scanner.trigger == "lsl"
             else [] if rig.is_fmri else [rig.lsl.data_stream])
    for name in names:
        try:
            resolve_stream(name, rig.lsl.resolve_timeout_s)
        except StreamNotFoundError as err:
            result.problems.append(f"{rig_path}: lsl: {err}")


def _check_display(experiment: Experiment, experiment_path: Path, rig: Rig, rig_path: Path, pool,
                   result: Validation) -> None:
    from loop.clock import LSLClock
    from loop.session import SessionOptions, _open_screen
    from loop.text_checks import TextCheckError

    if rig.display is None:
        result.problems.append(f"{rig_path}: display: --display needs a [display] table.")
        return
    if pool is None:
        return
    try:
        screen = _open_screen(experiment, experiment_path, rig, rig_path, LSLClock(),
                              SessionOptions(Path("."), display=True), pool)
        screen.close()
    except TextCheckError as err:
        result.problems.extend(f"{experiment_path}: presentation: sentence {text!r}: {reason}"
                               for text, reason in err.problems)
    except ConfigError as err:
        result.problems.extend(str(err).splitlines())
