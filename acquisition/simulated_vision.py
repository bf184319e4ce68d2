"""The simulated vision subject: recording sites whose responses to images come from a CNN layer.

Runs in its own process (``VisionSimulatorProcess``, spawn-safe). It reads onset markers from the
session's marker stream and loads the image file that each onset names. It streams ``n_sites``
float32 channels (``SITE001`` onwards, then ``PHOTO`` if asked) at ``sfreq`` over LSL, in the wire
format and with the noise model of the ECoG simulator, whose renderer it reuses. The truth is
``acquisition.vision_truth.VisionTruth``, which reads another layer than the controller's features.
Computing one image's truth takes about 0.2 s on a busy 2-core CPU machine, and the stream would
stall that long after every onset. So the truth of every natural image is kept from start-up, and
with ``image_folder`` a thread computes the truth of each new ``.npy`` image as soon as the session
writes it, before its onset. NOTE: an image first seen at its onset (another folder, a PNG) still
stalls the stream. Its samples keep their acquisition times, so none is lost, but they arrive late.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.simulated import (
    PHOTODIODE_CHANNEL,
    ChildProcess,
    EcogRenderer,
    SimulatorConfig,
    open_marker_inlet,
    stream_samples,
)
from synth.image_pool import image_id

logger = logging.getLogger(__name__)

# Settings that name where the process connects and writes, as opposed to how the subject responds.
WIRE_FIELDS = ("data_stream", "marker_stream", "source_id", "log_file", "lsl_config")
STREAM_TYPE = "MUA"


@dataclass(frozen=True)
class VisionSimulatorConfig:
    """Everything the vision subject's process needs, as plain values so that it pickles under spawn.

    The truth settings (``truth_*``, ``image_size``, ``rf_*``, ``n_channels_per_site``,
    ``response_sd``, ``exponent``) go to ``VisionTruth``, and their defaults are its own. The truth is
    normalised on the natural-image set (``natural_folder``, or the shipped set when None) at
    ``natural_image_size`` pixels. ``feature_cache_dir`` None uses the neurosteer cache.
    """

    data_stream: str
    marker_stream: str
    source_id: str
    log_file: str
    lsl_config: str | None
    n_sites: int = 8
    sfreq: float = 1000.0
    snr: float = 1.0
    signal_sd: float = 1.0
    mean_level: float = 2.0
    latency_s: float = 0.05
    response_duration_s: float = 0.3
    baseline_s: float = 0.2
    seed: int = 7
    truth_model: str = "embedded:mobilenet_v2"
    truth_architecture: str = "mobilenet_v2"
    truth_layer: str = "features.10"
    image_size: int = 128
    rf_sd_range: tuple[float, float] = (0.08, 0.2)
    rf_centre_range: tuple[float, float] = (0.2, 0.8)
    n_channels_per_site: int = 6
    response_sd: float = 0.5
    exponent: float = 1.5
    natural_image_size: int = 256
    natural_folder: str | None = None
    # Folder where the session writes its images before their onsets; watched when set.
    image_folder: str | None = None
    feature_cache_dir: str | None = None
    photodiode_lag_s: float | None = None
    speed: float = 1.0
    marker_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        positive = ("sfreq", "snr", "signal_sd", "response_duration_s", "baseline_s", "response_sd",
                    "speed", "marker_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.n_sites < 1:
            raise ValueError(f"n_sites must be at least 1, got {self.n_sites}.")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be 0 or more, got {self.latency_s}.")
        if self.photodiode_lag_s is not None and self.photodiode_lag_s < 0:
            raise ValueError(f"photodiode_lag_s must be 0 or more (or None for no photodiode), "
                             f"got {self.photodiode_lag_s}.")
        for name in ("rf_sd_range", "rf_centre_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, as fractions "
                                 f"of the image side; got {getattr(self, name)!r}.")


def vision_simulator_config(settings: Mapping[str, Any], speed: float = 1.0,
                            **wire: Any) -> VisionSimulatorConfig:
    """Return the simulated vision subject's process settings from a rig's settings table.

    ``settings`` is the table as a dict (or a pydantic model, which is dumped), keyed by the
    config's field names other than the ``wire`` ones and ``speed``. ``wire`` gives the stream
    names, source id, log file and LSL configuration; in-process runs leave them empty.

    Raises:
        ValueError: for a key that is not a setting, or a value out of range.
    """
    if hasattr(settings, "model_dump"):
        settings = settings.model_dump()
    allowed = {field.name for field in fields(VisionSimulatorConfig)} - {*WIRE_FIELDS, "speed"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"Unknown vision simulator settings {unknown}; the settings are "
                         f"{sorted(allowed)}.")
    values = dict(settings)
    # TOML and JSON give lists, and the frozen config needs hashable tuples.
    for name in ("rf_sd_range", "rf_centre_range"):
        if name in values:
            values[name] = tuple(float(value) for value in values[name])
    defaults = {"data_stream": "", "marker_stream": "", "source_id": "", "log_file": "",
                "lsl_config": None}
    return VisionSimulatorConfig(speed=speed, **(defaults | wire), **values)


def vision_channel_names(n_sites: int, photodiode: bool = False) -> list[str]:
    """Return the simulated sites' channel labels, SITE001 onwards, then PHOTO if asked."""
    names = [f"SITE{index + 1:03d}" for index in range(n_sites)]
    return [*names, PHOTODIODE_CHANNEL] if photodiode else names


