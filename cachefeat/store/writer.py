"""Writing a cache: the one way to open a store for writing (`open_for_writing`: lock, unfinished
creation, create or resume, repair, what is left to do), used by single-process and Ray extraction alike,
and the shard writer.

A shard is written whole, then flagged done in `progress`; killed anywhere before the flag, it reads as
not done and the next run writes it again. Stage one decides what goes into a shard; this module decides
how it lands.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync as zarr_sync

from .bucket_writer import BucketRun, bucket_out
from .confine import open_group, open_inside, read_json, real_root, remove_inside
from .layout import (
    _DIMS,
    ATTR,
    CREATING,
    DEFAULT_CODEC,
    LOCK_NAME,
    NO_RECORD,
    RECORD,
    SHARD_VIDEO_TABLES,
    STORE_ENTRIES,
    ZARR_PARTIAL,
    CacheError,
    Layout,
    UnsafeStore,
    content_fingerprint,
    diff_meta,
    parse_codec,
    record_slots,
    table_checksum,
)
from .lock import StoreLock
from .reader import Cache
from .shard_file import fsync_dir
from .validate import MAX_ROOT_DOC
from .verify import verify


# ------------------------------------------------------------------------------------------- life cycle
@dataclass
class StoreWriter:
    """A store opened for writing: the lock is held until `close()` (or the end of a `with` block)."""
    cache: Cache            # the store, opened read-write
    lock: StoreLock
    todo: list[int]         # shards still to write, in order
    bucket: BucketRun | None = None     # for --out s3://...: `cache` is the staging copy, uploaded shard by shard

    @property
    def path(self) -> Path:
        return self.cache.path

    @property
    def layout(self) -> Layout:
        return self.cache.layout

    @property
    def meta(self) -> dict:
        return self.cache.meta

    def shard_done(self, shard: int) -> None:
        """Called by the shard writer after each shard is flagged done: a bucket's shard is uploaded here."""
        if self.bucket is not None:
            self.bucket.shard_done(self.cache, shard)

    def view(self) -> Cache:
        """The store as it is now, for counting what is done (for a bucket: the bucket)."""
        return self.cache if self.bucket is None else self.bucket.view()

    def close(self, failed: bool = False) -> None:
        self.lock.release()
        if self.bucket is not None:
            self.bucket.close(failed)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)


def open_for_writing(path: str | os.PathLike, meta: dict, layout: Layout, videos: list, codec: str = DEFAULT_CODEC,
                     overwrite: bool = False, repair: bool = False,
                     extras: Callable[[], dict[str, np.ndarray]] | None = None, log=print,
                     timeline: dict[str, np.ndarray] | None = None) -> StoreWriter:
    """Take the store's lock, then create the store or re-open it to resume, and say what is left to do.

    A store whose creation was interrupted is removed and made again; a store made with other settings is
    refused, naming the differences (`overwrite` replaces it); `repair` verifies every finished shard and
    sends the damaged ones back to be written. `extras()` computes the small arrays written once at
    creation (text embeddings, int8 steps); it runs only when the store is created, with the lock held.
    `timeline`: a windowed layout's per-video start and duration (see create_store). `path` may be an
    s3:// URL (or a bucket_writer.BucketOut): the cache is then staged locally and uploaded shard by shard."""
    if (out := bucket_out(path)) is not None:
        run = BucketRun(out, overwrite, repair, log)
        try:
            w = _open_folder(run.path, meta, layout, videos, codec, False, False, extras, run.say, timeline)
        except BaseException as e:
            run.close(failed=True)
            if isinstance(e, CacheError):     # (its lines name the staging folder: the user gave the URL)
                raise type(e)(run.named(str(e))) from None
            raise
        w = replace(w, bucket=run)
        try:
            run.created(w.cache)
        except BaseException:
            w.close(failed=True)
            raise
        return w
    return _open_folder(Path(path), meta, layout, videos, codec, overwrite, repair, extras, log, timeline)


