"""A cache in an S3-compatible bucket: `push()` against raw PUTs of the same bytes, and reading every feature
row through `open_cache(url)` against raw ranged GETs of the same byte ranges, on a local S3 server.

    write_efficiency = push MiB/s  /  raw PUTs of the cache's files' bytes, IN_FLIGHT at once     (goal >= 0.8)
    read_efficiency  = reader MiB/s / raw ranged GETs of the bytes the reader fetches, IN_FLIGHT   (goal >= 0.8)

The server is moto's S3 server (tests/s3server.py's serve_in_child, signatures checked) on 127.0.0.1, in a
process of its own so that it does not share this process's GIL. moto is Python (werkzeug threads under one
GIL): it serves far fewer MiB/s than S3, MinIO or a real network, so it is the bottleneck of both sides,
and the figures say how much of what the server can give cachefeat gets, not how fast S3 is. The server
process's CPU time over each side's wall time is reported ("server busy": near 1.0 the server was the limit),
and this process's ("client busy", its obstore threads included), with its share in the kernel and its minor
page faults (memory the kernel maps on first touch: costly in a virtual machine).

The cache: random float16 features written by cachefeat's own shard writer (store.write_shard) in the layout
of a real extraction: ViT-B/16 `--layers last:4 --tokens all`, 8 frames (what EVL-style caches hold), shard
objects of ~19 MiB; in smoke mode the tiny registered ViT's layout. Writing: `push()` of the local cache to a
new prefix (CRC32C of every file, a listing, one PUT and one HEAD per object, data before the shard records
and the root document last) against one PUT per file of the same bytes (read into memory beforehand, the
same multipart rule) to another new prefix. Reading: one epoch of the batches stage two streams from a
bucket cache (CachedSource, in_memory "no": buffers of 4 shards, each array's rows of a buffer read at once,
a fresh cache each round so the shard indexes are fetched as in a first epoch) against one ranged GET per
range the reader's coalescing makes (every shard object's index, and its chunks' spans merged where less
than COALESCE apart), all of the cache's at once, IN_FLIGHT in flight. The two sides alternate in ROUNDS
rounds after a warm-up; the medians are compared. Each round's objects are deleted before the next.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from common import TINY, WORK, synth_data, test_module

GOAL = 0.8


def settings(mode) -> dict:
    if mode.smoke:
        return {"model": TINY, "layers": "all", "tokens": "all", "frames": 2, "clips": 16, "shard_size": 4,
                "rounds": 1}
    return {"model": "ViT-B/16", "layers": "last:4", "tokens": "all", "frames": 8, "clips": 64, "shard_size": 8,
            "rounds": 5}


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'goal',
    'model',
    'layers',
    'tokens',
    'frames',
    'clips',
    'shard_clips',
    'objects',
    'cache_mib',
    'feature_objects',
    'read_mib',
    'in_flight',
    'rounds',
    'server',
    'write.push_mib_s',
    'write.raw_put_mib_s',
    'write.efficiency',
    'write.verdict',
    'write.server_busy_push',
    'write.server_busy_raw',
    'write.client_busy_push',
    'write.client_busy_raw',
    'write.client_kernel_push',
    'write.client_kernel_raw',
    'write.page_faults_push',
    'write.page_faults_raw',
    'read.reader_mib_s',
    'read.raw_get_mib_s',
    'read.efficiency',
    'read.verdict',
    'read.requests_raw',
    'read.server_busy_reader',
    'read.server_busy_raw',
    'read.client_busy_reader',
    'read.client_busy_raw',
    'read.client_kernel_reader',
    'read.client_kernel_raw',
    'read.page_faults_reader',
    'read.page_faults_raw',
    'read.open_s',
    'read.checks_copy_s',
    'read.checks_copy_share',
)


def run(mode, log=print) -> dict:
    from cachefeat.store import open_cache, remote
    st = settings(mode)
    local, layout = synthetic_cache(st)
    cache = open_cache(local)
    files = remote._cache_files(cache)
    sizes = {k: os.path.getsize(p) for k, p in files.items()}
    total = sum(sizes.values())
    names = list(layout.feature_arrays())
    log(f"[object_store] {st['model']} layers {st['layers']} tokens {st['tokens']}, {st['frames']} frames, "
        f"{layout.num_clips} clips in shards of {layout.shard_rows}: {len(files)} files, {total / 2 ** 20:.1f} MiB; "
        f"moto's S3 server in a process of its own, {remote.IN_FLIGHT} requests in flight, {st['rounds']} rounds")
    with moto_server() as (server, pid), aws_env(server.env()):
        bucket = server.new_bucket()
        base = f"s3://{bucket}"
        write = _write(cache, files, base, pid, st["rounds"], log)
        url = f"{base}/cache.zarr"
        remote.push(cache, remote.parse_url(url))
        read = _read(url, names, pid, st["rounds"], log)
    read |= _checks_and_copy(local, names, read["raw_s"], log)
    return {"goal": GOAL, "model": st["model"], "layers": st["layers"], "tokens": st["tokens"], "frames": st["frames"],
            "clips": layout.num_clips, "shard_clips": layout.shard_rows, "objects": len(files),
            "cache_mib": total / 2 ** 20, "feature_objects": read.pop("feature_objects"),
            "read_mib": read.pop("bytes") / 2 ** 20, "in_flight": remote.IN_FLIGHT, "rounds": st["rounds"],
            "server": "moto (Python) on 127.0.0.1, a process of its own", "write": write, "read": read}


# ------------------------------------------------------------------------------------------- the cache
def synthetic_cache(st: dict):
    """A finished cache of random features in the layout of `st` (a real extraction's plan: layout, metadata,
    tables), written by store.write_shard, under benchmarks/work/; reused when complete. Returns (path, layout)."""
    from bench_io import _manifest, _shard_data

    from cachefeat.extract.backbone import load_backbone
    from cachefeat.extract.manifest import load_manifest
    from cachefeat.extract.plan import ExtractSettings, plan
    from cachefeat.store import open_cache, open_for_writing, write_shard
    data = synth_data("extract-data-32", classes=6, videos_per_class=4, size=32)   # (its files are never decoded)
    videos = load_manifest(data / "train.txt", classes=str(data / "classes.txt")).videos
    s = ExtractSettings(model=st["model"], pretrained="none", layers=st["layers"], tokens=st["tokens"],
                        frames=st["frames"], text=False, shard_size=st["shard_size"])
    p = plan(s, _manifest(videos, st["clips"]), load_backbone(st["model"], "none", "cpu"))
    out = WORK / f"objstore-{st['model'].replace('/', '-')}-{st['layers'].replace(':', '')}-{st['clips']}.zarr"
    if (out / "zarr.json").exists():
        try:
            if open_cache(out).complete:
                return out, p.layout
        # B110: a damaged or older cache from an earlier run is made again below
        except Exception:  # nosec B110
            pass
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    with open_for_writing(out, p.meta, p.layout, p.manifest.videos, s.codec, log=lambda *a: None) as w:
        for shard in w.todo:
            write_shard(w.cache, _shard_data(w.layout, shard, rng), fsync=False)
    return out, p.layout


# ------------------------------------------------------------------------------------------- the server
@contextmanager
def moto_server():
    """tests/s3server.serve_in_child: moto's server in a process of its own; yields (its S3Server, its pid)."""
    missing = [m for m in ("moto", "boto3", "obstore") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"the object_store section needs {', '.join(missing)}: pip install 'cachefeat[test]'")
    with test_module("s3server").serve_in_child() as served:
        yield served