def natural_truth_file(log_file: str | Path) -> Path:
    """Return where the simulator writes the truth of every natural image, beside its log."""
    return Path(str(log_file) + ".natural_truth.npz")


def read_natural_truth(path: str | Path) -> dict[str, np.ndarray]:
    """Return the arrays of a natural-image truth file (see :func:`save_natural_truth`)."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def renderer_config(config: VisionSimulatorConfig) -> SimulatorConfig:
    """Return the ECoG renderer's settings for the vision subject: one channel per site."""
    return SimulatorConfig(
        data_stream=config.data_stream, marker_stream=config.marker_stream,
        source_id=config.source_id, pool_file="", log_file=config.log_file, pool_n_words=None,
        lsl_config=config.lsl_config, n_channels=config.n_sites, sfreq=config.sfreq,
        target_channels=tuple(range(config.n_sites)), snr=config.snr, signal_sd=config.signal_sd,
        mean_level=config.mean_level, latency_s=config.latency_s,
        response_duration_s=config.response_duration_s, baseline_s=config.baseline_s,
        seed=config.seed, photodiode_lag_s=config.photodiode_lag_s, speed=config.speed,
        marker_timeout_s=config.marker_timeout_s,
    )


def read_stimulus_image(image_file: object) -> np.ndarray:
    """Return the image an onset marker names: ``(H, W, 3)`` or ``(H, W)``, uint8 or float in [0, 1].

    ``image_file`` is an absolute path to a ``.npy`` array or to an image file that Pillow reads
    (PNG, JPEG, ...); Pillow images are converted to RGB unless they are greyscale.

    Raises:
        ValueError: for a missing or relative path, or an array of the wrong shape, type or range.
        OSError: for a file that cannot be opened or decoded.
    """
    if not isinstance(image_file, str) or not image_file:
        raise ValueError(
            f"The onset marker has no image_file (got {image_file!r}), so the simulated vision "
            "subject cannot respond to it; send image stimuli with the absolute path of their .npy "
            "or image file."
        )
    path = Path(image_file)
    if not path.is_absolute():
        raise ValueError(
            f"image_file {image_file!r} is a relative path; send an absolute path, because the "
            "simulator may run in another working directory than the session."
        )

    if path.suffix.lower() == ".npy":
        image = np.load(path, allow_pickle=False)
    else:
        from PIL import Image

        try:
            with Image.open(path) as opened:
                image = np.asarray(opened if opened.mode in ("L", "RGB") else opened.convert("RGB"))
        except Image.DecompressionBombError as err:
            raise ValueError(f"Image file {path} is too large to decode ({err}).") from err

    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or 0 in image.shape:
        raise ValueError(f"Image file {path} contains an array of shape {image.shape}; expected "
                         "(height, width, 3) RGB or (height, width) grey, with no side of 0.")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"Image file {path} contains {image.dtype} pixels; expected uint8, or "
                         "float in [0, 1].")
    if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
        raise ValueError(f"Image file {path} contains float pixels outside [0, 1] or not finite; "
                         "scale them to [0, 1], or save uint8.")
    return image


