"""The Zarr v3 shard files of a cache's big arrays, read and written straight, without zarr's per-chunk
machinery: the same bytes as zarr's, through the same codecs.

A cache's feature arrays hold one chunk per clip inside one shard file per shard (docs/cache-format.md).
zarr-python spends ~0.5 ms per chunk it reads (the reading benchmark: 338-378 clips/s of 5 chunks each
through zarr, 3,600-3,900 through this reader), while decompressing a 16 KiB zstd chunk takes ~20 us, so a
streamed reader of small chunks ran at a fraction of the disk's and the codec's speed. `ShardFile` decodes
exactly what zarr would: the sharding codec's index (little-endian (offset, nbytes) uint64 pairs,
CRC32C-checked), then each wanted inner chunk through the array's own codec chain (bytes -> zstd | gzip |
blosc | nothing -> crc32c), with positional reads of only the byte ranges needed, coalesced. A chunk missing
from the index (never written, or all fill value) reads as the fill value, as in zarr.

Writing is the same format the other way round (`ShardFile.write`): each row's chunk through the codec
chain (bytes -> compressor -> crc32c), chunks equal to the fill value left out as zarr leaves them out,
then the index and its checksum, written to a temporary file renamed over the shard file. A durable write
(fsync, the default) goes around the page cache with O_DIRECT through reusable aligned staging buffers:
its bytes must reach the disk before the shard counts anyway, and through the page cache every shard of a
multi-TB extraction would first take fresh pages and evict everything else. Filesystems that refuse O_DIRECT (some
network and FUSE mounts) get the buffered `os.writev` stream, as does `--no-fsync`.
zarr's own write path spent its time per chunk (a scan against the fill value, copies in the checksum
codec and the shard assembly, an event-loop round trip): 381-401 MiB/s on the H100 node whatever the
codec, while one thread here writes at the disk's speed (the io benchmark, docs/performance.md).
zarr remains the reader of record: tests check that zarr writes the same bytes and reads these back.

Only the layouts cachefeat writes are handled (regular grid, chunks and shards split along the first axis
only, default chunk keys); `ShardFile.open` returns None for anything else and the caller uses zarr. Data
that fails a check raises `ShardFileError`; the cache then reads through zarr, which names what is damaged.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .confine import check_folders, open_inside, read_json, real_root, refusal
from .layout import NOT_STORED, crc32c_of
from .validate import MAX_ARRAY_DOC

MISSING = 2 ** 64 - 1           # offset and length of a chunk absent from a shard
COALESCE_GAP = 1 << 16          # read two chunk ranges at once when fewer bytes than this lie between them
IOV_MAX = 1024                  # buffers one writev may take (Linux)
DIRECT_ALIGN = 4096             # O_DIRECT wants offsets, lengths and memory aligned to the logical block size
STAGE_BYTES = 4 << 20           # a staging buffer: copies and checksums stay in the CPU cache (2 x FILE_WRITERS: 32 MB)


class ShardFileError(Exception):
    """A shard file whose bytes do not decode (bad checksum, truncated, wrong size)."""


class NotAsRecorded(ShardFileError):
    """Intact chunks that are not the ones the shard's checksum record lists: copied or moved from another
    place, or deleted. zarr cannot tell (it reads them as data or as the fill value), so no fallback."""


@dataclass(frozen=True)
class Compressor:
    """A bytes-to-bytes compressor of zarr's codec list, as the numcodecs object zarr itself builds for it.
    `decode(blob, nbytes)` returns the chunk's `nbytes` bytes, or raises: the size a compressed frame claims is
    checked against the chunk's before anything is decompressed (a crafted frame cannot make it allocate)."""
    encode: Callable
    decode: Callable
    raw_bytes: bool           # encode takes the chunk as uint8 (blosc, as zarr passes it), not typed


