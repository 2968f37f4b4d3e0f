"""The CLIP zero-shot baseline, from a cache alone: final image embeddings against class-name text
embeddings, both stored at extraction."""
from __future__ import annotations

import numpy as np

from ..store import Cache, CacheError


def zero_shot(cache: Cache) -> dict:
    text = cache.text_embeddings().astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    valid = cache.valid()
    labels = cache.labels()
    if not valid.any():
        raise CacheError(f"{cache.path} has no valid clips")
    emb = cache.read("embed").astype(np.float32)                       # (C, T, E)
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    sims = emb.mean(axis=1) @ text.T                                   # (C, classes)
    video = cache.clip_video()
    per_video: dict[int, list] = {}
    for row in np.flatnonzero(valid):
        per_video.setdefault(int(video[row]), []).append(sims[row])
    vids = [v for v in per_video if labels[v * cache.views.count] >= 0]
    if not vids:
        raise CacheError(f"{cache.path} has no labelled valid videos to evaluate")
    scores = np.stack([np.mean(per_video[v], axis=0) for v in vids])
    truth = np.array([labels[v * cache.views.count] for v in vids])
    order = np.argsort(-scores, axis=1)
    top1 = float(np.mean(order[:, 0] == truth))
    top5 = float(np.mean([t in o[:5] for t, o in zip(truth, order)]))
    return {"top1": top1, "top5": top5, "videos": len(vids), "classes": len(cache.classes)}
