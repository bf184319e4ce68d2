"""Image features from named layers of a CNN, pooled, batched and cached on disk.

Runs in the controller process (calibration, pool scoring, synthesis) and in the simulated vision
subject. Forward hooks capture the requested modules' outputs, and the pass stops once every
requested module has run, so no later layer is computed. ``differentiable(layer)`` returns a torch
module with the same preprocessing and pooling for gradient-based image synthesis.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from synth.cache import FeatureCache
from synth.models import cache_root, resolve_device
from synth.vision_models import LoadedVisionModel, VisionModel

logger = logging.getLogger(__name__)

# "grid" keeps coarse position (a g × g average of each channel), which synthesis needs to place a
# feature in a site's receptive field. "mean" is the spatial average, and "none" keeps the whole map.
POOLINGS = ("grid", "mean", "none")
DEFAULT_GRID_SIZE = 3
# Images are resized to 128 × 128 by default for speed on CPUs. There MobileNetV2 up to features.13
# runs 3.5 to 5 times faster than at its native 224 px: 45 to 75 against 13 to 15 images/s on one
# core of a busy 2-core machine with torch 2.13. It still gives scikit-image's cat its class.
DEFAULT_IMAGE_SIZE = 128


class _StopForward(Exception):
    """Raised by a hook once every requested layer has run, to end the forward pass there."""


def image_key(image: np.ndarray) -> str:
    """Return the cache key of one image: SHA-1 of its dtype, shape and raw bytes."""
    contiguous = np.ascontiguousarray(image)
    digest = hashlib.sha1(f"{contiguous.dtype.str}{contiguous.shape}".encode())
    digest.update(contiguous.tobytes())
    return digest.hexdigest()


def split_images(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Return a list of single images, each ``(H, W, 3)`` or ``(H, W)``, after checking dtype and range.

    ``images`` is ``(n, H, W, 3)`` RGB, ``(n, H, W)`` grey, one ``(H, W, 3)`` or ``(H, W)`` image, or
    a sequence of single images of any sizes. Pixels are uint8, or float in [0, 1].
    """
    if isinstance(images, np.ndarray):
        if (images.ndim == 4 and images.shape[-1] == 3) or (images.ndim == 3 and images.shape[-1] != 3):
            singles = list(images)
        elif images.ndim in (2, 3):
            singles = [images]
        else:
            raise ValueError(
                f"images must be (n, H, W, 3), (n, H, W), (H, W, 3) or (H, W); got shape {images.shape}."
            )
    else:
        singles = [np.asarray(image) for image in images]
    for index, image in enumerate(singles):
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
            raise ValueError(f"Image {index} has shape {image.shape}; expected (H, W, 3) or (H, W).")
        if image.dtype == np.uint8:
            continue
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"Image {index} has dtype {image.dtype}; expected uint8 or float in [0, 1].")
        if image.size and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                f"Image {index} has float values in [{image.min():g}, {image.max():g}]; expected "
                "[0, 1] (divide 8-bit pixels by 255, or pass them as uint8)."
            )
    return singles


def to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return one image as a ``(1, 3, H, W)`` float32 tensor in [0, 1]; grey repeats into RGB."""
    # A copy, because natural-image sets are read-only arrays and torch warns on those.
    pixels = torch.tensor(image, device=device)
    pixels = pixels.float() / 255.0 if image.dtype == np.uint8 else pixels.float()
    if pixels.ndim == 2:
        pixels = pixels.unsqueeze(-1).expand(-1, -1, 3)
    return pixels.permute(2, 0, 1).unsqueeze(0)


def prepare_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Crop ``(n, 3, H, W)`` images to their centred square and resize them to ``image_size``.

    Resizing is bilinear with antialiasing, so it is differentiable and the same in ``extract`` and
    in the module from ``differentiable``.
    """
    height, width = images.shape[-2:]
    if height != width:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        images = images[..., top:top + side, left:left + side]
    if images.shape[-1] != image_size:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size),
                                                 mode="bilinear", antialias=True, align_corners=False)
    return images