def _open_folder(path: Path, meta: dict, layout: Layout, videos: list, codec: str, overwrite: bool, repair: bool,
                 extras, log, timeline) -> StoreWriter:
    lock = StoreLock(path)
    lock.acquire()
    try:
        cache = _create_or_resume(path, meta, layout, videos, codec, overwrite, repair, extras, timeline)
        if repair:
            _repair_tables(cache, videos, extras, log, timeline)
        todo = _shards_left(cache, repair, log)
    except BaseException:
        lock.release()
        raise
    return StoreWriter(cache, lock, todo)


def _create_or_resume(path: Path, meta: dict, layout: Layout, videos: list, codec: str, overwrite: bool,
                      repair: bool, extras, timeline=None) -> Cache:
    if path.exists() and is_unfinished_creation(path):
        remove_store(path)  # killed while creating it: nothing in it is data yet
    is_cache = os.path.lexists(path / "zarr.json")
    if repair and not is_cache:
        raise CacheError(f"--repair: there is no cache at {path} to repair")
    if path.is_file():
        raise CacheError(f"{path} is a file; choose another --out")
    if not is_cache and path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise CacheError(f"{path} exists and is not a cachefeat cache; choose another --out "
                         f"(--overwrite only replaces a cachefeat cache)")
    if is_cache and overwrite:
        Cache(path)  # refuses to delete a Zarr store that is not ours, or one cachefeat did not write
        remove_store(path)
    elif is_cache:
        old = Cache(path, mode="r+")
        if layout.time and not old.layout.time:
            layout = replace(layout, time=False)   # made before clips/time existed: resumed as it was made
        new = dict(meta, layout=layout.to_dict(), codec=codec, schema_version=old.meta.get("schema_version"))
        if old.meta.get("fingerprint") != content_fingerprint(new):
            diffs = diff_meta(old.meta, new)
            raise CacheError(f"{path} was made with other settings ({'; '.join(diffs[:4]) or 'metadata differs'});"
                             f" use the same settings to resume, --overwrite to start over, or another --out")
        return old
    create_store(path, meta, layout, videos, codec=codec, extras=extras() if extras else None, timeline=timeline)
    return Cache(path, mode="r+")


def _shards_left(cache: Cache, repair: bool, log) -> list[int]:
    """The shards still to write, with --repair's damaged shards sent back first; says what is done."""
    layout = cache.layout
    if repair:
        rep = verify(cache)
        if rep.fatal:
            raise CacheError(f"{cache.path} cannot be repaired by re-extraction: {rep.fatal[0]}")
        if rep.shards:
            log(f"repair: {len(rep.shards)} damaged shards ({len(rep.clips(layout))} clips) will be extracted again")
            reset_shards(cache, rep.shards)
        else:
            log("repair: verify found no damage")
    todo = [int(s) for s in np.flatnonzero(~cache.shard_done())]
    if not todo:
        log(f"{cache.path}: already complete ({layout.num_shards} shards); nothing to do")
    elif layout.num_shards > len(todo):
        log(f"{cache.path}: resuming, {layout.num_shards - len(todo)} of {layout.num_shards} shards already done")
    return todo


