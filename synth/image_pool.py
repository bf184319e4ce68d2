"""The images a vision session can show: the natural set first, then every image synthesised.

Runs in the controller process. Pure bookkeeping: ids, labels, kinds and the uint8 pixels. An
image's id is a hash of its pixels, so the same image always has the same id.
"""

from __future__ import annotations

import hashlib

import numpy as np


def image_id(image: np.ndarray) -> str:
    """Return the stable id of a uint8 image: ``i`` and the first 10 hex digits of its SHA-1."""
    image = np.ascontiguousarray(image)
    digest = hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()
    return "i" + digest[:10]


class ImagePool:
    """Images with ids, labels (the text markers carry) and kinds (``natural`` or ``synthesised``)."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.kinds: list[str] = []
        self.source = "images"
        self._index_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, image: np.ndarray, label: str, kind: str) -> int:
        """Add one uint8 image ``(H, W, 3)``; return its index. An image already present keeps its
        first index."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Images must be uint8 (H, W, 3), got {image.dtype} {image.shape}.")
        identity = image_id(image)
        if identity in self._index_of:
            return self._index_of[identity]
        image = image.copy()
        image.setflags(write=False)
        self.images.append(image)
        self.ids.append(identity)
        self.texts.append(label)
        self.kinds.append(kind)
        self._index_of[identity] = len(self.ids) - 1
        return self._index_of[identity]

    def indices_of(self, kind: str) -> np.ndarray:
        return np.array([index for index, value in enumerate(self.kinds) if value == kind], int)
