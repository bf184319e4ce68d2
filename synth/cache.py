"""On-disk cache of feature vectors, keyed by model identity, layer, pooling, dtype and text.

Runs in the controller and benchmark processes. Each key set (one model, layer, pooling and dtype)
is a folder of ``.npz`` shards written atomically (temporary file, then rename), so a crash never
leaves a half-written shard. Lookups read every shard of the folder once; fine for pools up to a few
hundred thousand sentences.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np

from synth.errors import CacheCorruptError

logger = logging.getLogger(__name__)


def text_key(text: str) -> str:
    """Return the cache key of one text (SHA-1 of its UTF-8 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class FeatureCache:
    """Feature vectors of one (model, layer, pooling, dtype) combination."""

    def __init__(self, root: Path, model_identity: str, layer: int, pooling: str, dtype: str) -> None:
        spec = {"model": model_identity, "layer": layer, "pooling": pooling, "dtype": dtype}
        digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root) / digest
        self.folder.mkdir(parents=True, exist_ok=True)
        spec_path = self.folder / "spec.json"
        if not spec_path.exists():
            spec_path.write_text(json.dumps(spec, indent=2))
        self._rows: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._rows is not None:
            return self._rows
        rows: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as content:
                    keys, features = content["keys"], content["features"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
                raise CacheCorruptError(
                    f"Feature cache shard {shard} cannot be read ({err}). Delete that file; its "
                    "features will be computed again on the next run."
                ) from err
            if features.ndim != 2 or len(keys) != len(features):
                raise CacheCorruptError(
                    f"Feature cache shard {shard} has {len(keys)} keys for features of shape "
                    f"{features.shape}. Delete that file; its features will be computed again."
                )
            rows.update(zip(keys.tolist(), features, strict=True))
        self._rows = rows
        return rows

    def lookup(self, texts: list[str]) -> tuple[dict[int, np.ndarray], list[int]]:
        """Return the cached vectors by position in ``texts``, and the positions that are missing."""
        rows = self._load()
        found, missing = {}, []
        for index, text in enumerate(texts):
            vector = rows.get(text_key(text))
            if vector is None:
                missing.append(index)
            else:
                found[index] = vector
        return found, missing

    def store(self, texts: list[str], features: np.ndarray) -> None:
        """Write one new shard with these texts' feature vectors, ``(n_texts, n_features)``."""
        if len(texts) == 0:
            return
        keys = np.array([text_key(text) for text in texts])
        final = self.folder / f"{uuid.uuid4().hex}.npz"
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            np.savez(handle, keys=keys, features=features.astype(np.float32))
        os.replace(temporary, final)
        rows = self._load()
        rows.update(zip(keys.tolist(), features.astype(np.float32), strict=True))
