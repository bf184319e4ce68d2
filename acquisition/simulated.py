"""The simulated subject: an ECoG-like LSL amplifier whose target channels respond to sentences.

Runs in its own process (``SimulatorProcess``, spawn-safe) or from ``neurosteer simulate``. It reads
onset markers from the session's marker stream and streams ``n_channels`` float32 channels at
``sfreq`` over LSL, stamped with each sample's acquisition time. Noise is white and Gaussian,
scaled so that a single trial's response estimate (response-window mean minus pre-stimulus mean)
has SD ``signal_sd / snr`` on every channel. NOTE: real high-gamma noise is 1/f-like and correlated
across neighbouring electrodes; this simulator has neither.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything the simulated subject's process needs; plain values, so it pickles under spawn."""

    data_stream: str
    marker_stream: str
    source_id: str
    pool_file: str
    log_file: str
    pool_n_words: int | None
    lsl_config: str | None
    n_channels: int = 64
    sfreq: float = 1000.0
    target_channels: tuple[int, ...] = (8, 9, 10, 11, 16, 17, 18, 19, 24, 25)
    snr: float = 0.30
    signal_sd: float = 1.0
    mean_level: float = 2.0
    latency_s: float = 0.1
    response_duration_s: float = 1.0
    baseline_s: float = 0.5
    readout_weight: float = 1.0
    surprisal_weight: float = 1.0
    surprisal_model: str = "embedded:smollm2-135m"
    seed: int = 7
    photodiode_lag_s: float | None = None
    speed: float = 1.0
    marker_timeout_s: float = 120.0


PHOTODIODE_CHANNEL = "PHOTO"


def channel_names(n_channels: int, photodiode: bool = False) -> list[str]:
    """Return the simulated amplifier's channel labels, ECOG001 onwards, then PHOTO if asked."""
    names = [f"ECOG{index + 1:03d}" for index in range(n_channels)]
    return [*names, PHOTODIODE_CHANNEL] if photodiode else names


