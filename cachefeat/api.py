"""The Python API's trained-adapter side: `cachefeat.load_adapter(run)` gives back a trained adapter with
what it needs to run on cached features (the cache side is `cachefeat.open_cache`, see cache.Cache).

    adapter = cachefeat.load_adapter("runs/evl")
    ds = adapter.dataset("k400_val.zarr")          # the arrays it reads, from a cache checked to fit it
    logits = adapter.logits(ds.gather(ds.rows[:8]))  # (8, classes)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .adapters import Adapter, CacheMismatch, FeatureSpec, Needs, check_cache


@dataclass
class TrainedAdapter:
    """A trained adapter (in eval mode), the feature space it was built for, what it reads, and the class
    names its logits index."""
    model: Adapter
    spec: FeatureSpec
    needs: Needs
    classes: list[str]
    checkpoint: dict        # the run's checkpoint: adapter name and config, training config, history, cache metadata

    @property
    def name(self) -> str:
        return self.checkpoint["adapter"]

    def check(self, cache) -> None:
        """Refuse (CacheMismatch, one line) a cache whose features or shapes this adapter cannot use."""
        from .train import check_features
        check_features(self.checkpoint["cache_meta"], cache.meta, f"the cache {cache.path}")
        problems = check_cache(self.name, self.needs, cache.meta, trained=self.spec)
        if problems:
            raise CacheMismatch("; ".join(problems))

    def dataset(self, cache, rows=None, in_memory: str = "auto"):
        """The valid clips of `cache` (a path or an open Cache) with exactly the arrays this adapter reads,
        as a torch-style Dataset (cachefeat.data.CacheDataset); the cache is checked first."""
        from .cache import Cache, open_cache
        from .data import CacheDataset, Selection
        cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.check(cache)
        return CacheDataset(cache, Selection.from_needs(self.needs), rows=rows, in_memory=in_memory)

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """Logits (B, classes) for a batch of cached features: a dict of arrays or tensors with the clip axis
        first (what `dataset(...).gather(rows)` returns; pixels as the cache's uint8)."""
        from .evaluate import to_device
        device = next(self.model.parameters()).device
        x = to_device({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                       if k in ("embed", "cls", "tokens", "pixels")}, device, self.spec)
        return self.model(x).float()

    def predict(self, batch: dict, top: int = 5) -> list[list[tuple[str, float]]]:
        """Per clip: the `top` (class name, probability) pairs."""
        p = self.logits(batch).softmax(-1).cpu().numpy()
        order = np.argsort(-p, axis=1)[:, :top]
        return [[(self.classes[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]

    def to(self, device) -> "TrainedAdapter":
        self.model.to(device)
        return self


def load_adapter(run: str | os.PathLike, device: str = "cpu") -> TrainedAdapter:
    """A trained adapter from a run folder written by `cachefeat train` (or its checkpoint.pt)."""
    from .train import adapter_from_checkpoint, load_checkpoint
    ck = load_checkpoint(run)
    model, spec, needs = adapter_from_checkpoint(ck)
    return TrainedAdapter(model.to(device), spec, needs, list(ck["classes"]), ck)
