"""Ground truth of a simulated vision subject: noise-free responses of N recording sites to images.

Runs in the simulated subject's process and in benchmarks. Each site reads the full spatial map of
one MobileNetV2 layer (``features.10`` by default) through a Gaussian receptive field and a sparse
channel weighting, then a rectifying power-law output. The controller's default features are a 3 × 3
grid of ``features.13``, so it faces a real model mismatch: another depth, another readout and a
nonlinearity. NOTE: by default the truth and the controller share one network, so the mismatch is
smaller than a real brain's. Pass another ``model`` (a torchvision or timm network with cached
weights, or a local checkpoint) for a larger one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

from synth.image_features import DEFAULT_IMAGE_SIZE, ImageFeatureExtractor
from synth.vision_models import DEFAULT_VISION_MODEL, LoadedVisionModel, load_vision_model

logger = logging.getLogger(__name__)

TRUTH_LAYER = "features.10"


@dataclass(frozen=True)
class VisionSite:
    """One simulated recording site's tuning, drawn from the truth's seed.

    Positions and widths are fractions of the image side, with (0, 0) at the top-left corner.
    ``threshold`` is where the rectifier starts, in SDs of the site's drive below its mean
    on the reference images, and ``gain`` scales the output so those images average 1.
    """

    centre_xy: tuple[float, float]
    rf_sd: float
    channels: np.ndarray  # (n_channels_per_site,) indices into the layer's channels
    channel_weights: np.ndarray  # (n_channels_per_site,) unit L2 norm, mixed signs
    threshold: float
    gain: float


def _solve_threshold(drive_z: np.ndarray, exponent: float, response_sd: float) -> float:
    """Return the threshold c with SD/mean of ``max(z + c, 0) ** exponent`` equal to ``response_sd``.

    The ratio falls as c grows: it is about ``sqrt(n - 1)`` when only the top image passes the
    threshold, and about ``exponent / c`` once every image does, so a root lies between.
    """
    def excess(threshold: float) -> float:
        output = np.maximum(drive_z + threshold, 0.0) ** exponent
        return float(output.std() / output.mean()) - response_sd

    low = -float(drive_z.max()) + 1e-9
    high = 10.0 * exponent / response_sd + float(-drive_z.min())
    if excess(low) <= 0.0:
        raise ValueError(
            f"response_sd={response_sd} cannot be reached with {len(drive_z)} reference images; "
            "use a smaller response_sd or more reference images."
        )
    return float(brentq(excess, low, high, xtol=1e-10))


class VisionTruth:
    """Noise-free responses of ``n_sites`` simulated sites, ``(n_images, n_sites)``.

    Site s computes ``drive = Σ_c w_c Σ_xy g_s(x, y) A_c(x, y)`` over the truth layer's map ``A``,
    with ``g_s`` a Gaussian receptive field normalised to sum 1 and ``w`` sparse, then
    ``response = gain · max((drive − mean) / sd + threshold, 0) ** exponent``. The drive's mean and
    sd, the threshold and the gain are set on the reference images so that there each site's
    responses have mean exactly 1 and SD ``response_sd``. Everything random comes from ``seed``.
    """

    def __init__(
        self,
        n_sites: int,
        seed: int,
        reference: np.ndarray | None = None,
        *,
        model: LoadedVisionModel | None = None,
        layer: str = TRUTH_LAYER,
        image_size: int = DEFAULT_IMAGE_SIZE,
        n_channels_per_site: int = 6,
        rf_sd_range: tuple[float, float] = (0.08, 0.2),
        rf_centre_range: tuple[float, float] = (0.2, 0.8),
        response_sd: float = 0.5,
        exponent: float = 1.5,
        cache_dir: Path | None = None,
        use_cache: bool = True,
    ) -> None:
        if n_sites < 1:
            raise ValueError(f"n_sites must be at least 1, got {n_sites}.")
        if response_sd <= 0 or exponent < 1:
            raise ValueError(f"response_sd must be positive and exponent at least 1; got "
                             f"{response_sd} and {exponent}.")
        if reference is None:
            from synth.natural_images import load_natural_images

            reference = load_natural_images().images
        self.n_sites = n_sites
        self.seed = seed
        self.layer = layer
        self.exponent = exponent
        self.response_sd = response_sd
        loaded = model if model is not None else load_vision_model(DEFAULT_VISION_MODEL, device="cpu")
        # Only the reference images go through the disk cache, because a session's synthesised
        # images are new every trial and would add one cache shard each.
        self._reference_extractor = ImageFeatureExtractor(
            loaded, [layer], pooling="none", image_size=image_size, cache_dir=cache_dir,
            use_cache=use_cache)
        self._extractor = ImageFeatureExtractor(loaded, [layer], pooling="none",
                                                image_size=image_size, use_cache=False)
        shape = self._extractor.output_shape(layer)
        if len(shape) != 3:
            raise ValueError(f"Layer {layer!r} outputs shape {shape}; the truth needs a (C, H, W) map.")
        n_channels, height, width = shape
        if not 1 <= n_channels_per_site <= n_channels:
            raise ValueError(f"n_channels_per_site must be in 1..{n_channels}, got {n_channels_per_site}.")

        # Draw every site's receptive field and channel weights from one generator.
        rng = np.random.default_rng(seed)
        centres = rng.uniform(*rf_centre_range, size=(n_sites, 2))
        widths = rng.uniform(*rf_sd_range, size=n_sites)
        channels = np.stack([np.sort(rng.choice(n_channels, n_channels_per_site, replace=False))
                             for _ in range(n_sites)])
        weights = rng.normal(size=(n_sites, n_channels_per_site))
        weights /= np.linalg.norm(weights, axis=1, keepdims=True)

        # Receptive fields are evaluated at the centres of the map's cells.
        rows = (np.arange(height) + 0.5) / height
        columns = (np.arange(width) + 0.5) / width
        fields = np.exp(-((columns[None, None, :] - centres[:, 0, None, None]) ** 2
                          + (rows[None, :, None] - centres[:, 1, None, None]) ** 2)
                        / (2 * widths[:, None, None] ** 2))
        self._fields = fields / fields.sum(axis=(1, 2), keepdims=True)  # (n_sites, H, W)
        readout = np.zeros((n_sites, n_channels, height, width))
        for site in range(n_sites):
            readout[site, channels[site]] = weights[site, :, None, None] * self._fields[site]
        self._readout = readout.reshape(n_sites, -1)  # (n_sites, C·H·W), channel-major as pooled

        # Normalise on the reference images: drive z-scores, then threshold and gain per site.
        self.reference = reference
        drive = self._drive(reference, self._reference_extractor)
        self._drive_mean = drive.mean(axis=0)
        self._drive_sd = np.where(drive.std(axis=0) > 0, drive.std(axis=0), 1.0)
        drive_z = (drive - self._drive_mean) / self._drive_sd
        thresholds = np.array([_solve_threshold(drive_z[:, site], exponent, response_sd)
                               for site in range(n_sites)])
        rectified = np.maximum(drive_z + thresholds, 0.0) ** exponent
        gains = 1.0 / rectified.mean(axis=0)
        self.sites = [
            VisionSite((float(centres[s, 0]), float(centres[s, 1])), float(widths[s]), channels[s],
                       weights[s], float(thresholds[s]), float(gains[s]))
            for s in range(n_sites)
        ]
        self._thresholds, self._gains = thresholds, gains
        self.reference_responses = rectified * gains  # (n_reference, n_sites)
        logger.info("Simulated vision subject: %d sites reading %s of %s, normalised on %d images.",
                    n_sites, layer, loaded.identity, len(reference))

    def _drive(self, images, extractor: ImageFeatureExtractor) -> np.ndarray:
        maps = extractor.extract(images)[self.layer].astype(np.float64)
        return maps @ self._readout.T

    def __call__(self, images) -> np.ndarray:
        """Return the noise-free responses, ``(n_images, n_sites)``, to uint8 or [0, 1] images.

        ``images`` has any shape that ``ImageFeatureExtractor.extract`` accepts.
        """
        drive_z = (self._drive(images, self._extractor) - self._drive_mean) / self._drive_sd
        return self._gains * np.maximum(drive_z + self._thresholds, 0.0) ** self.exponent

    def receptive_fields(self) -> np.ndarray:
        """Return each site's receptive-field weights on the layer's grid, ``(n_sites, H, W)``."""
        return self._fields.copy()

    def best_natural_image(self, site: int, images=None) -> tuple[int, float]:
        """Return the index of the image that drives ``site`` most, and its response.

        ``images`` defaults to the reference images; the index is into whichever set is used.
        """
        if not 0 <= site < self.n_sites:
            raise ValueError(f"site must be in 0..{self.n_sites - 1}, got {site}.")
        responses = self.reference_responses if images is None else self(images)
        index = int(np.argmax(responses[:, site]))
        return index, float(responses[index, site])
