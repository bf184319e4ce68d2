"""The simulated scanner: sync pulses and per-TR ROI values for fMRI dry runs.

Runs in its own process (``ScannerProcess``, spawn-safe). It reads onset markers from the session's
marker stream and sends one sync pulse per TR on an LSL marker stream. As a real-time pipeline
would, it publishes each volume's ROI values over the ZeroMQ per-TR schema
(``acquisition.zmq_bridge``), ``processing_delay_s`` after the volume's acquisition ends. The BOLD
signal is the truth of every sentence shown, convolved with the canonical HRF (``acquisition.hrf``),
plus a linear drift, slow cardiac- and respiration-like oscillations and white thermal noise.
Pulses start when the session sends its ``waiting_for_scanner`` marker, as an operator starts the
scanner. With ``volume_folder`` it also writes every volume there as NIfTI, with one mask per ROI,
for the volume bridge.
NOTE: the noise has the same shape in every ROI but is independent across ROIs, whereas real
physiological noise is shared across the brain.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from acquisition.hrf import event_regressors
from acquisition.simulated import ChildProcess, ParentWatch, load_truth, open_marker_inlet

logger = logging.getLogger(__name__)

BASELINE_SIGNAL = 100.0
# Periods of the physiological-like oscillations, in seconds: cardiac (aliased at a 2 s TR into a
# slow wave) and respiration.
CARDIAC_ALIAS_PERIOD_S = 11.0
RESPIRATION_PERIOD_S = 4.3


@dataclass(frozen=True)
class ScannerConfig:
    """Everything the simulated scanner's process needs; plain values, so it pickles under spawn."""

    marker_stream: str
    trigger_stream: str
    zmq_address: str
    roi_names: tuple[str, ...]
    target_roi: str
    pool_file: str
    pool_n_words: int | None
    log_file: str
    lsl_config: str | None
    tr_s: float = 2.0
    n_dummy_scans: int = 4
    percent_signal_change: float = 1.0
    signal_sd: float = 0.5
    thermal_noise_sd: float = 0.4
    physiological_noise_sd: float = 0.2
    drift_per_minute: float = 0.5
    processing_delay_s: float = 0.4
    readout_weight: float = 1.0
    surprisal_weight: float = 1.0
    surprisal_model: str = "embedded:smollm2-135m"
    seed: int = 11
    speed: float = 1.0
    marker_timeout_s: float = 120.0
    subscriber_timeout_s: float = 120.0
    volume_folder: str | None = None
    follow_pulses: bool = False


class BoldRenderer:
    """Pure BOLD generation: ROI values at volume times from the onsets scheduled so far.

    Times here are nominal seconds from the first pulse (before the speed factor), so the haemodynamic
    response keeps its real shape in dry runs.
    """

    def __init__(self, config: ScannerConfig) -> None:
        self.config = config
        self.n_rois = len(config.roi_names)
        self.target = config.roi_names.index(config.target_roi)
        rng = np.random.default_rng([config.seed, 3])
        self._noise_rng = np.random.default_rng([config.seed, 4])
        self._phases = rng.uniform(0, 2 * np.pi, (self.n_rois, 2))
        self._onsets: list[float] = []
        self._durations: list[float] = []
        self._amplitudes: list[np.ndarray] = []

    def amplitudes(self, truth_z: float) -> np.ndarray:
        """Return each ROI's noise-free response to a stimulus of truth ``truth_z``, in % signal change."""
        config = self.config
        amplitudes = np.full(self.n_rois, config.percent_signal_change)
        amplitudes[self.target] += config.signal_sd * truth_z
        return amplitudes

    def add_onset(self, onset_s: float, duration_s: float, truth_z: float) -> np.ndarray:
        amplitudes = self.amplitudes(truth_z)
        self._onsets.append(onset_s)
        self._durations.append(duration_s)
        self._amplitudes.append(amplitudes)
        return amplitudes

    def noise_free(self, time_s: float) -> np.ndarray:
        """Return the ROI values at ``time_s`` without noise: baseline, drift and responses."""
        values = np.full(self.n_rois, BASELINE_SIGNAL + self.config.drift_per_minute * time_s / 60.0)
        if self._onsets:
            regressors = event_regressors(np.array(self._onsets), np.array(self._durations),
                                          np.array([time_s]))[0]
            values += regressors @ np.array(self._amplitudes)
        return values

    def volume(self, time_s: float) -> np.ndarray:
        """Return the ROI values of the volume at ``time_s``, noise included."""
        config = self.config
        slow = (np.sin(2 * np.pi * time_s / CARDIAC_ALIAS_PERIOD_S + self._phases[:, 0])
                + np.sin(2 * np.pi * time_s / RESPIRATION_PERIOD_S + self._phases[:, 1]))
        # The sum of two unit sines has SD 1, so this has SD physiological_noise_sd.
        physiological = config.physiological_noise_sd * slow
        thermal = self._noise_rng.normal(0.0, config.thermal_noise_sd, self.n_rois)
        return self.noise_free(time_s) + physiological + thermal


