"""Stage one: videos -> frozen backbone -> cache (`cachefeat extract`).

    plan.py         ExtractSettings; the one planner of a cache's arrays and shards (extract and --dry-run)
    manifest.py     video lists: class folders, `path label` lists, Kinetics CSV, Something-Something JSON
    video.py        decoding (decord, PyAV, frame folders), the frames of each view or fps window, timestamps
    sampling.py     which frames: uniform segments, dense strides, or fps samples cut into windows
    preprocess.py   resize, crop, augmented views, the small pixel frames
    decode_pool.py  decoder processes with a timeout per video
    fetch.py        videos in a bucket (s3:// URLs) streamed into a temporary file by the decode worker
    backbone.py     the frozen image tower (open_clip ViTs, open_clip towers with timm trunks, timm ViTs) and
                    its tapped forward; tiny.py: tiny registered members of each family (tests, demo)
    pipeline.py     decode -> forward -> write, over the shards a store has left (`extract`)
    distributed.py  the same pipeline in Ray actors, one per GPU (`extract_distributed`)

Names load on first use: decoder processes import this package and must stay light (no torch).
"""
_LAZY = {"ExtractSettings": "plan", "plan_layout": "plan", "dry_run_report": "plan",
         "extract": "pipeline", "ExtractStats": "pipeline", "extract_distributed": "distributed"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
