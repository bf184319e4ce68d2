"""Image synthesis by gradient ascent on an encoding model, within what a display can show.

Runs in the controller process, in benchmarks and in tests, and talks to nothing. A
parameterisation (colour-decorrelated Fourier or plain pixels) makes raw images, display limits
squash them into [0, 1] under an RMS-contrast limit, seeded random transforms move them each step,
and a differentiable encoding readout predicts each site's response. ``synthesize`` returns uint8
images, the objective trace and the predicted responses; it never displays or saves. Every tensor
is created on the device passed in, so the same code runs on CPU and on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from synth.models import resolve_device

logger = logging.getLogger(__name__)

MEAN_GREY = 0.5
# Quantising to uint8 toward grey moves a pixel's deviation from grey by at most half a level.
_HALF_LEVEL = 0.5 / 255
_MIN_SIZE_PX = 8

# RGB covariance of pixel values in [0, 1] in four photographs shipped with scikit-image 0.26
# (astronaut, chelsea, coffee, rocket), each centred on its own mean colour, from
# ``colour_covariance``. Neighbouring channels correlate at 0.86 (R, G) and 0.93 (G, B).
NATURAL_COLOUR_COVARIANCE = np.array([
    [0.0544, 0.0435, 0.0347],
    [0.0435, 0.0477, 0.0435],
    [0.0347, 0.0435, 0.0456],
])

PARAMETERISATIONS = ("fourier", "pixel")


class SynthesisError(RuntimeError):
    """Synthesis that produced non-finite values, usually from a learning rate too high."""


def synthesis_device(device: str | torch.device) -> torch.device:
    """Return the torch device for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA if present).

    Unlike ``synth.models.resolve_device``, it rejects a CUDA device that this machine lacks here,
    before any tensor is made.
    """
    resolved = resolve_device(str(device))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but this torch build has no CUDA device "
                         "(torch.cuda.is_available() is False); pass device='cpu' or 'auto'.")
    if resolved.type == "cuda" and resolved.index is None:
        # Tensors report "cuda:0", never "cuda", so the index is needed to compare devices.
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _image_size(size: int | Sequence[int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if min(height, width) < _MIN_SIZE_PX:
        raise ValueError(f"Image size must be at least {_MIN_SIZE_PX} px each way, got {size!r}.")
    return int(height), int(width)


# --- Colour and frequency ---------------------------------------------------------------------


def colour_covariance(images: Sequence[np.ndarray]) -> np.ndarray:
    """Return the 3 x 3 RGB covariance of uint8 ``(H, W, 3)`` images, pixels scaled to [0, 1].

    Each image is centred on its own mean colour first, so the result measures colour contrast
    within images rather than differences between them.
    """
    centred = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        centred.append(pixels - pixels.mean(axis=0))
    return np.cov(np.concatenate(centred).T)


def colour_mixing_matrix(covariance: np.ndarray = NATURAL_COLOUR_COVARIANCE) -> np.ndarray:
    """Return the symmetric square root of a colour covariance, scaled to unit mean channel variance.

    Multiplying channels that are uncorrelated with unit variance by this matrix gives channels
    with the natural colour correlations, so optimising the uncorrelated ones treats a change of
    luminance and a change of hue as separate directions.
    """
    covariance = np.asarray(covariance, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    if covariance.shape != (3, 3) or eigenvalues.min() <= 0:
        raise ValueError(f"A colour covariance must be a positive-definite 3 x 3 matrix, got "
                         f"{covariance.tolist()}.")
    root = eigenvectors @ np.diag(np.sqrt(eigenvalues)) @ eigenvectors.T
    return root / np.sqrt(np.trace(covariance) / 3)


def mix_colours(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 3 x 3 colour matrix to every pixel of ``(n, 3, H, W)`` images."""
    return torch.einsum("ck,nkhw->nchw", matrix, images)


def spectrum_scale(size: tuple[int, int], decay: float = 1.0) -> np.ndarray:
    """Return ``1 / f**decay`` on the ``rfft2`` grid of ``size``, ``(H, W // 2 + 1)``.

    Frequencies are in cycles per pixel, floored at one cycle per image so the mean colour stays
    finite. The scale is normalised so that coefficients of unit variance make images of about unit
    pixel variance.
    """
    height, width = size
    frequency = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    scale = np.maximum(frequency, 1.0 / max(height, width)) ** -decay
    # With norm="ortho", each complex coefficient adds 2 * scale**2 / (H * W) to the pixel variance,
    # counting the mirrored half of the spectrum that irfft2 implies.
    return scale / np.sqrt(2 * np.mean(scale**2))


