"""Stage one on Ray: one extraction worker (a Ray actor) per GPU, or per CPU slot without GPUs.

    driver (this process)                              ShardBroker actor (on the driver's node)
      plan, lock and prepare the store                   the shards to do, which worker holds which,
      one progress bar, the failures, the summary  <-->  clips done so far
      replaces a worker that dies                          ^ take() / finished() / progress()
                                                           |
    ExtractWorker actors: each builds the backbone from the same settings (and checks that its weights
    hash is the cache's), opens the store, and runs its own DecodePool and ShardExtractor over shards it
    takes from the broker one at a time, so a fast worker simply takes more.

Why the result equals a single-process extraction: a shard's contents depend only on its videos and the
settings (batches never straddle shards), every shard is written whole by the one worker holding it, and a
shard counts as done only once its `progress` flag is set after its data. A shard goes back to the queue
only when Ray reports its worker dead, and only if its flag is not set; were a "dead" worker still writing
(a partitioned node), it would write the same bytes in whole chunks, so the store ends up the same.

`extract_distributed()` runs on whatever Ray runtime `ray_runtime.ray_runtime()` gives: one already
initialised (tests), a cluster (`address`), or a local one started and stopped for the run (the CLI).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray

from ..ray_runtime import (
    WorkerError,
    death_reason,
    node_cpu_share,
    on_driver_node,
    ray_runtime,
    use_gpus,
    use_worker_settings,
    worker_resources,
    worker_settings,
)
from ..store import Cache, CacheError, open_for_writing
from ..store.bucket_writer import (
    BucketOut,
    bucket_out,
    bucket_state,
    clear_staging,
    pull,
    upload_shard,
)
from ..store.writer import StoreWriter
from .decode_pool import DecodePool
from .manifest import Manifest
from .pipeline import ExtractStats, creation_extras, stop_on_sigint
from .plan import ExtractSettings, plan


# ------------------------------------------------------------------------------------------- broker
@ray.remote(num_cpus=0)
class ShardBroker:
    """Hands out shards one at a time and remembers who holds which, so the driver can give a dead
    worker's shards to another. Progress is counted per worker so a dead worker's partial work is
    taken off the bar again."""

    def __init__(self, shards: list[int], rows: dict[int, int]):
        self.todo = deque(shards)
        self.rows = rows
        self.held: dict[int, list[int]] = defaultdict(list)
        self.done: set[int] = set()
        self.stopped = False
        self.reported: dict[int, int] = defaultdict(int)      # clips a worker reported, cumulative
        self.finished_rows: dict[int, int] = defaultdict(int)  # clips of the shards it finished

    def take(self, worker: int) -> int | None:
        if self.stopped or not self.todo:
            return None
        s = self.todo.popleft()
        self.held[worker].append(s)
        return s

    def finished(self, worker: int, shard: int) -> None:
        if shard in self.held.get(worker, []):
            self.held[worker].remove(shard)
        if shard not in self.done:
            self.done.add(shard)
            self.finished_rows[worker] += self.rows[shard]

    def progress(self, worker: int, clips: int) -> None:
        self.reported[worker] += clips

    def state(self) -> str:
        """For a worker whose queue ran dry: "work" (take again), "wait" (shards are held by others and
        may come back) or "done" (all shards done, or the run was stopped)."""
        if self.stopped or len(self.done) == len(self.rows):
            return "done"
        return "work" if self.todo else "wait"

    def release(self, worker: int) -> list[int]:
        """A worker died: forget it and return the shards it held (its partial progress is dropped)."""
        self.reported[worker] = self.finished_rows[worker]
        return self.held.pop(worker, [])

    def requeue(self, shards: list[int]) -> None:
        self.todo.extendleft(reversed(shards))  # first in line: keeps the store filling in order

    def mark_done(self, shards: list[int]) -> None:
        for s in shards:
            if s not in self.done:
                self.done.add(s)
                self.finished_rows[-1] += self.rows[s]

    def stop(self) -> None:
        self.stopped = True

    def snapshot(self) -> dict:
        partial = sum(max(0, self.reported[w] - self.finished_rows[w]) for w in self.held)
        return {"clips": sum(self.finished_rows.values()) + partial, "done": len(self.done),
                "todo": len(self.todo), "held": {w: list(s) for w, s in self.held.items() if s},
                "stopped": self.stopped}


# ------------------------------------------------------------------------------------------- worker
class WorkerSetupError(Exception):
    """A worker cannot take part (cannot see the store, builds other weights); the message says why."""


def open_store_for_worker(out, fingerprint: str, where: str, worker_id: int = 0):
    """The store as a worker opens it, with the reason in words when it cannot (the usual cause on a
    cluster: --out is on a disk only the driver's node sees). For a bucket (a BucketOut), a staging copy of
    the cache as it was made, in a folder of this worker's node."""
    if isinstance(out, BucketOut):
        staging = out.staging_dir(f"w{worker_id}")
        try:
            clear_staging(staging)
            objects, docs = bucket_state(out.location)
            pull(out.location, objects, docs, staging, shard_state=False)
            cache = Cache(staging, mode="r+")
        except CacheError as e:
            raise WorkerSetupError(f"{where} cannot stage the cache {out.url} in {staging} ({e})") from None
        if cache.meta.get("fingerprint") != fingerprint:
            raise WorkerSetupError(f"{where} finds a different cache at {out.url} (fingerprint "
                                   f"{cache.meta.get('fingerprint')} instead of {fingerprint}): written by another "
                                   f"run meanwhile?")
        return cache
    try:
        cache = Cache(out, mode="r+")
    except CacheError as e:
        raise WorkerSetupError(f"{where} cannot open the cache {out} ({e}); on a Ray cluster --out must be on "
                               f"storage every node mounts at the same path (NFS, Lustre, a shared disk)") from None
    if cache.meta.get("fingerprint") != fingerprint:
        raise WorkerSetupError(f"{where} sees a different cache at {out} (fingerprint "
                               f"{cache.meta.get('fingerprint')} instead of {fingerprint}): is {out} the same "
                               f"shared folder on every node?")
    return cache


@ray.remote
class ExtractWorker:
    """One extraction worker: its own backbone, decode processes and shard writer."""

    def __init__(self, worker_id: int, broker):
        self.id, self.broker = worker_id, broker
        self.pool = None
        self.bucket = None       # the bucket's Location when the cache is staged for one

    def setup(self, out: str, settings: ExtractSettings, device: str, fingerprint: str, weights_sha256: str,
              videos, workers: int, batch_size: int, decode_workers: int | None, decode_timeout: float,
              reader: str, preprocess: str = "auto", fsync: bool = True, bucket: dict | None = None) -> dict:
        import torch

        from .backbone import load_backbone
        from .decode_pool import DecodePool
        from .pipeline import ShardExtractor
        host, pid = socket.gethostname(), os.getpid()
        where = f"worker {self.id} on {host} (pid {pid})"
        use_worker_settings(bucket)     # the driver's bucket settings, where this node has none
        cache = open_store_for_worker(out, fingerprint, where, self.id)
        self.bucket = out.location if isinstance(out, BucketOut) else None
        bb = load_backbone(settings.model, settings.pretrained, device, settings.precision, seed=settings.seed,
                           quick_gelu=settings.quick_gelu, trust_pretrained=settings.trust_pretrained)
        if bb.weights_sha256 != weights_sha256:
            raise WorkerSetupError(f"{where} built {settings.model} with weights {bb.weights_sha256[:12]}, but the "
                                   f"cache was planned with {weights_sha256[:12]}: different weights files or "
                                   f"open_clip/torch versions on this node?")
        if bb.precision != cache.meta["compute_precision"]:
            raise WorkerSetupError(f"{where} computes in {bb.precision}, the cache in "
                                   f"{cache.meta['compute_precision']}")
        gpu = bb.device.type == "cuda"
        if decode_workers is None:
            decode_workers = max(1, node_cpu_share(gpu, workers) - 1)
        self.pool = DecodePool(decode_workers, decode_timeout)
        self.reported, self.last_flush = 0, time.monotonic()
        self.flush_lock = threading.Lock()   # the decode loop and the writer thread both flush
        self.extractor = ShardExtractor(cache, bb, videos, self.pool, batch_size, reader, preprocess=preprocess,
                                        fsync=fsync,
                                        on_progress=self._on_progress, on_shard_done=self._on_shard_done)
        name = torch.cuda.get_device_name(bb.device) if gpu else "cpu"
        return {"host": host, "pid": pid, "device": f"{bb.device} ({name})" if gpu else "cpu",
                "decode_workers": decode_workers}

    def _on_progress(self, clips: int) -> None:
        with self.flush_lock:
            self.reported += clips
        if time.monotonic() - self.last_flush > 0.3:
            self._flush()

    def _flush(self) -> None:
        with self.flush_lock:
            if self.reported:
                self.broker.progress.remote(self.id, self.reported)  # fire and forget: only for the bar
                self.reported = 0
            self.last_flush = time.monotonic()

    def _on_shard_done(self, shard: int) -> None:
        # called by the writer thread after the shard's progress flag is set (for a bucket: once it is
        # uploaded there); waited for, so the broker knows before this worker asks for more
        if self.bucket is not None:
            upload_shard(self.extractor.store, self.bucket, shard)
        self._flush()
        ray.get(self.broker.finished.remote(self.id, shard))

    def _shards(self):
        while (s := ray.get(self.broker.take.remote(self.id))) is not None:
            yield s

    def run(self) -> ExtractStats:
        """Extract shards until the broker has none left for anybody. When the queue is empty but other
        workers still hold shards, wait: a shard of a worker that dies comes back to the queue."""
        total = ExtractStats()
        try:
            while True:
                stats = self.extractor.run(self._shards())
                total.shards += stats.shards
                total.clips += stats.clips
                total.seconds += stats.seconds
                total.wait_decode_s += stats.wait_decode_s
                total.forward_s += stats.forward_s
                total.wait_write_s += stats.wait_write_s
                self._flush()
                while (state := ray.get(self.broker.state.remote())) == "wait":
                    time.sleep(0.2)
                if state == "done":
                    return total
        finally:
            self.pool.close()
            if self.bucket is not None:         # the shards are in the bucket: the staging copy goes
                clear_staging(self.extractor.store.path)


# ------------------------------------------------------------------------------------------- driver
@dataclass
class WorkerInfo:
    id: int
    actor: object = None
    state: str = "starting"           # starting, running, finished, dead
    host: str = ""
    pid: int = 0
    device: str = ""
    decode_workers: int = 0
    shards: int = 0                   # shards it wrote (known when it finishes)
    held: list = field(default_factory=list)
    error: str = ""


@dataclass
class RunState:
    """What monitor callbacks see on every poll of the driver."""
    workers: list[WorkerInfo]
    shards_total: int
    shards_done: int
    clips: int


@dataclass
class DistributedStats(ExtractStats):
    workers: list[WorkerInfo] = field(default_factory=list)
    worker_deaths: int = 0
    shards_requeued: int = 0
    replacements: int = 0
    ready_seconds: float = 0.0        # from the start of the workers until the first one took a shard


def extract_distributed(manifest: Manifest, out: str | Path, settings: ExtractSettings, workers: int = 2,
                        batch_size: int = 64, decode_workers: int | None = None, decode_timeout: float = 60.0,
                        reader: str = "auto", overwrite: bool = False, progress: bool = True, log=print,
                        address: str | None = None, max_replacements: int | None = None,
                        monitor: Callable[[RunState], None] | None = None, repair: bool = False,
                        preprocess: str = "auto", fsync: bool = True) -> DistributedStats:
    """Extract (or resume extracting) `manifest` into the cache at `out` with `workers` Ray actors.

    Uses the Ray runtime already initialised in this process, else connects to `address`, else starts a
    local one for the run. `decode_workers` is per worker (None: its share of its node's cores - 1, at most
    8). A worker that dies is replaced while shards remain, at most `max_replacements` times in all
    (default: `workers`). `monitor`, if given, is called with a RunState on every poll (about 5 per second).
    `preprocess` and `fsync` as for `pipeline.extract`.
    """
    import torch

    from ..devices import resolve_precision
    from .backbone import load_backbone
    with ray_runtime(address) as runtime:
        gpu = use_gpus(settings.device, runtime)
        device = "cuda" if gpu else "cpu"
        # the driver never runs the backbone: it builds it on CPU for the plan and the reference weights
        # hash, with the precision the workers will compute in (part of the cache's identity)
        bb = load_backbone(settings.model, settings.pretrained, "cpu", "fp32", seed=settings.seed,
                           quick_gelu=settings.quick_gelu, trust_pretrained=settings.trust_pretrained)
        bb = replace(bb, precision=resolve_precision(settings.precision, torch.device(device), gpu_auto="fp16"))
        p = plan(settings, manifest, bb)
        weights_sha256 = bb.weights_sha256

        def extras():  # computed once, here, before any worker starts (text embeddings, int8 steps)
            with DecodePool(1, decode_timeout) as pool:
                return creation_extras(p, bb, pool, batch_size, reader, log)

        out = bucket_out(out) or Path(out).resolve()
        with open_for_writing(out, p.meta, p.layout, manifest.videos, settings.codec, overwrite, repair,
                              extras=extras, log=log, timeline=p.timeline.arrays() if p.timeline else None) as store:
            bb = None    # the driver's copy is not needed any more: free it before the workers start
            if not store.todo:
                return DistributedStats()
            # workers decode by absolute path: their working directory is not the driver's (URLs stay URLs)
            videos = [replace(v, path=v.path if v.path.startswith("s3://") else os.path.abspath(v.path))
                      for v in manifest.videos]
            driver = _Driver(store, log, progress, monitor)
            n = min(workers, len(store.todo))
            if n < workers:
                log(f"{len(store.todo)} shard{'s' * (len(store.todo) != 1)} to write: starting {n} "
                    f"worker{'s' * (n != 1)}, not {workers} (--shard-size sets the clips per shard)")
            cap = runtime.gpus if gpu else runtime.cpus
            if n > cap:
                log(f"{n} workers asked for, but the cluster has {cap:g} {'GPUs' if gpu else 'CPUs'}: "
                    f"the others start when resources free up")
            bucket = isinstance(out, BucketOut)
            setup_args = (out if bucket else str(out), settings, device, store.meta["fingerprint"], weights_sha256,
                          ray.put(videos), n, batch_size, decode_workers, decode_timeout, reader, preprocess,
                          fsync, worker_settings() if bucket or any(v.path.startswith("s3://") for v in videos)
                          else None)
            return driver.run(n, worker_resources(gpu), setup_args,
                              n if max_replacements is None else max_replacements)


# what Ray raises when a worker's process or node is gone (as opposed to an error raised by our code)
_DEATHS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
           ray.exceptions.OutOfMemoryError, ray.exceptions.LocalRayletDiedError)


