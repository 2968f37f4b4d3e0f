"""The Python API's trained-adapter side: `cachefeat.load_adapter(run)` gives back a trained adapter with
what it needs to run on cached features (the cache side is `cachefeat.open_cache`, see store.Cache).

    adapter = cachefeat.load_adapter("runs/evl")
    ds = adapter.dataset("k400_val.zarr")          # the arrays it reads, from a cache checked to fit it
    logits = adapter.logits(ds.gather(ds.rows[:8]))  # (8, classes)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters import Adapter, FeatureSpec, Needs
from ..devices import resolve_device, resolve_precision
from ..store import Cache, open_cache
from .checkpoint import adapter_from_checkpoint, check_fits, load_checkpoint
from .config import TrainError
from .coverage import check_cache_use
from .evaluate import evaluate, to_device
from .reader import CacheDataset, CachedSource


@dataclass
class TrainedAdapter:
    """A trained adapter (in eval mode), the feature space it was built for, what it reads, and the class
    names its logits index."""
    model: Adapter
    spec: FeatureSpec
    needs: Needs
    classes: list[str]
    checkpoint: dict        # the run's checkpoint: adapter name and config, training config, history, cache metadata
    path: str = ""          # where it was loaded from

    @property
    def name(self) -> str:
        return self.checkpoint["adapter"]

    def check(self, cache) -> None:
        """Refuse (CacheMismatch, one line) a cache whose features or shapes this adapter cannot use."""
        check_fits(cache.meta, self.name, self.needs, f"the cache {cache.path}",
                   trained_meta=self.checkpoint["cache_meta"], trained=self.spec)

    def dataset(self, cache, rows=None, in_memory: str = "auto"):
        """The valid clips of `cache` (a path or an open Cache) with exactly the arrays this adapter reads,
        as a torch-style Dataset (cachefeat.train.reader.CacheDataset); the cache is checked first."""
        cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.check(cache)
        return CacheDataset(cache, self.needs, rows=rows, in_memory=in_memory)

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """Logits (B, classes) for a batch of cached features: a dict of arrays or tensors with the clip axis
        first (what `dataset(...).gather(rows)` returns; pixels as the cache's uint8)."""
        device = next(self.model.parameters()).device
        x = to_device({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                       if k in ("embed", "cls", "tokens", "pixels")}, device, self.spec)
        return self.model(x).float()

    def predict(self, batch: dict, top: int = 5) -> list[list[tuple[str, float]]]:
        """Per clip: the `top` (class name, probability) pairs."""
        p = self.logits(batch).softmax(-1).cpu().numpy()
        order = np.argsort(-p, axis=1)[:, :top]
        return [[(self.classes[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]

    def evaluate(self, cache, batch_size: int = 64, device: str = "auto", precision: str = "auto",
                 in_memory: str = "auto", read_workers: int = 2, allow_incomplete: bool = False,
                 keep_logits: bool = False, progress=None, view_average: str | None = None) -> dict:
        """The multi-view test protocol on `cache` (a path or an open Cache, checked to fit first; an
        unfinished cache, or one being written, is refused unless `allow_incomplete`): top-1 and top-5 per
        video, per-class accuracy, the confusion matrix, and what was evaluated (`coverage`: the cache's
        videos, those evaluated, failed at extraction, unwritten). `keep_logits`: also the per-clip and
        per-video logits (`logits`, with the cache's video ids). `progress(n)`: called with each batch's clips.
        `view_average`: logit or prob (default: the setting the adapter was trained with, else logit)."""
        cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.check(cache)
        cov = check_cache_use(cache, allow_incomplete)
        if not cache.valid().any():
            raise TrainError(f"{cache.path} has no valid clips")
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev, gpu_auto="bf16")
        src = CachedSource(cache, self.needs, batch_size, in_memory=in_memory, workers=read_workers)
        try:
            view_average = view_average or self.checkpoint["train_config"].get("view_average", "logit")
            result = evaluate(self.model.to(dev), src, dev, prec, self.spec, cache.classes, progress, keep_logits,
                              view_average)
        finally:
            src.close()
        if keep_logits:
            ids = cache.root["videos/id"][:][result["logits"]["video"]]
            result["logits"]["video_id"] = np.array(ids.tolist(), dtype=str)   # a plain numpy string array
        ck = self.checkpoint
        return {"top1": result["top1"], "top5": result["top5"], **result, "adapter": ck["adapter"],
                "trainable_params": ck["trainable_params"], "epochs": ck["epoch"], "checkpoint": self.path,
                "cache": str(cache.path), "views": cache.views.count,
                "coverage": {"videos": cov["videos"], "evaluated": result["videos"], "failed": cov["failed"],
                             "unwritten": cov["unwritten"], "complete": cov["complete"]}}

    def to(self, device) -> TrainedAdapter:
        self.model.to(device)
        return self


def load_adapter(run: str | os.PathLike, device: str = "cpu") -> TrainedAdapter:
    """A trained adapter from a run folder written by `cachefeat train` (or one of its checkpoint folders)."""
    ck = load_checkpoint(run)
    model, spec, needs = adapter_from_checkpoint(ck)
    return TrainedAdapter(model.to(device), spec, needs, list(ck["classes"]), ck, str(run))