class VisionSubject:
    """The noise-free side of the simulated vision subject: images to per-site truth and amplitudes.

    ``truth`` is normalised per site so that the natural images (the truth's reference set) have
    mean 0 and SD 1 (population SD). A site's amplitude is ``mean_level + signal_sd * truth``, in
    stream units. With the truth's default rectified output (mean 1, SD ``response_sd`` on natural
    images), no image's truth falls below ``-1 / response_sd``.
    """

    def __init__(self, config: VisionSimulatorConfig, truth, reference_images=None) -> None:
        self.config = config
        self.truth = truth
        reference = np.asarray(truth.reference_responses, dtype=np.float64)
        self.raw_mean = reference.mean(axis=0)
        self.raw_sd = reference.std(axis=0)
        self.natural_truth = self.normalise(reference)
        # Raw truth by image id. One lock: the folder watch and the onsets share the network.
        self._raw_by_image: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        if reference_images is not None:
            for image, raw in zip(reference_images, reference, strict=True):
                self._raw_by_image[image_id(np.asarray(image))] = raw

    def raw_truth(self, image: np.ndarray) -> np.ndarray:
        """Return the raw ``VisionTruth`` responses to one image, computed once per image."""
        key = image_id(np.asarray(image))
        with self._lock:
            if key not in self._raw_by_image:
                self._raw_by_image[key] = np.asarray(self.truth([image]), dtype=np.float64)[0]
            return self._raw_by_image[key]

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """Return the truth of raw ``VisionTruth`` responses, in SDs of the natural images per site."""
        return (np.asarray(raw, dtype=np.float64) - self.raw_mean) / self.raw_sd

    def amplitudes(self, truth: np.ndarray) -> np.ndarray:
        """Return each site's noise-free response amplitude for a truth ``(..., n_sites)``."""
        return self.config.mean_level + self.config.signal_sd * np.asarray(truth)

    def respond(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the raw truth, the normalised truth and the amplitudes of one image, each ``(n_sites,)``."""
        raw = self.raw_truth(image)
        truth = self.normalise(raw)
        return raw, truth, self.amplitudes(truth)


def load_vision_subject(config: VisionSimulatorConfig):
    """Build the truth of ``config`` and return the subject and the natural-image set it is normalised on."""
    from acquisition.vision_truth import VisionTruth
    from synth.natural_images import load_image_folder, load_natural_images
    from synth.vision_models import load_vision_model

    if config.natural_folder:
        natural = load_image_folder(config.natural_folder, config.natural_image_size)
    else:
        natural = load_natural_images(config.natural_image_size)
    model = load_vision_model(config.truth_model, device="cpu", architecture=config.truth_architecture)
    truth = VisionTruth(
        config.n_sites, config.seed, natural.images, model=model, layer=config.truth_layer,
        image_size=config.image_size, n_channels_per_site=config.n_channels_per_site,
        rf_sd_range=config.rf_sd_range, rf_centre_range=config.rf_centre_range,
        response_sd=config.response_sd, exponent=config.exponent,
        cache_dir=Path(config.feature_cache_dir) if config.feature_cache_dir else None,
    )
    return VisionSubject(config, truth, natural.images), natural


class FolderWatch(threading.Thread):
    """Computes the truth of every new ``.npy`` image in a folder, ahead of its onset."""

    POLL_S = 0.1

    def __init__(self, folder: Path, subject: VisionSubject) -> None:
        super().__init__(name="vision-truth-ahead", daemon=True)
        self.folder = folder
        self.subject = subject
        self.stop = threading.Event()
        self._seen: set[Path] = set()

    def run(self) -> None:
        while not self.stop.wait(self.POLL_S):
            if not self.folder.is_dir():
                continue
            for path in sorted(self.folder.glob("*.npy")):
                if path in self._seen:
                    continue
                self._seen.add(path)
                try:
                    self.subject.raw_truth(read_stimulus_image(str(path.resolve())))
                except (ValueError, OSError) as err:
                    # The onset reports it, if the image is ever shown.
                    logger.debug("Could not read %s ahead of its onset: %s", path, err)


def save_natural_truth(path: str | Path, subject: VisionSubject, ids: list[str]) -> None:
    """Write the truth of every natural image to an ``.npz`` readable without pickle.

    Arrays: ``truth`` ``(n_natural, n_sites)`` normalised per site, ``truth_raw`` (the
    ``VisionTruth`` output), ``ids`` ``(n_natural,)`` image ids, ``raw_mean`` and ``raw_sd``
    ``(n_sites,)`` (``truth = (truth_raw - raw_mean) / raw_sd``), and each site's receptive field as
    ``rf_centre_xy`` ``(n_sites, 2)`` and ``rf_sd`` ``(n_sites,)``, fractions of the image side.
    """
    sites = subject.truth.sites
    np.savez(
        path,
        truth=subject.natural_truth,
        truth_raw=np.asarray(subject.truth.reference_responses, dtype=np.float64),
        ids=np.array(ids, dtype=str),
        raw_mean=subject.raw_mean,
        raw_sd=subject.raw_sd,
        rf_centre_xy=np.array([site.centre_xy for site in sites], dtype=np.float64),
        rf_sd=np.array([site.rf_sd for site in sites], dtype=np.float64),
    )


def _open_data_outlet(config: VisionSimulatorConfig):
    import pylsl

    names = vision_channel_names(config.n_sites, config.photodiode_lag_s is not None)
    info = pylsl.StreamInfo(config.data_stream, STREAM_TYPE, len(names), config.sfreq,
                            pylsl.cf_float32, config.source_id)
    channels = info.desc().append_child("channels")
    for name in names:
        channel = channels.append_child("channel")
        channel.append_child_value("label", name)
        channel.append_child_value("unit", "a.u.")
        channel.append_child_value("type", "photodiode" if name == PHOTODIODE_CHANNEL else STREAM_TYPE)
    info.desc().append_child_value("simulator", json.dumps(asdict(config)))
    outlet = pylsl.StreamOutlet(info, chunk_size=0, max_buffered=60)
    logger.info("Streaming %d channels at %g Hz as %r.", len(names), config.sfreq, config.data_stream)
    return outlet


def respond_to_onset(event: dict, stamp: float, subject: VisionSubject, renderer: EcogRenderer) -> dict:
    """Schedule the response to one onset marker and return its log entry.

    An onset whose image cannot be read gets no neural response. It still lights the photodiode,
    because the screen showed something. Its entry has an ``error`` in place of truth and amplitudes.
    """
    entry = {"trial": event.get("trial"), "onset": stamp, "stimulus_id": event.get("stimulus_id"),
             "image_file": event.get("image_file")}
    duration_s = event.get("duration_s", 0.1)
    try:
        image = read_stimulus_image(event.get("image_file"))
    except (ValueError, OSError) as err:
        renderer.add_response(stamp, np.zeros(subject.config.n_sites), duration_s)
        logger.error("Trial %s (stimulus %s) has no response: %s", entry["trial"],
                     entry["stimulus_id"], err)
        return entry | {"error": str(err)}

    raw, truth, amplitudes = subject.respond(image)
    renderer.add_response(stamp, amplitudes, duration_s)
    return entry | {"truth": truth.tolist(), "truth_raw": raw.tolist(),
                    "amplitudes": amplitudes.tolist()}


def run_vision_simulator(config: VisionSimulatorConfig, ready=None, stop=None) -> None:
    """Stream the simulated vision subject until ``stop`` is set or a ``session_end`` marker arrives.

    Also stops when the process that started it is gone. ``ready`` (an Event) is set once the data
    outlet exists, after the truth has loaded and the natural-image truth file is written. Every
    onset's entry goes to ``config.log_file`` as one JSON line.
    """
    from acquisition.lsl import configure_lsl

    configure_lsl(Path(config.lsl_config) if config.lsl_config else None)

    subject, natural = load_vision_subject(config)
    save_natural_truth(natural_truth_file(config.log_file), subject, natural.ids)
    renderer = EcogRenderer(renderer_config(config))

    # The marker inlet is connected before the data outlet appears, so that the controller (which
    # waits for the data stream) cannot send an onset this process would miss.
    watch = None
    if config.image_folder:
        watch = FolderWatch(Path(config.image_folder), subject)
        watch.start()
    marker_inlet = open_marker_inlet(config, "Simulated vision subject")
    if marker_inlet is None:
        return
    outlet = _open_data_outlet(config)
    if ready is not None:
        ready.set()

    with open(config.log_file, "a", encoding="utf-8") as log:
        stream_samples(outlet, renderer, marker_inlet,
                       lambda markers, stamps: _handle_markers(markers, stamps, subject, renderer,
                                                               log),
                       config.sfreq, stop)
    if watch is not None:
        watch.stop.set()
    marker_inlet.close_stream()
    del outlet
    logger.info("The simulated vision subject stopped.")


def _handle_markers(markers, stamps, subject: VisionSubject, renderer: EcogRenderer, log) -> bool:
    """Respond to each onset and log it; return True at a ``session_end`` marker."""
    from acquisition.lsl import decode_marker

    for (text,), stamp in zip(markers, stamps, strict=True):
        try:
            event = decode_marker(text)
        except ValueError as err:
            logger.error("Ignored a marker that is not a neurosteer marker (%s): %r", err, text[:80])
            continue
        if event["type"] == "session_end":
            return True
        if event["type"] == "onset":
            entry = respond_to_onset(event, stamp, subject, renderer)
            log.write(json.dumps(entry, ensure_ascii=False) + "\n")
            log.flush()
    return False


def _process_main(config: VisionSimulatorConfig, ready, stop) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vision simulator %(message)s")
    run_vision_simulator(config, ready, stop)


class VisionSimulatorProcess(ChildProcess):
    """The simulated vision subject in a child process."""

    def __init__(self, config: VisionSimulatorConfig) -> None:
        super().__init__(config, _process_main, "neurosteer-vision-simulator",
                         "simulated vision subject")

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for the child to end on its own; return its exit code, or None."""
        self._process.join(timeout_s)
        return self._process.exitcode
