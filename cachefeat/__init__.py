"""cachefeat: extract frozen CLIP ViT features from videos once into a Zarr v3 cache, then train and
ablate video adapters on the cache without touching the backbone again.

Python API: `cachefeat.open_cache(path)` (see cachefeat.cache.Cache). Heavy modules load on first use, so
the decode worker processes, which import this package, stay light (no torch).
"""
__version__ = "0.1.0"

__all__ = ["__version__", "open_cache"]


def __getattr__(name):
    if name == "open_cache":
        from .cache import open_cache
        return open_cache
    raise AttributeError(f"module 'cachefeat' has no attribute {name!r}")
