"""The parts of a session that differ for images: loading, storing images, the simulated subject.

Runs in the process of ``neurosteer run`` when the experiment has a ``[vision]`` table.
``loop/session.py`` calls these functions at the points where a sentence session loads its pool,
starts its simulated subject and writes its stimuli.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from loop.config import Experiment, Rig, lsl_config_path, resolve_data_path
from loop.errors import ConfigError

BUILTIN_NATURAL = "builtin:natural"


def image_folder_for(session_file: Path) -> Path:
    """Return the folder beside a session file where its images are kept as ``.npy`` files."""
    return session_file.with_name(session_file.stem + "_images")


def load_natural_set(experiment: Experiment, experiment_path: Path):
    """Return the experiment's natural images at its image size (an ``ImageSet``)."""
    from synth.natural_images import ImageSetError, load_image_folder, load_natural_images

    settings = experiment.vision
    try:
        if settings.natural_images == BUILTIN_NATURAL:
            return load_natural_images(settings.image_size)
        folder = resolve_data_path(settings.natural_images, experiment_path.parent)
        return load_image_folder(folder, settings.image_size)
    except ImageSetError as err:
        raise ConfigError(f"{experiment_path}: vision.natural_images: {err}") from None


def load_images_and_features(experiment: Experiment, experiment_path: Path, progress=None):
    """Load the natural images, the vision model and the natural images' features.

    Returns the image pool (natural images only), ``{layer: (n_images, d)}`` features, the model's
    identity and the feature extractor that synthesis uses later.
    """
    from synth.image_features import ImageFeatureExtractor
    from synth.image_pool import ImagePool
    from synth.vision_models import load_vision_model

    settings = experiment.vision
    natural = load_natural_set(experiment, experiment_path)
    loaded = load_vision_model(settings.model, settings.device)
    missing = [layer for layer in settings.layers if layer not in loaded.model.layer_names()]
    if missing:
        raise ConfigError(f"{experiment_path}: vision.layers: {missing} are not modules of "
                          f"{settings.model} (e.g. {', '.join(loaded.model.layer_names()[-4:])}).")
    extractor = ImageFeatureExtractor(loaded, settings.layers, pooling=settings.pooling,
                                      grid_size=settings.grid_size,
                                      image_size=settings.image_size)
    pool = ImagePool()
    for image, name in zip(natural.images, natural.ids, strict=True):
        pool.add(image, name, "natural")
    features = extractor.extract(np.stack(pool.images), progress=progress)
    return pool, features, loaded.identity, extractor


class ImageStore:
    """Writes each image of the pool once: to the session file, and to a ``.npy`` file beside it.

    The file is what onset markers name, so the simulated subject (or another recording program)
    can read the image shown. It is written whole before its name goes out: a temporary file,
    then a rename.
    """

    def __init__(self, pool, recorder, folder: Path) -> None:
        self.pool = pool
        self.recorder = recorder
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, index: int) -> str:
        stimulus_id = self.pool.ids[index]
        path = self.folder / f"{stimulus_id}.npy"
        if not path.exists():
            temporary = path.with_suffix(".tmp")
            with open(temporary, "wb") as handle:
                np.save(handle, self.pool.images[index], allow_pickle=False)
            os.replace(temporary, path)
        self.recorder.add_image(stimulus_id, self.pool.images[index], self.pool.texts[index],
                                self.pool.kinds[index])
        return str(path.resolve())


def start_vision_simulator(rig: Rig, rig_path: Path, experiment: Experiment,
                           experiment_path: Path, log_file: Path, image_folder: Path,
                           speed: float):
    """Start the simulated vision subject in a child process, on the experiment's natural set.

    It watches ``image_folder``, where the session writes each image before its onset.
    """
    from acquisition.simulated_vision import VisionSimulatorProcess, vision_simulator_config

    settings = rig.vision_simulator.model_dump()
    vision = experiment.vision
    natural_folder = None
    if vision.natural_images != BUILTIN_NATURAL:
        natural_folder = str(resolve_data_path(vision.natural_images, experiment_path.parent))
    lsl_path = lsl_config_path(rig, rig_path)
    config = vision_simulator_config(
        settings, speed, data_stream=rig.lsl.data_stream, marker_stream=rig.lsl.marker_stream,
        source_id=f"neurosteer-vision-sim-{rig.vision_simulator.seed}", log_file=str(log_file),
        lsl_config=str(lsl_path) if lsl_path else None, natural_image_size=vision.image_size,
        natural_folder=natural_folder, image_folder=str(image_folder.resolve()))
    process = VisionSimulatorProcess(config)
    process.start()
    return process


def check_vision_channels(experiment: Experiment, experiment_path: Path, rig: Rig) -> None:
    """Check that the experiment's sites are channels of the rig's simulated vision subject."""
    from acquisition.simulated_vision import vision_channel_names

    names = vision_channel_names(rig.vision_simulator.n_sites)
    missing = [name for name in experiment.response.target_channels if name not in names]
    if missing:
        raise ConfigError(f"{experiment_path}: response.target_channels: {missing} are not among "
                          f"the simulated sites {names[0]}..{names[-1]}.")
