"""Natural-image baseline sets: photographs that ship inside installed packages, or a lab's folder.

Runs in the controller (baseline stimuli, calibration) and in the simulated vision subject
(normalising its ground truth). Nothing here downloads: every shipped photograph is a file inside
the scikit-image, PsychoPy, scikit-learn or matplotlib wheel, so the set depends on their versions.
Each image's id and source name the file it came from.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_IMAGE_SIZE = 256
NATURAL_SOURCES = ("skimage", "psychopy", "sklearn", "matplotlib")
# PIL modes that convert to RGB without losing or inventing information.
ACCEPTED_MODES = ("RGB", "L")


class ImageSetError(ValueError):
    """A folder or package that cannot provide an image set; the message names the file at fault."""


@dataclass(frozen=True)
class ImageSet:
    """Square RGB images with stable ids and where each came from.

    ``images`` is ``(n_images, size, size, 3)`` uint8 and read-only; ``sources`` names the package
    and file, and ``credits`` the photographer or licence as the source package states it.
    """

    images: np.ndarray
    ids: list[str]
    sources: list[str]
    credits: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        """Side of every image in pixels."""
        return int(self.images.shape[1])


@dataclass(frozen=True)
class _Shipped:
    """One photograph inside an installed package; ``crop`` is (left, top, side) as fractions."""

    image_id: str
    package: str
    path: str
    credit: str
    crop: tuple[float, float, float] | None = None


_SKIMAGE = "scikit-image sample data"
_SKIMAGE_IMAGES = (
    # (skimage.data function, credit from its docstring in scikit-image 0.26)
    ("astronaut", "NASA (Eileen Collins); public domain"),
    ("brick", "CC0Textures Bricks25; CC0"),
    ("camera", "Lav Varshney; CC0"),
    ("chelsea", "Stefan van der Walt; CC0"),
    ("clock", "Stefan van der Walt; public domain"),
    ("coffee", "Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0"),
    ("coins", "Brooklyn Museum Collection; no known copyright restrictions"),
    ("grass", "linolafett on DeviantArt; CC0"),
    ("gravel", "CC0Textures Gravel04; CC0"),
    ("hubble_deep_field", "NASA HubbleSite; public domain"),
    ("immunohistochemistry", "CMMI Brussels; no known copyright restrictions"),
    ("moon", "scikit-image sample data; no licence stated in scikit-image"),
    ("stereo_motorcycle", "Middlebury 2014 stereo benchmark (left view); scikit-image sample data"),
    ("retina", "Mikael Häggström, Wikimedia Commons; CC0"),
    ("rocket", "SpaceX; public domain"),
)

# PsychoPy (GPL-3.0-or-later) ships these demo pictures without a separate licence or credit.
_PSYCHOPY_CREDIT = "PsychoPy demo picture; no image licence stated in the psychopy package"
_PSYCHOPY_DEMOS = "demos/builder/Design Templates/randomisedBlocks/stims"
_PSYCHOPY_EYETRACKING = "demos/coder/iohub/eyetracking/gcCursor/images"
_PSYCHOPY_PANORAMA = "demos/builder/Feature Demos/panorama/panImg.jpg"
_SHIPPED_FILES = (
    *(_Shipped(f"psychopy-face0{k}", "psychopy", f"{_PSYCHOPY_DEMOS}/face0{k}.jpg", _PSYCHOPY_CREDIT)
      for k in (1, 2, 3)),
    *(_Shipped(f"psychopy-house0{k}", "psychopy", f"{_PSYCHOPY_DEMOS}/house0{k}.jpg",
               _PSYCHOPY_CREDIT) for k in (1, 2, 3)),
    _Shipped("psychopy-face", "psychopy", "demos/coder/stimuli/face.jpg", _PSYCHOPY_CREDIT),
    _Shipped("psychopy-beach", "psychopy", "demos/coder/stimuli/beach.jpg", _PSYCHOPY_CREDIT),
    _Shipped("psychopy-fairground", "psychopy", "demos/builder/Experiments/BART/assets/background.jpg",
             _PSYCHOPY_CREDIT),
    *(_Shipped(f"psychopy-{name}", "psychopy", f"{_PSYCHOPY_EYETRACKING}/{name}.jpg", _PSYCHOPY_CREDIT)
      for name in ("canal", "fall", "lake", "party", "swimming")),
    # Four side-by-side views along the horizon of an equirectangular 360° park panorama (2:1), each
    # a square one quarter of its width: different trees, paths and buildings, so distinct stimuli.
    *(_Shipped(f"psychopy-panorama{k}", "psychopy", _PSYCHOPY_PANORAMA, _PSYCHOPY_CREDIT,
               crop=(k / 4, 0.25, 0.25)) for k in range(4)),
    _Shipped("sklearn-china", "sklearn", "datasets/images/china.jpg",
             "danielbuechele on Flickr; CC BY 2.0"),
    _Shipped("sklearn-flower", "sklearn", "datasets/images/flower.jpg",
             "vultilion on Flickr; CC BY 2.0"),
    _Shipped("matplotlib-grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
             "US Navy photograph of Grace Hopper; public domain"),
)

_INSTALL_HINTS = {
    "skimage": "pip install 'neurosteer[vision]' (scikit-image)",
    "psychopy": "pip install 'neurosteer[display]' (psychopy)",
    "sklearn": "pip install scikit-learn",
    "matplotlib": "pip install matplotlib",
}


def square_resize(image: Image.Image, size: int,
                  crop: tuple[float, float, float] | None = None) -> np.ndarray:
    """Return a square crop of ``image`` resized to ``(size, size, 3)`` RGB uint8 (Lanczos).

    ``crop`` is (left, top, side) as fractions of the width, height and width; without it the crop
    is the largest centred square.
    """
    width, height = image.size
    if crop is None:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
    else:
        side = round(crop[2] * width)
        left, top = round(crop[0] * width), round(crop[1] * height)
    # Cropped before resizing, so no pixel outside the square leaks in at the edges.
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def _package_folder(package: str) -> Path:
    # Located without importing: importing psychopy takes seconds and starts its preferences.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImageSetError(
            f"The natural-image set needs the {package} package, which is not installed: run "
            f"{_INSTALL_HINTS[package]}, or pass sources= without {package!r}."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _skimage_images(size: int) -> list[tuple[str, np.ndarray, str, str]]:
    _package_folder("skimage")
    data = importlib.import_module("skimage.data")
    found = []
    for name, credit in _SKIMAGE_IMAGES:
        # Each of these functions reads a file inside the scikit-image wheel, and the test suite
        # checks that none opens a network connection. Others, like eagle(), download with pooch.
        pixels = getattr(data, name)()
        if isinstance(pixels, tuple):
            pixels = pixels[0]
        image_id = "skimage-motorcycle" if name == "stereo_motorcycle" else f"skimage-{name}"
        found.append((image_id, square_resize(Image.fromarray(pixels), size),
                      f"scikit-image: skimage.data.{name}()", f"{_SKIMAGE}: {credit}"))
    return found


def _decode(path: Path, size: int, crop: tuple[float, float, float] | None) -> Image.Image:
    with Image.open(path) as image:
        if crop is not None:
            # JPEG draft mode decodes the 10240 × 5120 panorama at a reduced scale that still gives
            # each view at least ``size`` pixels: 0.3 s instead of 0.9 s at size 256.
            scale = size / (crop[2] * image.size[0])
            image.draft("RGB", (round(scale * image.size[0]), round(scale * image.size[1])))
        return image.convert("RGB")


def _shipped_file_images(package: str, size: int) -> list[tuple[str, np.ndarray, str, str]]:
    folder = _package_folder(package)
    found = []
    decoded: dict[Path, Image.Image] = {}  # the panorama is decoded once for its four views
    for entry in (item for item in _SHIPPED_FILES if item.package == package):
        path = folder / entry.path
        if not path.is_file():
            raise ImageSetError(
                f"{path} is missing from the installed {package} package; the natural-image set "
                f"expects it there (reinstall {package}, or pass sources= without {package!r})."
            )
        if path not in decoded:
            decoded[path] = _decode(path, size, entry.crop)
        pixels = square_resize(decoded[path], size, entry.crop)
        found.append((entry.image_id, pixels, f"{package}: {entry.path}", entry.credit))
    return found


def load_natural_images(size: int = DEFAULT_IMAGE_SIZE,
                        sources: Sequence[str] = NATURAL_SOURCES) -> ImageSet:
    """Return the natural-image baseline set: 36 photographs at ``size`` × ``size`` pixels.

    The set has 15 scikit-image sample photographs (a cat, an astronaut, coffee, coins, textures, a
    rocket, a retina, ...) and 14 PsychoPy demo pictures (4 faces, 3 houses, scenes). It adds 4
    distinct views of PsychoPy's park panorama, 2 scikit-learn photographs and 1 from matplotlib.
    All are square centre crops except the panorama views. A photograph smaller than ``size`` is
    enlarged (PsychoPy's beach picture is 200 px wide). The result is cached per process, and its
    array is read-only.

    Raises:
        ImageSetError: when a package in ``sources`` is not installed or lacks a file.
    """
    unknown = sorted(set(sources) - set(NATURAL_SOURCES))
    if unknown:
        raise ValueError(f"Unknown sources {unknown}; choose among {NATURAL_SOURCES}.")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}.")
    return _load_natural_images(size, frozenset(sources))


@functools.lru_cache(maxsize=4)
def _load_natural_images(size: int, sources: frozenset[str]) -> ImageSet:
    found = []
    for source in NATURAL_SOURCES:
        if source not in sources:
            continue
        found += _skimage_images(size) if source == "skimage" else _shipped_file_images(source, size)
    images = np.stack([pixels for _, pixels, _, _ in found])
    images.flags.writeable = False
    return ImageSet(images, [item[0] for item in found], [item[2] for item in found],
                    [item[3] for item in found])


def _check_image_file(path: Path, size: int) -> str | None:
    """Return what is wrong with one image file for a set of ``size`` px images, or None."""
    try:
        with Image.open(path) as image:
            image.verify()
        # verify() leaves the file unusable, and only decoding finds a truncated image.
        with Image.open(path) as image:
            mode, (width, height), n_frames = image.mode, image.size, getattr(image, "n_frames", 1)
            image.load()
    except UnidentifiedImageError:
        return "is not an image file that Pillow can read (expected PNG, JPEG, TIFF, BMP or WebP)"
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot be read ({err})"
    if n_frames > 1:
        return f"has {n_frames} frames; expected a still image with one frame"
    if mode not in ACCEPTED_MODES:
        return (f"has mode {mode}; expected 8-bit RGB or greyscale (modes {ACCEPTED_MODES}), so "
                "save it without alpha channel, palette or 16-bit depth")
    if min(width, height) < size:
        return f"is {width} × {height} pixels; expected at least {size} × {size}"
    return None


def load_image_folder(path: str | Path, size: int = DEFAULT_IMAGE_SIZE) -> ImageSet:
    """Return a lab's own images from the files directly in ``path``, as square centre crops.

    Every file is checked before any is loaded. Hidden files (names starting with ``.``) and
    subfolders are not read. Ids are the file names, in sorted order.

    Raises:
        ImageSetError: for a missing or empty folder, or listing every file that is not a readable,
            one-frame, RGB or greyscale image of at least ``size`` pixels on its shorter side.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ImageSetError(f"Image folder {folder} does not exist or is not a folder.")
    files = sorted(item for item in folder.iterdir()
                   if item.is_file() and not item.name.startswith("."))
    if not files:
        raise ImageSetError(
            f"Image folder {folder} contains no image files (subfolders and hidden files are not "
            "read); put the stimulus images directly in it."
        )

    problems = [f"{item} {problem}" for item in files
                if (problem := _check_image_file(item, size)) is not None]
    if problems:
        raise ImageSetError(
            f"{len(problems)} of {len(files)} files in {folder} cannot be used as stimuli:\n  "
            + "\n  ".join(problems)
        )

    pixels = []
    for item in files:
        with Image.open(item) as image:
            pixels.append(square_resize(image, size))
    images = np.stack(pixels)
    images.flags.writeable = False
    return ImageSet(images, [item.name for item in files], [str(item) for item in files],
                    ["" for _ in files])