@contextmanager
def aws_env(env: dict):
    """This process reaches the server (store.remote reads the AWS_* variables when it opens a location)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _minor_faults() -> int:
    """Minor page faults of this process so far (/proc/self/stat): pages the kernel mapped on first touch."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


def _timed(fn, pid: int) -> tuple[float, float, float, float, int]:
    """(wall seconds of fn(), the server's CPU seconds over them, this process's CPU seconds over them, this
    process's kernel CPU seconds over them, this process's minor page faults during fn())."""
    c0, p0, k0, f0, t0 = cpu_seconds(pid), time.process_time(), os.times().system, _minor_faults(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return (wall, (cpu_seconds(pid) - c0) / wall, (time.process_time() - p0) / wall, (os.times().system - k0) / wall,
            _minor_faults() - f0)


def _summary(got: dict[str, list[tuple]]) -> list[dict]:
    """Medians by side of each of _timed's figures over the rounds."""
    width = len(next(iter(got.values()))[0])
    return [{k: statistics.median(x[i] for x in v) for k, v in got.items()} for i in range(width)]


def _alternate(sides: dict, rounds: int, pid: int, before=None, after=None) -> dict[str, list[tuple]]:
    """Each side's _timed figures per round, in turn A B A B ... after one warm-up of each; `before()` at the
    start of each round and `after(side)` after each side, neither timed."""
    out = {k: [] for k in sides}
    for i in range(rounds + 1):
        if before:
            before()
        for k, fn in sides.items():
            got = _timed(fn, pid)
            if i:
                out[k].append(got)
            if after:
                after(k)
    return out


def _figures(got: dict[str, list[tuple]], ours: str, ours_rate: str, raw_rate: str, nbytes: int) -> dict:
    """The figures of one comparison (`ours` against "raw" over the same `nbytes`) as the result file keeps them."""
    med, busy, client, kernel, faults = _summary(got)
    mib = nbytes / 2 ** 20
    eff = med["raw"] / med[ours]
    return {ours_rate: mib / med[ours], raw_rate: mib / med["raw"], "efficiency": eff, "verdict": _verdict(eff),
            f"{ours}_s": [x[0] for x in got[ours]], "raw_s": [x[0] for x in got["raw"]],
            "round_efficiencies": [r[0] / p[0] for p, r in zip(got[ours], got["raw"])],
            f"server_busy_{ours}": busy[ours], "server_busy_raw": busy["raw"], f"client_busy_{ours}": client[ours],
            "client_busy_raw": client["raw"], f"client_kernel_{ours}": kernel[ours], "client_kernel_raw": kernel["raw"],
            f"page_faults_{ours}": int(faults[ours]), "page_faults_raw": int(faults["raw"])}


def _busy(out: dict, ours: str) -> str:
    return (f"efficiency {out['efficiency']:.2f} ({out['verdict']}); busy, of one core: server "
            f"{out[f'server_busy_{ours}']:.2f} / {out['server_busy_raw']:.2f}, this process "
            f"{out[f'client_busy_{ours}']:.2f} / {out['client_busy_raw']:.2f} (in the kernel "
            f"{out[f'client_kernel_{ours}']:.2f} / {out['client_kernel_raw']:.2f}; minor page faults "
            f"{out[f'page_faults_{ours}']:,} / {out['page_faults_raw']:,})")


def _verdict(eff: float) -> str:
    return "met" if eff >= GOAL else f"missed by {GOAL - eff:.2f}"


# ------------------------------------------------------------------------------------------- writing
def _write(cache, files: dict[str, str], base: str, pid: int, rounds: int, log) -> dict:
    import obstore

    from cachefeat.store import remote
    blobs = {k: Path(p).read_bytes() for k, p in files.items()}
    total = sum(len(b) for b in blobs.values())
    n = {"push": 0, "raw": 0}

    def fresh(side):
        n[side] += 1
        return remote.parse_url(f"{base}/{side}-{n[side]}")

    def push():
        remote.push(cache, fresh("push"))

    def forget(side):                   # (not timed) the server's memory back before the next round
        loc = remote.parse_url(f"{base}/{side}-{n[side]}")
        remote.delete(loc, list(remote.list_objects(loc)))

    async def put_all(loc):
        gate = asyncio.Semaphore(remote.IN_FLIGHT)

        async def one(key, data):
            async with gate:
                await obstore.put_async(loc.store, key, data, use_multipart=len(data) > remote.MULTIPART_BYTES,
                                        chunk_size=remote.PART_BYTES, max_concurrency=4)
        await asyncio.gather(*(one(k, b) for k, b in blobs.items()))

    def raw():
        remote.run_sync(put_all(fresh("raw")))
    got = _alternate({"push": push, "raw": raw}, rounds, pid, after=forget)
    out = _figures(got, "push", "push_mib_s", "raw_put_mib_s", total) | {"requests_raw": len(blobs)}
    log(f"  write: push {out['push_mib_s']:.1f} MiB/s, raw PUTs {out['raw_put_mib_s']:.1f} MiB/s: {_busy(out, 'push')}")
    return out


# ------------------------------------------------------------------------------------------- reading
def _read(url: str, names: list[str], pid: int, rounds: int, log) -> dict:
    import obstore

    from cachefeat.adapters.base import Needs
    from cachefeat.store import open_cache, remote
    from cachefeat.train.reader import CachedSource

    t0 = time.perf_counter()
    probe = open_cache(url)
    open_s = time.perf_counter() - t0
    tokens = tuple(int(n.split("/")[1]) for n in names if n.startswith("tokens/"))
    sel = Needs(embed="embed" in names, cls_layers=tuple(probe.layers) if "cls" in names else (), token_layers=tokens)
    ranges = _ranges(probe, names)
    total = sum(e - s for _, s, e in ranges)
    loc = probe.location
    state = {}

    def prepare():                      # (not timed) a fresh cache: its shard indexes not yet fetched
        c = open_cache(url)
        state["src"] = CachedSource(c, sel, batch_size=8, in_memory="no")     # its default buffers: 4 shards

    def reader():
        rows = 0
        for batch in state["src"].batches(0, train=True):
            rows += len(next(iter(batch.values())))
        state["rows"] = rows

    async def get_all():
        gate = asyncio.Semaphore(remote.IN_FLIGHT)

        async def one(key, start, end):
            async with gate:
                return len(await obstore.get_range_async(loc.store, key, start=start, end=end))
        got = sum(await asyncio.gather(*(one(*r) for r in ranges)))
        if got != total:
            raise RuntimeError(f"raw GETs returned {got} bytes, not {total}")

    def raw():
        remote.run_sync(get_all())
    times = _alternate({"reader": reader, "raw": raw}, rounds, pid, before=prepare)
    if state["rows"] != probe.num_clips:
        raise RuntimeError(f"the reader's epoch held {state['rows']} clips, not {probe.num_clips}")
    out = _figures(times, "reader", "reader_mib_s", "raw_get_mib_s", total) | {
        "requests_raw": len(ranges), "open_s": open_s, "reads": sel.describe(),
        "feature_objects": sum(1 for k in probe.objects if k.split("/c/")[0] in names), "bytes": total}
    log(f"  read: {sel.describe()}, {total / 2 ** 20:.1f} MiB in {len(ranges)} ranges: reader "
        f"{out['reader_mib_s']:.1f} MiB/s, raw ranged GETs {out['raw_get_mib_s']:.1f} MiB/s: {_busy(out, 'reader')}; "
        f"opening the cache {open_s:.2f} s (not counted)")
    return out


def _checks_and_copy(local, names: list[str], raw_s: list[float], log) -> dict:
    """The reader's own work on the bytes it fetches, without any request: every chunk's CRC32C checked and
    the chunk copied into a new block (as the reader decodes each chunk into its batch's place), the chunks
    already in memory, in this one thread; medians of 3. What the raw GETs do not do: on two cores shared with
    the server, this competes with the server for them. Its share is of the raw GETs' median time."""
    from cachefeat.store import open_cache
    from cachefeat.store.layout import crc32c_of
    from cachefeat.store.shard_file import MISSING
    cache = open_cache(local)
    bodies = []                         # each chunk's bytes without its stored CRC32C
    for name in names:
        sf = cache.shard_file(name)
        tail = 4 if sf.chunk_crc else 0
        for s in range(-(-sf.shape[0] // sf.shard_rows)):
            path = sf.path(s)
            data = np.frombuffer(path.read_bytes(), np.uint8)
            fd = os.open(path, os.O_RDONLY)
            try:
                index = sf._index(fd, path)
            finally:
                os.close(fd)
            bodies += [data[a:a + n - tail] for a, n in index[index[:, 0] != MISSING].tolist()]

    def work():
        block = np.empty(sum(len(b) for b in bodies), np.uint8)      # new memory, as each buffer's block
        at = 0
        for body in bodies:
            crc32c_of(body)
            block[at:at + len(body)] = body
            at += len(body)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    own = statistics.median(times)
    out = {"checks_copy_s": own, "checks_copy_share": own / statistics.median(raw_s)}
    log(f"  the reader's own work on those bytes (CRC32C and one copy into new memory, no request, one thread): "
        f"{out['checks_copy_s']:.2f} s, {out['checks_copy_share']:.2f} of the raw GETs' time")
    return out


def _ranges(cache, names: list[str]) -> list[tuple[str, int, int]]:
    """(key, start, end) of every GET range the reader makes to read all rows of `names`: each shard object's
    index (its last index_nbytes), and its chunks' spans merged where less than COALESCE apart."""
    from cachefeat.store import remote
    from cachefeat.store.shard_file import MISSING
    out = []
    for name in names:
        sf = cache.shard_file(name)
        if sf is None:
            raise RuntimeError(f"{cache.path}: array {name} is not read from shard objects")
        shards = range(-(-sf.shape[0] // sf.shard_rows))
        sf._load_indexes(shards)
        for s in shards:
            index = sf._indexes[s]
            if index is None:
                continue
            key = sf._key(s)
            size = cache.objects[key]
            out.append((key, size - sf.index_nbytes, size))
            spans = index[index[:, 0] != MISSING].astype(np.int64)
            spans = spans[np.argsort(spans[:, 0])]
            start, end = int(spans[0, 0]), int(spans[0, 0] + spans[0, 1])
            for a, n in spans[1:].tolist():
                if a - end < remote.COALESCE:
                    end = max(end, a + n)
                else:
                    out.append((key, start, end))
                    start, end = a, a + n
            out.append((key, start, end))
    return out
