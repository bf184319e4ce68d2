"""The natural-image baseline set from installed packages, and a lab's own image folder."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
from PIL import Image

from synth.natural_images import (
    ImageSetError,
    _load_natural_images,
    load_image_folder,
    load_natural_images,
)

N_SHIPPED = 36


@pytest.fixture
def no_network(monkeypatch):
    """Make every socket connection in this process fail, so any download attempt raises."""
    def reject_connection(*args, **kwargs):
        raise OSError("network access in a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", reject_connection)
    monkeypatch.setattr(socket, "create_connection", reject_connection)


def test_shipped_set_loads_offline(no_network):
    _load_natural_images.cache_clear()
    shipped = load_natural_images(size=64)
    assert len(shipped) == N_SHIPPED
    assert shipped.images.shape == (N_SHIPPED, 64, 64, 3)
    assert shipped.images.dtype == np.uint8
    assert shipped.size == 64
    assert not shipped.images.flags.writeable


def test_shipped_set_ids_sources_credits():
    shipped = load_natural_images(size=64)
    assert len(set(shipped.ids)) == N_SHIPPED
    counts = {package: sum(source.startswith(f"{package}:") for source in shipped.sources)
              for package in ("scikit-image", "psychopy", "sklearn", "matplotlib")}
    assert counts == {"scikit-image": 15, "psychopy": 18, "sklearn": 2, "matplotlib": 1}
    assert all(credit for credit in shipped.credits)
    cat = shipped.ids.index("skimage-chelsea")
    assert shipped.sources[cat] == "scikit-image: skimage.data.chelsea()"
    assert "CC0" in shipped.credits[cat]
    assert {"psychopy-face01", "psychopy-house01", "sklearn-china",
            "matplotlib-grace_hopper"} <= set(shipped.ids)


def test_shipped_images_are_distinct():
    images = load_natural_images(size=64).images.reshape(N_SHIPPED, -1).astype(np.float64)
    centred = images - images.mean(axis=1, keepdims=True)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, 0.0)
    # Measured maximum: 0.60 (two of PsychoPy's face photographs of the same man).
    assert similarity.max() < 0.8


def test_centre_crop_of_known_photo():
    import skimage.data

    shipped = load_natural_images(size=64)
    cat = shipped.images[shipped.ids.index("skimage-chelsea")]
    original = skimage.data.chelsea()  # (300, 451, 3): the crop is columns 75 to 375
    expected = np.asarray(Image.fromarray(original[:, 75:375]).resize((64, 64), Image.LANCZOS))
    np.testing.assert_array_equal(cat, expected)


def test_sources_subset_and_errors(monkeypatch):
    only_skimage = load_natural_images(size=32, sources=["skimage"])
    assert len(only_skimage) == 15
    with pytest.raises(ValueError, match=r"Unknown sources \['imagenet'\]"):
        load_natural_images(sources=("skimage", "imagenet"))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        load_natural_images(size=8)
    # A None entry in sys.modules makes find_spec report the package as not installed.
    monkeypatch.setitem(sys.modules, "psychopy", None)
    with pytest.raises(ImageSetError, match=r"needs the psychopy package.*neurosteer\[display\]"):
        load_natural_images(size=33)


def save(path, mode="RGB", size=(80, 60), **kwargs):
    rng = np.random.default_rng(len(str(path)))
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, **kwargs)


def test_folder_loads_sorted_square_crops(tmp_path):
    save(tmp_path / "b_scene.png")
    save(tmp_path / "a_face.jpg", mode="L", size=(50, 70))
    save(tmp_path / ".hidden.png", mode="RGBA")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("not read")
    folder = load_image_folder(tmp_path, size=48)
    assert folder.ids == ["a_face.jpg", "b_scene.png"]
    assert folder.images.shape == (2, 48, 48, 3)
    assert folder.images.dtype == np.uint8
    grey = folder.images[0]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_empty_or_missing_folder_rejected(tmp_path):
    with pytest.raises(ImageSetError, match="contains no image files"):
        load_image_folder(tmp_path)
    with pytest.raises(ImageSetError, match="does not exist or is not a folder"):
        load_image_folder(tmp_path / "absent")


def test_folder_problems_name_each_file(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "readme.jpg").write_text("these are the stimuli")
    save(tmp_path / "small.png", size=(40, 90))
    save(tmp_path / "alpha.png", mode="RGBA")
    save(tmp_path / "print.tif", mode="CMYK")
    frames = [Image.new("RGB", (80, 80), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "movie.gif", save_all=True, append_images=frames[1:])
    save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageSetError) as rejected:
        load_image_folder(tmp_path, size=60)
    message = str(rejected.value)
    assert message.startswith(f"6 of 8 files in {tmp_path} cannot be used as stimuli")
    assert f"{tmp_path / 'readme.jpg'} is not an image file" in message
    assert f"{tmp_path / 'small.png'} is 40 × 90 pixels; expected at least 60 × 60" in message
    assert f"{tmp_path / 'alpha.png'} has mode RGBA" in message
    assert f"{tmp_path / 'print.tif'} has mode CMYK" in message
    assert f"{tmp_path / 'movie.gif'} has 2 frames" in message
    assert f"{tmp_path / 'truncated.jpg'} cannot be read" in message
    assert "good.png" not in message
    assert "whole.jpg" not in message
