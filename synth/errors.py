"""Errors raised by model loading, feature extraction and encoding models."""


class ModelNotFoundError(FileNotFoundError):
    """A model given by path, hub name or embedded name that cannot be loaded without a download."""


class CacheCorruptError(RuntimeError):
    """A cache entry on disk that cannot be read back; deleting it makes it be recomputed."""
