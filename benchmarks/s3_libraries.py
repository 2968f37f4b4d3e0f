"""Which Python S3 client cachefeat should use: obstore against s3fs (and boto3) on the same requests.

    python benchmarks/s3_libraries.py [--out benchmarks/results/NAME.json] [--rounds 5] [--note TEXT]

Standalone: it imports no cachefeat and no torch (benchmarks/common.py imports them only inside its
functions), so it runs in a virtual environment of its own holding the libraries
compared (`pip install s3fs obstore 'moto[server]' boto3 numpy`). It starts moto's S3 server
(tests/s3server.py's serve_in_child) in a process of its own on 127.0.0.1, puts OBJECTS objects
of OBJECT_MIB MiB of random bytes in a bucket, and then, per library:

- read: the byte ranges an epoch of cachefeat's reader fetches, in its two steps: every object's last 64 KiB
  (a shard's index), then DATA_RANGES ranges of ~1.5 MiB per object with gaps of 4-32 KiB between them;
- write: a whole-object PUT of every object (one request each: 12 MiB is below both libraries' multipart
  thresholds).

    obstore       get_range_async / get_ranges_async(coalesce=COALESCE), IN_FLIGHT objects at once, as
                  cachefeat's store.remote does (its ranges of an object merged where less than COALESCE apart:
                  one request per object and step); put_async, IN_FLIGHT at once
    s3fs          S3FileSystem(asynchronous=True)._cat_ranges(batch_size=IN_FLIGHT): one GET per range, as
                  s3fs does (its max_gap is not implemented); _pipe(batch_size=IN_FLIGHT)
    s3fs_merged   s3fs with the ranges merged beforehand as obstore merges them (fsspec.utils's
                  merge_offset_ranges, max_gap COALESCE): the same requests as obstore, so the library's own cost
    boto3         get_object(Range=...) of the merged ranges / put_object, in a pool of IN_FLIGHT threads

The botocore-based clients get max_pool_connections=IN_FLIGHT (their default, 10, would cap them below the
others); every library keeps its other defaults (botocore's CRC32 of each PUT body, for one). Every library's
bytes are checked against the objects' bytes (not timed). The libraries alternate, in an order rotated each
round, after one warm-up round; the medians of ROUNDS rounds are reported, with each library's MiB/s as a ratio
to obstore's, and the CPU seconds this process spent per GiB moved (time.process_time: every thread of the
process, obstore's Rust threads and boto3's pool included) and the server process's. moto is Python under
one GIL, far slower than S3 or MinIO: it bounds the absolute speeds; the client CPU per GiB is the library's
own cost, the figure that decides on a machine whose few cores the training also needs.

Writes the result JSON (--out; the figures under sections.s3_libraries) and its log beside it (.log).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

from common import git_describe, test_module

ROOT = Path(__file__).resolve().parent
OBJECTS = 24
OBJECT_MIB = 12
INDEX_BYTES = 64 << 10          # a shard's index: its last 64 KiB
DATA_RANGES = 8                 # ranges per object after its index
IN_FLIGHT = 16                  # as cachefeat.store.remote.IN_FLIGHT
COALESCE = 1 << 16              # as cachefeat.store.remote.COALESCE
LIBRARIES = ("obstore", "s3fs", "s3fs_merged", "boto3")
WRITERS = ("obstore", "s3fs", "boto3")
VERSIONS = ("obstore", "s3fs", "fsspec", "aiobotocore", "aiohttp", "botocore", "boto3", "moto", "numpy")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- the requests
def plan(size: int, rng) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(the index range, the data ranges) of one object of `size` bytes: its last INDEX_BYTES, then DATA_RANGES
    ranges filling the rest but for a gap of 4-32 KiB after each."""
    slot = (size - INDEX_BYTES) // DATA_RANGES
    gaps = rng.integers(4 << 10, 32 << 10, DATA_RANGES, endpoint=True)
    return (size - INDEX_BYTES, size), [(k * slot, (k + 1) * slot - int(g)) for k, g in enumerate(gaps)]


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges merged where less than COALESCE apart (sorted ranges), as obstore's coalescing merges them."""
    from fsspec.utils import merge_offset_ranges
    _, starts, ends = merge_offset_ranges(["k"] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges],
                                          max_gap=COALESCE, sort=True)
    return list(zip(starts, ends))


def cut(merged: list[tuple[int, int]], blobs: list, ranges: list[tuple[int, int]]) -> list[memoryview]:
    """Each of `ranges` sliced out of the blobs of the merged ranges that hold them."""
    out, j = [], 0
    for s, e in ranges:
        while merged[j][1] < e:
            j += 1
        m0 = merged[j][0]
        out.append(memoryview(blobs[j])[s - m0:e - m0])
    return out