def _repair_tables(cache: Cache, videos: list, extras, log, timeline=None) -> None:
    """--repair: the tables written at creation that fail their checks (unreadable, or not matching the
    checksum the metadata recorded), written again from the video list (and `extras()`, computed again)."""
    names = [*cache.layout.creation_tables(), *cache.meta.get("extras", [])]
    bad = []
    for name in names:
        try:
            cache.table(name)
        except UnsafeStore:      # not damage: a cache cachefeat did not write is not "repaired"
            raise
        except Exception:
            bad.append(name)
    if not bad:
        return
    again = extras() if extras is not None and set(bad) & set(cache.meta.get("extras", [])) else None
    tables = creation_tables(cache.layout, videos, again, timeline)
    recorded = cache.meta.get("table_checksums") or {}
    for name in bad:
        if name not in tables or (name in recorded and table_checksum(tables[name][0]) != recorded[name]):
            raise CacheError(f"{cache.path}: table {name} is damaged and this run cannot write it again as it was; "
                             f"extract the cache again with --overwrite")
        arr = cache.root[name]
        for i in range(-(-arr.shape[0] // arr.chunks[0])):      # no read of a damaged chunk on the way
            _drop_chunk(arr, i)
        arr[...] = tables[name][0]
    log(f"repair: wrote {', '.join(bad)} again")


def reset_shards(cache: Cache, shards) -> None:
    """Mark shards as not done, so the next extract writes them again (what --repair does)."""
    prog = cache.root["progress"]
    for s in sorted(shards):
        prog[s] = 0
        if cache.has_records:
            _drop_chunk(cache.root[RECORD], s)      # no record: the shard is to be written again
            cache._records.pop(s, None)


def remove_store(path: Path) -> None:
    """Delete a store's contents, keeping the lock file this process holds: only what lies in its folder (a
    link is removed as a link; a store reached through a link is not deleted at all)."""
    if path.is_symlink():
        raise CacheError(f"{path} is a symbolic link (to {os.path.realpath(path)}); cachefeat deletes nothing "
                         f"through a link: give the folder itself as --out")
    root = real_root(path)
    for child in os.listdir(root):
        if child != LOCK_NAME:
            remove_inside(root, os.path.join(root, child))


# ------------------------------------------------------------------------------------------- creation
def create_store(path: str | os.PathLike, meta: dict, layout: Layout, videos: list, codec: str = DEFAULT_CODEC,
                 extras: dict[str, np.ndarray] | None = None, timeline: dict[str, np.ndarray] | None = None):
    """Create the store with every array (row arrays empty), the static per-video and per-clip tables,
    `extras` (small arrays known up front: text embeddings, int8 steps) and the metadata. `videos` are
    manifest.VideoEntry rows in cache order. A windowed layout also needs `timeline` = {start, duration}: per
    video, the seconds its probe found (videos/start, videos/duration)."""
    compressors = parse_codec(codec)
    # mode "a", not "w": the folder may already hold this writer's lock file, which "w" would delete;
    # the caller has made sure no other store content is there
    root = open_group(path, mode="a")
    root.attrs[CREATING] = True   # replaced by the metadata once every array exists (see is_unfinished_creation)
    C, rows = layout.num_clips, layout.shard_rows
    for name, (shape, dtype) in layout.row_arrays().items():
        dims = _DIMS[name] if name in _DIMS else _DIMS[name.split("/")[0]]
        if shape:  # big per-clip arrays: one chunk per clip, one shard file per shard
            root.create_array(name, shape=(C, *shape), dtype=dtype, chunks=(1, *shape), shards=(rows, *shape),
                              compressors=compressors, fill_value=0, dimension_names=dims)
        else:      # one value per clip: one chunk per shard
            root.create_array(name, shape=(C,), dtype=str if dtype == "str" else dtype, chunks=(rows,),
                              compressors=compressors, fill_value="" if dtype == "str" else 0, dimension_names=dims)
    tables = creation_tables(layout, videos, extras, timeline)
    for name, (data, chunk, dims) in tables.items():
        a = root.create_array(name, shape=data.shape, dtype=data.dtype if data.dtype.kind != "U" else str,
                              chunks=(chunk, *data.shape[1:]), compressors=compressors,
                              fill_value="" if data.dtype.kind == "U" else 0, dimension_names=dims)
        a[...] = data
    # one chunk per shard flag and per shard record: each writer touches only its own files
    root.create_array("progress", shape=(layout.num_shards,), dtype=np.uint8, chunks=(1,),
                      compressors=[Crc32cCodec()], fill_value=0, dimension_names=("shard",))
    k = max(w.stop for w in record_slots(layout).values())
    root.create_array(RECORD, shape=(layout.num_shards, k), dtype=np.int64, chunks=(1, k),
                      compressors=[Crc32cCodec()], fill_value=NO_RECORD, dimension_names=("shard", "chunk"))
    meta = dict(meta, schema_version=layout.schema_version, layout=layout.to_dict(), codec=codec,
                extras=sorted(extras or {}),
                table_checksums={name: table_checksum(data) for name, (data, _, _) in tables.items()
                                 if name not in SHARD_VIDEO_TABLES})
    meta["fingerprint"] = content_fingerprint(meta)
    root.attrs.put({ATTR: meta})  # last: until here the store reads as unfinished
    return root


def creation_tables(layout: Layout, videos: list, extras: dict[str, np.ndarray] | None = None,
                    timeline: dict[str, np.ndarray] | None = None) -> dict:
    """The tables a store holds from its creation: name -> (data, rows per chunk, dimension names). All but
    the per-video results (filled shard by shard) follow from the video list, `extras` and (windowed) the
    `timeline`, so --repair can write them again."""
    V, rows = layout.num_videos, layout.shard_rows
    labels = np.array([v.label for v in videos], dtype=np.int32)
    videos_ = {"videos/path": np.array([str(v.path) for v in videos], dtype=str),
               "videos/id": np.array([str(v.video_id) for v in videos], dtype=str),
               "videos/label": labels, "videos/status": np.zeros(V, np.uint8),
               "videos/num_frames": np.zeros(V, np.int32), "videos/error": np.array([""] * V, dtype=str)}
    if layout.windowed:
        videos_["videos/num_clips"] = np.asarray(layout.clip_counts, dtype=np.int32)
        if timeline is not None:
            videos_["videos/start"] = np.asarray(timeline["start"], dtype=np.float64)
            videos_["videos/duration"] = np.asarray(timeline["duration"], dtype=np.float64)
    out = {name: (videos_[name], layout.video_chunk(name), ("video",)) for name in layout.video_tables()
           if name in videos_}
    out.update({"clips/video": (layout.clip_video(), rows, ("clip",)),
                "clips/view": (layout.clip_view(), rows, ("clip",)),
                "clips/label": (np.repeat(labels, np.diff(layout.first_clips)), rows, ("clip",))})
    for name, data in (extras or {}).items():
        dims = ("class", "channel") if name == "text/embed" else ("layer", "channel")[-np.ndim(data):]
        out[name] = (np.asarray(data), max(1, len(data)), dims)
    return out


def is_unfinished_creation(path: str | os.PathLike) -> bool:
    """A store whose creation was interrupted: our marker but no metadata yet (or an empty group with
    nothing else in the folder but our lock). Safe to remove and create again."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        entries = {e.name: e.is_symlink() for e in os.scandir(p)}
        if "zarr.json" not in entries:      # killed while writing the very first zarr.json
            partials = [name for name in entries if ZARR_PARTIAL.fullmatch(name)]
            return bool(partials) and set(entries) <= {LOCK_NAME, *partials} and not any(entries.values())
        group = read_json(real_root(p), p / "zarr.json", MAX_ROOT_DOC)
    except (OSError, CacheError):
        return False
    unknown = {name for name in set(entries) - STORE_ENTRIES if not ZARR_PARTIAL.fullmatch(name)}
    if unknown or any(entries.values()):   # something cachefeat (or zarr writing for it) never puts there
        return False
    attrs = group.get("attributes") or {}
    if not isinstance(attrs, dict) or ATTR in attrs:
        return False
    if attrs.get(CREATING) is True:
        return True
    return not attrs and all(name in ("zarr.json", LOCK_NAME) or ZARR_PARTIAL.fullmatch(name) for name in entries)


# ------------------------------------------------------------------------------------------- shards
@dataclass
class ShardData:
    """Everything one writer writes for one shard: arrays cover exactly the shard's rows / videos."""
    shard: int
    rows: dict[str, np.ndarray]       # Layout.row_arrays() name -> (shard rows, ...)
    videos: dict[str, np.ndarray]     # videos/status, videos/num_frames, videos/error -> (shard videos,)


def write_shard(store: Cache, data: ShardData, fsync: bool = True) -> int:
    """Write a whole shard, then flag it done; returns the bytes of the big arrays written. Those go
    straight into their shard files (shard_file.py: zarr's bytes without zarr's per-chunk cost); the small
    per-clip and per-video tables go through zarr. Killed anywhere before the flag, the shard reads as not
    done and is redone by the next run. With `fsync` (the default) the shard's files are on the disk before
    the flag is written, and the flag before this returns, so a power cut cannot leave a shard flagged done
    whose data never reached the disk (its cost per shard: the io benchmark)."""
    root, layout = store.root, store.layout
    rows = layout.shard_rows_range(data.shard)
    vids = layout.shard_videos_range(data.shard)
    r, v = slice(rows.start, rows.stop), slice(vids.start, vids.stop)
    direct = {name: store.shard_file(name) for name in data.rows}
    files = {name: _file_writers().submit(f.write, data.shard, data.rows[name], fsync=fsync)
             for name, f in direct.items() if f is not None}
    try:                     # the small tables through zarr, while the shard files are being written
        for name, arr in data.rows.items():
            if direct[name] is None:
                _drop_chunk(root[name], data.shard)
                root[name][r] = arr
                if fsync:
                    _fsync_chunk(root[name], data.shard)
        for name, arr in data.videos.items():
            if not len(arr):
                continue           # windowed: a shard inside one long video writes no video's entries
            chunk = layout.video_chunk(name)
            blocks = range(vids.start // chunk, -(-vids.stop // chunk))   # whole chunks: the shard's videos
            for b in blocks:
                _drop_chunk(root[name], b)
            root[name][v] = arr
            if fsync:
                for b in blocks:
                    _fsync_chunk(root[name], b)
    finally:
        wait(files.values())             # every file finished, even when something failed, before going on
    written, checksums = 0, {}
    for name, w in files.items():
        w = w.result()
        written += w.nbytes
        checksums[name] = w.checksums
    if store.has_records:     # what the shard holds, read back: the record verify and readers check it against
        root[RECORD][data.shard] = store.stored_checksums(data.shard, written=checksums)
        store._records.pop(data.shard, None)
        if fsync:
            _fsync_chunk(root[RECORD], data.shard)
    root["progress"][data.shard] = 1
    if fsync:
        _fsync_chunk(root["progress"], data.shard)
    return written


_FILE_WRITERS: ThreadPoolExecutor | None = None
FILE_WRITERS = 4     # shard files written at once: one's checksums and copies overlap another's disk writes


def _file_writers() -> ThreadPoolExecutor:
    """The threads that write a shard's files side by side (kept for the process's life: each keeps its
    staging buffers, see shard_file._write_direct)."""
    global _FILE_WRITERS
    if _FILE_WRITERS is None:
        _FILE_WRITERS = ThreadPoolExecutor(FILE_WRITERS, thread_name_prefix="cachefeat-shard-file")
    return _FILE_WRITERS


def _forget_file_writers() -> None:
    global _FILE_WRITERS
    _FILE_WRITERS = None


# a forked child has none of the parent's threads: its pool would take work and never run it
os.register_at_fork(after_in_child=_forget_file_writers)


def record_again(cache: Cache) -> None:
    """Write every finished shard's checksum record from what it holds now. For `cachefeat import`, which
    encodes the chunks again (a gzip chunk stores the second it was written, so its bytes and checksum
    differ from the exported cache's); export refuses a cache whose chunks do not match their records."""
    if not cache.has_records:
        return
    for s in np.flatnonzero(cache.shard_done()).tolist():
        cache.root[RECORD][s] = cache.stored_checksums(s)
        cache._records.pop(s, None)


def _fsync_chunk(arr, index: int) -> None:
    """Put the stored object holding the `index`-th block of rows of a zarr array, and its directory entry,
    on the disk (a chunk of only the fill value is not stored: nothing to do)."""
    coords = (index,) + (0,) * (arr.ndim - 1)
    root = str(arr.store_path.store.root)
    path = Path(root) / arr.path / arr.metadata.encode_chunk_key(coords)
    try:
        fd = open_inside(root, path)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _drop_chunk(arr, index: int) -> None:
    """Delete the stored object holding the `index`-th block of rows (a shard file, or the chunk of a
    per-clip table). zarr's sharding codec otherwise reads the old shard before writing a new one, even
    when the write covers all of it: wasted work, and a damaged old shard would block its own rewrite."""
    coords = (index,) + (0,) * (arr.ndim - 1)
    key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
    zarr_sync(arr.store_path.store.delete(key))

