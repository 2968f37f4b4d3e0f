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
            progress=None) -> list[dict]:
    """One result per video: {"video", "top": [{"class", "index", "probability"}], "views"} or {"video", "error"}.
    `progress(1)` is called after each video."""
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
    for i, path in enumerate(videos):
        if i and progress is not None:
            progress(1)
        res = online.decode_result(path, i)
        if not res.ok:
            results.append({"video": str(path), "error": f"{res.stage}: {res.error}"})
            continue
        x = to_device(online.extract(res.pixels, res.small), dev, spec)    # the views are the batch
        with torch.no_grad(), autocast(dev, prec):
            logits = model(x).float().mean(dim=0)
        prob = torch.softmax(logits, dim=-1).cpu().numpy()
        order = np.argsort(-prob)[: min(top, len(classes))]
        results.append({"video": str(path), "views": int(res.pixels.shape[0]),
                        "top": [{"class": classes[j], "index": int(j), "probability": float(prob[j])} for j in order]})
    if videos and progress is not None:
        progress(1)
    return results