# ------------------------------------------------------------------------------------------- the libraries
class Obstore:
    def __init__(self, server, bucket):
        from obstore.store import S3Store
        endpoint, key, secret, region = server
        self.store = S3Store(bucket, endpoint=endpoint, access_key_id=key, secret_access_key=secret, region=region,
                             client_options={"allow_http": True})

    async def read(self, keys, index, data):
        import obstore
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def idx(k, r):
            async with gate:
                return await obstore.get_range_async(self.store, k, start=r[0], end=r[1])

        async def rows(k, rs):
            async with gate:
                return await obstore.get_ranges_async(self.store, k, starts=[s for s, _ in rs], ends=[e for _, e in rs],
                                                      coalesce=COALESCE)
        heads = await asyncio.gather(*(idx(k, r) for k, r in zip(keys, index)))
        bodies = await asyncio.gather(*(rows(k, rs) for k, rs in zip(keys, data)))
        return heads, bodies

    async def write(self, keys, blobs):
        import obstore
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(k, b):
            async with gate:
                await obstore.put_async(self.store, k, b, use_multipart=False)
        await asyncio.gather(*(one(k, b) for k, b in zip(keys, blobs)))


class S3fs:
    def __init__(self, server, bucket, merged=False):
        self.server, self.bucket, self.merged, self.fs = server, bucket, merged, None

    async def _fs(self):
        if self.fs is None:        # made in the running loop, as asynchronous=True needs
            from s3fs import S3FileSystem
            endpoint, key, secret, region = self.server
            self.fs = S3FileSystem(asynchronous=True, key=key, secret=secret, endpoint_url=endpoint,
                                   client_kwargs={"region_name": region}, skip_instance_cache=True,
                                   config_kwargs={"max_pool_connections": IN_FLIGHT})
            await self.fs.set_session()
        return self.fs

    async def _ranges(self, fs, paths, starts, ends):
        return await fs._cat_ranges(paths, starts, ends, batch_size=IN_FLIGHT, on_error="raise")

    async def read(self, keys, index, data):
        fs = await self._fs()
        paths = [f"{self.bucket}/{k}" for k in keys]
        heads = await self._ranges(fs, paths, [r[0] for r in index], [r[1] for r in index])
        if self.merged:
            spans = [merge(rs) for rs in data]
        else:
            spans = data
        flat = [(p, s, e) for p, rs in zip(paths, spans) for s, e in rs]
        got = await self._ranges(fs, [p for p, _, _ in flat], [s for _, s, _ in flat], [e for _, _, e in flat])
        bodies, i = [], 0
        for rs, sp in zip(data, spans):
            blobs = got[i:i + len(sp)]
            i += len(sp)
            bodies.append(cut(sp, blobs, rs) if self.merged else blobs)
        return heads, bodies

    async def write(self, keys, blobs):
        fs = await self._fs()
        await fs._pipe({f"{self.bucket}/{k}": b for k, b in zip(keys, blobs)}, batch_size=IN_FLIGHT)

    async def close(self):
        if self.fs is not None and self.fs._s3 is not None:
            await self.fs._s3.__aexit__(None, None, None)


class Boto3:
    def __init__(self, server, bucket):
        import boto3
        from botocore.config import Config
        endpoint, key, secret, region = server
        self.bucket = bucket
        self.s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                               region_name=region, config=Config(max_pool_connections=IN_FLIGHT))
        self.pool = ThreadPoolExecutor(IN_FLIGHT)

    def _get(self, key, start, end):
        return self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"].read()

    async def read(self, keys, index, data):
        heads = list(self.pool.map(lambda a: self._get(a[0], *a[1]), zip(keys, index)))
        spans = [merge(rs) for rs in data]
        flat = [(k, s, e) for k, sp in zip(keys, spans) for s, e in sp]
        got = list(self.pool.map(lambda a: self._get(*a), flat))
        bodies, i = [], 0
        for rs, sp in zip(data, spans):
            bodies.append(cut(sp, got[i:i + len(sp)], rs))
            i += len(sp)
        return heads, bodies

    async def write(self, keys, blobs):
        list(self.pool.map(lambda a: self.s3.put_object(Bucket=self.bucket, Key=a[0], Body=a[1]), zip(keys, blobs)))


