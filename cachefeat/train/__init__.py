"""Stage two: adapters trained, evaluated and compared on cached features, never touching the backbone.

    config.py       TrainConfig: every setting with its default (the CLI takes its defaults from here)
    reader.py       the arrays an adapter reads, in RAM or streamed by reader processes; open_dataset
    loop.py         open_run (caches checked, adapter resolved) and train (the loop, top to bottom)
    checkpoint.py   the checkpoint format; check_fits, the one "does this cache fit this adapter" check
    runs.py         run folders: resume, replace or refuse; compare
    coverage.py     check_cache_use: unfinished / being-written caches refused unless allowed; what was used
    evaluate.py     the multi-view protocol, per-class accuracy, confusion matrix
    predict.py      new videos end to end (backbone rebuilt from the checkpoint)
    online.py       the same batches computed from the videos (the equivalence that justifies the cache)
    trained.py      load_adapter: a trained adapter for the Python API
    zeroshot.py     CLIP zero-shot from cached embeddings
    ablate.py       many configurations side by side (Ray Tune)
    distributed.py  data-parallel training (Ray Train)

Names load on first use, so that reading TrainConfig's defaults (the CLI does at start) imports no torch.
"""
_LAZY = {
    "adapter_from_checkpoint": "checkpoint", "check_fits": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "TrainConfig": "config", "TrainDiverged": "config", "TrainError": "config", "read_config_file": "config",
    "Part": "loop", "Run": "loop", "cpu_threads": "loop", "lr_at": "loop", "mix": "loop", "open_run": "loop",
    "param_groups": "loop", "train": "loop",
    "CacheDataset": "reader", "CachedSource": "reader", "open_dataset": "reader",
    "RunFolder": "runs", "compare_runs": "runs", "open_run_folder": "runs",
    "TrainedAdapter": "trained", "load_adapter": "trained",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