# --- Parameterisations -------------------------------------------------------------------------


class FourierImage(torch.nn.Module):
    """Raw images as colour-decorrelated Fourier coefficients scaled by ``1 / f**decay``.

    The parameter is ``(n_images, 3, H, W // 2 + 1, 2)``, the real and imaginary parts of each
    channel's ``rfft2`` spectrum in decorrelated colour space. Natural images have about this
    amplitude spectrum, so a gradient step changes every frequency by a similar share of its
    natural amplitude instead of piling up high-frequency noise as pixel steps do.
    """

    def __init__(self, n_images: int, size: tuple[int, int], *, generator: torch.Generator,
                 device: torch.device, init_sd: float = 0.01, decay: float = 1.0,
                 colour_covariance: np.ndarray = NATURAL_COLOUR_COVARIANCE) -> None:
        super().__init__()
        self.size = size
        height, width = size
        self.register_buffer("scale", torch.as_tensor(spectrum_scale(size, decay),
                                                      dtype=torch.float32, device=device))
        mixing = colour_mixing_matrix(colour_covariance)
        self.register_buffer("mixing", torch.as_tensor(mixing, dtype=torch.float32, device=device))
        self.register_buffer("unmixing", torch.as_tensor(np.linalg.inv(mixing), dtype=torch.float32,
                                                         device=device))
        shape = (n_images, 3, height, width // 2 + 1, 2)
        self.coefficients = torch.nn.Parameter(
            init_sd * torch.randn(shape, generator=generator, device=device))

    def forward(self) -> torch.Tensor:
        """Return raw images ``(n_images, 3, H, W)``, unbounded."""
        spectrum = torch.view_as_complex(self.coefficients) * self.scale
        decorrelated = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        return mix_colours(decorrelated, self.mixing)

    @torch.no_grad()
    def encode(self, raw: torch.Tensor) -> None:
        """Set the coefficients so that ``forward()`` returns ``raw`` ``(n_images, 3, H, W)``."""
        decorrelated = mix_colours(raw.to(self.scale), self.unmixing)
        spectrum = torch.fft.rfft2(decorrelated, norm="ortho") / self.scale
        self.coefficients.copy_(torch.view_as_real(spectrum))


class PixelImage(torch.nn.Module):
    """Raw images as one free value per pixel and channel, the baseline parameterisation."""

    def __init__(self, n_images: int, size: tuple[int, int], *, generator: torch.Generator,
                 device: torch.device, init_sd: float = 0.01) -> None:
        super().__init__()
        self.size = size
        self.pixels = torch.nn.Parameter(
            init_sd * torch.randn((n_images, 3, *size), generator=generator, device=device))

    def forward(self) -> torch.Tensor:
        """Return raw images ``(n_images, 3, H, W)``, unbounded."""
        return self.pixels

    @torch.no_grad()
    def encode(self, raw: torch.Tensor) -> None:
        """Set the pixels so that ``forward()`` returns ``raw``."""
        self.pixels.copy_(raw)


def make_parameterisation(name: str, n_images: int, size: tuple[int, int], *,
                          generator: torch.Generator, device: torch.device) -> torch.nn.Module:
    """Return a ``FourierImage`` or ``PixelImage`` by name, initialised near mean grey."""
    if name == "fourier":
        return FourierImage(n_images, size, generator=generator, device=device)
    if name == "pixel":
        return PixelImage(n_images, size, generator=generator, device=device)
    raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {name!r}.")


# --- Display limits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DisplayLimits:
    """Limits of the display: pixel values in [0, 1] and a maximum RMS contrast about mean grey.

    RMS contrast is ``sqrt(mean((pixel - 0.5)**2))`` over every pixel and channel of an image, so
    0.5 allows anything (all pixels black or white) and a smaller value keeps images near the grey
    background. Measured about grey rather than about the image's own mean, it also bounds the
    mean luminance shift.
    """

    rms_contrast: float = 0.25

    def __post_init__(self) -> None:
        if not _HALF_LEVEL < self.rms_contrast <= 0.5:
            raise ValueError(f"rms_contrast must be in ({_HALF_LEVEL:.4f}, 0.5], got "
                             f"{self.rms_contrast!r}; 0.5 leaves contrast unlimited.")

    @property
    def float_rms_contrast(self) -> float:
        """The limit for float images, leaving room for quantisation to uint8 toward grey."""
        # Toward-grey rounding raises no pixel's squared deviation above max(d², half level²), so
        # the uint8 image's RMS is at most sqrt(rms² + half level²). The 1e-6 covers float32.
        return math.sqrt(self.rms_contrast**2 - _HALF_LEVEL**2) * (1 - 1e-6)


DEFAULT_LIMITS = DisplayLimits()


def rms_contrast(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return each image's RMS deviation from mean grey, ``(n_images,)``.

    Accepts uint8 images ``(n, H, W, 3)`` or float images in [0, 1] in either channel order.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    values = np.asarray(images, dtype=np.float64)
    if np.asarray(images).dtype == np.uint8:
        values = values / 255.0
    deviation = values.reshape(len(values), -1) - MEAN_GREY
    return np.sqrt(np.mean(deviation**2, axis=1))


def limit_contrast(images: torch.Tensor, limits: DisplayLimits) -> torch.Tensor:
    """Scale each image's deviation from grey down to the RMS-contrast limit where it is above.

    ``images`` are ``(n, 3, H, W)`` in [0, 1]. Scaling toward grey keeps values in [0, 1].
    """
    deviation = images - MEAN_GREY
    rms = (deviation.pow(2).mean(dim=(1, 2, 3), keepdim=True) + 1e-12).sqrt()
    factor = torch.clamp(limits.float_rms_contrast / rms, max=1.0)
    return MEAN_GREY + deviation * factor


def to_display(raw: torch.Tensor, limits: DisplayLimits) -> torch.Tensor:
    """Map raw images to displayable ones: ``0.5 + 0.5 tanh(raw)``, then the contrast limit."""
    return limit_contrast(MEAN_GREY + 0.5 * torch.tanh(raw), limits)


def from_display(images: torch.Tensor) -> torch.Tensor:
    """Return raw images that ``to_display`` maps back to ``images`` when they are within limits."""
    deviation = torch.clamp(2 * (images - MEAN_GREY), -0.999, 0.999)
    return torch.atanh(deviation)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Quantise ``(n, 3, H, W)`` images in [0, 1] to uint8 ``(n, H, W, 3)``, rounding toward grey.

    Rounding toward 127.5 instead of to the nearest level means quantisation adds at most half a
    level to the RMS contrast (see ``DisplayLimits.float_rms_contrast``).
    """
    levels = images.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy() * 255.0
    quantised = np.where(levels >= 127.5, np.floor(levels), np.ceil(levels))
    return np.clip(quantised, 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return uint8 ``(n, H, W, 3)`` images as float ``(n, 3, H, W)`` in [0, 1] on ``device``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images of shape (n, H, W, 3), got {images.dtype} "
                         f"{images.shape}.")
    tensor = torch.as_tensor(images, device=device).permute(0, 3, 1, 2)
    return tensor.to(torch.float32) / 255.0


# --- Transforms --------------------------------------------------------------------------------


def _reflect(coordinates: torch.Tensor, length: int) -> torch.Tensor:
    """Fold coordinates into [0, length - 1] by reflecting at both edges."""
    period = 2 * (length - 1)
    folded = torch.remainder(coordinates, period)
    return torch.where(folded > length - 1, period - folded, folded)


def _interpolation_matrices(source: torch.Tensor, length: int) -> torch.Tensor:
    """Return bilinear interpolation matrices ``(n, length, length)`` from source coordinates.

    ``source`` is ``(n, length)``: where each output pixel reads in the input, reflected at edges.
    """
    source = _reflect(source, length)
    lower = torch.clamp(torch.floor(source), max=length - 2)
    fraction = (source - lower).unsqueeze(-1)
    lower = lower.long()
    below = torch.nn.functional.one_hot(lower, length).to(source.dtype)
    above = torch.nn.functional.one_hot(lower + 1, length).to(source.dtype)
    return (1 - fraction) * below + fraction * above


def resample(images: torch.Tensor, shift_px: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Shift and zoom each image about its centre, bilinear, reflecting at the edges.

    ``shift_px`` is ``(n, 2)`` (down, right) and ``scale`` ``(n,)``. The resampling is two matrix
    products per image instead of ``grid_sample``, whose CUDA backward pass accumulates with
    atomics and so is not reproducible run to run.
    """
    n_images, _, height, width = images.shape
    rows = torch.arange(height, device=images.device, dtype=images.dtype)
    columns = torch.arange(width, device=images.device, dtype=images.dtype)
    centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
    source_y = (rows - centre_y) / scale[:, None] + centre_y - shift_px[:, :1]
    source_x = (columns - centre_x) / scale[:, None] + centre_x - shift_px[:, 1:]
    matrix_y = _interpolation_matrices(source_y, height)
    matrix_x = _interpolation_matrices(source_x, width)
    return torch.einsum("nyi,ncij,nxj->ncyx", matrix_y, images, matrix_x)


@dataclass(frozen=True)
class Jitter:
    """Shift each image by a random whole number of pixels, up to ``max_shift_px`` each way."""

    max_shift_px: int

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n_images = images.shape[0]
        shift = torch.randint(-self.max_shift_px, self.max_shift_px + 1, (n_images, 2),
                              generator=generator, device=images.device).to(images.dtype)
        return resample(images, shift, torch.ones(n_images, device=images.device, dtype=images.dtype))


@dataclass(frozen=True)
class RandomScale:
    """Zoom each image about its centre by a factor drawn uniformly from [min_scale, max_scale]."""

    min_scale: float = 0.95
    max_scale: float = 1.05

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"RandomScale needs 0 < min_scale <= max_scale, got "
                             f"{self.min_scale}, {self.max_scale}.")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n_images = images.shape[0]
        draw = torch.rand(n_images, generator=generator, device=images.device, dtype=images.dtype)
        scale = self.min_scale + (self.max_scale - self.min_scale) * draw
        return resample(images, torch.zeros(n_images, 2, device=images.device, dtype=images.dtype),
                        scale)


@dataclass(frozen=True)
class RandomShiftScale:
    """A random whole-pixel shift of up to ``max_shift_px`` and a zoom from [min_scale, max_scale].

    Both happen in one resampling, which blurs once where ``Jitter`` then ``RandomScale`` blur
    twice. It also costs a third of a jitter, zoom, jitter sequence: 1.5 ms against 4.2 ms for the
    forward and backward pass of 8 images of 64 px on one shared CPU thread (torch 2.13).
    """

    max_shift_px: int
    min_scale: float = 0.9
    max_scale: float = 1.1

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"RandomShiftScale needs 0 < min_scale <= max_scale, got "
                             f"{self.min_scale}, {self.max_scale}.")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n_images = images.shape[0]
        shift = torch.randint(-self.max_shift_px, self.max_shift_px + 1, (n_images, 2),
                              generator=generator, device=images.device).to(images.dtype)
        draw = torch.rand(n_images, generator=generator, device=images.device, dtype=images.dtype)
        scale = self.min_scale + (self.max_scale - self.min_scale) * draw
        return resample(images, shift, scale)