def pool_map(output: torch.Tensor, pooling: str, grid_size: int) -> torch.Tensor:
    """Pool a layer's ``(n, C, H, W)`` output into ``(n, d)`` features.

    ``grid`` gives ``d = C · g · g``, flattened channel-major (channel, row, column); ``mean`` gives
    ``d = C``; ``none`` gives ``d = C · H · W``. A ``(n, d)`` output (a linear layer) is returned as it
    is, whatever the pooling.
    """
    if output.ndim == 2:
        return output
    if output.ndim != 4:
        raise ValueError(
            f"Layer output has shape {tuple(output.shape)}; only (n, C, H, W) maps and (n, d) vectors "
            "can be pooled. Choose a convolutional module."
        )
    if pooling == "grid":
        return torch.nn.functional.adaptive_avg_pool2d(output, grid_size).flatten(1)
    if pooling == "mean":
        return output.mean(dim=(2, 3))
    if pooling == "none":
        return output.flatten(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


class LayerReadout(torch.nn.Module):
    """Pooled features of chosen layers for ``(n, 3, H, W)`` images in [0, 1], as a torch module.

    The forward pass returns ``{layer: (n, d)}`` and keeps the autograd graph, so gradients reach
    the images. The network stays in eval mode even after ``train()``, because batch norm must keep
    its ImageNet statistics while images are optimised.
    """

    def __init__(self, model: VisionModel, layers: Sequence[str], pooling: str, grid_size: int,
                 image_size: int) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.pooling = pooling
        self.grid_size = grid_size
        self.image_size = image_size
        self._modules_by_layer = {layer: model.layer(layer) for layer in self.layers}

    def train(self, mode: bool = True) -> LayerReadout:
        super().train(mode)
        self.model.eval()
        return self

    def capture(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return each layer's unpooled output, ``{layer: (n, C, H, W)}``, for images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (n, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
        captured: dict[str, torch.Tensor] = {}

        def make_hook(layer: str):
            def hook(_module, _inputs, output):
                if layer not in captured:
                    output = output[0] if isinstance(output, tuple) else output
                    # A copy unless the pass stops here, because a later in-place operation (such
                    # as torchvision's ReLU(inplace=True)) would overwrite the captured tensor.
                    last = len(captured) == len(self.layers) - 1
                    captured[layer] = output if last else output.clone()
                if len(captured) == len(self.layers):
                    raise _StopForward
            return hook

        handles = [module.register_forward_hook(make_hook(layer))
                   for layer, module in self._modules_by_layer.items()]
        try:
            self.model(prepare_images(images, self.image_size))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise RuntimeError(f"Layers {missing} did not run in the network's forward pass; "
                               "choose modules that forward() calls.")
        return captured

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captured = self.capture(images)
        return {layer: pool_map(captured[layer], self.pooling, self.grid_size)
                for layer in self.layers}


class LayerFeatures(torch.nn.Module):
    """One layer's pooled features, ``(n, 3, H, W)`` images in [0, 1] to ``(n, d)``, differentiable."""

    def __init__(self, readout: LayerReadout, layer: str) -> None:
        super().__init__()
        self.readout = readout
        self.layer = layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(images)[self.layer]


class ImageFeatureExtractor:
    """Pooled features of chosen CNN layers for batches of images, cached on disk.

    Cache entries are keyed by the model identity, layer, pooling (with grid and image size) and
    the exact bytes of each input image, so a uint8 image and its float copy are cached apart.
    """

    def __init__(
        self,
        loaded: LoadedVisionModel,
        layers: Sequence[str],
        pooling: str = "grid",
        batch_size: int = 32,
        device: str | None = None,
        grid_size: int = DEFAULT_GRID_SIZE,
        image_size: int = DEFAULT_IMAGE_SIZE,
        cache_dir: Path | None = None,
        use_cache: bool = True,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if not layers:
            raise ValueError("layers is empty; name at least one module, e.g. 'features.13'.")
        if grid_size < 1 or image_size < 32 or batch_size < 1:
            raise ValueError(f"grid_size, batch_size and image_size must be at least 1, 1 and 32; "
                             f"got {grid_size}, {batch_size} and {image_size}.")
        self.loaded = loaded
        self.device = loaded.device if device is None else resolve_device(device)
        model = loaded.model
        if (self.device.type, self.device.index or 0) != (loaded.device.type, loaded.device.index or 0):
            # A copy, so that the caller's model stays on its own device.
            model = copy.deepcopy(loaded.model).to(self.device)
        self.layers = list(dict.fromkeys(layers))
        self.pooling = pooling
        self.grid_size = grid_size
        self.image_size = image_size
        self.batch_size = batch_size
        self._readout = LayerReadout(model, self.layers, pooling, grid_size, image_size)
        self._shapes: dict[str, tuple[int, ...]] = {}
        label = f"{pooling}{grid_size if pooling == 'grid' else ''}@{image_size}px"
        root = (cache_dir or cache_root()) / "image_features"
        self._caches = (
            {layer: FeatureCache(root, loaded.identity, layer, label, "float32")
             for layer in self.layers}
            if use_cache else None
        )

    def output_shape(self, layer: str) -> tuple[int, ...]:
        """Return the unpooled output shape of ``layer`` for one image, e.g. ``(96, 8, 8)``."""
        if layer not in self._shapes:
            probe = LayerReadout(self._readout.model, [layer], self.pooling, self.grid_size,
                                 self.image_size)
            with torch.inference_mode():
                blank = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                self._shapes[layer] = tuple(probe.capture(blank)[layer].shape[1:])
        return self._shapes[layer]

    def n_features(self, layer: str) -> int:
        """Return the width ``d`` of ``layer``'s pooled features."""
        shape = self.output_shape(layer)
        if len(shape) == 1 or self.pooling == "none":
            return int(np.prod(shape))
        return shape[0] * (self.grid_size**2 if self.pooling == "grid" else 1)

    def differentiable(self, layer: str) -> LayerFeatures:
        """Return a module mapping ``(n, 3, H, W)`` float images in [0, 1] to ``(n, d)`` features.

        Its preprocessing (centre square crop, resize to ``image_size``, normalisation) and pooling
        are those of ``extract``, and it runs on this extractor's device. Gradients flow to the
        images only, since the network's parameters do not require them.
        """
        if layer not in self.layers:
            raise ValueError(f"Layer {layer!r} is not one of this extractor's layers {self.layers}.")
        readout = LayerReadout(self._readout.model, [layer], self.pooling, self.grid_size,
                               self.image_size)
        return LayerFeatures(readout, layer)

    def extract(
        self, images: np.ndarray | Sequence[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Return ``{layer: (n_images, d)}`` float32 features, reading the cache first.

        ``images`` is ``(n, H, W, 3)`` RGB or ``(n, H, W)`` grey (a single ``(H, W, 3)`` or ``(H, W)``
        image also works, as does a list of images of different sizes), uint8 or float in [0, 1].
        """
        singles = split_images(images)
        keys = [image_key(image) for image in singles]
        found_by_layer: dict[str, dict[int, np.ndarray]] = {}
        missing_any: set[int] = set()
        for layer in self.layers:
            if self._caches is None:
                found, missing = {}, list(range(len(singles)))
            else:
                found, missing = self._caches[layer].lookup(keys)
            found_by_layer[layer] = found
            missing_any.update(missing)

        computed: dict[str, np.ndarray] = {}
        order = sorted(missing_any)
        if order:
            # A few images at a time is the synthesis loop's normal work; only a batch is news.
            level = logging.INFO if len(order) >= 100 else logging.DEBUG
            logger.log(level, "Computing features of %d images at layers %s with %s (cached on "
                       "disk for later runs).", len(order), self.layers, self.loaded.identity)
            computed = self._compute([singles[index] for index in order], progress)

        result: dict[str, np.ndarray] = {}
        for layer in self.layers:
            # The width comes from the data, so a full cache hit never runs the network.
            width = (computed[layer].shape[1] if order
                     else len(next(iter(found_by_layer[layer].values()), ())))
            result[layer] = np.empty((len(singles), width), np.float32)
            for index, vector in found_by_layer[layer].items():
                result[layer][index] = vector
            if order:
                result[layer][order] = computed[layer]
                if self._caches is not None:
                    self._caches[layer].store([keys[index] for index in order], computed[layer])
        return result

    def _compute(self, singles: list[np.ndarray], progress) -> dict[str, np.ndarray]:
        """Run the truncated network over ``singles`` in batches."""
        parts: dict[str, list[np.ndarray]] = {layer: [] for layer in self.layers}
        for start in range(0, len(singles), self.batch_size):
            batch = singles[start:start + self.batch_size]
            with torch.inference_mode():
                # Each image is cropped and resized alone, so one batch may mix image sizes.
                prepared = torch.cat([prepare_images(to_tensor(image, self.device), self.image_size)
                                      for image in batch])
                pooled = self._readout(prepared)
            for layer in self.layers:
                parts[layer].append(pooled[layer].float().cpu().numpy())
            if progress is not None:
                progress(len(batch))
        return {layer: np.concatenate(arrays) for layer, arrays in parts.items()}