# Each ROI of a written volume is one slab of this many voxels (x, y, z).
ROI_SLAB_SHAPE = (4, 4, 2)


def roi_volume(values: np.ndarray) -> np.ndarray:
    """Return a volume whose ROI k is the k-th slab along z, every voxel of it at ``values[k]``."""
    x, y, z = ROI_SLAB_SHAPE
    volume = np.zeros((x, y, z * len(values)), dtype=np.float32)
    for roi, value in enumerate(values):
        volume[:, :, roi * z:(roi + 1) * z] = value
    return volume


def write_roi_masks(folder: Path, roi_names: tuple[str, ...]) -> dict[str, Path]:
    """Write one NIfTI mask per ROI of :func:`roi_volume` into ``folder``; return their paths."""
    from acquisition.volumes import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for roi, name in enumerate(roi_names):
        mask = roi_volume(np.eye(len(roi_names))[roi]).astype(np.uint8)
        paths[name] = write_volume(folder / f"mask_{name}.nii", mask, np.eye(4))
    return paths


def write_roi_volume(folder: Path, tr_index: int, values: np.ndarray) -> Path:
    """Write volume ``tr_index`` as ``vol_NNNN.nii`` in two parts, as a slow network copy would."""
    from acquisition.volumes import write_volume

    return write_volume(folder / f"vol_{tr_index:04d}.nii", roi_volume(values), np.eye(4),
                        n_parts=2)


def run_scanner(config: ScannerConfig, ready=None, stop=None) -> None:
    """Run the simulated scanner until ``stop`` is set or a ``session_end`` marker arrives.

    ``ready`` (an Event) is set once the pulse stream and the ZeroMQ publisher exist. Every onset's
    noise-free response goes to ``config.log_file`` as one JSON line.
    """
    from acquisition.lsl import MarkerOutlet, configure_lsl, decode_marker
    from acquisition.zmq_bridge import TRPublisher

    configure_lsl(Path(config.lsl_config) if config.lsl_config else None)
    _, truth = load_truth(config)
    renderer = BoldRenderer(config)

    marker_inlet = open_marker_inlet(config, "Simulated scanner")
    if marker_inlet is None:
        return
    pulses = MarkerOutlet(config.trigger_stream, f"{config.trigger_stream}-{config.seed}")
    if config.volume_folder is not None:
        write_roi_masks(Path(config.volume_folder), config.roi_names)
    publisher = TRPublisher(config.zmq_address, bind=True)
    logger.info("Simulated scanner ready: pulses on %r, values on %s.", config.trigger_stream,
                publisher.address)
    if ready is not None:
        ready.set()

    try:
        publisher.wait_for_subscribers(1, config.subscriber_timeout_s)
        _scan(config, renderer, truth, marker_inlet, pulses, publisher, decode_marker, stop)
    finally:
        marker_inlet.close_stream()
        publisher.close()
        pulses.close()


