"""Stage one's I/O path against its ceilings, measured side by side at steady state (no GPU needed).

    raw write        the same bytes as the writer's, written to the same folder with plain os.write and
                     fsync (as the writer does before a shard counts), through the page cache and around it
                     (O_DIRECT from an aligned copy): the faster of the two is the disk's limit
    writer alone     cachefeat's shard writer (store.write_shard) on shards of a token cache, default codec,
                     fsync on (the default); also without fsync against a raw write without it (what the
                     page cache takes), and with zstd:3, for comparison
    decoders alone   the decode worker processes on the synthetic videos, nothing else running
    free backbone    the whole pipeline (decode -> forward -> write) with a backbone stand-in that costs nothing
                     and emits float32 features of the real model's shapes: the I/O path's own ceiling

    writer_efficiency     = writer MiB/s / raw write MiB/s                               (goal >= 0.8)
    io_ceiling_efficiency = free-backbone frames/s / min(decoders alone, writer alone)   (goal >= 0.8)

Each ceiling runs for `seconds` after a warm-up, looping its inputs. Writer and raw writes alternate shard
by shard, so drift hits both alike, and the rounds before files start being deleted (fresh pages for every
file, not the steady state) are not counted. The decoders alone and the free-backbone pipeline alternate
in ROUNDS rounds on the same decode processes. The pipeline is timed from the first shard it finishes in a
round to its last, counting the frames of the shards after the first: its filling up is left out, and
what the decoders are ahead when the first shard is written they lack while the last one is, so this is
the steady rate (the whole run's time would also count filling and draining, which the decoders' ceiling
does not). The model geometry is ViT-B/16's (12 blocks, 196 patch tokens, width 768) with
`--layers last:4 --tokens all`, what EVL-style caches hold; the weights are never used.
"""
from __future__ import annotations

import mmap
import os
import shutil
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from cachefeat.extract.backbone import Backbone, load_backbone
from cachefeat.extract.decode_pool import DEPTH, DecodePool, default_workers
from cachefeat.extract.manifest import Manifest, VideoEntry, load_manifest
from cachefeat.extract.pipeline import ShardExtractor
from cachefeat.extract.plan import ExtractSettings, plan
from cachefeat.extract.video import DecodeRequest
from cachefeat.specs import SamplingSpec, ViewSpec
from cachefeat.store import DEFAULT_CODEC, ShardData, open_for_writing, write_shard
from cachefeat.store.shard_file import DIRECT_ALIGN, fsync_dir

from common import TINY, WORK, Mode, synth_data

MODEL, LAYERS, TOKENS = "ViT-B/16", "last:4", "all"
GOAL = 0.8


class FreeBackbone(Backbone):
    """The real backbone's description and preprocessing, with a forward that costs nothing: it hands back
    preallocated float32 features of the real shapes (what a CPU forward returns), so the pipeline around
    it is all that is measured."""

    def features(self, pixels, layers, tokens):
        n = len(pixels)
        if not hasattr(self, "_out") or self._out["cls"].shape[0] < n:
            g = torch.Generator().manual_seed(0)
            size = max(n, 64)
            self._out = {"cls": torch.randn(size, len(layers), self.width, generator=g),
                         "embed": torch.randn(size, self.embed_dim, generator=g)}
            if tokens.kind != "cls":
                self._out["tokens"] = torch.randn(size, len(layers), tokens.num_patch_tokens, self.width,
                                                  generator=g)
        return {k: v[:n] for k, v in self._out.items()}


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'codec',
    'raw_write_mib_s',
    'writer_mib_s',
    'writer_efficiency',
    'limiting_side',
    'decoders_frames_per_s',
    'writer_frames_per_s',
    'free_backbone_frames_per_s',
    'io_ceiling_efficiency',
    'shard_clips',
    'free_backbone_round_efficiencies',
    'free_backbone_cpu_ms_per_frame',
    'cores',
)


