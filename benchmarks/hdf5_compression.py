"""Size and speed of the HDF5 export's compression options on a real extracted cache.

    python benchmarks/hdf5_compression.py CACHE.zarr [--work DIR] [--repeat N]

For each option: the file size (and ratio to the uncompressed arrays), the time to write the export (the
source cache read and decoded included), and the time to read every dataset back with h5py from the
page cache (a first read warms it), so the disk's speed does not decide. Times are the best of --repeat
runs, which tames other processes on a shared machine. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py

from cachefeat.fmt import human_bytes, table
from cachefeat.store import open_cache
from cachefeat.store.exchange import write_hdf5

OPTIONS = [
    ("none", {}),
    ("lzf", {"compression": "lzf", "shuffle": False}),
    ("lzf + shuffle", {"compression": "lzf", "shuffle": True}),
    ("gzip:1", {"compression": "gzip", "compression_opts": 1, "shuffle": False}),
    ("gzip:1 + shuffle", {"compression": "gzip", "compression_opts": 1, "shuffle": True}),
    ("gzip:4 + shuffle", {"compression": "gzip", "compression_opts": 4, "shuffle": True}),
    ("gzip:6 + shuffle", {"compression": "gzip", "compression_opts": 6, "shuffle": True}),
    ("gzip:9 + shuffle", {"compression": "gzip", "compression_opts": 9, "shuffle": True}),
]


def read_all(path) -> None:
    names = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            f[n][()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache")
    ap.add_argument("--work", default=None, help="Folder for the temporary files (default: a temp folder).")
    ap.add_argument("--repeat", type=int, default=3, help="Runs per option; the best time counts.")
    args = ap.parse_args()
    cache = open_cache(args.cache)
    rows, raw = [], None
    with tempfile.TemporaryDirectory(dir=args.work) as d:
        for label, filters in OPTIONS:
            path = Path(d) / "x.h5"
            write_s = read_s = float("inf")
            for _ in range(args.repeat):
                path.unlink(missing_ok=True)
                t0 = time.perf_counter()
                stats = write_hdf5(cache, path, filters)
                write_s = min(write_s, time.perf_counter() - t0)
                read_all(path)
                t0 = time.perf_counter()
                read_all(path)
                read_s = min(read_s, time.perf_counter() - t0)
            size, raw = path.stat().st_size, stats.raw_bytes
            rows.append([label, human_bytes(size), f"{raw / size:.3f}", f"{write_s:.1f}",
                         f"{raw / write_s / 2**20:.0f}", f"{read_s:.2f}", f"{raw / read_s / 2**20:.0f}"])
            path.unlink()
    print(f"{args.cache}: {human_bytes(raw)} of arrays; Zarr store on disk {human_bytes(cache.disk_bytes())} "
          f"({cache.meta.get('codec')})")
    print(table(rows, ["compression", "size", "ratio", "write s", "write MiB/s", "read s", "read MiB/s"]))


if __name__ == "__main__":
    main()