def _compressor(codec: dict, itemsize: int) -> Compressor | None:
    """The numcodecs codec zarr uses for a compressor entry of the codec list (same settings, so the same
    bytes), or None if it is one this module does not know."""
    name, cfg = codec.get("name"), codec.get("configuration") or {}
    if name == "zstd":
        from numcodecs import Zstd
        z = Zstd.from_config({"level": cfg.get("level", 0), "checksum": cfg.get("checksum", False)})

        def unzstd(blob, nbytes):
            if _zstd_content_size(blob) != nbytes:    # numcodecs allocates what the frame says it holds
                raise ValueError(f"a zstd frame of {_zstd_content_size(blob)} bytes for a chunk of {nbytes}")
            return z.decode(blob)
        return Compressor(z.encode, unzstd, False)
    if name == "gzip":
        from numcodecs import GZip
        g = GZip(cfg.get("level", 5))

        def gunzip(blob, nbytes):
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            data = d.decompress(memoryview(blob), nbytes)         # never more than the chunk's bytes
            if len(data) != nbytes or not d.eof or d.unconsumed_tail:
                raise ValueError(f"gzip data of another size than the chunk's {nbytes} bytes")
            return data
        return Compressor(g.encode, gunzip, False)
    if name == "blosc":                       # blosc frames carry their own settings
        import numcodecs
        from numcodecs import Blosc
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}.get(cfg.get("shuffle", "shuffle"))
        if shuffle is None:
            return None
        config = {"cname": cfg.get("cname", "zstd"), "clevel": cfg.get("clevel", 5), "shuffle": shuffle,
                  "blocksize": cfg.get("blocksize", 0)}
        if tuple(int(x) for x in numcodecs.__version__.split(".")[:2]) >= (0, 16):   # as zarr's BloscCodec
            config["typesize"] = cfg.get("typesize", itemsize)
        b = Blosc.from_config(config)

        def unblosc(blob, nbytes):
            if len(blob) < 16 or int.from_bytes(bytes(blob[4:8]), "little") != nbytes:   # what it allocates
                raise ValueError(f"a blosc frame of another size than the chunk's {nbytes} bytes")
            return b.decode(blob)
        return Compressor(b.encode, unblosc, True)
    return None


