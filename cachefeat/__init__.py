"""cachefeat: extract frozen CLIP ViT features from videos once into a Zarr v3 cache, then train and
ablate video adapters on the cache without touching the backbone again.

Python API (README, "From Python"; examples/api_example.py):
    cachefeat.open_cache(path)      a cache: metadata, arrays as NumPy, a torch Dataset (cachefeat.cache.Cache)
    cachefeat.load_adapter(run)     a trained adapter that runs on cached features (cachefeat.api.TrainedAdapter)
    cachefeat.train.TrainConfig, open_run, train   training from Python (the module cachefeat.train)
Heavy modules load on first use, so the decode worker processes, which import this package, stay light
(no torch).
"""
__version__ = "0.1.0"

__all__ = ["__version__", "open_cache", "load_adapter"]

_LAZY = {"open_cache": "cache", "load_adapter": "api"}


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cachefeat' has no attribute {name!r}")
