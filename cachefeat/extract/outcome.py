"""Did an extraction succeed? The verdict `extract` turns into its exit status: a cache with no valid clip
is a failed run (almost always a wrong path or --video-root, which the message says), and so is one where
more videos failed than the caller's budget (`--max-failed-fraction`)."""
from __future__ import annotations

from ..store import Cache


def failure_verdict(cache: Cache, max_failed_fraction: float = 1.0, video_root: str | None = None) -> str | None:
    """None when the finished cache is acceptable, else the one-line reason it is not."""
    failures = cache.failures()
    videos = cache.num_videos
    first = f"the first: {failures[0]['path']}: {failures[0]['error']}" if failures else ""
    if not cache.valid().any():
        if failures and all(f["stage"] == "fetch" for f in failures):   # videos in a bucket, none fetched
            return (f"no valid clips: {len(failures)} of {videos} videos failed to fetch ({first}); check the "
                    f"bucket's URL, the AWS_* settings and that the server is up (docs/object-storage.md)")
        root = video_root or cache.meta.get("source_path", "")
        where = (f"--video-root {video_root}" if video_root
                 else f"the manifest's folder{f' ({_parent(root)})' if root else ''}")
        return (f"no valid clips: {len(failures)} of {videos} videos failed" + (f" ({first})" if first else "")
                + f"; are the paths right? Relative paths are looked up under {where}: check --video-root "
                  f"(cachefeat info {cache.path} --failures lists every failure)")
    if failures and len(failures) > max_failed_fraction * videos:
        return (f"{len(failures)} of {videos} videos failed ({100 * len(failures) / videos:.1f}%, more than "
                f"--max-failed-fraction {max_failed_fraction:g}; {first}); the cache is kept: "
                f"cachefeat info {cache.path} --failures lists them")
    return None


def _parent(path: str) -> str:
    from pathlib import Path
    p = Path(path)
    return str(p if p.is_dir() else p.parent)