# ------------------------------------------------------------------------------------------- measuring
def check(name, objects, index, data, got) -> None:
    """Every range `name` returned is the objects' bytes there."""
    heads, bodies = got
    for obj, r, h, rs, bs in zip(objects, index, heads, data, bodies):
        if len(bs) != len(rs) or memoryview(h) != memoryview(obj)[r[0]:r[1]] or any(
                memoryview(b) != memoryview(obj)[s:e] for (s, e), b in zip(rs, bs)):
            raise RuntimeError(f"{name} returned other bytes than the objects'")


def timed(loop, coro, pid):
    """(result, wall seconds, this process's CPU seconds, the server's CPU seconds) of running `coro`."""
    c0, p0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    out = loop.run_until_complete(coro)
    wall = time.perf_counter() - t0
    return out, wall, time.process_time() - p0, cpu_seconds(pid) - c0


def figures(rounds: list[dict], nbytes: int, names) -> dict:
    """Per library: each round's figures and their medians; MiB/s ratios to obstore's."""
    mib, gib = nbytes / 2 ** 20, nbytes / 2 ** 30
    out = {}
    for n in names:
        rs = [r[n] for r in rounds]
        out[n] = {"seconds": [r["s"] for r in rs], "mib_s": [mib / r["s"] for r in rs],
                  "client_cpu_s_per_gib": [r["client_cpu"] / gib for r in rs],
                  "server_cpu_s_per_gib": [r["server_cpu"] / gib for r in rs]}
        for k in ("mib_s", "client_cpu_s_per_gib", "server_cpu_s_per_gib"):
            out[n][f"median_{k}"] = statistics.median(out[n][k])
    for n in names:
        out[n]["ratio_to_obstore"] = out[n]["median_mib_s"] / out["obstore"]["median_mib_s"]
        out[n]["cpu_ratio_to_obstore"] = out[n]["median_client_cpu_s_per_gib"] / out["obstore"][
            "median_client_cpu_s_per_gib"]
    return out


