"""Start, run and close one session: models, streams, presenter, controller and session file.

Runs in the process of the ``neurosteer run`` command. For a simulated rig it also starts the
simulated subject in a child process. The order of closing matters: the inlet goes before its
outlet (liblsl logs a broken transmission otherwise), and the session file is closed last, after
the simulated subject's truth log has been merged into it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from acquisition.simulated import log_file_for, read_log, truth_file
from acquisition.simulated_vision import natural_truth_file
from loop.config import (
    Experiment,
    Rig,
    effective_experiment_text,
    load_experiment,
    load_rig,
    lsl_config_path,
    resolve_data_path,
)
from loop.errors import ConfigError, ResumeError, RunEndedError, SessionAbortedError
from loop.recording import TEXT
from loop.recovery import resumed_path

logger = logging.getLogger(__name__)

RECORDED_PACKAGES = ("neurosteer", "numpy", "scipy", "torch", "transformers", "h5py", "pylsl",
                     "pyzmq", "pydantic", "sentence-transformers", "psychopy")


@dataclass(frozen=True)
class SessionOptions:
    """How to run a session: where to write, how fast, and whether to open a window."""

    output_dir: Path
    speed: float = 1.0
    display: bool = False
    seed: int | None = None
    simulator_ready_timeout_s: float = 900.0


def resolve_model_name(name: str, base: Path) -> str:
    """Return a model name with a relative folder taken relative to ``base`` (the experiment's).

    Embedded names, absolute paths and hub names are returned unchanged. A relative path that
    does not exist beside the experiment file is also returned unchanged, for the hub-cache lookup.
    """
    from synth.models import EMBEDDED_PREFIX

    if name.startswith(EMBEDDED_PREFIX):
        return name
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    beside = (base / path).resolve()
    return str(beside) if beside.exists() else name


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def load_pool_and_features(experiment: Experiment, experiment_path: Path, progress=None):
    """Load the candidate pool and its features for every candidate layer (cached on disk)."""
    from synth.features import TextFeatureExtractor
    from synth.models import load_causal_lm
    from synth.pool import load_pool_file

    pool_path = resolve_data_path(experiment.pool.file, experiment_path.parent)
    pool = load_pool_file(pool_path, experiment.pool.column, experiment.pool.n_words)
    settings = experiment.model
    loaded = load_causal_lm(settings.name, settings.device, settings.dtype)
    extractor = TextFeatureExtractor(loaded, settings.layers, settings.pooling,
                                     settings.batch_size)
    features = extractor.extract(pool.texts, progress=progress)
    return pool, features, loaded.identity


def simulator_config(simulator, speed: float = 1.0, **wire):
    """Return the simulated subject's process settings from a rig's ``[simulator]`` table.

    ``wire`` gives the stream names, source id, pool and log files; in-process runs leave them
    empty.
    """
    from acquisition.simulated import SimulatorConfig

    defaults = {"data_stream": "", "marker_stream": "", "source_id": "", "pool_file": "",
                "log_file": "", "pool_n_words": None, "lsl_config": None}
    settings = simulator.model_dump()
    settings["target_channels"] = tuple(settings["target_channels"])
    return SimulatorConfig(speed=speed, **(defaults | wire), **settings)


def _simulator_config(rig: Rig, rig_path: Path, pool_file: Path, pool_n_words: int | None,
                      log_file: Path, speed: float):
    lsl_path = lsl_config_path(rig, rig_path)
    return simulator_config(
        rig.simulator, speed, data_stream=rig.lsl.data_stream,
        marker_stream=rig.lsl.marker_stream, source_id=f"neurosteer-sim-{rig.simulator.seed}",
        pool_file=str(pool_file), log_file=str(log_file), pool_n_words=pool_n_words,
        lsl_config=str(lsl_path) if lsl_path else None,
    )


def _merge_simulator_log(recorder, log_file: Path, truth_path: Path) -> None:
    """Copy the simulated subject's noise-free responses into the session file.

    A resumed session also takes the logs of the files it continues (``earlier_simulator_logs``);
    a trial logged twice keeps its latest entry.
    """
    if truth_path.exists():
        recorder.write_array("simulator/pool_truth", np.load(truth_path, allow_pickle=False))
    earlier = [Path(name) for name in json.loads(recorder.file.attrs.get("earlier_simulator_logs",
                                                                         "[]"))]
    by_trial = {}
    for path in [*earlier, log_file]:
        if path.exists():
            by_trial.update((row["trial"], row) for row in read_log(path))
    rows = [by_trial[trial] for trial in sorted(by_trial)]
    # The simulated vision subject logs an error, and no truth, for an image it could not read.
    errors = [row for row in rows if "error" in row]
    rows = [row for row in rows if "error" not in row]
    if errors:
        recorder.write_array("simulator/error_trial", np.array([row["trial"] for row in errors]))
        recorder.write_array("simulator/error", [row["error"] for row in errors], dtype=TEXT)
    if not rows:
        return
    recorder.write_array("simulator/trial", np.array([row["trial"] for row in rows]))
    recorder.write_array("simulator/onset", np.array([row["onset"] for row in rows]))
    recorder.write_array("simulator/truth", np.array([row["truth"] for row in rows]))
    recorder.write_array("simulator/amplitudes", np.array([row["amplitudes"] for row in rows]))
    if all("truth_raw" in row for row in rows):
        recorder.write_array("simulator/truth_raw", np.array([row["truth_raw"] for row in rows]))
    labels = [row.get("text", row.get("stimulus_id", "")) for row in rows]
    recorder.write_array("simulator/text", labels, dtype=TEXT)


def session_path(output_dir: Path, name: str, started: dt.datetime) -> Path:
    """Return the session file's path, named after the experiment and the session's start."""
    return Path(output_dir) / f"{name}_{started.strftime('%Y%m%d-%H%M%S')}.h5"


def check_rig_fits_stimuli(experiment: Experiment, experiment_path: Path, rig: Rig,
                            rig_path: Path) -> None:
    """Reject a simulated subject made for the other kind of stimuli, and images on an fMRI rig."""
    if experiment.vision is not None and rig.simulator is not None:
        raise ConfigError(f"{rig_path}: simulator: this simulated subject responds to sentences, "
                          f"and {experiment_path.name} shows images. Use a rig with a "
                          "[vision_simulator] table, e.g. hardware_configs/simulated_vision.toml.")
    if experiment.vision is None and rig.vision_simulator is not None:
        raise ConfigError(f"{rig_path}: vision_simulator: this simulated subject responds to "
                          f"images, and {experiment_path.name} shows sentences. Use a rig with a "
                          "[simulator] table, e.g. hardware_configs/simulated_ecog.toml.")
    if experiment.vision is not None and rig.is_fmri:
        raise ConfigError(f"{experiment_path}: vision: image experiments run on electrophysiology "
                          "rigs (LSL); fMRI rigs are not supported for them yet.")


def _check_simulated_channels(experiment: Experiment, experiment_path: Path, rig: Rig) -> None:
    from acquisition.simulated import channel_names

    names = channel_names(rig.simulator.n_channels)
    missing = [name for name in experiment.response.target_channels if name not in names]
    if missing:
        raise ConfigError(f"{experiment_path}: response.target_channels: {missing} are not among "
                          f"the simulator's channels {names[0]}..{names[-1]}.")


def _target_indices(experiment: Experiment, experiment_path: Path, description) -> list[int]:
    names = description.channel_names
    missing = [name for name in experiment.response.target_channels if name not in names]
    if missing:
        raise ConfigError(f"{experiment_path}: response.target_channels: {missing} are not "
                          f"channels of stream {description.name!r} ({', '.join(names[:4])}, ...).")
    return [names.index(name) for name in experiment.response.target_channels]


def run_session(experiment_path: Path, rig_path: Path, options: SessionOptions,
                progress=None, resume=None) -> Path:
    """Run one session end to end and return the path of its session file.

    Everything that can fail before the first trial (files, model, pool, streams, the window and
    the sentences' fit on it) is checked before the session file is created, so a session that
    cannot start leaves no file behind. The controller runs in a worker thread while this thread
    runs the presentation loop, which PsychoPy needs in the main thread.

    ``resume`` (a :class:`loop.recovery.RecoveredSession`) continues a stopped session in a new
    file beside the old one: the new file starts with everything readable in the old one, and the
    controller replays the recovered trials before it shows the next.
    """
    import pylsl

    from acquisition.epochs import ResponseWindow
    from acquisition.lsl import DataInlet, MarkerOutlet, check_clock_base, configure_lsl
    from acquisition.responses import LSLResponses
    from acquisition.simulated import SimulatorProcess
    from loop.clock import LSLClock
    from loop.controller import Controller
    from loop.presentation_loop import PresentationLoop
    from loop.recording import SessionRecorder
    from synth.errors import ModelNotFoundError
    from synth.models import resolve_model_path

    experiment_path, rig_path = Path(experiment_path), Path(rig_path)
    experiment = load_experiment(experiment_path)
    rig = load_rig(rig_path)
    seed = experiment.experiment.seed if options.seed is None else options.seed
    # --seed overrides the file, and the effective settings stored in the session file record it.
    experiment = experiment.model_copy(
        update={"experiment": experiment.experiment.model_copy(update={"seed": seed})})
    if options.display and rig.display is None:
        raise ConfigError(f"{rig_path}: display: a run with a window needs a [display] table "
                          "describing the screen; see docs/experiment_format.md.")
    vision = experiment.vision is not None
    check_rig_fits_stimuli(experiment, experiment_path, rig, rig_path)
    if rig.simulator is not None:
        _check_simulated_channels(experiment, experiment_path, rig)
    if vision and rig.vision_simulator is not None:
        from loop.vision_session import check_vision_channels

        check_vision_channels(experiment, experiment_path, rig)
    if rig.is_fmri:
        _target_rois(experiment, experiment_path, rig)
        _check_trigger_needs_window(rig, rig_path, options)
        if resume is not None:
            raise ResumeError(f"{resume.path} is an fMRI session, and an fMRI session cannot be "
                              "resumed: its scanner run and GLM start again. Start a new session.")
    if not vision:
        model_name = resolve_model_name(experiment.model.name, experiment_path.parent)
        try:
            resolve_model_path(model_name)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"{experiment_path}: model.name: {err}") from None
        experiment = experiment.model_copy(
            update={"model": experiment.model.model_copy(update={"name": model_name})})
    configure_lsl(lsl_config_path(rig, rig_path))

    # The session starts now: its file name and its "started" attribute give the same time.
    started = dt.datetime.now()
    if resume is None:
        path = session_path(options.output_dir, experiment.experiment.name, started)
    else:
        path = resumed_path(resume.path, started.strftime("%Y%m%d-%H%M%S"))
    recorder = simulator = inlet = outlet = screen = None
    status = "aborted"
    try:
        pool_file = resolve_data_path(experiment.pool.file, experiment_path.parent)
        if rig.simulator is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            simulator = SimulatorProcess(_simulator_config(
                rig, rig_path, pool_file, experiment.pool.n_words,
                log_file_for(path), options.speed))
            simulator.start()
        elif rig.vision_simulator is not None:
            from loop.vision_session import start_vision_simulator

            path.parent.mkdir(parents=True, exist_ok=True)
            from loop.vision_session import image_folder_for

            simulator = start_vision_simulator(rig, rig_path, experiment, experiment_path,
                                               log_file_for(path), image_folder_for(path),
                                               options.speed)
        elif rig.rig.kind == "simulated_fmri":
            path.parent.mkdir(parents=True, exist_ok=True)
            simulator = _start_scanner(rig, rig_path, pool_file, experiment.pool.n_words, path,
                                       options.speed)

        if vision:
            from loop.vision_session import load_images_and_features

            pool, features, model_identity, extractor = load_images_and_features(
                experiment, experiment_path, progress)
        else:
            pool, features, model_identity = load_pool_and_features(experiment, experiment_path,
                                                                    progress)

        # Streams: the marker outlet first, so the simulated subject can find it while it loads.
        outlet = MarkerOutlet(rig.lsl.marker_stream, f"neurosteer-markers-{path.stem}")
        if simulator is not None:
            simulator.wait_ready(options.simulator_ready_timeout_s)
        if rig.is_fmri:
            inlet = _open_fmri_inputs(rig, rig_path, options)
            targets = _target_rois(experiment, experiment_path, rig)
            description, photodiode_channel = None, None
        else:
            inlet = DataInlet(rig.lsl.data_stream, rig.lsl.resolve_timeout_s)
            first_samples = check_clock_base(inlet, pylsl.local_clock, rig.lsl.resolve_timeout_s)
            description = inlet.description
            targets = _target_indices(experiment, experiment_path, description)
            photodiode_channel = _photodiode_index(rig, rig_path, description)

        # The display, and every sentence checked against it, before the session file exists.
        clock = LSLClock()
        screen = _open_screen(experiment, experiment_path, rig, rig_path, clock, options, pool)

        metadata = {"experiment_file": str(experiment_path), "rig_file": str(rig_path),
                    "seed": seed, "speed": options.speed,
                    "kind": "dry_run" if rig.rig.kind.startswith("simulated") else "live",
                    "modality": "fmri" if rig.is_fmri else "electrophysiology",
                    "stimuli": "images" if vision else "sentences",
                    "display": "psychopy" if options.display else "headless",
                    "started": started.isoformat(timespec="seconds"),
                    "model_identity": model_identity, "versions": package_versions()}
        experiment_text = experiment_path.read_text(encoding="utf-8")
        rig_text = rig_path.read_text(encoding="utf-8")
        if resume is None:
            recorder = SessionRecorder(path)
            recorder.write_metadata(experiment_text, rig_text, metadata)
            if not vision:
                recorder.write_stimuli(pool.ids, pool.texts, pool.source)
        else:
            recorder = resumed_recorder(path, resume, experiment_text, rig_text, metadata,
                                         model_identity, pool, clock)
        recorder.on_fault = getattr(progress, "fault", None)
        # With `extends`, the stored text is not the whole experiment: keep every setting too.
        recorder.write_array("config/experiment_effective", effective_experiment_text(experiment),
                             dtype=TEXT)
        if options.display:
            recorder.file.attrs["refresh_rate_hz"] = 1.0 / screen.frame_period_s
        if rig.is_fmri:
            responses = _start_fmri_run(experiment, rig, inlet, screen, outlet, recorder, clock,
                                        options.speed)
        else:
            recorder.add_stream(description.name, list(description.channel_names),
                                description.sfreq, description.source_id)
            response = experiment.response
            window = ResponseWindow(response.tmin_s, response.tmax_s, *response.baseline_s)
            responses = LSLResponses(
                inlet, window.scaled(options.speed), clock,
                on_chunk=lambda data, times: recorder.add_chunk(description.name, data, times),
                stall_report_s=rig.lsl.stall_report_s,
                reconnect_timeout_s=rig.lsl.reconnect_timeout_s,
                photodiode_channel=photodiode_channel, on_fault=recorder.add_fault,
                on_gap=lambda start, end: recorder.add_gap(description.name, start, end),
            )
        loop = PresentationLoop(screen, clock, outlet, _operator_keys(rig), options.speed)
        presenter = loop.presenter()
        if not rig.is_fmri:
            recorded = recorder.file.get(f"streams/{description.name}/timestamps")
            if recorded is not None and recorded.shape[0]:
                # A resumed session's recording goes on from the stopped one's last sample.
                responses.continue_after(float(recorded[-1]))
            responses.take(*first_samples)
            # While the stream is stalled, no fallback fills the next slot: it would go unrecorded.
            responses.on_stall = presenter.withdraw
        hooks = {"on_trial": progress.trial if progress is not None else None,
                 "on_phase": progress.phase if progress is not None else None}
        if vision:
            from loop.vision_controller import VisionController
            from loop.vision_session import ImageStore, image_folder_for

            controller = VisionController(
                experiment, pool, features, targets, presenter, responses, clock,
                np.random.default_rng(seed), extractor,
                ImageStore(pool, recorder, image_folder_for(path)), recorder=recorder,
                speed=options.speed, synthesis_device=experiment.vision.synthesis.device,
                replay=resume.trials if resume is not None else None, **hooks)
        else:
            controller = Controller(
                experiment, pool, features, targets, presenter, responses, clock,
                np.random.default_rng(seed), recorder=recorder, speed=options.speed,
                replay=resume.trials if resume is not None else None, **hooks)
        worker = ControllerThread(controller, presenter)
        worker.start()
        try:
            loop.run(worker)
        finally:
            worker.join_or_warn()
            _record_display_summary(recorder, loop.summary, presenter)
        if worker.error is not None:
            raise worker.error

        recorder.file.attrs["chosen_layer"] = controller.state.layer
        for key, value in controller.encoder.to_arrays().items():
            recorder.write_array(f"model/final_state/{key}", value)
        status = "complete"
        return path
    except RunEndedError as err:
        status = "ended_by_operator"
        raise SessionAbortedError(
            f"{err} The {recorder.n_trials} completed trials are kept in {path}."
            + _resume_hint(rig, path)) from err
    except KeyboardInterrupt as err:
        n_trials = recorder.n_trials if recorder is not None else 0
        raise SessionAbortedError(
            f"Session stopped by the operator after {n_trials} trials; they are kept in {path}."
            + (_resume_hint(rig, path) if recorder is not None else "")) from err
    except Exception as err:
        if recorder is not None:
            err.add_note(f"The session stopped after {recorder.n_trials} trials; they are kept "
                         f"in {path}." + _resume_hint(rig, path))
        raise
    finally:
        _close(recorder, status, screen, inlet, outlet, simulator, path)


def _resume_hint(rig: Rig, path: Path) -> str:
    if rig.is_fmri:
        return ""
    return f" To continue it, run: neurosteer resume {path}"


def _start_scanner(rig: Rig, rig_path: Path, pool_file: Path, pool_n_words: int | None,
                   path: Path, speed: float):
    from acquisition.simulated_scanner import ScannerProcess, scanner_config

    lsl_path = lsl_config_path(rig, rig_path)
    scanner = ScannerProcess(scanner_config(
        rig, speed, marker_stream=rig.lsl.marker_stream, pool_file=str(pool_file),
        pool_n_words=pool_n_words, log_file=str(log_file_for(path)),
        lsl_config=str(lsl_path) if lsl_path else None))
    scanner.start()
    return scanner


@dataclass
class FmriInputs:
    """The per-TR values and the sync pulses of an fMRI run, and the responses made from them."""

    subscriber: object
    triggers: object
    responses: object = None
    emulator: object = None

    def close(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()
        if self.responses is not None:
            self.responses.close()
        if self.triggers is not None:
            self.triggers.close()
        self.subscriber.close()


def _open_fmri_inputs(rig: Rig, rig_path: Path, options: SessionOptions) -> FmriInputs:
    """Connect to the per-TR values and open the trigger source the rig names."""
    from acquisition import scanner
    from acquisition.zmq_bridge import TRSubscriber

    settings = rig.scanner
    _check_trigger_needs_window(rig, rig_path, options)
    try:
        subscriber = TRSubscriber(rig.zmq.address, bind=rig.zmq.bind,
                                  allow_remote=rig.zmq.allow_remote,
                                  roi_names=list(rig.zmq.roi_names))
    except ValueError as err:
        raise ConfigError(f"{rig_path}: zmq.address: {err}") from None
    try:
        if settings.trigger == "lsl":
            triggers = scanner.LSLTriggerSource(settings.trigger_stream, marker_type="pulse",
                                                timeout_s=rig.lsl.resolve_timeout_s)
        elif settings.trigger == "serial":
            try:
                triggers = scanner.SerialTriggerSource(settings.serial_port,
                                                       settings.serial_baudrate,
                                                       settings.serial_trigger_byte)
            except OSError as err:  # pyserial's SerialException is an OSError
                raise ConfigError(f"{rig_path}: scanner.serial_port: failed to open "
                                  f"{settings.serial_port!r}: {err}. Check the cable and the "
                                  "port name.") from None
        else:
            # Key presses are read by the window's frame loop; the source is made once it is open.
            triggers = None
    except BaseException:
        subscriber.close()
        raise
    return FmriInputs(subscriber, triggers)


def _check_trigger_needs_window(rig: Rig, rig_path: Path, options: SessionOptions) -> None:
    if rig.scanner.trigger == "key" and not options.display:
        raise ConfigError(f"{rig_path}: scanner.trigger: key-press triggers are read from the "
                          "PsychoPy window, so run with --display, or use \"serial\" or \"lsl\".")


def _target_rois(experiment: Experiment, experiment_path: Path, rig: Rig) -> list[int]:
    names = list(rig.zmq.roi_names)
    missing = [name for name in experiment.response.target_channels if name not in names]
    if missing:
        raise ConfigError(f"{experiment_path}: response.target_channels: {missing} are not ROIs "
                          f"of the rig's zmq.roi_names {names}.")
    return [names.index(name) for name in experiment.response.target_channels]


def _start_fmri_run(experiment: Experiment, rig: Rig, inputs: FmriInputs, screen, outlet,
                    recorder, clock, speed: float):
    """Wait for the scanner's first volume and return the response source anchored to it."""
    from acquisition.fmri import FMRIResponses, TriggerWatch
    from acquisition.glm import OnlineGLM
    from acquisition.lsl import encode_marker
    from acquisition.scanner import QueuedTriggerSource, TriggerCounter, TriggerCrossCheck

    settings = rig.scanner
    recorder.file.attrs.update({"tr_s": settings.tr_s, "n_dummy_scans": settings.n_dummy_scans,
                                "roi_names": json.dumps(list(rig.zmq.roi_names))})
    counter = TriggerCounter(settings.tr_s / speed, n_dummy_scans=settings.n_dummy_scans)

    def record_pulse(time: float, volume: int) -> None:
        # Every pulse counted goes into the session file with its volume (negative for dummies).
        recorder.add_marker(time, encode_marker({"type": "pulse", "volume": volume}))

    if settings.trigger == "key":
        # Key pulses also go out on the marker stream at once, from the window's thread, so that
        # other recordings (and a key-triggered simulated scanner) see them.
        screen.take_trigger_key(settings.trigger_key,
                                lambda time: outlet.push({"type": "pulse"}, time))
        inputs.triggers = QueuedTriggerSource(
            screen.trigger_pulses, f"key {settings.trigger_key!r} in the PsychoPy window")
    recorder.add_marker(clock.now(), outlet.push({"type": "waiting_for_scanner"}, clock.now()))
    screen.set_message("Waiting for the scanner")
    if rig.rig.kind == "simulated_fmri" and settings.trigger == "key":
        inputs.emulator = _start_mri_emulator(settings, speed)
    volume_zero = _wait_for_volume_zero(screen, inputs.triggers, counter, clock,
                                        settings.first_pulse_timeout_s, record_pulse)
    screen.set_message(None)
    recorder.file.attrs["volume_zero"] = volume_zero
    logger.info("Volume 0 started at %.3f (after %d dummy scans).", volume_zero,
                settings.n_dummy_scans)

    response = experiment.response
    glm = OnlineGLM(len(rig.zmq.roi_names), drift_cutoff_s=response.drift_cutoff_s,
                    estimable_after_s=response.estimable_after_s, ridge=response.glm_ridge)
    cross_check = TriggerCrossCheck(counter, max_delay_trs=settings.max_response_delay_trs,
                                    min_delay_trs=settings.min_response_delay_trs)
    watch = TriggerWatch(inputs.triggers, counter, cross_check, on_pulse=record_pulse)
    inputs.responses = FMRIResponses(inputs.subscriber, glm, clock, volume_zero, settings.tr_s,
                                     speed, triggers=watch, on_volume=recorder.add_volume,
                                     on_fault=recorder.add_fault)
    return inputs.responses


def _start_mri_emulator(settings, speed: float):
    """Start PsychoPy's MRI emulator, which presses the trigger key once per TR in this process."""
    from psychopy_mri_emulator import SyncGenerator

    tr_s = settings.tr_s / speed
    if tr_s < 0.1:
        raise ConfigError(f"PsychoPy's MRI emulator needs a TR of 0.1 s or more, and scanner.tr_s "
                          f"{settings.tr_s:g} s at --speed {speed:g} gives {tr_s:g} s. Lower --speed.")
    # More volumes than any session has; the emulator is stopped when the session closes.
    emulator = SyncGenerator(TR=tr_s, TA=tr_s, volumes=1_000_000, sync=settings.trigger_key)
    emulator.daemon = True
    emulator.start()
    return emulator


def _wait_for_volume_zero(screen, triggers, counter, clock, timeout_s: float,
                          on_pulse) -> float:
    """Keep the screen going until the pulse of volume 0 arrives; return its time."""
    from acquisition.scanner import TriggerTimeoutError

    deadline = clock.now() + timeout_s
    while clock.now() < deadline:
        # Reading the keys also routes trigger-key presses to their queue.
        screen.pressed_keys()
        pulses = triggers.poll()
        for position, pulse in enumerate(pulses):
            volume = counter.add_pulse(pulse)
            on_pulse(pulse, volume)
            if volume == 0:
                # Later pulses of this poll are counted by the run's own polls.
                triggers.unread(pulses[position + 1:])
                return pulse
        screen.idle(clock.now() + 0.002)
    raise TriggerTimeoutError(
        f"No sync pulse for volume 0 within {timeout_s:g} s ({counter.n_pulses} pulses counted, "
        f"{counter.n_dummy_scans} dummy scans expected). Start the scanner, and check the trigger "
        "cable and the rig's [scanner] trigger settings."
    )


class ControllerThread(threading.Thread):
    """Runs the controller beside the presentation loop and keeps any error for the main thread."""

    # Maximum wait for the controller to notice that the loop stopped. A response collection that
    # waits for a stalled stream gives up after 2 s, and the next hand-over then fails at once.
    JOIN_TIMEOUT_S = 30.0

    def __init__(self, controller, presenter) -> None:
        super().__init__(name="neurosteer-controller", daemon=True)
        self.controller = controller
        self.presenter = presenter
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.controller.run()
        except BaseException as err:  # handed to the main thread, which raises it again
            self.error = err
        finally:
            self.presenter.stop()

    def join_or_warn(self) -> None:
        self.join(self.JOIN_TIMEOUT_S)
        if self.is_alive():
            logger.error("The controller thread did not stop within %.0f s of the presentation "
                         "loop; the session file is closed without it.", self.JOIN_TIMEOUT_S)


def _photodiode_index(rig: Rig, rig_path: Path, description) -> int | None:
    photodiode = rig.display.photodiode if rig.display is not None else None
    if photodiode is None or photodiode.channel is None:
        return None
    names = list(description.channel_names)
    if photodiode.channel not in names:
        raise ConfigError(f"{rig_path}: display.photodiode.channel: {photodiode.channel!r} is not "
                          f"a channel of stream {description.name!r} ({', '.join(names[:4])}, ...).")
    return names.index(photodiode.channel)


def _operator_keys(rig: Rig):
    from loop.presentation_loop import OperatorKeys

    if rig.display is None:
        return OperatorKeys()
    return OperatorKeys(pause=rig.display.pause_key, end=rig.display.end_key)


def _open_screen(experiment: Experiment, experiment_path: Path, rig: Rig, rig_path: Path, clock,
                 options: SessionOptions, pool):
    """Open the screen; for a window, also check every pool sentence's fit and glyphs on it."""
    from loop.presentation_loop import HeadlessScreen

    if not options.display:
        screen = HeadlessScreen(clock)
        screen.open()
        return screen

    from loop.psychopy_screen import PsychoPyScreen, resolve_monitor
    from loop.text_checks import check_texts_before_run
    from loop.visuals import font_path

    presentation = experiment.presentation
    try:
        look = text_look(experiment, experiment_path)
        font_path(look)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"{experiment_path}: presentation: {err}") from None
    photodiode = rig.display.photodiode
    screen = PsychoPyScreen(
        clock, resolve_monitor(rig.display, rig_path), look, presentation.mode,
        presentation.word_duration_s / options.speed, presentation.image_size_deg,
        presentation.fixation, _photodiode_look(photodiode),
        (rig.display.pause_key, rig.display.end_key),
    )
    screen.open()
    if experiment.vision is not None:
        # Images are drawn at image_size_deg; there is no text to check.
        return screen
    try:
        check_texts_before_run(screen.window, pool.texts, look, mode=presentation.mode,
                               word_duration_s=presentation.word_duration_s,
                               stimulus_duration_s=experiment.timing.stimulus_duration_s)
    except Exception:
        screen.close()
        raise
    return screen


def text_look(experiment: Experiment, experiment_path: Path):
    """Return the text settings of an experiment's ``[presentation]`` table."""
    from loop.visuals import TextLook

    presentation = experiment.presentation
    font_file = (resolve_data_path(presentation.font_file, experiment_path.parent)
                 if presentation.font_file else None)
    return TextLook(font=presentation.font, font_file=font_file,
                    height_deg=presentation.text_height_deg,
                    wrap_width_deg=presentation.wrap_width_deg, color=presentation.text_color,
                    max_lines=presentation.max_lines)


def _photodiode_look(photodiode):
    if photodiode is None:
        return None
    from loop.visuals import PhotodiodeSettings

    return PhotodiodeSettings(corner=photodiode.corner, size_pix=photodiode.size_pix)


def _record_display_summary(recorder, summary, presenter) -> None:
    """Store what the presentation loop saw: frame reports still queued, pauses, lag, fallbacks."""
    for report in presenter.take_reports():
        recorder.add_frame_report(report)
    pauses = np.array(summary.pauses, dtype=np.float64).reshape(-1, 2)
    recorder.write_array("display/pauses", pauses, attrs={"columns": "start, end (LSL clock, s)"})
    recorder.file.attrs["n_fallbacks"] = summary.n_fallbacks
    if "display_lag_s" in recorder.file["trials"]:
        lags = recorder.file["trials/display_lag_s"][:]
        measured = lags[np.isfinite(lags)]
        if len(measured):
            recorder.file.attrs["display_lag_median_s"] = float(np.median(measured))
            recorder.file.attrs["display_lag_n_trials"] = len(measured)


def _close(recorder, status, screen, inlet, outlet, simulator, path) -> None:
    """Close everything in order; each step runs even when an earlier one failed."""
    import pylsl

    if screen is not None:
        screen.close()
    # The inputs close before the session-end marker, which stops the simulated subject: liblsl
    # logs a broken transmission when an outlet goes before its inlet.
    if inlet is not None:
        inlet.close()
    if outlet is not None:
        end = {"type": "session_end", "status": status}
        text = outlet.push(end, pylsl.local_clock())
        if recorder is not None:
            recorder.add_marker(pylsl.local_clock(), text)
    if simulator is not None:
        simulator.stop()
    if outlet is not None:
        outlet.close()
    if recorder is None:
        # The session never started: remove what the simulated subject wrote, as no file refers
        # to it.
        if simulator is not None:
            log_file = log_file_for(path)
            for leftover in (log_file, truth_file(log_file), natural_truth_file(log_file)):
                leftover.unlink(missing_ok=True)
        return
    if simulator is not None:
        log_file = log_file_for(path)
        _merge_simulator_log(recorder, log_file, truth_file(log_file))
        natural_truth = natural_truth_file(log_file)
        if natural_truth.exists():
            # The simulated vision subject's noise-free responses to every natural image.
            with np.load(natural_truth, allow_pickle=False) as arrays:
                for name in arrays.files:
                    recorder.write_array(f"simulator/natural/{name}", arrays[name])
    recorder.close(status)


def resumed_recorder(path: Path, resume, experiment_text: str, rig_text: str, metadata: dict,
                      model_identity: str, pool, clock):
    """Open the file that continues a stopped session and add its recovered trials to it."""
    import h5py

    from loop.recording import SessionRecorder, TrialRecord

    if experiment_text != resume.experiment_text or rig_text != resume.rig_text:
        changed = "experiment" if experiment_text != resume.experiment_text else "rig"
        raise ResumeError(
            f"The {changed} file {metadata[f'{changed}_file']} differs from the copy stored in "
            f"{resume.path.name}, so the session would not go on as it started. Restore the "
            f"file (the original text is under config/{changed} in the session file).")
    if resume.metadata.get("model_identity") not in (None, model_identity):
        raise ResumeError(
            f"The model files differ from the session's (identity {model_identity} where the "
            f"session used {resume.metadata['model_identity']}). Restore the model the session "
            "used.")
    if resume.file_readable:
        with h5py.File(resume.path, "r") as old:
            recorder = SessionRecorder(path, copy_from=old)
        recorder.write_journal_header(experiment_text, rig_text, resume.metadata)
    else:
        recorder = SessionRecorder(path)
        recorder.write_metadata(experiment_text, rig_text, resume.metadata)
    from synth.image_pool import ImagePool

    # A vision session's images are stored one by one as they are added (ImageStore).
    if "stimuli" not in recorder.file and not isinstance(pool, ImagePool):
        recorder.write_stimuli(pool.ids, pool.texts, pool.source)
    resume.damage.extend(recorder.damage)
    earlier = json.loads(resume.metadata.get("earlier_simulator_logs", "[]"))
    recorder.file.attrs.update({
        "resumed_from": str(resume.path),
        "earlier_simulator_logs": json.dumps([*earlier, str(log_file_for(resume.path))]),
        "versions": json.dumps(metadata["versions"])})
    for row in resume.trials:
        recorder.add_trial(TrialRecord.from_row(row), row["observed_channels"], row["checkpoint"])
    recorder.add_resume(clock.now(), str(resume.path), resume.n_trials, resume.damage_summary())
    if resume.damage:
        recorder.add_fault(clock.now(), "damaged_file",
                           f"{resume.path.name}: {resume.damage_summary()}. The "
                           f"{resume.n_trials} completed trials were recovered from the "
                           f"{resume.source}.")
    logger.info("Resuming %s after %d trials (taken from the %s) in %s.", resume.path.name,
                resume.n_trials, resume.source, path.name)
    return recorder