class EcogRenderer:
    """Pure sample generation: noise plus the responses of scheduled onsets, chunk by chunk."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        speed = config.speed
        self.latency_s = config.latency_s / speed
        self.duration_s = config.response_duration_s / speed
        n_window = max(1, round(self.duration_s * config.sfreq))
        n_baseline = max(1, round(config.baseline_s / speed * config.sfreq))
        # Noise SD per sample such that SD(window mean - baseline mean) = signal_sd / snr.
        trial_noise_sd = config.signal_sd / config.snr
        self.sample_noise_sd = trial_noise_sd / np.sqrt(1.0 / n_window + 1.0 / n_baseline)
        rng = np.random.default_rng(config.seed)
        self.gains = np.zeros(config.n_channels)
        self.gains[list(config.target_channels)] = rng.uniform(0.8, 1.2, len(config.target_channels))
        self._noise_rng = np.random.default_rng([config.seed, 1])
        self._responses: list[tuple[float, np.ndarray]] = []
        # (start, end) of each photodiode pulse: the stimulus as the display lag delays it.
        self._light: list[tuple[float, float]] = []
        self.n_output_channels = config.n_channels + (config.photodiode_lag_s is not None)
        self._ramp_s = min(0.05 / speed, self.duration_s / 4)
        samples = np.arange(n_window) / config.sfreq
        self._shape_scale = 1.0 / float(np.mean(self._shape(samples)))

    def _shape(self, local: np.ndarray) -> np.ndarray:
        """Return the response time course: a plateau with raised-cosine edges, peak 1."""
        edge = np.minimum(np.minimum(local, self.duration_s - local) / self._ramp_s, 1.0)
        return 0.5 - 0.5 * np.cos(np.pi * edge)

    def amplitudes(self, truth_z: float) -> np.ndarray:
        """Return the noise-free response of each channel to a stimulus of truth ``truth_z``."""
        level = self.config.mean_level + self.config.signal_sd * truth_z
        return self.gains * level

    def add_onset(self, onset: float, truth_z: float, duration_s: float = 0.1) -> np.ndarray:
        """Schedule the response to an onset, and the photodiode pulse of ``duration_s``."""
        return self.add_response(onset, self.amplitudes(truth_z), duration_s)

    def add_response(self, onset: float, amplitudes: np.ndarray, duration_s: float = 0.1) -> np.ndarray:
        """Schedule a response of ``amplitudes`` ``(n_channels,)`` to an onset, and its photodiode pulse.

        Each channel's response window then averages its amplitude. Returns the amplitudes as float64.
        """
        amplitudes = np.asarray(amplitudes, dtype=np.float64)
        if amplitudes.shape != (self.config.n_channels,):
            raise ValueError(f"amplitudes must have shape ({self.config.n_channels},), one per channel; "
                             f"got {amplitudes.shape}.")
        self._responses.append((onset, amplitudes))
        if self.config.photodiode_lag_s is not None:
            start = onset + self.config.photodiode_lag_s
            self._light.append((start, start + duration_s))
        return amplitudes

    def render(self, times: np.ndarray) -> np.ndarray:
        """Return ``(n_samples, n_output_channels)`` float32 data at sample ``times``.

        The photodiode channel, when there is one, is last: 1 while a stimulus is lit, else 0.
        """
        data = self._noise_rng.normal(0.0, self.sample_noise_sd,
                                      (len(times), self.config.n_channels))
        if len(times) == 0:
            return np.empty((0, self.n_output_channels), np.float32)
        for onset, amplitudes in self._responses:
            start = onset + self.latency_s
            inside = (times >= start) & (times < start + self.duration_s)
            if inside.any():
                # Scaled so that the response's mean over its window is its amplitude.
                shape = self._shape(times[inside] - start) * self._shape_scale
                data[inside] += np.outer(shape, amplitudes)
        horizon = times[-1] - self.latency_s - self.duration_s
        self._responses = [item for item in self._responses if item[0] > horizon]
        if self.config.photodiode_lag_s is None:
            return data.astype(np.float32)

        light = np.zeros((len(times), 1))
        for start, end in self._light:
            light[(times >= start) & (times < end)] = 1.0
        self._light = [(start, end) for start, end in self._light if end > times[-1]]
        return np.hstack([data, light]).astype(np.float32)


def log_file_for(session_file: str | Path) -> Path:
    """Return where a simulated subject logs its responses to a session, beside its session file."""
    return Path(session_file).with_suffix(".simulator.jsonl")


def read_log(log_file: str | Path) -> list[dict]:
    """Return a simulated subject's log: one dict per onset (trial, onset, text, truth, amplitudes)."""
    return [json.loads(line) for line in Path(log_file).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def truth_file(log_file: str | Path) -> Path:
    """Return where the simulator writes the truth of every pool sentence, beside its log."""
    return Path(str(log_file) + ".pool_truth.npy")


def run_simulator(config: SimulatorConfig, ready=None, stop=None) -> None:
    """Stream the simulated subject until ``stop`` is set or a ``session_end`` marker arrives.

    ``ready`` (an Event) is set once the data outlet exists, after the ground truth has loaded.
    Every onset's noise-free response goes to ``config.log_file`` as one JSON line.
    """
    from acquisition.lsl import configure_lsl, decode_marker

    configure_lsl(Path(config.lsl_config) if config.lsl_config else None)
    import pylsl

    _, truth = load_truth(config)
    renderer = EcogRenderer(config)

    # The marker inlet is connected before the data outlet appears, so that the controller (which
    # waits for the data stream) cannot send an onset this process would miss.
    marker_inlet = open_marker_inlet(config, "Simulated subject")
    if marker_inlet is None:
        return

    names = channel_names(config.n_channels, config.photodiode_lag_s is not None)
    info = pylsl.StreamInfo(config.data_stream, "ECoG", len(names), config.sfreq,
                            pylsl.cf_float32, config.source_id)
    channels = info.desc().append_child("channels")
    for name in names:
        channel = channels.append_child("channel")
        channel.append_child_value("label", name)
        channel.append_child_value("unit", "a.u.")
        channel.append_child_value("type", "photodiode" if name == PHOTODIODE_CHANNEL else "HGA")
    info.desc().append_child_value("simulator", json.dumps(asdict(config)))
    outlet = pylsl.StreamOutlet(info, chunk_size=0, max_buffered=60)
    logger.info("Streaming %d channels at %g Hz as %r.", len(names), config.sfreq,
                config.data_stream)
    if ready is not None:
        ready.set()

    with open(config.log_file, "a", encoding="utf-8") as log:

        def handle_markers(markers, stamps) -> bool:
            for (text,), stamp in zip(markers, stamps, strict=True):
                event = decode_marker(text)
                if event["type"] == "session_end":
                    return True
                if event["type"] == "onset":
                    value = float(truth([event["text"]])[0])
                    amplitudes = renderer.add_onset(stamp, value, event.get("duration_s", 0.1))
                    log.write(json.dumps({
                        "trial": event.get("trial"), "onset": stamp, "text": event["text"],
                        "truth": value,
                        "amplitudes": amplitudes[list(config.target_channels)].tolist(),
                    }, ensure_ascii=False) + "\n")
                    log.flush()
            return False

        stream_samples(outlet, renderer, marker_inlet, handle_markers, config.sfreq, stop)
    marker_inlet.close_stream()
    del outlet


# Samples per pushed chunk: a quarter of a second at 1000 Hz.
PUSH_CHUNK_SAMPLES = 250


def stream_samples(outlet, renderer, marker_inlet, handle_markers, sfreq: float, stop) -> None:
    """Stream rendered samples in real time until a marker ends it, ``stop`` is set, or the
    session process is gone.

    Each pass takes the markers first (``handle_markers(markers, stamps)`` schedules responses
    and returns True at the session's end), so that a response starting in the next chunk is
    already scheduled. It then pushes every sample due by now, stamped with its acquisition time.
    """
    import pylsl

    period = 1.0 / sfreq
    next_sample_time = pylsl.local_clock()
    parent = ParentWatch()
    while (stop is None or not stop.is_set()) and parent.alive():
        markers, stamps = marker_inlet.pull_chunk(timeout=0.0)
        if handle_markers(markers, stamps):
            return
        n_samples = int((pylsl.local_clock() - next_sample_time) / period)
        if n_samples > 0:
            times = next_sample_time + period * np.arange(n_samples)
            data = renderer.render(times)
            for start in range(0, n_samples, PUSH_CHUNK_SAMPLES):
                end = start + PUSH_CHUNK_SAMPLES
                outlet.push_chunk(data[start:end], times[start:end])
            next_sample_time = times[-1] + period
        time.sleep(0.005)


def load_truth(config):
    """Load the pool and the ground truth of a simulated subject's config, and save the pool's truth.

    ``config`` is a :class:`SimulatorConfig` or an ``acquisition.simulated_scanner.ScannerConfig``.
    """
    from acquisition.ground_truth import GroundTruth
    from synth.pool import load_pool_file

    pool = load_pool_file(Path(config.pool_file), n_words=config.pool_n_words)
    truth = GroundTruth(pool.texts, config.readout_weight, config.surprisal_weight, config.seed,
                        config.surprisal_model)
    np.save(truth_file(config.log_file), truth.reference_truth(pool.texts))
    return pool, truth


def open_marker_inlet(config, device_name: str):
    """Connect to the session's marker stream with clock correction; None if it never appears."""
    import pylsl

    logger.info("%s loaded; waiting up to %.0f s for the marker stream %r.", device_name,
                config.marker_timeout_s, config.marker_stream)
    found = pylsl.resolve_byprop("name", config.marker_stream, 1, config.marker_timeout_s)
    if not found:
        logger.error("No marker stream %r within %.0f s; the %s stops.", config.marker_stream,
                     config.marker_timeout_s, device_name.lower())
        return None
    inlet = pylsl.StreamInlet(found[0], processing_flags=pylsl.proc_clocksync)
    inlet.open_stream(timeout=config.marker_timeout_s)
    inlet.time_correction(timeout=config.marker_timeout_s)
    return inlet


class ParentWatch:
    """Tells a simulated device's child process whether the session that started it still runs.

    A session killed outright (SIGKILL, power loss) sends no ``session_end`` marker. Without this
    check its simulated device would stream on, so a resumed session would find two streams of
    the same name. Outside a child process (``neurosteer simulate``) it always returns True.
    """

    CHECK_INTERVAL_S = 0.25

    def __init__(self) -> None:
        self._parent = multiprocessing.parent_process()
        self._next_check = 0.0

    def alive(self) -> bool:
        if self._parent is None or time.monotonic() < self._next_check:
            return True
        self._next_check = time.monotonic() + self.CHECK_INTERVAL_S
        if self._parent.is_alive():
            return True
        logger.warning("The session process is gone; the simulated device stops.")
        return False


def _process_main(config: SimulatorConfig, ready, stop) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simulator %(message)s")
    run_simulator(config, ready, stop)


class ChildProcess:
    """A simulated device in a child process, started with the spawn method on every OS.

    ``target(config, ready, stop)`` runs in the child. It sets ``ready`` once it streams and
    returns when ``stop`` is set.
    """

    def __init__(self, config, target, name: str, device_name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.config = config
        self._device_name = device_name
        self._ready = context.Event()
        self._stop = context.Event()
        self._process = context.Process(target=target, args=(config, self._ready, self._stop),
                                        name=name, daemon=True)

    def start(self) -> None:
        self._process.start()

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the child streams; raise if it died or took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.2):
            if not self._process.is_alive():
                raise RuntimeError(
                    f"The {self._device_name} exited with code {self._process.exitcode} before it "
                    "started streaming; its log above says why."
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"The {self._device_name} was not ready within {timeout_s:g} s.")

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout_s)


class SimulatorProcess(ChildProcess):
    """The simulated subject in a child process."""

    def __init__(self, config: SimulatorConfig) -> None:
        super().__init__(config, _process_main, "neurosteer-simulator", "simulated subject")