def machine() -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def versions() -> dict:
    out = {}
    for p in VERSIONS:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def busiest(n: int = 5) -> list[str]:
    """The n busiest processes (nice, %CPU, command), for the record of what else ran."""
    ps = shutil.which("ps")
    if ps is None:
        return []
    lines = subprocess.run([ps, "-eo", "ni,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                           timeout=10).stdout.splitlines()
    return [" ".join(x.split()) for x in lines[1:n + 1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / f"{socket.gethostname()}-s3-libraries.json"),
                    help="The result JSON; its log is written beside it (.log).")
    ap.add_argument("--rounds", type=int, default=5, help="Timed rounds (after one warm-up round).")
    ap.add_argument("--objects", type=int, default=OBJECTS)
    ap.add_argument("--object-mib", type=int, default=OBJECT_MIB, help="Size of each object (the suite: 1).")
    ap.add_argument("--note", default="", help="Free text kept in the result file (the machine's other load).")
    args = ap.parse_args()
    lines = []

    def log(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        lines.append(s)

    size = args.object_mib << 20
    try:        # without s3fs (not one of cachefeat's dependencies) its sides are left out, saying so
        import s3fs  # noqa: F401
        libraries, writers = LIBRARIES, WRITERS
    except ImportError:
        libraries = tuple(n for n in LIBRARIES if not n.startswith("s3fs"))
        writers = tuple(n for n in WRITERS if not n.startswith("s3fs"))
    rng = np.random.default_rng(0)
    objects = [rng.bytes(size) for _ in range(args.objects)]
    keys = [f"data/obj-{i:03d}.bin" for i in range(args.objects)]
    plans = [plan(size, rng) for _ in objects]
    index, data = [p[0] for p in plans], [p[1] for p in plans]
    read_bytes = sum(e - s for s, e in index) + sum(e - s for rs in data for s, e in rs)
    write_bytes = size * args.objects
    load0, top0 = os.getloadavg(), busiest()
    ver = versions()
    log(f"s3 libraries on {socket.gethostname()}: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    if libraries != LIBRARIES:
        log("s3fs is not installed: its sides are left out (pip install s3fs)")
    log(f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; busiest: {'; '.join(top0)}")
    if args.note:
        log(f"note: {args.note}")
    log(f"{args.objects} objects of {args.object_mib} MiB; read: per object its last {INDEX_BYTES >> 10} KiB, then "
        f"{DATA_RANGES} ranges of ~{(size - INDEX_BYTES) / DATA_RANGES / 2 ** 20:.2f} MiB with 4-32 KiB gaps "
        f"({read_bytes / 2 ** 20:.1f} MiB); write: one PUT per object ({write_bytes / 2 ** 20:.0f} MiB); "
        f"{IN_FLIGHT} in flight, coalesce {COALESCE >> 10} KiB; moto's S3 server in a process of its own; "
        f"{args.rounds} rounds after a warm-up, the order rotated each round")
    loop = asyncio.new_event_loop()
    t_start = time.perf_counter()
    with test_module("s3server").serve_in_child() as (served, pid):
        server = (served.endpoint, served.key, served.secret, served.region)
        import boto3
        endpoint, key, secret, region = server
        admin = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                             region_name=region)
        bucket = "s3-libraries"
        admin.create_bucket(Bucket=bucket)
        for k, b in zip(keys, objects):
            admin.put_object(Bucket=bucket, Key=k, Body=b)
        make = {"obstore": lambda: Obstore(server, bucket), "s3fs": lambda: S3fs(server, bucket),
                "s3fs_merged": lambda: S3fs(server, bucket, merged=True), "boto3": lambda: Boto3(server, bucket)}
        libs = {n: make[n]() for n in libraries}
        reads, writes = [], []
        for rnd in range(args.rounds + 1):
            order = libraries[rnd % len(libraries):] + libraries[:rnd % len(libraries)]
            got = {}
            for n in order:
                res, wall, ccpu, scpu = timed(loop, libs[n].read(keys, index, data), pid)
                check(n, objects, index, data, res)
                del res
                got[n] = {"s": wall, "client_cpu": ccpu, "server_cpu": scpu}
            worder = [n for n in order if n in writers]
            for n in worder:
                wkeys = [f"put-{n}/obj-{i:03d}.bin" for i in range(args.objects)]
                _, wall, ccpu, scpu = timed(loop, libs[n].write(wkeys, objects), pid)
                for k in wkeys[:2] + wkeys[-1:]:          # (not timed) what was put is the bytes sent
                    if admin.get_object(Bucket=bucket, Key=k)["Body"].read() != objects[wkeys.index(k)]:
                        raise RuntimeError(f"{n} put other bytes than the objects'")
                admin.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in wkeys]})
                got[f"put:{n}"] = {"s": wall, "client_cpu": ccpu, "server_cpu": scpu}
            label = "warm-up" if rnd == 0 else f"round {rnd}"
            log(f"  {label}: read " + ", ".join(f"{n} {read_bytes / 2 ** 20 / got[n]['s']:.0f} MiB/s "
                                                 f"(cpu {got[n]['client_cpu']:.2f} s)" for n in order)
                + "; write " + ", ".join(f"{n} {write_bytes / 2 ** 20 / got[f'put:{n}']['s']:.0f} MiB/s "
                                         f"(cpu {got[f'put:{n}']['client_cpu']:.2f} s)" for n in worder))
            if rnd:
                reads.append({n: got[n] for n in libraries})
                writes.append({n: got[f"put:{n}"] for n in writers})
        for n in libraries:
            if n.startswith("s3fs"):
                loop.run_until_complete(libs[n].close())
    loop.close()
    load1 = os.getloadavg()
    read = figures(reads, read_bytes, libraries)
    write = figures(writes, write_bytes, writers)
    for what, fig in (("read", read), ("write", write)):
        log(f"{what} medians: " + "; ".join(
            f"{n} {f['median_mib_s']:.0f} MiB/s ({f['ratio_to_obstore']:.2f} of obstore), client CPU "
            f"{f['median_client_cpu_s_per_gib']:.2f} s/GiB ({f['cpu_ratio_to_obstore']:.2f} of obstore), server "
            f"{f['median_server_cpu_s_per_gib']:.2f} s/GiB" for n, f in fig.items()))
    log(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; {time.perf_counter() - t_start:.0f} s")
    settings = {"objects": args.objects, "object_mib": args.object_mib, "index_bytes": INDEX_BYTES,
                "data_ranges": DATA_RANGES, "gaps": "4-32 KiB", "in_flight": IN_FLIGHT, "coalesce": COALESCE,
                "rounds": args.rounds, "read_mib": read_bytes / 2 ** 20, "write_mib": write_bytes / 2 ** 20,
                "server": "moto (Python) on 127.0.0.1, a process of its own",
                "botocore_max_pool_connections": IN_FLIGHT}
    load = {"start": load0, "end": load1, "busiest_at_start": top0, "note": args.note}
    # under "sections", as the benchmarks' other result files: what docs' '<!-- fig FILE:KEY -->' marks name
    result = {"machine": machine(), "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "git_describe": git_describe(),
              "versions": ver, "sections": {"s3_libraries": {
                  "settings": settings, "load": load, "read": read, "write": write,
                  "rounds": {"read": reads, "write": writes}}}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".log").write_text("\n".join(lines) + "\n")
    log(f"wrote {out} and {out.with_suffix('.log')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
