"""End-to-end inference on new videos with a trained adapter: the backbone, frame sampling and
preprocessing that made its training cache (all recorded in the checkpoint), then the adapter; the logits
of the views are averaged, as in evaluation."""
from __future__ import annotations

import numpy as np
import torch

from ..devices import autocast, resolve_precision
from .checkpoint import adapter_from_checkpoint
from .evaluate import to_device
from .online import OnlineFeatures, backbone_from_meta


def predict(ck: dict, videos: list[str], device: str = "auto", precision: str = "auto", top: int = 5,
            decode_workers: int = 1, decode_timeout: float = 60.0, progress=None) -> list[dict]:
    """One result per video: {"video", "top": [{"class", "index", "probability"}], "views"} or {"video", "error"}.
    Videos are decoded as extract decodes them: in `decode_workers` processes (0 = in this process, no
    timeout), a video that takes longer than `decode_timeout` seconds (a hung decoder, a FIFO) failing.
    `progress(1)` is called after each video."""
    from ..extract.decode_pool import DecodePool
    model, spec, needs = adapter_from_checkpoint(ck)
    meta = ck["cache_meta"]
    backbone = backbone_from_meta(meta, device=device)
    dev = backbone.device
    prec = resolve_precision(precision, dev, gpu_auto="bf16")
    model.to(dev)
    # the cache's test views; a cache of random training views has no test protocol to repeat: centre view
    online = OnlineFeatures(meta, needs, backbone, test_views=True)
    classes = list(ck["classes"])
    results = []
    with DecodePool(decode_workers, decode_timeout) as pool:
        for i, res in enumerate(_decoded_in_order(pool, online, videos, ahead=max(2, 2 * decode_workers))):
            results.append(_predict_one(model, spec, online, res, videos[i], classes, dev, prec, top))
            if progress is not None:
                progress(1)
    return results


def _decoded_in_order(pool, online: OnlineFeatures, videos: list[str], ahead: int):
    """The decoded videos in order, the pool decoding up to `ahead` of them at a time."""
    pending, submitted = {}, 0
    for i in range(len(videos)):
        while submitted < len(videos) and submitted < i + ahead:
            pool.submit(online.request(submitted, videos[submitted]))
            submitted += 1
        while i not in pending:
            res = pool.get()
            pending[res.key] = res
        yield pending.pop(i)


def _predict_one(model, spec, online, res, path, classes, dev, prec, top) -> dict:
    if not res.ok:
        return {"video": str(path), "error": f"{res.stage}: {res.error}"}
    x = to_device(online.extract(res.pixels, res.small), dev, spec)    # the views are the batch
    with torch.no_grad(), autocast(dev, prec):
        logits = model(x).float().mean(dim=0)
    prob = torch.softmax(logits, dim=-1).cpu().numpy()
    order = np.argsort(-prob)[: min(top, len(classes))]
    return {"video": str(path), "views": int(res.pixels.shape[0]),
            "top": [{"class": classes[j], "index": int(j), "probability": float(prob[j])} for j in order]}