def _zstd_content_size(blob) -> int | None:
    """The decompressed size a zstd frame's header states (RFC 8878, 3.1.1.1), or None when it states none."""
    head = bytes(blob[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    flags = head[4]
    single = (flags >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[flags & 3]
    size = (single, 2, 4, 8)[flags >> 6]
    if not size or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def _parse_chain(codecs: list, itemsize: int = 1) -> tuple[str, Compressor | None, bool] | None:
    """(endian, compressor or None, crc) of a chain [bytes, compressor?, crc32c?], or None if it is another."""
    if not codecs or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    rest = list(codecs[1:])
    crc = bool(rest) and rest[-1].get("name") == "crc32c"
    if crc:
        rest.pop()
    if len(rest) > 1:
        return None
    compressor = None
    if rest:
        compressor = _compressor(rest[0], itemsize)
        if compressor is None:
            return None
    return endian, compressor, crc


class Written(NamedTuple):
    """What `ShardFile.write` wrote: the file's size and each row's chunk checksum (NOT_STORED: left out)."""
    nbytes: int
    checksums: np.ndarray


@dataclass(frozen=True)
class ShardFile:
    """One sharded array of a local Zarr v3 store, read shard file by shard file."""
    folder: Path
    shape: tuple[int, ...]
    dtype: np.dtype                 # as stored (with the byte order of the bytes codec)
    shard_rows: int
    chunk_shape: tuple[int, ...]    # (1, *shape[1:]): one row per chunk
    fill_value: object
    compressor: Compressor | None
    chunk_crc: bool
    index_crc: bool
    index_at_end: bool
    root: str                       # the store's real folder: every file read or written lies in it (confine.py)
    _inside: set = field(default_factory=set, compare=False, repr=False)   # shards whose file open_inside passed

    @classmethod
    def open(cls, folder: str | os.PathLike, root: str | None = None) -> ShardFile | None:
        """The reader for the array stored in `folder` (in the store whose real folder is `root`; default:
        `folder` itself), or None when its layout is not one this reads."""
        folder = Path(folder)
        root = real_root(folder) if root is None else root
        try:
            meta = read_json(root, folder / "zarr.json", MAX_ARRAY_DOC)
        except OSError:
            return None
        try:
            return cls._from_meta(folder, meta, root)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            return None

    @classmethod
    def _from_meta(cls, folder: Path, meta: dict, root: str) -> ShardFile | None:
        shape = tuple(meta["shape"])
        codecs = meta["codecs"]
        keys = meta.get("chunk_key_encoding", {})
        if (meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or len(codecs) != 1
                or codecs[0]["name"] != "sharding_indexed" or meta["chunk_grid"]["name"] != "regular"
                or keys.get("name") != "default" or (keys.get("configuration") or {}).get("separator", "/") != "/"
                or meta.get("storage_transformers") or not isinstance(meta["data_type"], str) or not shape):
            return None
        shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        cfg = codecs[0]["configuration"]
        chunk = tuple(cfg["chunk_shape"])
        if shard[1:] != shape[1:] or chunk != (1, *shape[1:]):
            return None
        dtype = np.dtype(meta["data_type"])
        if dtype.kind not in "biuf":
            return None
        inner, index = _parse_chain(cfg["codecs"], dtype.itemsize), _parse_chain(cfg["index_codecs"])
        if inner is None or index is None or index[0] != "little" or index[1] is not None:
            return None
        endian, compressor, chunk_crc = inner
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
        fill = meta.get("fill_value", 0)
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):   # "NaN", hex strings...: zarr's job
            return None
        return cls(folder, shape, dtype, shard[0], chunk, fill, compressor, chunk_crc,
                   index[2], cfg.get("index_location", "end") == "end", root)

    @cached_property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def path(self, shard: int) -> Path:
        return self.folder / "c" / str(shard) / "/".join("0" * (len(self.shape) - 1))

    # -- reading
    def read(self, rows, recorded: Callable[[int], np.ndarray | None] | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Rows of the array: a slice with step 1 or an int array (any order, repeats allowed). With
        `recorded(shard)` (the shard's checksums of this array's chunks, from its record; None: no record)
        each chunk read must be the one recorded at its place (NotAsRecorded otherwise). `out`: an array (or
        a strided view, such as one layer's place in a stack of layers) of the rows' shape and dtype that the
        chunks are decoded into, saving a copy; returned."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise ValueError("ShardFile reads slices with step 1 only")
            rows = np.arange(start, max(start, stop))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError("rows must be a slice or a 1-d array")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        shape, dtype = (len(rows), *self.shape[1:]), self.dtype.newbyteorder("=")
        if out is None:
            out = np.empty(shape, dtype)
        elif out.shape != shape or out.dtype != dtype:
            raise ValueError(f"{self.folder}: out is {out.dtype}{out.shape}, the rows {dtype}{shape}")
        shard_of = rows // self.shard_rows
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            expect = recorded(int(shard)) if recorded is not None else None
            self._read_into(int(shard), rows[where] - int(shard) * self.shard_rows, out, where, expect)
        return out

    def _read_into(self, shard: int, local: np.ndarray, out: np.ndarray, where: np.ndarray,
                   expect: np.ndarray | None = None) -> None:
        """Decode chunks `local` (row indices inside `shard`) into out[where]; `expect`: their recorded
        checksums (NOT_STORED: a chunk left out)."""
        path = self.path(shard)
        wanted = np.unique(local)
        try:
            present, blobs = self._fetch(shard, path, wanted)
        except FileNotFoundError:            # no chunk of this shard was ever stored
            if expect is not None:
                self._check_record(path, shard, wanted, np.full(len(wanted), NOT_STORED), expect)
            out[where] = self.fill_value
            return
        if expect is not None:
            found = np.full(len(wanted), NOT_STORED)
            found[present] = [self._stored_crc(b) for b in blobs]
            self._check_record(path, shard, wanted, found, expect)
        slot = {int(r): int(p) for p, r in zip(where[::-1], local[::-1])}     # first position of each row
        for row, blob in zip(wanted[present].tolist(), blobs):
            out[slot[row]] = self._decode(blob, path, row)
        for row in wanted[~present].tolist():
            out[slot[row]] = self.fill_value
        if len(slot) < len(local):                                           # repeated rows
            for pos, row in zip(where.tolist(), local.tolist()):
                if slot[row] != pos:
                    out[pos] = out[slot[row]]

    def _fetch(self, shard: int, path: Path, wanted: np.ndarray) -> tuple[np.ndarray, list]:
        """(present, blobs): which of the rows `wanted` (sorted, unique) the shard file stores, and the bytes of
        their chunks; FileNotFoundError when the shard has no file. (The object store reader's ranged GETs
        replace this: store.reader.RemoteShardFile.)"""
        fd = self._open(shard, path)
        try:
            index = self._index(fd, path)
            spans = index[wanted]
            present = spans[:, 0] != MISSING
            return present, self._read_ranges(fd, path, spans[present])
        finally:
            os.close(fd)

    def _open(self, shard: int, path: Path) -> int:
        """The shard file, read-only: through open_inside the first time (no link, a regular file inside the
        store), then with O_NOFOLLOW alone, which spares the hot path two system calls per file (the folders
        on its way were inside the store; a cache is not rebuilt under its reader)."""
        if shard in self._inside:
            try:
                return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise
            except OSError:                  # a link now, or unreadable: open_inside says which
                pass
        fd = open_inside(self.root, path)
        self._inside.add(shard)
        return fd

    def _stored_crc(self, blob) -> int:
        """The checksum a chunk's crc32c codec stored (without that codec: the CRC32C of its bytes)."""
        return int.from_bytes(bytes(blob[-4:]), "little") if self.chunk_crc else crc32c_of(blob)

    def _check_record(self, path: Path, shard: int, rows: np.ndarray, found: np.ndarray,
                      expect: np.ndarray) -> None:
        wrong = rows[found != expect[rows]]
        if len(wrong):
            first = shard * self.shard_rows
            raise NotAsRecorded(f"{path}: the chunks of clips {', '.join(str(first + r) for r in wrong[:4].tolist())}"
                                f"{' ...' if len(wrong) > 4 else ''} are not the ones recorded when the shard was "
                                f"written (copied, moved or deleted)")

    def chunk_checksums(self, shard: int) -> np.ndarray:
        """(shard_rows,) int64: the stored checksum of each chunk of shard `shard`'s file, NOT_STORED where a
        chunk is left out; what the shard's record holds for this array. Reads the index and four bytes a
        chunk (the chunks' own checksums are checked when they are read)."""
        out = np.full(self.shard_rows, NOT_STORED, np.int64)
        path = self.path(shard)
        try:
            fd = self._open(shard, path)
        except FileNotFoundError:
            return out
        try:
            index = self._index(fd, path)
            for r in np.flatnonzero(index[:, 0] != MISSING).tolist():
                off, n = int(index[r, 0]), int(index[r, 1])
                out[r] = (int.from_bytes(os.pread(fd, 4, off + n - 4), "little") if self.chunk_crc
                          else crc32c_of(os.pread(fd, n, off)))
        finally:
            os.close(fd)
        return out

    def _index(self, fd: int, path: Path) -> np.ndarray:
        """(shard_rows, 2) uint64 (offset, nbytes) of each chunk of the shard file."""
        size = self.index_nbytes
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):     # (open_inside checked it once; a file is not replaced under a reader)
            raise refusal(self.root, f"{path} is not a regular file")
        file_size = st.st_size
        if file_size < size:
            raise ShardFileError(f"{path}: {file_size} bytes, shorter than its index ({size} bytes)")
        return self._parse_index(os.pread(fd, size, file_size - size if self.index_at_end else 0), file_size, path)

    @property
    def index_nbytes(self) -> int:
        return self.shard_rows * 16 + (4 if self.index_crc else 0)

    def _parse_index(self, raw: bytes, file_size: int, path) -> np.ndarray:
        """The index's bytes (`raw`, read from a file of `file_size` bytes) checked and parsed."""
        n, size = self.shard_rows, self.index_nbytes
        if len(raw) != size:
            raise ShardFileError(f"{path}: {len(raw)} bytes of an index of {size}")
        if self.index_crc:
            raw, stored = raw[:-4], int.from_bytes(raw[-4:], "little")     # bytes: crc32c takes them as is
            if crc32c_of(raw) != stored:
                raise ShardFileError(f"{path}: the shard index fails its checksum")
        index = np.frombuffer(raw, "<u8").reshape(n, 2)
        limit = file_size - size if self.index_at_end else file_size     # offsets count from the file's start
        present = index[:, 0] != MISSING
        if (index[present, 0] + index[present, 1] > limit).any():
            raise ShardFileError(f"{path}: the shard index points past the end of the file")
        return index

    @staticmethod
    def _read_ranges(fd: int, path: Path, spans: np.ndarray) -> list[np.ndarray]:
        """The bytes of each (offset, nbytes) span, reading neighbouring spans in one call."""
        blobs: list[np.ndarray | None] = [None] * len(spans)
        order = np.argsort(spans[:, 0], kind="stable")
        i = 0
        while i < len(order):
            j = i
            start = int(spans[order[i], 0])
            end = start + int(spans[order[i], 1])
            while j + 1 < len(order) and int(spans[order[j + 1], 0]) - end < COALESCE_GAP:
                j += 1
                end = max(end, int(spans[order[j], 0] + spans[order[j], 1]))
            buf = np.frombuffer(os.pread(fd, end - start, start), np.uint8)
            if len(buf) != end - start:
                raise ShardFileError(f"{path}: truncated (wanted bytes {start}..{end})")
            for k in order[i:j + 1]:
                off = int(spans[k, 0]) - start
                blobs[k] = buf[off: off + int(spans[k, 1])]
            i = j + 1
        return blobs

    def _decode(self, blob: np.ndarray, path: Path, row: int) -> np.ndarray:
        if self.chunk_crc:
            if len(blob) < 4 or crc32c_of(blob[:-4]) != int.from_bytes(blob[-4:].tobytes(), "little"):
                raise ShardFileError(f"{path}: chunk {row} fails its checksum")
            blob = blob[:-4]
        try:       # never more bytes than a chunk holds (Compressor.decode)
            raw = self.compressor.decode(blob, self.chunk_nbytes) if self.compressor is not None else blob
        except Exception as e:               # the codec's own error for a damaged frame, or a size that differs
            raise ShardFileError(f"{path}: chunk {row} does not decompress ({e})") from None
        if memoryview(raw).nbytes != self.chunk_nbytes:
            raise ShardFileError(f"{path}: chunk {row} decodes to the wrong size")
        return np.frombuffer(raw, self.dtype).reshape(self.shape[1:])

    # -- writing
    def write(self, shard: int, data: np.ndarray, fsync: bool = True) -> Written:
        """Write rows shard * shard_rows ... of the array (`data`, one row per chunk; the last shard may be
        short) as its shard file, the bytes zarr writes for the same rows; returns the bytes written and
        what `chunk_checksums` would now read back (a durable write bypassed the page cache, so reading
        them back would cost a disk read per chunk). The
        file is replaced whole (a temporary file renamed over it), and removed when every chunk equals the
        fill value, as zarr does. With `fsync` the bytes and the new directory entry are on the disk when
        this returns (what lets a progress flag set afterwards survive a power cut)."""
        if data.shape[1:] != self.shape[1:] or len(data) > self.shard_rows:
            raise ValueError(f"{self.folder}: rows of shape {data.shape} do not fit a shard of {self.shape}")
        path = self.path(shard)
        stored = np.ascontiguousarray(data, dtype=self.dtype)           # the bytes codec's byte order
        rows = stored.reshape(len(stored), -1)
        keep = np.flatnonzero(~self._is_fill(rows))
        checksums = np.full(self.shard_rows, NOT_STORED, np.int64)
        if not len(keep):
            path.unlink(missing_ok=True)
            return Written(0, checksums)
        raw_rows = rows.view(np.uint8)
        blobs = [raw_rows[r] if self.compressor is None else
                 self.compressor.encode(raw_rows[r] if self.compressor.raw_bytes else rows[r]) for r in keep.tolist()]
        sizes = np.array([memoryview(b).nbytes for b in blobs], np.uint64) + (4 if self.chunk_crc else 0)
        index = np.full((self.shard_rows, 2), MISSING, "<u8")
        index[keep, 1] = sizes
        index[keep, 0] = np.cumsum(sizes) - sizes
        index_size = index.nbytes + (4 if self.index_crc else 0)
        if not self.index_at_end:                  # offsets count from the file's start
            index[keep, 0] += index_size
        index_bytes = index.tobytes()
        if self.index_crc:
            index_bytes += crc32c_of(index_bytes).to_bytes(4, "little")
        head, tail = (b"", index_bytes) if self.index_at_end else (index_bytes, b"")
        check_folders(self.root, path.parent)                    # nothing written through a link
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):    # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        total, crcs = _write_new_file(tmp, head, blobs, self.chunk_crc, tail, fsync)
        checksums[keep] = crcs
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
        return Written(total, checksums)

    def _is_fill(self, rows: np.ndarray) -> np.ndarray:
        """(rows,) bool: the row's chunk equals the fill value everywhere, so zarr leaves it out. A zero fill
        is compared by bits, as zarr does (so -0.0 is data)."""
        if self.fill_value == 0:
            bits = rows.view(f"u{self.dtype.itemsize}")
            fill = ~np.any(bits[:, :64], axis=1)      # features are rarely 0 this early: scan the rest only then
            for r in np.flatnonzero(fill):
                fill[r] = not bits[r].any()
            return fill
        return np.all(rows == self.fill_value, axis=1)


_stage = threading.local()       # each writing thread's staging buffers and the thread that writes them out
_refuses_direct: set[int] = set()  # st_dev of filesystems that refused O_DIRECT


def _new_stage() -> None:
    global _stage
    _stage = threading.local()


os.register_at_fork(after_in_child=_new_stage)   # a forked child has no disk threads: it starts its own


def _write_new_file(path: Path, head: bytes, blobs: list, crc_in_file: bool, tail: bytes,
                    fsync: bool) -> tuple[int, list[int]]:
    """Write `head`, each blob (followed by its CRC32C when `crc_in_file`) and `tail` as the new file
    `path`; returns the file's size and each blob's CRC32C. With `fsync` the bytes are on the disk when
    this returns."""
    if fsync and hasattr(os, "O_DIRECT"):
        dev = os.stat(path.parent).st_dev
        if dev not in _refuses_direct:
            try:
                return _write_direct(path, head, blobs, crc_in_file, tail)
            except OSError as e:
                if e.errno != errno.EINVAL:                 # EINVAL: O_DIRECT or its alignment refused here
                    raise
                _refuses_direct.add(dev)
                path.unlink(missing_ok=True)                # (it may have been created): made again below
    crcs = [crc32c_of(b) for b in blobs]
    parts = [head] if head else []
    for blob, crc in zip(blobs, crcs):
        parts.append(blob)
        if crc_in_file:
            parts.append(crc.to_bytes(4, "little"))
    if tail:
        parts.append(tail)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)   # a new file, never a link
    try:
        total = 0
        for i in range(0, len(parts), IOV_MAX):
            part = parts[i:i + IOV_MAX]
            want = sum(memoryview(c).nbytes for c in part)
            done = os.writev(fd, part)
            if done != want:                   # a short write (rare): write the rest plainly
                rest = b"".join(bytes(memoryview(c).cast("B")) for c in part)[done:]
                while rest:
                    rest = rest[os.write(fd, rest):]
            total += want
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return total, crcs


def _write_direct(path: Path, head: bytes, blobs: list, crc_in_file: bool, tail: bytes) -> tuple[int, list[int]]:
    """The file's bytes copied through this thread's two page-aligned staging buffers and written with
    O_DIRECT in STAGE_BYTES pieces by this thread's disk thread, so the disk writes one buffer while the
    other is filled. Each blob's CRC32C is computed on its staged copy, while it is in the CPU's cache (one
    pass over the data less than computing it first). The last partial page goes through the page cache
    (O_DIRECT writes whole pages only). Then fsync: the file's size and the disk's write cache."""
    if getattr(_stage, "buffers", None) is None:   # anonymous mmaps: page-aligned; numpy copies into them
        _stage.buffers = [np.frombuffer(mmap.mmap(-1, STAGE_BYTES), np.uint8) for _ in range(2)]   # without the GIL
        _stage.disk = ThreadPoolExecutor(1, thread_name_prefix="cachefeat-direct-write")
    stages, disk = _stage.buffers, _stage.disk
    size = stages[0].nbytes
    writing: list[Future | None] = [None, None]     # each buffer's write in flight
    cur = fill = offset = 0
    crcs: list[int] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECT, 0o644)
    try:
        def send(nbytes: int) -> None:
            nonlocal cur, fill, offset
            writing[cur] = disk.submit(_pwrite_all, fd, memoryview(stages[cur][:nbytes]), offset)
            offset += nbytes
            cur, fill = 1 - cur, 0
            if writing[cur] is not None:     # the other buffer: free once its write is done
                writing[cur].result()
                writing[cur] = None

        def stage(data, crc: int | None = None) -> int | None:
            """Copy `data` into the staging buffers (sending each full one); with `crc`, extend it over the
            staged bytes."""
            nonlocal fill
            src = np.frombuffer(data, np.uint8)
            n, pos = src.nbytes, 0
            while pos < n:
                k = min(n - pos, size - fill)
                piece = stages[cur][fill:fill + k]
                piece[...] = src[pos:pos + k]
                if crc is not None:
                    crc = crc32c_of(piece, crc)
                fill, pos = fill + k, pos + k
                if fill == size:
                    send(size)
            return crc

        stage(head)
        for blob in blobs:
            crc = stage(blob, 0)
            crcs.append(crc)
            if crc_in_file:
                stage(crc.to_bytes(4, "little"))
        stage(tail)
        whole = fill // DIRECT_ALIGN * DIRECT_ALIGN
        rest = bytes(stages[cur][whole:fill])
        if whole:
            send(whole)
        for w in writing:
            if w is not None:
                w.result()
    except BaseException:
        for w in writing:                    # no write may still use the buffers or the descriptor
            if w is not None:
                w.exception()
        os.close(fd)
        raise
    os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)     # the partial last page, through the page cache
    try:
        _pwrite_all(fd, memoryview(rest), offset)
        os.fsync(fd)                         # the whole file: fsync is per file, not per descriptor
    finally:
        os.close(fd)
    return offset + len(rest), crcs


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf.nbytes:
        done = os.pwrite(fd, buf, offset)
        buf, offset = buf[done:], offset + done


def fsync_dir(folder: Path) -> None:
    """Put a folder's entries (a file created or renamed in it) on the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:          # platforms where a folder cannot be opened: the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
