"""Adapters by name: a registry you can list (`cachefeat adapters`), one module per adapter.

    probe     linear classifier on the time-averaged final embedding (frame averaging: blind to order)
    temporal  small transformer over the per-frame CLS of the last block
    evl       EVL-style decoder over all tokens of the last K blocks, with its temporal modules
    dist      DiST-style dual encoder: 3D-conv branch over cached pixels, integrated with every tapped layer
    madapter  M-adapter: per-level fusion + temporal modules, chained shallow to deep

`build(name, options, spec)` parses the options against the adapter's Config dataclass (unknown keys and
bad values are refused in one line) and constructs it for a feature space.
"""
from .base import Adapter, AdapterError, CacheMismatch, FeatureSpec, Needs
from .registry import build, get, list_adapters, make_config, register, resolve

# each module registers itself; this order is the listing order (so isort must not sort it)
from . import probe, temporal, evl, dist, madapter  # noqa: E402, F401, I001  # isort: skip

__all__ = ["Adapter", "AdapterError", "CacheMismatch", "FeatureSpec", "Needs", "build", "get", "list_adapters",
           "make_config", "register", "resolve"]
