"""Assertions shared by several test modules."""
from __future__ import annotations

import numpy as np

from cachefeat.cache import open_cache

VOLATILE_META = ("created", "source_path")


def assert_caches_equal(a_path, b_path, features_only: bool = False) -> None:
    """Every array (and the metadata, except timestamps and paths) of two caches is identical."""
    a, b = open_cache(a_path), open_cache(b_path)
    names = list(a.layout.feature_arrays()) if features_only else a.array_names()
    assert names == b.array_names()[: len(names)]
    for name in names:
        x, y = a.read(name), b.read(name)
        assert x.shape == y.shape, name
        assert np.array_equal(x, y), f"array {name} differs"
    skip = VOLATILE_META + (("layout", "fingerprint") if features_only else ())  # sharding may differ
    ma = {k: v for k, v in a.meta.items() if k not in skip}
    mb = {k: v for k, v in b.meta.items() if k not in skip}
    assert ma == mb
