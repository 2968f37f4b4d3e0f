"""Storage: bytes per frame for each token spec and layer choice (ViT-B/16, ViT-L/14), and the codecs
considered for the cache: compression ratio, write and read speed on real extracted features.

The byte counts are exact arithmetic on the cache layout. The codec figures are measured on features a
ViT extracted from the synthetic videos; with random weights (no weights can be downloaded here) the
statistics differ from trained CLIP features, so the ratios are indicative.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import zarr

from cachefeat.extract import ExtractSettings, extract
from cachefeat.extract.backbone import model_geometry
from cachefeat.extract.manifest import load_manifest
from cachefeat.specs import ViewSpec, parse_layers, parse_tokens
from cachefeat.store import Layout, open_cache, parse_codec
from cachefeat.store.shard_file import ShardFile

from common import TINY, WORK, Mode, synth_data

K400_FRAMES = 240_000 * 8     # Kinetics-400 train, 8 frames per clip, one view
CODECS = ["none", "zstd:1", "zstd:3", "zstd:9", "blosc-lz4", "blosc-zstd:1", "blosc-zstd:3", "blosc-zstd:5", "gzip:1"]


def bytes_per_frame(mode: Mode) -> list[dict]:
    rows = []
    for model in ("ViT-B/16", "ViT-L/14"):
        geo = model_geometry(model)
        for tok in ("cls", "pooled:4x4", "all"):
            for lay in ("last:1", "last:4", "all"):
                layers = parse_layers(lay, geo["depth"])
                t = parse_tokens(tok, tuple(geo["patch_grid"]))
                for dtype in ("float16", "int8"):
                    L = Layout(1, ViewSpec(), 1, tuple(layers), t, geo["width"], geo["embed_dim"], dtype, 1)
                    b = sum(L.bytes_per_clip().values())
                    rows.append({"model": model, "tokens": tok, "layers": lay, "dtype": dtype, "bytes_per_frame": b,
                                 "k400_8f_tb": b * K400_FRAMES / 1e12})
    return rows


def codecs(mode: Mode, log=print) -> dict:
    """Write the same real token arrays with each codec; ratio, write and read throughput."""
    model = TINY if mode.smoke else "ViT-B/16"
    data = synth_data("extract-data", classes=6, videos_per_class=max(2, mode.videos // 6 + 1))
    manifest = load_manifest(data / "train.txt", classes=str(data / "classes.txt"))
    manifest.videos = manifest.videos[: (mode.videos if mode.smoke else 8 if not mode.full else 64)]
    src = WORK / f"codec-src-{len(manifest.videos)}.zarr"     # named by its size: a stale one is never reused
    if not (src / "zarr.json").exists() or not open_cache(src).complete:
        shutil.rmtree(src, ignore_errors=True)
        frames = 4 if not mode.full else 8
        extract(manifest, src, ExtractSettings(model=model, pretrained="none", layers="last:4", tokens="all",
                                               frames=frames, device=mode.device, text=False, codec="none"),
                batch_size=mode.batch_size, decode_workers=mode.decode_workers, progress=False, log=lambda *a: None)
    c = open_cache(src)
    arrays = {name: c.read(name) for name in c.layout.feature_arrays() if name.startswith("tokens/")}
    raw = sum(a.nbytes for a in arrays.values())
    rows_per_shard = c.layout.shard_rows
    log(f"[storage] codecs on {model} tokens (random weights), last 4 layers, {c.num_clips} clips x {c.frames} "
        f"frames: {raw / 2**20:.1f} MiB raw float16")
    results = {}
    for spec in CODECS:
        d = WORK / "codec-test.zarr"
        shutil.rmtree(d, ignore_errors=True)
        root = zarr.open_group(str(d), mode="w")
        made = {}
        for name, a in arrays.items():
            made[name] = root.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(1, *a.shape[1:]),
                                           shards=(rows_per_shard, *a.shape[1:]), compressors=parse_codec(spec))
        t0 = time.perf_counter()
        for name, a in arrays.items():
            made[name][...] = a
        write_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)
        # whole arrays and random single clips, through zarr and through cachefeat's shard-file reader
        # (what training reads with), interleaved
        reads, direct_reads = [], []
        for _ in range(3):
            r = zarr.open_group(str(d), mode="r")
            t0 = time.perf_counter()
            for name in arrays:
                r[name][...]
            reads.append(time.perf_counter() - t0)
            files = {name: ShardFile.open(d / name) for name in arrays}
            t0 = time.perf_counter()
            for f in files.values():
                f.read(slice(None))
            direct_reads.append(time.perf_counter() - t0)
        picks = np.random.default_rng(0).integers(0, c.num_clips, 32)
        t0 = time.perf_counter()
        for i in picks:
            for name in arrays:
                r[name][int(i)]
        clip_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in picks:
            for f in files.values():
                f.read(np.array([i]))
        direct_clip_s = time.perf_counter() - t0
        per_clip_bytes = raw / c.num_clips * len(picks)
        mib = 2 ** 20
        results[spec] = {"ratio": raw / size, "write_mib_s": raw / write_s / mib,
                         "read_mib_s": raw / min(reads) / mib, "random_clip_read_mib_s": per_clip_bytes / clip_s / mib,
                         "direct_read_mib_s": raw / min(direct_reads) / mib,
                         "direct_random_clip_read_mib_s": per_clip_bytes / direct_clip_s / mib}
        log(f"  {spec:13s} ratio {raw / size:5.3f}  write {raw / write_s / mib:7.1f} MiB/s  "
            f"read {raw / min(reads) / mib:7.1f} MiB/s (shard files {raw / min(direct_reads) / mib:7.1f})  "
            f"random clips {per_clip_bytes / clip_s / mib:7.1f} MiB/s "
            f"(shard files {per_clip_bytes / direct_clip_s / mib:7.1f})")
    shutil.rmtree(WORK / "codec-test.zarr", ignore_errors=True)
    return {"model": model, "raw_mib": raw / 2**20, "codecs": results}


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'bytes_per_frame',
    'codecs.model',
    'codecs.raw_mib',
    'codecs.codecs.*.ratio',
    'codecs.codecs.*.write_mib_s',
    'codecs.codecs.*.read_mib_s',
    'codecs.codecs.*.direct_read_mib_s',
    'codecs.codecs.*.random_clip_read_mib_s',
    'codecs.codecs.*.direct_random_clip_read_mib_s',
)


def run(mode: Mode, log=print) -> dict:
    return {"bytes_per_frame": bytes_per_frame(mode), "codecs": codecs(mode, log)}
