"""Features computed now instead of read from a cache: decode, sample and preprocess exactly as a cache's
metadata records, then run the frozen backbone (rebuilt from the metadata, its weights hash checked).

- `backbone_from_meta`: the cache's backbone, refused if the weights differ from those it was made with.
- `OnlineFeatures`: one video (or a batch of decoded clips) -> the arrays an adapter reads, in the cache's
  layout and storage precision. `cachefeat predict` runs it on new videos.
- `OnlineSource`: a FeatureSource over a cache's clips that never reads its features, only its clip index
  and video paths: the same plan, the same batches, computed on the fly. Training from it and from the
  cache gives the same loss trajectory (tests/test_train.py); benchmarks time one against the other.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..adapters import Needs
from ..extract.backbone import CLASS_TOKEN, Backbone, BackboneError, load_backbone
from ..extract.preprocess import Preprocessing
from ..extract.video import DecodeRequest, DecodeResult, decode_video
from ..specs import AugmentSpec, PixelSpec, SamplingSpec, TokenSpec, ViewSpec
from ..store import Cache
from .reader import FeatureSource


def backbone_from_meta(meta: dict, device: str = "auto", precision: str = "auto") -> Backbone:
    """Rebuild the backbone a cache was made with; refuse one whose weights hash differs."""
    m = meta["model"]
    seed = m.get("init_seed")
    bb = load_backbone(m["name"], m.get("pretrained", "none"), device=device, precision=precision,
                       seed=0 if seed is None else int(seed), quick_gelu=m.get("quick_gelu"),
                       cls=m.get("cls", CLASS_TOKEN))   # caches before `cls` was recorded hold the class token
    if bb.weights_sha256 != m.get("weights_sha256"):
        raise BackboneError(f"rebuilding {m['name']} (pretrained {m.get('pretrained')}) gives weights "
                            f"{bb.weights_sha256[:12]}..., but the cache was made with "
                            f"{str(m.get('weights_sha256'))[:12]}...; "
                            f"the same weights are needed (same tag or checkpoint file)")
    return bb


class OnlineFeatures:
    """The cache's per-clip feature computation, redone: `request` decodes a video as the cache did (its
    sampling, views or augmented views, preprocessing, small pixels), `extract` turns decoded clips into the
    selection's arrays, rounded to the cache's storage precision. `test_views=True` uses deterministic test
    views even for a cache of augmented training views (predict: 1 centre view)."""

    def __init__(self, meta: dict, selection: Needs, backbone: Backbone, test_views: bool = False):
        self.meta, self.selection, self.backbone = meta, selection, backbone
        self.frames = int(meta["frames"])
        self.sampling = SamplingSpec(**meta["sampling"])
        self.augment = None if test_views else AugmentSpec.from_dict(meta.get("augment"))
        if meta.get("augment") and test_views:
            self.views = ViewSpec(1, 1)
        else:
            self.views = ViewSpec(meta["views"]["temporal"], meta["views"]["spatial"])
        self.prep = Preprocessing.from_dict(meta["preprocessing"])
        self.tokens = TokenSpec.from_dict(meta["tokens"])
        self.pixels = PixelSpec(**meta["pixels"]) if selection.pixels else None
        if selection.pixels and not meta.get("pixels"):
            raise BackboneError("pixels were asked for, but the cache metadata records no --pixels setting")
        self.layers = sorted(set(selection.cls_layers) | set(selection.token_layers))
        # int8 caches read back as float16: the closest this can come to them
        self.dtype = np.float32 if meta.get("dtype") == "float32" else np.float16

    def request(self, key: int, path: str, reader: str = "auto") -> DecodeRequest:
        """`key` is the video's row in the cache: augmented views are drawn from (seed, key, view)."""
        return DecodeRequest(key, str(path), self.frames, self.sampling, self.views, self.prep, reader,
                             pixels=self.pixels, augment=self.augment)

    def decode_result(self, path: str, key: int = 0) -> DecodeResult:
        """Decode all views of one video in this process (never raises: see DecodeResult.ok)."""
        return decode_video(self.request(key, path))

    def extract(self, clips: np.ndarray, small: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Decoded clips (n, T, h, w, 3) uint8 (and their small frames (n, T*K, S, S, 3)) ->
        {embed (n,T,E), cls (n,T,L,D), tokens (n,T,L',N,D), pixels}."""
        n, T = clips.shape[:2]
        sel = self.selection
        res = {}
        if sel.embed or self.layers:
            out = self.backbone.features(torch.from_numpy(np.ascontiguousarray(clips.reshape(n * T, *clips.shape[2:]))),
                                         self.layers or [self.backbone.depth - 1],
                                         self.tokens if sel.token_layers else TokenSpec("cls"))

            def host(t):   # the cache's rounding
                return t.float().cpu().numpy().astype(self.dtype)

            if sel.embed:
                res["embed"] = host(out["embed"]).reshape(n, T, -1)
            if sel.cls_layers:
                pos = [self.layers.index(l) for l in sel.cls_layers]
                res["cls"] = host(out["cls"][:, pos]).reshape(n, T, len(pos), -1)
            if sel.token_layers:
                pos = [self.layers.index(l) for l in sel.token_layers]
                tok = host(out["tokens"][:, pos])
                res["tokens"] = tok.reshape(n, T, *tok.shape[1:])
        if sel.pixels:
            res["pixels"] = small
        return res


class OnlineSource(FeatureSource):
    """A cache's clips with their features computed on the fly (decode + frozen backbone), in the same
    plan and batches as CachedSource. Decoding runs in `decode_workers` processes, one batch ahead."""

    def __init__(self, cache: Cache, selection: Needs, batch_size: int, seed: int = 0,
                 backbone: Backbone | None = None, device: str = "auto", decode_workers: int = 0,
                 train_views: str = "one"):
        super().__init__(cache, selection, batch_size, seed, train_views)
        self.paths = cache.read("videos/path")
        self.online = OnlineFeatures(cache.meta, selection, backbone or backbone_from_meta(cache.meta, device))
        self.decode_workers = decode_workers

    def batches(self, epoch: int, train: bool) -> Iterator[dict[str, np.ndarray]]:
        from ..extract.decode_pool import DecodePool
        batches = [rows for buf in self.plan(epoch, train) for rows in buf.batches]
        last_use = {int(v): i for i, rows in enumerate(batches) for v in self.tables.video[rows]}
        with DecodePool(self.decode_workers) as pool:
            decoded: dict[int, DecodeResult] = {}
            submitted: set[int] = set()

            def submit(rows):
                for v in np.unique(self.tables.video[rows]):
                    if int(v) not in submitted:
                        submitted.add(int(v))
                        pool.submit(self.online.request(int(v), self.paths[v]))

            for i, rows in enumerate(batches):
                submit(rows)
                if i + 1 < len(batches):
                    submit(batches[i + 1])   # decode the next batch while this one runs the backbone
                need = {int(v) for v in self.tables.video[rows]}
                while not need <= decoded.keys():
                    res = pool.get()
                    if res is None:
                        raise BackboneError("the decode pool returned nothing")
                    if not res.ok:
                        raise BackboneError(f"{self.paths[res.key]}: {res.stage}: {res.error}")
                    decoded[res.key] = res
                pairs = list(zip(self.tables.video[rows], self.tables.view[rows]))
                clips = np.stack([decoded[int(v)].pixels[int(w)] for v, w in pairs])
                small = np.stack([decoded[int(v)].small[int(w)] for v, w in pairs]) if self.selection.pixels else None
                for v in need:
                    if last_use[v] == i:   # no later batch needs this video
                        decoded.pop(v)
                yield {**self.online.extract(clips, small), **self.tables(rows)}