def run(mode: Mode, log=print, seconds: float | None = None) -> dict:
    seconds = seconds or (30.0 if mode.full else 0.3 if mode.smoke else 15.0)
    data = synth_data("extract-data-32" if mode.smoke else "extract-data-96", classes=6, videos_per_class=4,
                      size=32 if mode.smoke else 96)
    videos = load_manifest(data / "train.txt", classes=str(data / "classes.txt")).videos
    # smoke: the tiny ViT's shapes in shards of 8 clips (ViT-B/16's shards are 148 MiB each)
    model, shard = (TINY, {"shard_size": 8}) if mode.smoke else (MODEL, {})
    real = load_backbone(model, "none", "cpu")
    bb = FreeBackbone(**{f: getattr(real, f) for f in real.__dataclass_fields__})
    settings = ExtractSettings(model=model, layers=LAYERS, tokens=TOKENS, frames=mode.frames, text=False,
                               codec=DEFAULT_CODEC, **shard)
    workers = default_workers() if not mode.full else mode.decode_workers
    out = {"model": model, "layers": LAYERS, "tokens": TOKENS, "codec": DEFAULT_CODEC, "seconds": seconds,
           "decode_workers": workers, "frames_per_clip": mode.frames}

    # the writer and the disk, on shards of this layout
    folder = WORK / "io"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    p = plan(settings, _manifest(videos, 256), bb)
    frame_bytes = sum(p.layout.bytes_per_clip().values()) / p.layout.frames
    out["bytes_per_frame"] = frame_bytes
    out["shard_clips"] = p.layout.shard_rows
    log(f"[io] {model} layers {LAYERS} tokens {TOKENS}: {frame_bytes / 2 ** 20:.2f} MiB per frame, shards of "
        f"{p.layout.shard_rows} clips, codec {DEFAULT_CODEC}, {seconds:.0f} s per ceiling")
    variants = ((DEFAULT_CODEC, True, ""), (DEFAULT_CODEC, False, "_no_fsync"), ("zstd:3", True, "_zstd3"))
    for codec, fsync, key in variants:
        rates = _writer_and_raw(folder, replace(settings, codec=codec), p, seconds / 2, fsync,
                                room=100 if mode.smoke else 1000)
        writer, raw = rates["writer"], max(v for k, v in rates.items() if k != "writer")
        out[f"writer_mib_s{key}"], out[f"raw_write_mib_s{key}"] = writer, raw
        out[f"raw_write_buffered_mib_s{key}"] = rates["raw"]
        if "raw_direct" in rates:
            out[f"raw_write_direct_mib_s{key}"] = rates["raw_direct"]
        out[f"writer_efficiency{key}"] = writer / raw
        how = (f"the faster of buffered {rates['raw']:.0f} and O_DIRECT {rates['raw_direct']:.0f}"
               if "raw_direct" in rates else "buffered")
        log(f"  codec {codec}, fsync {'on' if fsync else 'off'}: writer alone {writer:.0f} MiB/s, raw write of the "
            f"same bytes {raw:.0f} MiB/s ({how}): writer efficiency {writer / raw:.2f}")
    shard_mib = p.layout.shard_rows * p.layout.frames * frame_bytes / 2 ** 20
    out["fsync_seconds_per_shard"] = shard_mib / out["writer_mib_s"] - shard_mib / out["writer_mib_s_no_fsync"]
    log(f"  fsync costs {out['fsync_seconds_per_shard']:.2f} s per shard of {shard_mib:.0f} MiB "
        f"(writer {out['writer_mib_s']:.0f} vs {out['writer_mib_s_no_fsync']:.0f} MiB/s without)")
    writer_fps = out["writer_mib_s"] * 2 ** 20 / frame_bytes

    # the decoders alone and the whole pipeline with the free backbone, in alternating rounds
    free = _decoders_and_pipeline(folder, videos, bb, settings, workers, seconds, log)
    decode_fps = free["decoders_frames_per_s"]
    ceiling = min(decode_fps, writer_fps)
    out.update({"decoders_frames_per_s": decode_fps, "writer_frames_per_s": writer_fps,
                "free_backbone_frames_per_s": free["frames_per_s"], "free_backbone_bottleneck": free["bottleneck"],
                "free_backbone_round_efficiencies": free["round_ratios"],
                "decoders_cpu_ms_per_frame": free["decoders_cpu_ms_per_frame"],
                "free_backbone_decoders_cpu_ms_per_frame": free["decoders_in_pipeline_cpu_ms_per_frame"],
                "free_backbone_process_cpu_ms_per_frame": free["pipeline_process_cpu_ms_per_frame"],
                "free_backbone_cpu_ms_per_frame": free["cpu_ms_per_frame"],
                "free_backbone_cores_busy": free["cores_busy"],
                "cores": len(os.sched_getaffinity(0)),
                "limiting_side": "decoding" if decode_fps <= writer_fps else "writing",
                "io_ceiling_efficiency": free["frames_per_s"] / ceiling})
    log(f"  decoders alone ({workers} workers): {decode_fps:.0f} frames/s, {free['decoders_cpu_ms_per_frame']:.2f} "
        f"ms of CPU per frame; writer alone {writer_fps:.0f} frames/s")
    log(f"  free-backbone pipeline: {free['frames_per_s']:.0f} frames/s ({free['frames']} frames); "
        f"io ceiling efficiency {out['io_ceiling_efficiency']:.2f} against {out['limiting_side']} "
        f"(pipeline time: {free['bottleneck']}); it used {free['cpu_ms_per_frame']:.2f} ms of CPU per frame "
        f"(decoders {free['decoders_in_pipeline_cpu_ms_per_frame']:.2f}, the pipeline's process "
        f"{free['pipeline_process_cpu_ms_per_frame']:.2f}; {free['cores_busy']:.2f} of {out['cores']} cores busy): "
        f"at most {1000 * out['cores'] / free['cpu_ms_per_frame']:.0f} frames/s on this machine's cores")
    shutil.rmtree(folder, ignore_errors=True)
    return out


