"""The CLIP zero-shot baseline, from a cache alone: final image embeddings against class-name text
embeddings, both stored at extraction."""
from __future__ import annotations

import numpy as np

from ..store import Cache, CacheError
from .coverage import check_cache_use
from .evaluate import top_k_hits, video_logits


def zero_shot(cache: Cache, allow_incomplete: bool = False) -> dict:
    """Top-1/top-5 per video (the views' similarities averaged) over the valid, labelled videos; an
    unfinished cache, or one being written, is refused unless `allow_incomplete`. `coverage` says what
    was evaluated: the cache's videos, those evaluated, failed at extraction, unwritten."""
    model = cache.meta.get("model", {})
    if model.get("text_tower") is False:
        raise CacheError(f"zero-shot compares image with text embeddings, and {model.get('name')} has no text tower "
                         f"(an image-only model): train an adapter on {cache.path} instead")
    cov = check_cache_use(cache, allow_incomplete)
    text = cache.text_embeddings().astype(np.float32)
    text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    rows = np.flatnonzero(cache.valid())       # failed and unwritten rows hold no embedding: never read
    if len(rows) == 0:
        raise CacheError(f"{cache.path} has no valid clips")
    emb = cache.read("embed", rows).astype(np.float32)                  # (clips, T, E)
    emb /= np.maximum(np.linalg.norm(emb, axis=2, keepdims=True), 1e-12)
    sims = emb.mean(axis=1) @ text.T                                    # (clips, classes)
    _, scores, truth = video_logits(sims, cache.clip_video()[rows], cache.labels()[rows])
    labelled = truth >= 0
    if not labelled.any():
        raise CacheError(f"{cache.path} has no labelled valid videos to evaluate")
    scores, truth = scores[labelled], truth[labelled]
    n = int(labelled.sum())
    return {"top1": float(np.mean(scores.argmax(axis=1) == truth)), "top5": float(top_k_hits(scores, truth, 5).mean()),
            "videos": n, "classes": len(cache.classes),
            "coverage": {"videos": cov["videos"], "evaluated": n, "failed": cov["failed"],
                         "unwritten": cov["unwritten"], "complete": cov["complete"]}}
