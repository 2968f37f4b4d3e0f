"""`cachefeat train --workers N`: data-parallel training through Ray Train.

The driver (the `cachefeat train` process) has already checked the settings and the caches as a single
run does; it then starts a `TorchTrainer` with N workers (one GPU each with nccl, or one CPU slot each with
gloo). Every worker runs the same code as a single-process run, `train.open_run` then `train.train`, with
its `Part` (rank, world): it reads only its slice of every global batch (DistributedSampler's split), DDP
averages the gradients, and rank 0 validates and writes the run folder in the single-process format, so
`cachefeat eval --checkpoint` and `--resume` work on it. Rank 0's epoch lines come back to the driver
through a Ray queue (the workers' own output stays in Ray's logs).

On a cluster, --out must be on storage that every node sees at the same path; so must the caches, unless they
are in a bucket (s3:// URLs), which every worker reads itself with the driver's AWS_* settings and, with
--local-cache, a local copy of the fetched shards on its own node (store.remote.worker_settings).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from ..ray_runtime import (
    ClusterError,
    WorkerError,
    on_driver_node,
    ray_runtime,
    use_gpus,
    use_worker_settings,
    worker_settings,
)
from ..store.remote import absolute, is_remote
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .loop import Part, cpu_threads, open_run, train


def train_distributed(cfg: TrainConfig, cache: str, val_cache: str | None, out: str, resume: bool, workers: int,
                      address: str | None = None, log=print, allow_incomplete: bool = False,
                      before_start=None) -> dict:
    """Train with `workers` Ray Train workers; returns rank 0's summary (also written to out/summary.json).
    `allow_incomplete`: train on the finished shards of an unfinished cache (see coverage.check_cache_use).
    `before_start()`: called once the cluster is joined and found able to run the workers, before they
    start (the CLI clears a run folder being replaced there, so a refused cluster deletes nothing)."""
    import ray
    from ray.util.queue import Queue

    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ClusterError(f"--device {cfg.device}: with --workers each worker gets its own GPU from Ray; "
                           f"use auto, cuda or cpu")
    with ray_runtime(address) as rt:
        gpu = use_gpus(cfg.device, rt)
        if gpu and rt.gpus < workers:
            raise ClusterError(f"--workers {workers}: the Ray cluster has {rt.gpus:g} GPUs, and data-parallel "
                               f"workers all run at once, one GPU each (fewer workers, or --device cpu)")
        if not gpu and rt.cpus < workers:
            raise ClusterError(f"--workers {workers}: the Ray cluster has {rt.cpus:g} CPU slots (one per worker "
                               f"is needed without GPUs)")
        if before_start is not None:
            before_start()
        _quiet_ray_train()
        queue = Queue(actor_options={"num_cpus": 0, **on_driver_node()})
        in_bucket = any(is_remote(c) for c in (cache, val_cache))
        config = {"cfg": replace(cfg, device="cuda" if gpu else "cpu").to_dict(), "cache": absolute(cache),
                  "val_cache": absolute(val_cache) if val_cache else None, "out": str(Path(out).resolve()),
                  "resume": resume, "queue": queue, "threads": cfg.threads,
                  "allow_incomplete": allow_incomplete, "bucket": worker_settings() if in_bucket else None}
        storage = tempfile.mkdtemp(prefix="cachefeat-train-")
        box: dict = {}

        def fit():
            try:
                box["result"] = _trainer(config, workers, gpu, storage).fit()
            except BaseException as e:   # noqa: BLE001 (reported by the driver below)
                box["error"] = e
            finally:
                queue.put(_DONE_MARK)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        try:
            while True:
                try:
                    line = queue.get()
                except (ray.exceptions.RayError, ConnectionError) as e:   # the cluster went away under us
                    raise WorkerError(f"distributed training failed: the Ray cluster stopped answering "
                                      f"({_reason(e)})") from None
                if line == _DONE_MARK:
                    break
                log(line)
            thread.join()
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        if "error" in box:
            raise WorkerError(f"distributed training failed: {_reason(box['error'])}") from box["error"]
    return json.loads((Path(out) / "summary.json").read_text())


_DONE_MARK = "\x00cachefeat-train-done"


def _trainer(config: dict, workers: int, gpu: bool, storage: str):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    return TorchTrainer(
        _worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name="cachefeat-train", storage_path=storage))


def _worker(config: dict) -> None:
    """One Ray Train worker: the single-process training code with this worker's part."""
    import ray.train
    import ray.train.torch
    use_worker_settings(config["bucket"])
    ctx = ray.train.get_context()
    part = Part(ctx.get_world_rank(), ctx.get_world_size())
    device = ray.train.torch.get_device()
    cfg = TrainConfig(**{**config["cfg"], "device": str(device)})
    queue = config["queue"]
    main = part.rank == 0
    # only rank 0 validates, so only it opens the val cache
    run = open_run(cfg, config["cache"], config["val_cache"] if main else None, config["allow_incomplete"])
    if main:
        Path(config["out"]).mkdir(parents=True, exist_ok=True)
    resume = load_checkpoint(config["out"]) if config["resume"] else None
    log = queue.put if main else (lambda s: None)
    threads = config["threads"] or 1   # one CPU slot per worker
    with cpu_threads(threads):
        train(run, config["out"], resume=resume, log=log, part=part)


def _reason(err: BaseException) -> str:
    """One line from Ray Train's error: the worker's own exception where there is one."""
    from ..ray_runtime import error_line
    return error_line(err)


def _quiet_ray_train() -> None:
    for name in ("ray.train", "ray.tune", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