class _Driver:
    """Starts the workers, watches them, moves a dead worker's shards back to the queue, shows progress."""

    POLL = 0.2

    def __init__(self, store: StoreWriter, log, progress: bool, monitor):
        # what is done is what the store says: the folder, or for a bucket the bucket (store.view())
        self.store, self.layout, self.todo, self.log, self.monitor = store, store.layout, store.todo, log, monitor
        rows = {s: len(self.layout.shard_rows_range(s)) for s in self.todo}
        self.broker = ShardBroker.options(**on_driver_node()).remote(self.todo, rows)
        self.workers: dict[int, WorkerInfo] = {}
        self.pending: dict = {}          # ObjectRef -> (worker id, "setup" | "run")
        self.stats = DistributedStats()
        from tqdm import tqdm
        self.bar = tqdm(total=sum(rows.values()), unit="clip", desc="extract", disable=not progress,
                        dynamic_ncols=True)
        self.shown = 0

    def say(self, message: str) -> None:
        """A line for the user, above the progress bar when there is one."""
        self.log(message) if self.bar.disable else self.bar.write(message)

    def start_worker(self, resources: dict, setup_args: tuple) -> None:
        wid = len(self.workers)
        actor = ExtractWorker.options(**resources).remote(wid, self.broker)
        self.workers[wid] = WorkerInfo(wid, actor)
        self.pending[actor.setup.remote(*setup_args)] = (wid, "setup")
        self.stats.workers.append(self.workers[wid])

    def run(self, n: int, resources: dict, setup_args: tuple, replacements: int) -> DistributedStats:
        self.t0 = t0 = time.perf_counter()
        for _ in range(n):
            self.start_worker(resources, setup_args)

        def request_stop():
            self.stats.interrupted = True
            self.broker.stop.remote()

        try:
            with stop_on_sigint(request_stop, self.say, "the shards in flight on every worker"):
                self._watch(resources, setup_args, replacements)
        finally:
            self.bar.close()
            for w in self.workers.values():
                ray.kill(w.actor)        # frees GPUs at once; also any still waiting for resources
            ray.kill(self.broker)
        return self._summary(time.perf_counter() - t0)

    def _watch(self, resources: dict, setup_args: tuple, replacements: int) -> None:
        """Poll until every shard is written (or the run stops), replacing dead workers."""
        while True:
            ready = []
            if self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=self.POLL)
            else:
                time.sleep(self.POLL)
            for ref in ready:
                self._collect(ref, resources, setup_args, replacements)
            snap = ray.get(self.broker.snapshot.remote())
            for w in self.workers.values():
                w.held = snap["held"].get(w.id, [])
            self._show(snap)
            if self.monitor:
                self.monitor(RunState(list(self.workers.values()), len(self.todo), snap["done"], snap["clips"]))
            busy = [w for w in self.workers.values() if w.state in ("starting", "running")]
            if snap["done"] == len(self.todo) or snap["stopped"]:
                # all written (or stopping): wait for the workers that run; never for one still
                # waiting for resources or loading its model
                if not any(w.state == "running" for w in busy):
                    break
            elif not busy:
                left = len(self.todo) - snap["done"]
                raise WorkerError(f"every worker died and the {replacements} replacements are used up; "
                                  f"{left} shards left (last error: {self._last_error()}); run the same "
                                  f"command again to resume")

    def _collect(self, ref, resources, setup_args, replacements) -> None:
        wid, what = self.pending.pop(ref)
        w = self.workers[wid]
        try:
            result = ray.get(ref)
        except _DEATHS as e:
            self._on_death(w, e)
            if self._shards_left() and self.stats.replacements < replacements:
                self.stats.replacements += 1
                self.start_worker(resources, setup_args)
            return
        except ray.exceptions.RayError as e:  # raised by our code, or Ray cannot place/set up the worker
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, WorkerSetupError):
                raise WorkerError(str(cause)) from None
            where = f"worker {wid}" + (f" on {w.host} (pid {w.pid})" if w.host else "")
            first = (str(cause).strip().splitlines() or [""])[0]
            raise WorkerError(f"{where} failed: {type(cause).__name__}: {first}") from None
        if what == "setup":
            w.host, w.pid, w.device, w.decode_workers = (result["host"], result["pid"], result["device"],
                                                          result["decode_workers"])
            if not any(x.state == "running" for x in self.workers.values()) and not self.shown:
                self.bar.reset()     # clips/s and the ETA count from the first worker ready, not from startup
                self.stats.ready_seconds = time.perf_counter() - self.t0
            w.state = "running"
            self.pending[w.actor.run.remote()] = (wid, "run")
        else:
            w.state, w.shards = "finished", result.shards

    def _on_death(self, w: WorkerInfo, err: BaseException) -> None:
        w.state, w.error = "dead", death_reason(err)
        self.stats.worker_deaths += 1
        ray.kill(w.actor, no_restart=True)     # make sure: a worker only "unavailable" must not write on
        held = ray.get(self.broker.release.remote(w.id))
        flags = self.store.view().shard_done()     # the store decides: a flagged shard is complete
        redo = [s for s in held if not flags[s]]
        self.broker.requeue.remote(redo)
        self.broker.mark_done.remote([s for s in held if flags[s]])
        self.stats.shards_requeued += len(redo)
        where = f" on {w.host} (pid {w.pid})" if w.host else ""
        self.say(f"worker {w.id}{where} died ({w.error}); "
                       f"{len(redo)} unfinished shard{'s' * (len(redo) != 1)} back in the queue")

    def _shards_left(self) -> bool:
        return ray.get(self.broker.state.remote()) != "done"

    def _last_error(self) -> str:
        errs = [w.error for w in self.workers.values() if w.error]
        return errs[-1] if errs else "none recorded"

    def _show(self, snap: dict) -> None:
        delta = snap["clips"] - self.shown
        if delta:
            self.bar.update(delta)   # negative after a death: that worker's partial shards are redone
            self.shown = snap["clips"]
        if snap["done"] < len(self.todo):
            running = sum(w.state == "running" for w in self.workers.values())
            self.bar.set_postfix_str(f"{running} workers", refresh=False)

    def _summary(self, seconds: float) -> DistributedStats:
        """Counts and failures read back from the store for the shards this run had to do: exact even when
        a worker died before it could report."""
        cache = self.store.view()
        done = cache.shard_done()
        lay = self.layout
        ran = [s for s in self.todo if done[s]]
        rows = np.zeros(lay.num_clips, bool)
        vids = np.zeros(lay.num_videos, bool)
        for s in ran:
            r, v = lay.shard_rows_range(s), lay.shard_videos_range(s)
            rows[r.start:r.stop] = True
            vids[v.start:v.stop] = True
        valid = cache.read("clips/valid") & rows
        if lay.windowed:   # a video of the shards run: any of its rows in them
            vids[:] = False
            vids[lay.clip_video()[rows]] = True
        failed = {f["video"]: f"{f['stage']}: {f['error']}" for f in cache.failures()}
        bad = [v for v in sorted(failed) if vids[v]]
        st = self.stats
        st.shards, st.clips = len(ran), int(valid.sum())
        st.frames = (int(cache.read("clips/valid_frames")[valid].sum()) if lay.windowed
                     else st.clips * lay.frames)
        st.failed_videos = len(bad)
        st.failures = [(int(v), failed[v]) for v in bad]
        st.seconds = seconds
        st.interrupted = st.interrupted and len(ran) < len(self.todo)
        return st