def default_transforms(size: tuple[int, int]) -> tuple[Callable, ...]:
    """Return the default transforms: a shift of up to 1/16 of the image and a 0.9 to 1.1 zoom."""
    return (RandomShiftScale(max(1, min(size) // 16), 0.9, 1.1),)


# --- Penalties ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TotalVariation:
    """Mean absolute difference between neighbouring pixels, times ``weight``, per image."""

    weight: float

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        vertical = (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(1, 2, 3))
        horizontal = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
        return self.weight * (vertical + horizontal)


def _gaussian_matrix(length: int, sigma_px: float, device: torch.device) -> torch.Tensor:
    positions = torch.arange(length, device=device, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((positions[:, None] - positions[None, :]) / sigma_px) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class BlurPenalty:
    """Mean squared difference between each image and its Gaussian blur, times ``weight``.

    It penalises only detail finer than ``sigma_px``, unlike total variation, which also penalises
    large edges.
    """

    weight: float
    sigma_px: float = 1.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _, _, height, width = images.shape
        blur_y = _gaussian_matrix(height, self.sigma_px, images.device)
        blur_x = _gaussian_matrix(width, self.sigma_px, images.device)
        blurred = torch.einsum("yi,ncij,xj->ncyx", blur_y, images, blur_x)
        return self.weight * (images - blurred).pow(2).mean(dim=(1, 2, 3))


# --- Encoding readout --------------------------------------------------------------------------


class EncodingReadout(torch.nn.Module):
    """Predicted site responses of images: features, standardised as at fitting, times ridge weights.

    Maps images ``(n, 3, H, W)`` in [0, 1] to responses ``(n, n_sites)`` as
    ``((features(images) - mean) / scale) @ weights.T + intercept``. ``mean`` and ``scale`` are
    ``(n_features,)``, ``weights`` ``(n_sites, n_features)`` and ``intercept`` ``(n_sites,)``, the
    layout of ``RidgeEncoder`` with its intercept column split off.
    """

    def __init__(self, features: torch.nn.Module, mean, scale, weights, intercept) -> None:
        super().__init__()
        self.features = features
        mean, scale = np.asarray(mean, np.float64), np.asarray(scale, np.float64)
        weights, intercept = np.asarray(weights, np.float64), np.asarray(intercept, np.float64)
        if mean.ndim != 1 or scale.shape != mean.shape:
            raise ValueError(f"mean and scale must both be (n_features,), got {mean.shape} and "
                             f"{scale.shape}.")
        if weights.ndim != 2 or weights.shape[1] != mean.shape[0]:
            raise ValueError(f"weights must be (n_sites, {mean.shape[0]}), got {weights.shape}; "
                             "drop the intercept column of RidgeEncoder.weights into intercept.")
        if intercept.shape != (weights.shape[0],):
            raise ValueError(f"intercept must be ({weights.shape[0]},), one per site, got "
                             f"{intercept.shape}.")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("scale must be finite and > 0 for every feature; a Standardizer sets "
                             "constant features' scale to 1.")
        for name, values in (("mean", mean), ("scale", scale), ("weights", weights),
                             ("intercept", intercept)):
            self.register_buffer(name, torch.as_tensor(values, dtype=torch.float32))

    @classmethod
    def from_encoder(cls, features: torch.nn.Module, encoder) -> EncodingReadout:
        """Build the readout of a fitted ``synth.encoding.RidgeEncoder``."""
        return cls.from_arrays(features, encoder.to_arrays())

    @classmethod
    def from_arrays(cls, features: torch.nn.Module, arrays: Mapping) -> EncodingReadout:
        """Build the readout from ``RidgeEncoder.to_arrays()`` output or the ``.npz`` it saves."""
        weights = np.asarray(arrays["weights"], dtype=np.float64)
        return cls(features, arrays["scaler_mean"], arrays["scaler_scale"], weights[:, :-1],
                   weights[:, -1])

    @property
    def n_sites(self) -> int:
        return self.weights.shape[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"The feature module returned shape {tuple(features.shape)}, but the "
                             f"readout expects (n_images, {self.mean.shape[0]}).")
        standard = (features - self.mean) / self.scale
        return standard @ self.weights.T + self.intercept


# --- Optimisation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisResult:
    """Synthesised images with the predictions they were chosen by."""

    images: np.ndarray  # (n_images, H, W, 3) uint8, within the display limits
    responses: np.ndarray  # (n_images, n_sites), predicted for `images` as quantised
    values: np.ndarray  # (n_images,), the objective of `responses`
    # (n_steps, n_images): the objective of each step's transformed images, before its update.
    trace: np.ndarray
    seed: int
    device: str
    parameterisation: str
    limits: DisplayLimits = DEFAULT_LIMITS


def _readout_on(readout: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Return ``readout`` if it is all on ``device``, else a copy moved there.

    A copy, so that a feature extractor sharing the readout's network keeps it on its own device.
    """
    tensors = [*readout.parameters(), *readout.buffers()]
    if all(tensor.device == device for tensor in tensors):
        return readout
    logger.info("Copying the readout to %s for synthesis.", device)
    return copy.deepcopy(readout).to(device)


@contextlib.contextmanager
def _deterministic_cudnn(device: torch.device) -> Iterator[None]:
    """Use deterministic cuDNN convolutions on CUDA for the duration, then restore the settings."""
    if device.type != "cuda":
        yield
        return
    # NOTE: these flags are process-wide, so another thread's convolutions also run
    # deterministically (and slower) while synthesis runs. They do not cover every op: the CUDA
    # backward passes of adaptive average pooling and bilinear interpolate accumulate with atomics,
    # so a readout using them repeats on CUDA only to float rounding (a uint8 level at most, rarely).
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def synthesize(
    readout: torch.nn.Module,
    objective,
    n_images: int,
    n_steps: int,
    seed: int,
    device: str | torch.device = "auto",
    size: int | tuple[int, int] = 64,
    *,
    parameterisation: str = "fourier",
    transforms: Sequence[Callable] | None = None,
    penalties: Sequence[Callable] = (TotalVariation(0.1),),
    limits: DisplayLimits = DEFAULT_LIMITS,
    learning_rate: float = 0.05,
    init_images: np.ndarray | None = None,
) -> SynthesisResult:
    """Synthesise images that maximise ``objective`` of the responses ``readout`` predicts.

    Each step makes the raw images, applies the display limits and then ``transforms``, and
    predicts responses. It then takes an Adam step on ``objective.score(responses) -
    sum(penalties)`` per image, with penalties in the objective's units. ``transforms=None`` means
    ``default_transforms(size)`` and ``()`` means none. ``init_images``, uint8
    ``(n_images, H, W, 3)``, start the ascent from given images instead of near-grey noise.

    ``readout`` runs in eval mode and its parameters get no gradients. When it is not on
    ``device``, a copy is moved there. The same seed on the same device gives the same images,
    except that on CUDA a readout with adaptive pooling or bilinear resizing repeats only to float
    rounding.
    """
    device = synthesis_device(device)
    size = _image_size(size)
    if n_images < 1 or n_steps < 0:
        raise ValueError(f"n_images must be >= 1 and n_steps >= 0, got {n_images} and {n_steps}.")
    if transforms is None:
        transforms = default_transforms(size)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    image_module = make_parameterisation(parameterisation, n_images, size, generator=generator,
                                         device=device)
    if init_images is not None:
        if np.asarray(init_images).shape != (n_images, *size, 3):
            raise ValueError(f"init_images must be uint8 {(n_images, *size, 3)}, got "
                             f"{np.asarray(init_images).shape}.")
        image_module.encode(from_display(from_uint8(init_images, device)))
    parameters = list(image_module.parameters())
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)

    readout = _readout_on(readout, device)
    was_training = readout.training
    readout.eval()
    try:
        with _deterministic_cudnn(device):
            trace = _ascend(readout, objective, image_module, optimizer, parameters, n_steps,
                            transforms, penalties, limits, generator)
            with torch.no_grad():
                displayed = to_display(image_module(), limits)
                _check_finite(np.all(np.isfinite(trace)) and bool(torch.isfinite(displayed).all()),
                              seed, learning_rate)
                images = to_uint8(displayed)
                responses = readout(from_uint8(images, device))
                values = objective.score(responses)
                _check_finite(bool(torch.isfinite(values).all()), seed, learning_rate)
    finally:
        readout.train(was_training)

    return SynthesisResult(images, responses.cpu().double().numpy(),
                           values.cpu().double().numpy(), trace, int(seed), str(device),
                           parameterisation, limits)


def _check_finite(finite: bool, seed: int, learning_rate: float) -> None:
    if not finite:
        raise SynthesisError(f"Synthesis with seed {seed} produced non-finite values; lower "
                             f"learning_rate (now {learning_rate}) or check the readout.")


def _ascend(readout, objective, image_module, optimizer, parameters, n_steps, transforms,
            penalties, limits, generator) -> np.ndarray:
    """Run ``n_steps`` of gradient ascent; return the objective trace ``(n_steps, n_images)``."""
    trace = []
    for _ in range(n_steps):
        # Forward: displayable images, then the readout's input after this step's transforms.
        images = to_display(image_module(), limits)
        seen = images
        for transform in transforms:
            seen = transform(seen, generator)
        values = objective.score(readout(seen))
        if values.shape != (images.shape[0],):
            raise ValueError(f"The objective returned shape {tuple(values.shape)}; expected one "
                             f"value per image, ({images.shape[0]},).")

        # Ascent on the summed per-image goal, so each image's gradient is independent of the batch.
        goal = values
        for penalty in penalties:
            goal = goal - penalty(images)
        # autograd.grad instead of backward() leaves the readout's .grad untouched.
        gradients = torch.autograd.grad(-goal.sum(), parameters)
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = gradient
        optimizer.step()
        trace.append(values.detach())

    if not trace:
        return np.zeros((0, image_module().shape[0]))
    return torch.stack(trace).cpu().double().numpy()