def _scan(config, renderer, truth, marker_inlet, pulses, publisher, decode_marker, stop) -> None:
    """Send pulses and volumes until the session ends.

    With ``follow_pulses`` the pulses are the session's own (PsychoPy's MRI emulator presses the
    trigger key there, and the session sends each press as a marker), so this process takes each
    volume's time from those markers and sends no pulses itself.
    """
    import pylsl

    tr_s = config.tr_s / config.speed
    delay_s = config.processing_delay_s / config.speed
    pulse_times: dict[int, float] = {}
    n_session_pulses = 0
    started = False
    next_pulse = 0
    next_volume = 0
    parent = ParentWatch()
    with open(config.log_file, "a", encoding="utf-8") as log:
        while (stop is None or not stop.is_set()) and parent.alive():
            # Markers: the operator's start, pulses, onsets, and the end of the session.
            markers, stamps = marker_inlet.pull_chunk(timeout=0.0)
            for (text,), stamp in zip(markers, stamps, strict=True):
                event = decode_marker(text)
                if event["type"] == "session_end":
                    return
                if event["type"] == "waiting_for_scanner" and not started:
                    started = True
                    if not config.follow_pulses:
                        first = pylsl.local_clock() + 0.05
                        pulse_times.update({volume: first + (volume + config.n_dummy_scans) * tr_s
                                            for volume in range(-config.n_dummy_scans, 0)})
                        pulse_times[0] = first + config.n_dummy_scans * tr_s
                    logger.info("Scanner started: %d dummy scans, TR %.3f s%s.",
                                config.n_dummy_scans, tr_s,
                                ", pulses from the session" if config.follow_pulses else "")
                elif event["type"] == "pulse" and config.follow_pulses:
                    pulse_times[n_session_pulses - config.n_dummy_scans] = stamp
                    n_session_pulses += 1
                elif event["type"] == "onset" and 0 in pulse_times:
                    _log_onset(config, renderer, truth, log, event, stamp, pulse_times[0])
            if not started or 0 not in pulse_times:
                time.sleep(0.002)
                continue

            # Own pulses, dummies included, each stamped with its own time.
            now = pylsl.local_clock()
            if not config.follow_pulses:
                volume_zero = pulse_times[0]
                while volume_zero + (next_pulse - config.n_dummy_scans) * tr_s <= now:
                    volume = next_pulse - config.n_dummy_scans
                    time_s = volume_zero + volume * tr_s
                    pulse_times.setdefault(volume, time_s)
                    pulses.push({"type": "pulse", "pulse": next_pulse}, time_s)
                    next_pulse += 1

            # Values of each volume once it is acquired and processed; dummies are not sent.
            while next_volume in pulse_times:
                pulse = pulse_times[next_volume]
                if not config.follow_pulses and next_volume >= next_pulse - config.n_dummy_scans:
                    break
                if pulse + tr_s + delay_s > now:
                    break
                # A volume's time is the middle of its acquisition, in nominal seconds from volume 0.
                volume_time_s = (next_volume + 0.5) * config.tr_s
                values = renderer.volume(volume_time_s)
                publisher.send(next_volume, pulse, [float(v) for v in values],
                               list(config.roi_names))
                if config.volume_folder is not None:
                    write_roi_volume(Path(config.volume_folder), next_volume, values)
                next_volume += 1
            time.sleep(0.002)


def _log_onset(config, renderer, truth, log, event, stamp: float, volume_zero: float) -> None:
    """Schedule an onset's response and log its noise-free amplitudes."""
    onset_s = (stamp - volume_zero) * config.speed
    value = float(truth([event["text"]])[0])
    amplitudes = renderer.add_onset(onset_s, event.get("duration_s", 0.5) * config.speed, value)
    log.write(json.dumps({
        "trial": event.get("trial"), "onset": stamp, "text": event["text"], "truth": value,
        "amplitudes": amplitudes.tolist(),
    }, ensure_ascii=False) + "\n")
    log.flush()


def _process_main(config: ScannerConfig, ready, stop) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scanner %(message)s")
    run_scanner(config, ready, stop)


class ScannerProcess(ChildProcess):
    """The simulated scanner in a child process."""

    def __init__(self, config: ScannerConfig) -> None:
        super().__init__(config, _process_main, "neurosteer-scanner", "simulated scanner")


def scanner_config(rig, speed: float = 1.0, **wire) -> ScannerConfig:
    """Return the simulated scanner's settings from a rig's tables; ``wire`` gives files and streams."""
    simulator = rig.scanner_simulator.model_dump()
    return ScannerConfig(
        trigger_stream=rig.scanner.trigger_stream, zmq_address=rig.zmq.address,
        roi_names=tuple(rig.zmq.roi_names), tr_s=rig.scanner.tr_s,
        n_dummy_scans=rig.scanner.n_dummy_scans, speed=speed,
        follow_pulses=rig.scanner.trigger == "key", **wire, **simulator,
    )
