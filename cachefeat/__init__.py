"""cachefeat: extract frozen CLIP ViT features from videos once into a Zarr v3 cache, then train and
ablate video adapters on the cache without touching the backbone again.

The package shows the design: cachefeat.store (the cache), cachefeat.extract (stage one),
cachefeat.train (stage two), cachefeat.adapters, and the thin command line in cachefeat.cli.

Python API (docs/python-api.md; examples/api_example.py):
    cachefeat.open_cache(path)      a cache: metadata, arrays as NumPy (cachefeat.store.Cache)
    cachefeat.open_dataset(cache, cls_layers=..., token_layers=...)   a torch Dataset of chosen arrays
    cachefeat.load_adapter(run)     a trained adapter that runs on cached features (cachefeat.train.TrainedAdapter)
    cachefeat.train.TrainConfig, open_run, train   training from Python
Heavy modules load on first use, so the decode worker processes, which import this package, stay light
(no torch).
"""
__version__ = "0.1.0"

__all__ = ["__version__", "open_cache", "open_dataset", "load_adapter"]

_LAZY = {"open_cache": "store", "open_dataset": "train.reader", "load_adapter": "train.trained"}


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cachefeat' has no attribute {name!r}")
