"""The embedded MobileNetV2 and the image feature extractor: loading, layers, cache, gradients."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

from synth.errors import ModelNotFoundError
from synth.image_features import ImageFeatureExtractor, image_key
from synth.vision_models import (
    LoadedVisionModel,
    MobileNetV2,
    VisionModel,
    embedded_mobilenet_path,
    load_vision_model,
)

pytestmark = [pytest.mark.models, pytest.mark.usefixtures("torch_one_thread")]

# Egyptian cat, tabby, tiger cat, Persian, Siamese, ... in the ImageNet-1k class order.
IMAGENET_CATS = range(281, 286)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Five scikit-image photographs at 96 × 96: cat, astronaut, coffee, rocket, coins (grey)."""
    import skimage.data
    from PIL import Image

    from synth.natural_images import square_resize

    names = ("chelsea", "astronaut", "coffee", "rocket", "coins")
    return np.stack([square_resize(Image.fromarray(getattr(skimage.data, name)()), 96)
                     for name in names])


def test_checkpoint_keys_match_exactly(mobilenet):
    state = torch.load(embedded_mobilenet_path(), map_location="cpu", weights_only=True)
    assert list(state) == list(MobileNetV2().state_dict())
    assert len(state) == 314
    loaded = mobilenet.model.network.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_loaded_model_state(mobilenet):
    assert mobilenet.identity.startswith("embedded:mobilenet_v2@")
    assert len(mobilenet.identity.split("@")[1]) == 16
    assert load_vision_model(device="cpu").identity == mobilenet.identity
    assert mobilenet.model.training is False
    assert not any(p.requires_grad for p in mobilenet.model.parameters())
    auto = load_vision_model(device="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_chelsea_is_an_imagenet_cat(mobilenet):
    import skimage.data

    from synth.image_features import prepare_images, to_tensor

    cat = prepare_images(to_tensor(skimage.data.chelsea(), torch.device("cpu")), 224)
    with torch.inference_mode():
        logits = mobilenet.model(cat)
    assert int(logits.argmax()) in IMAGENET_CATS
    assert int(logits.argmax()) == 285


def test_layer_shapes_and_dims(mobilenet, tmp_path):
    grid = ImageFeatureExtractor(mobilenet, ["features.13", "features.6"], cache_dir=tmp_path)
    assert grid.output_shape("features.6") == (32, 16, 16)
    assert grid.output_shape("features.13") == (96, 8, 8)
    features = grid.extract(np.zeros((2, 40, 40, 3), np.uint8))
    assert list(features) == ["features.13", "features.6"]
    assert features["features.6"].shape == (2, 32 * 9)
    assert features["features.13"].shape == (2, 96 * 9)
    assert features["features.13"].dtype == np.float32

    mean = ImageFeatureExtractor(mobilenet, ["features.13"], pooling="mean", grid_size=4,
                                 cache_dir=tmp_path).extract(np.zeros((1, 40, 40, 3), np.uint8))
    assert mean["features.13"].shape == (1, 96)
    four = ImageFeatureExtractor(mobilenet, ["features.13"], grid_size=4, image_size=64,
                                 cache_dir=tmp_path)
    assert four.output_shape("features.13") == (96, 4, 4)
    assert four.n_features("features.13") == 96 * 16


def test_grid_pooling_is_block_average(mobilenet, photos, tmp_path):
    layer = "features.6"
    full = ImageFeatureExtractor(mobilenet, [layer], pooling="none", image_size=96,
                                 cache_dir=tmp_path).extract(photos)[layer]
    grid = ImageFeatureExtractor(mobilenet, [layer], pooling="grid", grid_size=3, image_size=96,
                                 cache_dir=tmp_path).extract(photos)[layer]
    maps = full.reshape(len(photos), 32, 12, 12)
    blocks = maps.reshape(len(photos), 32, 3, 4, 3, 4).mean(axis=(3, 5)).reshape(len(photos), -1)
    np.testing.assert_allclose(grid, blocks, rtol=1e-5, atol=1e-6)


def test_forward_stops_after_deepest_layer(mobilenet, photos):
    extractor = ImageFeatureExtractor(mobilenet, ["features.3", "features.6"], use_cache=False)
    ran = []
    network = mobilenet.model.network
    handles = [block.register_forward_hook(lambda *args, k=k: ran.append(k))
               for k, block in enumerate(network.features)]
    handles.append(network.classifier.register_forward_hook(lambda *args: ran.append("classifier")))
    try:
        extractor.extract(photos[:2])
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(set(ran), key=str) == [0, 1, 2, 3, 4, 5, 6]


def test_batches_match_single_images(mobilenet, photos):
    layers = ["features.6", "features.13"]
    batched = ImageFeatureExtractor(mobilenet, layers, batch_size=3, use_cache=False).extract(photos)
    single = ImageFeatureExtractor(mobilenet, layers, batch_size=1, use_cache=False)
    for index, photo in enumerate(photos):
        alone = single.extract(photo)
        for layer in layers:
            np.testing.assert_allclose(batched[layer][index], alone[layer][0], rtol=1e-4, atol=1e-5)


def test_cache_hit_returns_identical_arrays(mobilenet, photos, tmp_path):
    first = ImageFeatureExtractor(mobilenet, ["features.13"], cache_dir=tmp_path).extract(photos)
    again = ImageFeatureExtractor(mobilenet, ["features.13"], cache_dir=tmp_path)
    calls = []
    handle = mobilenet.model.network.features[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        second = again.extract(photos[::-1])
    finally:
        handle.remove()
    assert calls == []
    np.testing.assert_array_equal(second["features.13"], first["features.13"][::-1])

    # Another pooling, or one changed pixel, is another cache entry.
    changed = photos.copy()
    changed[0, 0, 0, 0] ^= 1
    assert image_key(changed[0]) != image_key(photos[0])
    assert image_key(photos[0].astype(np.float32) / 255) != image_key(photos[0])
    other = ImageFeatureExtractor(mobilenet, ["features.13"], grid_size=2, cache_dir=tmp_path)
    assert other._caches["features.13"].folder != again._caches["features.13"].folder


def test_differentiable_path_equals_extract(mobilenet, photos):
    extractor = ImageFeatureExtractor(mobilenet, ["features.6", "features.13"], use_cache=False)
    extracted = extractor.extract(photos)
    images = torch.tensor(photos, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    images.requires_grad_(True)
    module = extractor.differentiable("features.13")
    features = module(images)
    assert features.shape == (len(photos), 96 * 9)
    np.testing.assert_allclose(features.detach().numpy(), extracted["features.13"],
                               rtol=1e-5, atol=1e-5)

    features[:, 0].sum().backward()
    assert images.grad is not None
    assert float(images.grad.abs().sum()) > 0.0
    assert all(p.grad is None for p in mobilenet.model.parameters())

    module.train()
    assert mobilenet.model.training is False


def test_differentiable_path_resizes_like_extract(mobilenet, photos):
    extractor = ImageFeatureExtractor(mobilenet, ["features.10"], image_size=64, use_cache=False)
    wide = np.concatenate([photos[:2], photos[:2, :, :30]], axis=2)  # (2, 96, 126, 3)
    extracted = extractor.extract(wide)["features.10"]
    images = torch.tensor(wide, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        features = extractor.differentiable("features.10")(images)
    np.testing.assert_allclose(features.numpy(), extracted, rtol=1e-5, atol=1e-5)


def test_grey_float_and_list_inputs(mobilenet, photos):
    extractor = ImageFeatureExtractor(mobilenet, ["features.6"], use_cache=False)
    grey = photos[4, :, :, 0]
    from_grey = extractor.extract(grey)["features.6"]
    from_rgb = extractor.extract(np.repeat(grey[:, :, None], 3, axis=2))["features.6"]
    np.testing.assert_allclose(from_grey, from_rgb, rtol=1e-6, atol=1e-6)

    from_float = extractor.extract(photos[:2].astype(np.float64) / 255.0)["features.6"]
    from_uint8 = extractor.extract(photos[:2])["features.6"]
    np.testing.assert_allclose(from_float, from_uint8, rtol=1e-5, atol=1e-5)

    mixed = extractor.extract([photos[0], photos[1, :64, :80]])["features.6"]
    assert mixed.shape == (2, 288)
    np.testing.assert_allclose(mixed[0], from_uint8[0], rtol=1e-5, atol=1e-5)


def test_invalid_inputs_are_rejected(mobilenet):
    extractor = ImageFeatureExtractor(mobilenet, ["features.6"], use_cache=False)
    with pytest.raises(ValueError, match=r"float values in \[0, 1.5\]"):
        extractor.extract(np.linspace(0.0, 1.5, 32 * 32 * 3).reshape(1, 32, 32, 3))
    with pytest.raises(ValueError, match="dtype int16"):
        extractor.extract(np.zeros((1, 32, 32, 3), np.int16))
    with pytest.raises(ValueError, match=r"shape \(1, 32, 32, 4\)"):
        extractor.extract(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="'features.99' is not a module"):
        ImageFeatureExtractor(mobilenet, ["features.99"])
    with pytest.raises(ValueError, match="pooling must be one of"):
        ImageFeatureExtractor(mobilenet, ["features.6"], pooling="max")
    with pytest.raises(ValueError, match="not one of this extractor's layers"):
        extractor.differentiable("features.13")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_missing_library_is_named(monkeypatch, library):
    # A None entry in sys.modules makes the import fail as if the library were not installed.
    monkeypatch.setitem(sys.modules, library, None)
    with pytest.raises(ImportError, match=f"needs the {library} library, which is not installed"):
        load_vision_model(f"{library}:resnet18", device="cpu")


FAKE_TORCHVISION = '''
"""A stand-in for torchvision with its model-registry calls, serving the embedded MobileNetV2."""
import types

from synth.vision_models import MobileNetV2


class _Weights:
    url = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"


class _Registry:
    DEFAULT = _Weights()


def get_model_weights(name):
    if name != "mobilenet_v2":
        raise ValueError(f"Unknown model {name}")
    return _Registry


def get_model(name, weights=None):
    assert weights is None
    return MobileNetV2()


models = types.SimpleNamespace(get_model_weights=get_model_weights, get_model=get_model)
'''


def test_torchvision_weights_come_from_hub_cache(monkeypatch, tmp_path):
    (tmp_path / "lib" / "torchvision").mkdir(parents=True)
    (tmp_path / "lib" / "torchvision" / "__init__.py").write_text(FAKE_TORCHVISION)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"

    with pytest.raises(ModelNotFoundError, match="never downloads") as missing:
        load_vision_model("torchvision:mobilenet_v2", device="cpu")
    assert str(checkpoints / "mobilenet_v2-b0353104.pth") in str(missing.value)
    with pytest.raises(ModelNotFoundError, match="no model called 'resnet18'"):
        load_vision_model("torchvision:resnet18", device="cpu")

    checkpoints.mkdir(parents=True)
    shutil.copy(embedded_mobilenet_path(), checkpoints)
    loaded = load_vision_model("torchvision:mobilenet_v2", device="cpu")
    embedded = load_vision_model(device="cpu")
    assert loaded.identity.split("@")[1] == embedded.identity.split("@")[1]


def test_local_checkpoint_loads_strictly(mobilenet, photos, tmp_path):
    state = {f"module.{key}": value for key, value in mobilenet.model.network.state_dict().items()}
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    local = load_vision_model(str(path), device="cpu")
    assert local.identity.startswith("local:finetuned.pth[mobilenet_v2]@")
    layer = ["features.13"]
    np.testing.assert_array_equal(
        ImageFeatureExtractor(local, layer, use_cache=False).extract(photos[:2])["features.13"],
        ImageFeatureExtractor(mobilenet, layer, use_cache=False).extract(photos[:2])["features.13"])

    wrong_shape = dict(state)
    wrong_shape["module.classifier.1.bias"] = torch.zeros(10)
    torch.save(wrong_shape, tmp_path / "ten_classes.pth")
    with pytest.raises(ModelNotFoundError, match="do not fit the MobileNetV2 architecture"):
        load_vision_model(str(tmp_path / "ten_classes.pth"), device="cpu")

    del state["module.classifier.1.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ModelNotFoundError, match=r"1 missing keys \(first: \['classifier.1.bias'\]\)"):
        load_vision_model(str(tmp_path / "partial.pth"), device="cpu")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="notes.pth as a torch checkpoint"):
        load_vision_model(str(tmp_path / "notes.pth"), device="cpu")
    with pytest.raises(ModelNotFoundError, match="not a checkpoint file on this machine"):
        load_vision_model(str(tmp_path / "absent.pth"), device="cpu")
    with pytest.raises(ModelNotFoundError, match="Unknown embedded vision model"):
        load_vision_model("embedded:resnet50", device="cpu")


def test_other_device_gets_a_copy(mobilenet):
    # Tensors on the meta device have no data, so this checks placement without a GPU.
    extractor = ImageFeatureExtractor(mobilenet, ["features.6"], device="meta", use_cache=False)
    assert extractor.device == torch.device("meta")
    assert next(extractor._readout.model.parameters()).device == torch.device("meta")
    assert next(mobilenet.model.parameters()).device == torch.device("cpu")
    assert mobilenet.device == torch.device("cpu")


def test_inplace_relu_keeps_captured_output():
    # A batch norm followed by an in-place ReLU, as in torchvision's networks: the captured batch
    # norm output must keep its negative values.
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 4, 3)).eval()
    model = VisionModel(network).requires_grad_(False)
    toy = LoadedVisionModel(model, "toy", torch.device("cpu"), "toy")
    extractor = ImageFeatureExtractor(toy, ["1", "3"], pooling="none", image_size=32, use_cache=False)
    images = np.random.default_rng(0).random((2, 32, 32, 3))
    captured = extractor.extract(images)["1"]
    with torch.no_grad():
        tensor = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2)
        expected = network[1](network[0]((tensor - model.mean) / model.std)).flatten(1)
    assert (captured < 0).any()
    np.testing.assert_allclose(captured, expected.numpy(), rtol=1e-5, atol=1e-6)