def _manifest(videos: list[VideoEntry], n: int) -> Manifest:
    """`n` videos cycling through the synthetic files (distinct rows of the same files)."""
    rows = [replace(videos[i % len(videos)], video_id=f"v{i}") for i in range(n)]
    return Manifest(rows, [str(c) for c in range(6)], "list", "bench", "0" * 64)


def _shard_data(layout, shard: int, rng) -> ShardData:
    """A full shard of feature-like values (every clip valid)."""
    rows = {}
    n = len(layout.shard_rows_range(shard))
    for name, (shape, dtype) in layout.row_arrays().items():
        if dtype == "str":
            rows[name] = np.full(n, "", dtype=str)
        elif np.dtype(dtype).kind == "f":
            rows[name] = rng.standard_normal((n, *shape), dtype=np.float32).astype(dtype)
        else:
            rows[name] = np.ones((n, *shape), dtype=dtype)
    k = len(layout.shard_videos_range(shard))
    return ShardData(shard, rows, {"videos/status": np.ones(k, np.uint8), "videos/num_frames": np.ones(k, np.int32),
                                   "videos/error": np.array([""] * k, dtype=str)})


def _writer_and_raw(folder, settings, p, seconds, fsync: bool, room: int = 1000) -> dict[str, float]:
    """MiB/s of the big arrays' uncompressed bytes, keyed writer, raw and (with fsync) raw_direct: write_shard
    vs a plain os.write of the same bytes (buffered; with fsync also O_DIRECT), in rotating rounds of one
    shard each, until each has run `seconds`; medians of the steady rounds. Every side
    writes new files every round, as a real extraction does (rewriting one file over and over would reuse
    the pages just freed and measure memory, not the disk), and delete those of WINDOW rounds back (not
    timed)."""
    store_path = folder / f"writer-{settings.codec}.zarr"
    shutil.rmtree(store_path, ignore_errors=True)
    layout = replace(p.layout, num_videos=p.layout.shard_videos * room)      # room for `room` distinct shards
    videos = (p.manifest.videos * (-(-layout.num_videos // len(p.manifest.videos))))[:layout.num_videos]
    with open_for_writing(store_path, p.meta, layout, videos, settings.codec, log=lambda *a: None) as writer:
        return _alternate(folder, writer.cache, seconds, fsync)


WINDOW = 3


def _alternate(folder, store, seconds, fsync: bool) -> dict[str, float]:
    layout = store.layout
    rng = np.random.default_rng(0)
    shards = [_shard_data(layout, s, rng) for s in range(2)]
    big = [n for n, (shape, _) in layout.row_arrays().items() if shape]
    nbytes = sum(shards[0].rows[n].nbytes for n in big)
    raw_dir = folder / "raw"
    shutil.rmtree(raw_dir, ignore_errors=True)
    aligned = [{n: _aligned_copy(s.rows[n]) for n in big} for s in shards]     # what O_DIRECT writes from

    # each side: (forget the files of WINDOW rounds back, write round i). Only the writing is timed: a real
    # extraction deletes nothing, the deleting only bounds the benchmark's disk use
    def forget_writer(i):
        for n in big:
            store.shard_file(n).path(i - WINDOW).unlink(missing_ok=True)

    def writer(i, data):
        write_shard(store, data, fsync=fsync)

    def raw(i, data, direct=False):
        side = raw_dir / ("direct" if direct else "buffered")
        (side / str(i)).mkdir(parents=True)
        for n in big:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0)
            fd = os.open(side / str(i) / n.replace("/", "_"), flags, 0o644)
            try:
                os.write(fd, aligned[i % 2][n] if direct else data.rows[n])
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        if fsync:
            fsync_dir(side / str(i))

    def forget_raw(i, direct=False):
        shutil.rmtree(raw_dir / ("direct" if direct else "buffered") / str(i - WINDOW))

    sides = {"writer": (forget_writer, writer), "raw": (forget_raw, raw)}
    if fsync and hasattr(os, "O_DIRECT"):       # the durable writer goes around the page cache: so may raw
        sides["raw_direct"] = (lambda i: forget_raw(i, True), lambda i, data: raw(i, data, direct=True))
    rates = {k: [] for k in sides}
    spent = {k: 0.0 for k in sides}
    i = 0
    while (min(spent.values()) < seconds or i < WINDOW + 6) and i < layout.num_shards:
        data = replace(shards[i % 2], shard=i)
        order = list(sides)[i % len(sides):] + list(sides)[:i % len(sides)]     # who goes first rotates too
        for k in order:
            forget, write = sides[k]
            if i >= WINDOW:
                forget(i)
            t0 = time.perf_counter()
            write(i, data)
            dt = time.perf_counter() - t0
            if i >= WINDOW:                       # the steady state: files are deleted as new ones come
                rates[k].append(nbytes / dt / 2 ** 20)
                spent[k] += dt
        i += 1
    shutil.rmtree(raw_dir)
    return {k: statistics.median(v) for k, v in rates.items()}


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """`a`'s bytes in page-aligned memory padded to a whole page, as O_DIRECT wants them."""
    size = -(-a.nbytes // DIRECT_ALIGN) * DIRECT_ALIGN
    buf = np.frombuffer(mmap.mmap(-1, size), np.uint8)
    buf[:a.nbytes] = a.reshape(-1).view(np.uint8)
    return buf


ROUNDS = 3    # decoders alone and the pipeline alternate, so drift in the machine's speed hits both alike


def _decoders_and_pipeline(folder, videos, bb, settings, workers, seconds, log) -> dict:
    """The decode workers alone and the whole pipeline with the free backbone, in ROUNDS alternating rounds
    of `seconds` / ROUNDS each, on one pool of decode workers (the same processes), after a warm-up of four
    shards (until the shard buffers are reused). Both at steady state: the decoders fed DEPTH requests per
    worker, the video list looped, the requests still in flight when time is up not counted; the pipeline
    from the first shard it finishes in a round to its last (see the module's doc). Shard files are deleted
    WINDOW shards behind, as in the writer's measurement, so both meet the same disk."""
    frames = settings.frames
    p = plan(settings, _manifest(videos, 64), bb)
    most = 1.5 * 1000 * workers * seconds / ROUNDS / frames   # videos a round takes at 1000 frames/s per worker
    n = 4 * p.layout.shard_videos + ROUNDS * max(3 * p.layout.shard_videos, int(most))   # (a spare half)
    manifest = _manifest(videos, n)
    p = plan(settings, manifest, bb)
    store_path = folder / "pipeline.zarr"
    shutil.rmtree(store_path, ignore_errors=True)
    done: list[tuple[int, float, dict]] = []          # finished shards: (shard, time, CPU seconds by side)
    with DecodePool(workers) as pool, open_for_writing(store_path, p.meta, p.layout, manifest.videos,
                                                       settings.codec, log=lambda *a: None) as store:
        layout = store.layout
        big = [n for n, (shape, _) in layout.row_arrays().items() if shape]

        def on_shard_done(shard):
            done.append((shard, time.perf_counter(), _cpu_seconds(pool)))
            for name in big:
                if shard >= WINDOW:
                    store.cache.shard_file(name).path(shard - WINDOW).unlink(missing_ok=True)

        ex = ShardExtractor(store.cache, bb, manifest.videos, pool, batch_size=64, on_shard_done=on_shard_done)
        todo = list(store.todo)
        ex.run(todo[:4])                                                 # warm-up
        todo = todo[4:]
        dec = {"frames": 0, "seconds": 0.0, "cpu": 0.0}
        pipe = {"frames": 0, "seconds": 0.0, "cpu": {"decoders": 0.0, "pipeline": 0.0}}
        ratios = []
        for r in range(ROUNDS):
            d = _decoders(pool, videos, bb, frames, seconds / ROUNDS)
            for k in dec:
                dec[k] += d[k]
            # the pipeline: about as many shards as the decoders' rate fills `seconds` / ROUNDS with
            count = max(3, round(d["frames"] / d["seconds"] * seconds / ROUNDS / (layout.shard_rows * frames)))
            if count > len(todo):
                raise RuntimeError("the benchmark's manifest is too short for the decoders' rate")
            shards, todo = todo[:count], todo[count:]
            done.clear()
            stats = ex.run(shards)
            if stats.failed_videos or len(done) != len(shards):
                raise RuntimeError("the benchmark's videos must all decode")
            (_, t0, cpu0), (_, t1, cpu1) = done[0], done[-1]
            got = sum(len(layout.shard_rows_range(s)) for s, _, _ in done[1:]) * frames
            pipe["frames"] += got
            pipe["seconds"] += t1 - t0
            for k in pipe["cpu"]:
                pipe["cpu"][k] += cpu1[k] - cpu0[k]
            ratios.append((got / (t1 - t0)) / (d["frames"] / d["seconds"]))
            log(f"    round {r + 1}: decoders alone {d['frames'] / d['seconds']:.0f} frames/s, pipeline "
                f"{got / (t1 - t0):.0f} frames/s ({len(done) - 1} shards): {ratios[-1]:.2f}")
    return {"decoders_frames_per_s": dec["frames"] / dec["seconds"],
            "decoders_cpu_ms_per_frame": 1000 * dec["cpu"] / dec["frames"],
            "frames": pipe["frames"], "frames_per_s": pipe["frames"] / pipe["seconds"],
            "bottleneck": stats.bottleneck(), "round_ratios": ratios,      # (the last round's)
            "decoders_in_pipeline_cpu_ms_per_frame": 1000 * pipe["cpu"]["decoders"] / pipe["frames"],
            "pipeline_process_cpu_ms_per_frame": 1000 * pipe["cpu"]["pipeline"] / pipe["frames"],
            "cpu_ms_per_frame": 1000 * sum(pipe["cpu"].values()) / pipe["frames"],
            "cores_busy": sum(pipe["cpu"].values()) / pipe["seconds"]}


def _decoders(pool, videos, bb, frames, seconds) -> dict:
    """The decode workers alone: frames decoded in `seconds` with every worker fed DEPTH requests, the video
    list looped, and the workers' CPU seconds meanwhile; the requests in flight at the end are not counted."""
    workers = len(pool.pids)
    done, i = 0, 0
    t0, cpu0 = time.perf_counter(), _cpu_seconds(pool)["decoders"]
    while True:
        while pool.in_flight < DEPTH * workers:
            v = videos[i % len(videos)]
            pool.submit(DecodeRequest(i, v.path, frames, SamplingSpec(), ViewSpec(), bb.preprocessing))
            i += 1
        res = pool.get()
        done += bool(res is not None and res.ok)
        if time.perf_counter() - t0 >= seconds:
            elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(pool)["decoders"] - cpu0
            while pool.in_flight:
                pool.get()
            return {"frames": done * frames, "seconds": elapsed, "cpu": cpu}


def _cpu_seconds(pool) -> dict[str, float]:
    """CPU seconds used so far by the pool's decode workers and by this process (every thread: the
    pipeline's main thread and the writer's)."""
    import psutil

    def used(proc):
        t = proc.cpu_times()
        return t.user + t.system
    return {"decoders": sum(used(psutil.Process(pid)) for pid in pool.pids), "pipeline": used(psutil.Process())}
