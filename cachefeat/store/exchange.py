"""Exchange formats: a cache out to HDF5 or to per-video .npy files, and HDF5 back to a cache.

- HDF5 mirrors the store node for node and bit for bit: every Zarr group and array (found by walking the
  store, so arrays added later travel too) becomes an HDF5 group or dataset at the same path, chunked like
  the cache (one clip per chunk for feature arrays), compressed, with a Fletcher-32 checksum per chunk. Each
  node carries its Zarr metadata document (`zarr_json`, authoritative for import) and, for HDF5 readers,
  its attributes as JSON (`cachefeat` on the root) and its `dimension_names`. Arrays are copied as stored
  (raw bits, int8 and scales included), so `import_hdf5` rebuilds a store with the same zarr.json
  documents (layout, sharding, codecs) and equal arrays.
- npy writes the features users read: one file set per valid video in the flat layout of video_features
  (`{stem}_{array}.npy`, axes (views, T, ...)), read through `Cache.read`, plus `index.json` with the
  metadata, class names, the id -> stem mapping and the failed videos. A windowed cache (--sampling fps)
  gives each video one (frames, ...) array per feature instead: its windows concatenated in time, padding
  dropped, a frame held by overlapping windows taken once (from the first window holding it: the backbone
  sees one frame at a time, so every window holds the same features for it), with `{stem}_time.npy`
  (seconds), `{stem}_timestamps_ms.npy` and `{stem}_fps.npy` as video_features writes them.

Outputs are built under a hidden sibling name and renamed into place at the end, so a crash never leaves
a half-written export that looks finished.

The source is a cache folder or a bucket cache (`s3://BUCKET/PREFIX`, reader.RemoteCache), read the same way
(row blocks of whole shards, every checksum checked) and refused the same way (a live writer: the folder's
lock or the prefix's lease; incomplete; damaged records), so both give the same export; the outputs, and
import's input and output, are local files.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .. import __version__
from ..errors import Damaged
from ..fmt import ranges
from .layout import ATTR, SCHEMA_VERSION, CacheDamaged, CacheError
from .lock import StoreLock
from .reader import NOT_DAMAGE, Cache, RemoteCache, open_cache
from .remote import IN_FLIGHT, get_bounded_async, is_remote, run_sync
from .validate import MAX_ARRAY_DOC, MAX_NODES, MAX_ROOT_DOC, _array, _Bad  # _array: an array doc's checks at open
from .writer import record_again

EXPORT_VERSION = 1
HDF5_MARK = "cachefeat_export"       # root attribute of an HDF5 export: JSON {format, version, ...}
HDF5_FORMAT = "cachefeat-hdf5"
NPY_FORMAT = "cachefeat-npy"
NPY_INDEX = "index.json"
ZARR_JSON = "zarr_json"              # per-node attribute: the node's zarr.json document, verbatim
_RESERVED = (ZARR_JSON, "dimension_names", HDF5_MARK)

COMPRESSION_HELP = "gzip[:LEVEL] (LEVEL 1-9), lzf or none"
DEFAULT_COMPRESSION = "gzip:1"       # measured on extracted caches; see README "Export and import"

# Arrays the npy export writes per video besides the layout's feature arrays, and shared ones.
_NPY_PER_VIDEO_EXTRA = ("pixels",)
_NPY_INDICES = {"clips/frame_idx": "frame_idx", "clips/pixel_frame_idx": "pixel_frame_idx", "clips/time": "time"}
_NPY_SHARED = ("text/embed",)

STEM_RULE = ("stem = the video id with '/' and '\\' replaced by '__', every other character except letters, "
             "digits, '.', '_' and '-' replaced by '_', a leading '.' or '-' replaced by '_'; ids longer than "
             "160 bytes are cut and get '-' + 12 hex digits of their SHA-1; a stem already taken (compared "
             "case-insensitively) gets '-<video row>' appended")

_BLOCK_BYTES = 64 << 20              # rows copied per step: whole shards, about this many bytes


class ExchangeError(CacheError):
    """An export or import that cannot be done as asked; the message says why, in one line."""


class ExportDamaged(ExchangeError, Damaged):
    """An HDF5 export whose data cannot be read back (exit status 1)."""


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


@dataclass
class ExchangeStats:
    arrays: int = 0
    files: int = 0
    videos: int = 0
    failed_videos: int = 0
    raw_bytes: int = 0       # uncompressed bytes of the arrays copied
    out_bytes: int = 0       # size of what was written
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------- walking
def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def store_nodes(root) -> tuple[list[str], list[str]]:
    """(groups, arrays) of a Zarr group, every depth, in natural order (tokens/2 before tokens/10). Found by
    walking the store rather than from a list, so arrays added to the format are never left behind."""
    nodes = _walk(root)
    return ([n for n, m in nodes.items() if isinstance(m, zarr.Group)],
            [n for n, m in nodes.items() if isinstance(m, zarr.Array)])


def _walk(root) -> dict:
    """name -> the group or array itself, every depth, in natural order: the nodes an export reads, opened once
    (in a bucket each opening is a request)."""
    with warnings.catch_warnings():
        # the lock file of a running writer, or any stray file, is not a Zarr node: skip it quietly
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        members = list(root.members(max_depth=None))
    return {n: m for n, m in sorted(members, key=lambda nm: _natural(nm[0])) if isinstance(m, (zarr.Group, zarr.Array))}


def _row_blocks(shape: tuple, outer_rows: int, row_bytes: int) -> list:
    """Slices along axis 0 covering whole outer chunks (shards), about _BLOCK_BYTES each, so every Zarr
    write covers complete shards (no read-modify-write) and memory stays bounded."""
    if len(shape) == 0:
        return [()]
    outer_rows = max(1, outer_rows)
    step = outer_rows * max(1, _BLOCK_BYTES // max(1, outer_rows * row_bytes))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [slice(0, 0)]


def _outer_rows(a) -> int:
    grid = a.shards or a.chunks
    return int(grid[0]) if grid else 1


def _item_bytes(dtype) -> int:
    return 64 if _is_str(dtype) else np.dtype(dtype).itemsize   # strings: a guess, for block sizes and the bar


def _row_bytes(shape: tuple, dtype) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * _item_bytes(dtype)


def _is_str(dtype) -> bool:
    return np.dtype(dtype).kind in "TUO"


# ------------------------------------------------------------------------------------------- safety
def _refuse_if_being_written(source, what: str = "export") -> None:
    """`source`: an open cache (a folder's writer lock, or a bucket prefix's live lease: a push or an
    extraction), or a folder."""
    if isinstance(source, Cache):
        path, holder = source.path, source.being_written_by()
    else:
        path, holder = source, StoreLock(source).active_holder()
    if holder is not None:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
        if "expires" in holder:        # a bucket's lease: a killed writer's blocks until it expires
            who = f"{holder.get('command', 'push')}, {who}, lease expires {holder['expires']}"
        raise ExchangeError(f"{path} is being written by another cachefeat process ({who}); "
                            f"{what} it when that run has finished")


def _local_output(out, what: str) -> Path:
    if is_remote(out):
        raise ExchangeError(f"{what} writes local files only, not {out}: write to a local path (a cache made "
                            f"there goes to a bucket with `cachefeat push`)")
    return Path(out)


def _open_source(path, allow_incomplete: bool) -> Cache:
    cache = open_cache(path)
    path = cache.path                  # a bucket's URL as the reader writes it
    _refuse_if_being_written(cache)
    done = cache.shard_done()
    if not done.all() and not allow_incomplete:
        raise ExchangeError(f"{path} is incomplete ({int(done.sum())} of {len(done)} shards done); finish it with "
                            f"`cachefeat extract` (same command, it resumes) or pass --allow-incomplete")
    problems = cache.record_problems(features=True)    # an import records what it is given: no damage in
    if problems:
        s, what = next(iter(problems.items()))
        raise CacheDamaged(f"{path}: shard {s} is damaged ({what}); run `cachefeat verify {path}`, then "
                           + (cache.repair if isinstance(cache, RemoteCache) else
                              "the same `cachefeat extract` with --repair"))
    return cache


def _prepare_output(out: Path, overwrite: bool, is_ours, what: str) -> Path:
    """Check that OUT may be (re)placed; return the hidden sibling to build into."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ExchangeError(f"{out} exists; pass --overwrite to replace it, or choose another output")
        if not is_ours(out):
            raise ExchangeError(f"{out} exists and is not a {what}; --overwrite only replaces a {what}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    _remove(tmp)
    return tmp


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished build onto OUT; an existing OUT (checked replaceable) goes only once the new one is
    complete."""
    if out.is_symlink():
        out.unlink()
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        _remove(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _tree_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
                dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- HDF5 out
def parse_compression(spec: str) -> dict:
    """A --compression value -> h5py create_dataset keywords (byte shuffle on: it helps float16, see README)."""
    name, _, level = spec.strip().lower().partition(":")
    if name == "none" and not level:
        return {}
    if name == "lzf" and not level:
        return {"compression": "lzf", "shuffle": True}
    if name == "gzip":
        try:
            lvl = int(level) if level else 1
        except ValueError:
            lvl = -1
        if 1 <= lvl <= 9:
            return {"compression": "gzip", "compression_opts": lvl, "shuffle": True}
    raise ExchangeError(f"--compression {spec!r}: expected {COMPRESSION_HELP}")


def _is_hdf5_export(p: Path) -> bool:
    import h5py
    if not p.is_file() or not h5py.is_hdf5(p):
        return False
    with h5py.File(p, "r") as f:
        return HDF5_MARK in f.attrs


def _zarr_docs(cache: Cache, names: list[str]) -> dict[str, str]:
    """The zarr.json text of each node ('': the root) as the cache holds it: read from the folder, or fetched
    from the bucket (IN_FLIGHT at once, each bounded as when the cache was opened) and decoded as read_text
    decodes a file (UTF-8, universal newlines), so a pushed cache exports the same attributes."""
    if not isinstance(cache, RemoteCache):
        return {n: (cache.path / n / "zarr.json").read_text(encoding="utf-8") for n in names}
    keys = {n: f"{n}/zarr.json" if n else "zarr.json" for n in names}

    async def fetch():
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(key):
            async with gate:
                return await get_bounded_async(cache.location, key, MAX_ROOT_DOC if key == "zarr.json"
                                               else MAX_ARRAY_DOC)
        return await asyncio.gather(*(one(k) for k in keys.values()))
    try:
        blobs = run_sync(fetch())
    except FileNotFoundError as e:      # gone since the cache was opened
        raise ExchangeError(f"{cache.path}: {e}; the cache changed while it was exported (being pushed?)") from None
    return {n: io.TextIOWrapper(io.BytesIO(b), encoding="utf-8").read() for n, b in zip(keys, blobs)}


def _node_attrs(h5obj, doc: str, node) -> None:
    """The node's zarr.json verbatim (import writes it back), plus its attributes as JSON for HDF5 readers."""
    h5obj.attrs[ZARR_JSON] = doc
    for key, value in node.attrs.asdict().items():
        if key not in _RESERVED:
            h5obj.attrs[key] = json.dumps(value)
    dims = getattr(node.metadata, "dimension_names", None)
    if dims is not None:
        h5obj.attrs["dimension_names"] = [str(d) for d in dims]


def export_hdf5(cache_path, out, compression: str = DEFAULT_COMPRESSION, overwrite: bool = False,
                allow_incomplete: bool = False, progress: bool = False) -> ExchangeStats:
    """Write every group, array and attribute of the cache to one HDF5 file (see the module docstring)."""
    t0 = time.perf_counter()
    filters = parse_compression(compression)
    out = _local_output(out, "export")
    cache = _open_source(cache_path, allow_incomplete)
    tmp = _prepare_output(out, overwrite, _is_hdf5_export, "cachefeat HDF5 export")
    try:
        nodes = _walk(cache.root)
        with _bar(_stored_bytes(nodes), "export", progress) as bar:
            stats = write_hdf5(cache, tmp, filters, {"compression": compression}, bar.update, nodes)
        _refuse_if_being_written(cache)  # a writer that started meanwhile (e.g. --overwrite) spoils the copy
        _replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    stats.out_bytes = out.stat().st_size
    stats.seconds = time.perf_counter() - t0
    return stats


def _stored_bytes(nodes: dict) -> int:
    return sum(int(np.prod(a.shape, dtype=np.int64)) * _item_bytes(a.dtype) for a in nodes.values()
               if isinstance(a, zarr.Array))


def write_hdf5(cache: Cache, path, filters: dict, mark: dict | None = None, on_bytes=None,
               nodes: dict | None = None) -> ExchangeStats:
    """The HDF5 mirror of an open cache at `path` (no checks: export_hdf5 is the safe entry point).
    `filters`: h5py create_dataset keywords for the numeric datasets (see parse_compression); `nodes`: the
    cache's, from _walk (default: walked here)."""
    import h5py
    nodes = _walk(cache.root) if nodes is None else nodes
    groups = [n for n, m in nodes.items() if isinstance(m, zarr.Group)]
    arrays = [n for n, m in nodes.items() if isinstance(m, zarr.Array)]
    # progress first: a shard it marks done was complete before any of its data is read, so even an
    # incomplete cache that a writer resumes meanwhile exports consistently (unmarked shards are not data)
    arrays.sort(key=lambda n: n != "progress")
    stats = ExchangeStats(arrays=len(arrays), files=1)
    docs = _zarr_docs(cache, ["", *groups, *arrays])
    with h5py.File(path, "w", track_order=True) as f:
        f.attrs[HDF5_MARK] = json.dumps({"format": HDF5_FORMAT, "version": EXPORT_VERSION, "tool": "cachefeat",
                                         "tool_version": __version__, "exported": _now(), "source": str(cache.path),
                                         "complete": cache.complete, **(mark or {}), "arrays": arrays})
        _node_attrs(f, docs[""], cache.root)
        for name in groups:
            _node_attrs(f.create_group(name, track_order=True), docs[name], nodes[name])
        for name in arrays:
            a = nodes[name]
            string = _is_str(a.dtype)
            kw = {}
            if a.size:  # HDF5 cannot chunk an empty dataset
                # one clip (row) per chunk where the cache has it (feature arrays); h5py's own choice for
                # the tables, whose cache chunks are whole shards of small values
                kw["chunks"] = tuple(a.chunks) if a.ndim >= 2 and a.chunks[0] == 1 else True
                if not string:  # HDF5 applies no filters to variable-length strings
                    kw.update(filters)
                    kw["fletcher32"] = True  # like the cache's CRC32C: corruption is detected on read
            ds = f.create_dataset(name, shape=a.shape, dtype=h5py.string_dtype("utf-8") if string else a.dtype,
                                  track_order=True, **kw)
            _node_attrs(ds, docs[name], a)
            # raw stored values (not Cache.read, which decodes): the export must keep the store's bits
            for sl in _row_blocks(a.shape, _outer_rows(a), _row_bytes(a.shape, a.dtype)):
                try:
                    block = a[sl]
                except NOT_DAMAGE:       # a bucket's server gone, a link in a folder: not damage
                    raise
                except Exception as e:   # zarr: a chunk fails its checksum, or does not decode
                    bad = cache.unreadable_rows(name, sl)
                    where = f"clips {ranges(bad)}" if bad else f"rows {sl}"
                    held = "in the bucket" if isinstance(cache, RemoteCache) else "on disk"
                    raise CacheDamaged(f"{cache.path}: array {name}, {where}: cannot be read ({_one_line(e)}); the "
                                       f"data {held} is damaged: run `cachefeat verify {cache.path}`, then "
                                       f"{cache.repair}") from None
                ds[sl] = block.astype(object) if string else block
                n = block.size * _item_bytes(a.dtype)
                stats.raw_bytes += n
                if on_bytes:
                    on_bytes(n)
    return stats


# ------------------------------------------------------------------------------------------- HDF5 in
def _is_replaceable_cache(p: Path) -> bool:
    if p.is_dir() and not any(p.iterdir()):
        return True
    try:
        Cache(p)
    except CacheError:
        return False
    _refuse_if_being_written(p, what="replace")
    return True


def import_hdf5(h5_path, out, overwrite: bool = False, progress: bool = False) -> ExchangeStats:
    """Rebuild a cache from an HDF5 export: the same zarr.json documents (layout, chunks, sharding, codecs,
    attributes) and the same array contents, bit for bit."""
    import h5py
    t0 = time.perf_counter()
    src, out = Path(h5_path), _local_output(out, "import")
    if not src.is_file():
        raise ExchangeError(f"{src}: no such file")
    if not h5py.is_hdf5(src):
        raise ExchangeError(f"{src} is not an HDF5 file")
    try:
        f = h5py.File(src, "r")
    except OSError as e:
        raise ExportDamaged(f"{src} cannot be opened as HDF5 ({_one_line(e)}): the file is damaged or cut short; "
                            f"export the cache again") from None
    with f:
        try:
            mark = json.loads(f.attrs[HDF5_MARK])
        except (KeyError, TypeError, ValueError):
            raise ExchangeError(f"{src} is an HDF5 file but not a cachefeat export "
                                f"(no '{HDF5_MARK}' attribute)") from None
        version = mark.get("version", 0) if isinstance(mark, dict) else None
        if not isinstance(mark, dict) or mark.get("format") != HDF5_FORMAT or type(version) is not int \
                or version > EXPORT_VERSION:
            said = f"a {mark.get('format')} export version {version}" if isinstance(mark, dict) else "no export"
            raise ExchangeError(f"{src} is {said}; this cachefeat reads {HDF5_FORMAT} up to version "
                                f"{EXPORT_VERSION}")
        groups, datasets = _hdf5_nodes(src, f)
        bad = [n for n in [*groups, *datasets] if any(p in ("", ".", "..") for p in n.split("/"))]
        if bad:
            raise ExchangeError(f"{src}: node name {bad[0]!r} cannot be a path inside a store")
        docs = {"": _read_node_doc(src, f, "")}
        docs.update({n: _read_node_doc(src, f[n], n) for n in [*groups, *datasets]})
        for name in groups:
            if json.loads(docs[name]).get("node_type") != "group":
                raise ExchangeError(f"{src}: /{name} is an HDF5 group but its Zarr metadata is not a group's")
        for name in datasets:     # shapes, dtypes and sizes, before anything is written or read
            _check_dataset(src, name, f[name], json.loads(docs[name]))
        meta = (json.loads(docs[""]).get("attributes") or {}).get(ATTR)
        if not isinstance(meta, dict) or "layout" not in meta:
            raise ExchangeError(f"{src} holds no cachefeat metadata ('{ATTR}' attribute of /); not a cache export")
        if type(meta.get("schema_version", 0)) is not int:
            raise ExchangeError(f"{src}: schema_version {meta['schema_version']!r} of its cachefeat metadata is not "
                                f"a whole number")
        if meta.get("schema_version", 0) > SCHEMA_VERSION:
            raise ExchangeError(f"{src} holds a cache of schema {meta['schema_version']}, newer than this cachefeat "
                                f"understands ({SCHEMA_VERSION}); upgrade cachefeat")
        tmp = _prepare_output(out, overwrite, _is_replaceable_cache, "cachefeat cache")
        stats = ExchangeStats(arrays=len(datasets), files=1)
        total = sum(f[n].size * _item_bytes(np.dtype("O") if h5py.check_string_dtype(f[n].dtype) else f[n].dtype)
                    for n in datasets)
        try:
            for name, doc in docs.items():   # the Zarr v3 metadata documents, as they were in the store
                (tmp / name).mkdir(parents=True, exist_ok=True)
                (tmp / name / "zarr.json").write_text(doc, encoding="utf-8")
            root = zarr.open_group(str(tmp), mode="r+", zarr_format=3)
            nodes = {}
            for name in datasets:
                try:
                    nodes[name] = root[name]
                except Exception as e:  # zarr's parse errors vary by kind: one line, whatever they are
                    raise ExchangeError(f"{src}: this zarr cannot read the metadata of /{name} ({e})") from None
            with _bar(total, "import", progress) as bar:
                for name in datasets:
                    ds, a = f[name], nodes[name]     # both checked by _check_dataset
                    string = h5py.check_string_dtype(ds.dtype) is not None
                    for sl in _row_blocks(a.shape, _outer_rows(a), _row_bytes(a.shape, a.dtype)):
                        try:
                            block = ds.asstr()[sl] if string else ds[sl]
                        except (OSError, ValueError) as e:   # h5py: a chunk fails its checksum or is cut off
                            raise ExportDamaged(f"import failed: {src}: dataset /{name} cannot be read "
                                                f"({_one_line(e)}); the file is damaged: export the cache again"
                                                ) from None
                        a[sl] = block
                        n = np.size(block) * _item_bytes(a.dtype)
                        stats.raw_bytes += n
                        bar.update(n)
            try:
                imported = Cache(tmp, mode="r+")   # opens as a cache: schema, metadata, layout and tables are there
            except CacheError as e:
                raise ExchangeError(f"{src} does not hold a whole cache: "
                                    f"{str(e).replace(str(tmp), 'the imported store')}") from None
            missing = [n for n in imported.array_names() if n not in datasets]
            if missing:
                raise ExchangeError(f"{src} does not hold a whole cache: array{'s' * (len(missing) > 1)} "
                                    f"{', '.join(missing[:4])} missing; export the cache again")
            record_again(imported)
            _replace(tmp, out)
        except BaseException:
            _remove(tmp)
            raise
    stats.out_bytes = _tree_bytes(out)
    stats.seconds = time.perf_counter() - t0
    return stats


# An HDF5 file is input like a cache: it may have been crafted to make the import read other files (links,
# external storage, virtual datasets: refused, the export writes none) or allocate what no file backs.
_MAX_EXPANSION = 1100      # deflate expands stored bytes at most ~1032 times (lzf far less): no filter gives more


def _hdf5_nodes(src: Path, f) -> tuple[list[str], list[str]]:
    """(groups, datasets) of the file, reached through hard links only: an external link or a soft link (the
    export writes neither) is refused before anything it names is opened, as is a node reached twice."""
    import h5py
    groups, datasets, seen = [], [], set()
    todo = [("", f)]
    while todo:
        prefix, group = todo.pop()
        for key in group:        # the link names, nothing resolved yet
            name = f"{prefix}{key}"
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise ExchangeError(f"{src}: /{name} is an external link to {link.filename}:{link.path}; refused "
                                    f"(it makes the import read another file, and an export holds no links)")
            if not isinstance(link, h5py.HardLink):
                where = f" to {link.path}" if isinstance(link, h5py.SoftLink) else ""
                raise ExchangeError(f"{src}: /{name} is a {type(link).__name__}{where}, not a node; refused (an "
                                    f"export holds no links)")
            node = group[key]
            if node.id in seen:
                raise ExchangeError(f"{src}: /{name} is a second name of another node; refused (an export writes "
                                    f"each node once)")
            seen.add(node.id)
            if len(seen) > MAX_NODES:
                raise ExchangeError(f"{src} holds more than {MAX_NODES} groups and datasets; not a cache export")
            if isinstance(node, h5py.Dataset):
                datasets.append(name)
            elif isinstance(node, h5py.Group):
                groups.append(name)
                todo.append((name + "/", node))
            else:
                raise ExchangeError(f"{src}: /{name} is a {type(node).__name__}, not a group or dataset")
    return sorted(groups, key=_natural), sorted(datasets, key=_natural)


def _check_dataset(src: Path, name: str, ds, doc: dict) -> None:
    """Refuse a dataset that is not what the import copies, before any of it is read: data in other files
    (external raw storage, a virtual dataset), a dtype other than the numbers and UTF-8 strings the export
    writes, a Zarr document cachefeat would not open (validate's checks of an array: shape, chunks, dtype,
    codecs, within its bounds) or that disagrees with the dataset, or more values than its stored bytes can
    hold after any filter."""
    import h5py
    where = f"{src}: dataset /{name}"
    if ds.is_virtual:
        files = sorted({v.file_name for v in ds.virtual_sources()})
        raise ExchangeError(f"{where} is a virtual dataset (its data is in {', '.join(files[:2]) or 'other files'})"
                            f"; refused (an export holds its data itself)")
    if ds.external:
        raise ExchangeError(f"{where} keeps its data in external files ({ds.external[0][0]!r}, ...); refused (an "
                            f"export holds its data itself)")
    string = h5py.check_string_dtype(ds.dtype)
    if string is not None and (string.encoding != "utf-8" or string.length is not None):
        raise ExchangeError(f"{where} holds {ds.dtype} strings; an export writes variable-length UTF-8 only")
    if string is None and (ds.dtype.kind not in "biuf" or ds.dtype.fields or ds.dtype.shape):
        raise ExchangeError(f"{where} has dtype {ds.dtype}, not one an export writes (numbers or UTF-8 strings)")
    if not isinstance(doc, dict) or doc.get("node_type") != "array":
        raise ExchangeError(f"{where}: its Zarr metadata is not an array's")
    try:
        want = _array(name, doc)
    except _Bad as e:
        raise ExchangeError(f"{where}: its Zarr metadata is not what cachefeat writes ({e})") from None
    if ds.shape != want.shape or (string is not None) != (want.data_type == "string") or (
            string is None and ds.dtype != np.dtype(want.data_type)):
        raise ExchangeError(f"{where} is {ds.dtype} {ds.shape} but its Zarr metadata says {want.data_type} "
                            f"{want.shape} (edited after export?)")
    claimed = ds.size * (16 if string is not None else ds.dtype.itemsize)    # strings: their 16-byte references
    stored = ds.id.get_storage_size()
    if claimed > _MAX_EXPANSION * stored + 4096:
        raise ExchangeError(f"{where} claims {claimed} bytes of values but stores {stored}, more than any filter "
                            f"expands to (chunks never written, or a crafted shape); export the cache again")


def _read_node_doc(src: Path, h5obj, name: str) -> str:
    """The node's zarr.json text; refuses a node whose HDF5 attributes no longer match it."""
    where = "/" + name
    try:
        text = h5obj.attrs[ZARR_JSON]
        doc = json.loads(text)
    except (KeyError, TypeError, ValueError):
        raise ExchangeError(f"{src}: {where} has no '{ZARR_JSON}' attribute "
                            f"(not written by cachefeat export)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("attributes") or {}, dict):
        raise ExchangeError(f"{src}: the '{ZARR_JSON}' attribute of {where} is not a Zarr metadata document")
    attributes = doc.get("attributes") or {}
    for key in h5obj.attrs:
        if key in _RESERVED:
            continue
        try:
            same = json.loads(h5obj.attrs[key]) == attributes.get(key, object())
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ExchangeError(f"{src}: attribute '{key}' of {where} differs from the Zarr metadata stored with it "
                                f"(edited after export?); restore it or export the cache again")
    return text


# ------------------------------------------------------------------------------------------- npy out
def safe_stems(ids: list[str]) -> list[str]:
    """File-name stems for video ids, unique and safe on any file system (rule: STEM_RULE)."""
    taken: set[str] = set()
    out = []
    for row, vid in enumerate(ids):
        s = re.sub(r"[^\w.\-]", "_", vid.replace("/", "__").replace("\\", "__"))
        s = re.sub(r"^[.\-]", "_", s) or "_"
        if len(s.encode()) > 160:
            digest = hashlib.sha1(vid.encode(), usedforsecurity=False).hexdigest()[:12]   # a name, not a seal
            s = s.encode()[:160].decode(errors="ignore") + "-" + digest
        stem = s if s.casefold() not in taken else f"{s}-{row}"
        k = 1
        while stem.casefold() in taken:
            stem, k = f"{s}-{row}-{k}", k + 1
        taken.add(stem.casefold())
        out.append(stem)
    return out


def _is_npy_export(p: Path) -> bool:
    if p.is_dir() and not any(p.iterdir()):
        return True
    try:
        return json.loads((p / NPY_INDEX).read_text()).get("format") == NPY_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_npy(cache_path, out_dir, overwrite: bool = False, allow_incomplete: bool = False,
               progress: bool = False) -> ExchangeStats:
    """One file set per valid video (`{stem}_{array}.npy`, axes (views, T, ...)) and index.json."""
    t0 = time.perf_counter()
    out = _local_output(out_dir, "export")
    cache = _open_source(cache_path, allow_incomplete)
    tmp = _prepare_output(out, overwrite, _is_npy_export, "cachefeat npy export")
    lay, n = cache.layout, cache.views.count
    nodes = _walk(cache.root)
    stored = [k for k, m in nodes.items() if isinstance(m, zarr.Array)]
    features = [*lay.feature_arrays(),
                *(a for a in _NPY_PER_VIDEO_EXTRA if a in stored and a not in lay.feature_arrays())]
    per_video = {name: name.replace("/", "_") for name in features}
    per_video.update({k: v for k, v in _NPY_INDICES.items() if k in stored})
    shard_done = cache.shard_done()
    video_done = cache.video_done()
    valid = cache.valid()
    if cache.windowed:   # a video with any frame (its failed windows are listed in `failures`)
        per_video = {name: name.replace("/", "_") for name in features}
        video_ok = np.zeros(cache.num_videos, bool)
        video_ok[cache.clip_video()[valid]] = True
    else:
        video_ok = valid.reshape(cache.num_videos, n).all(axis=1)
    ids = [str(x) for x in cache.read("videos/id")]
    paths = [str(x) for x in cache.read("videos/path")]
    labels = cache.read("videos/label")
    num_frames = cache.read("videos/num_frames")
    stems = safe_stems(ids)
    classes = cache.classes
    stats = ExchangeStats()
    total = int(video_ok.sum()) * n * sum(_row_bytes(nodes[k].shape, nodes[k].dtype) for k in per_video)
    if cache.windowed:
        total = int(valid.sum()) * sum(_row_bytes(nodes[k].shape, nodes[k].dtype) for k in per_video)
    frames_of: dict[int, int] = {}
    try:
        tmp.mkdir()
        with _bar(total, "export", progress) as bar:
            if cache.windowed:
                frames_of = _write_windows(cache, tmp, stems, per_video, video_ok, valid, bar, stats)
            for shard in (np.flatnonzero(shard_done) if not cache.windowed else []):
                rows, vids = lay.shard_rows_range(shard), lay.shard_videos_range(shard)
                keep = [v for v in vids if video_ok[v]]
                if not keep:
                    continue
                for name, suffix in per_video.items():
                    block = cache.read(name, slice(rows.start, rows.stop))
                    for v in keep:
                        r = v * n - rows.start
                        np.save(tmp / f"{stems[v]}_{suffix}.npy", block[r:r + n])
                        stats.files += 1
                        bar.update(block[r:r + n].nbytes)
                        stats.raw_bytes += block[r:r + n].nbytes
        shared = {}
        for name in _NPY_SHARED:
            if name in stored:
                fname = name.replace("/", "_") + ".npy"
                arr = cache.read(name)
                np.save(tmp / fname, arr)
                shared[fname] = {"array": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                                 "dims": _dims(nodes[name])}
                stats.files += 1
        arrays = {}
        for name, suffix in per_video.items():
            a = nodes[name]
            dims = _dims(a)
            if cache.windowed:
                shape, dims = ["frames", *a.shape[2:]], (["frame", *dims[2:]] if dims else None)
            else:
                shape, dims = [n, *a.shape[1:]], (["view", *dims[1:]] if dims else None)
            arrays[suffix] = {"file": f"{{stem}}_{suffix}.npy", "array": name, "shape": shape,
                              "dtype": str(np.dtype(cache.read(name, slice(0, 0)).dtype)), "dims": dims}
        if cache.windowed:
            arrays.update({k: {"file": f"{{stem}}_{k}.npy", "array": "clips/time", "shape": shape, "dtype": dt,
                               "dims": dims} for k, shape, dt, dims in (
                ("time", ["frames"], "float64", ["frame"]), ("timestamps_ms", ["frames"], "float64", ["frame"]),
                ("fps", [], "float64", []))})
        exported = [int(v) for v in np.flatnonzero(video_ok)]
        failures = cache.failures()
        index = {
            "format": NPY_FORMAT, "version": EXPORT_VERSION, "tool": "cachefeat", "tool_version": __version__,
            "exported": _now(), "source": str(cache.path), "complete": bool(shard_done.all()),
            "layout": (WINDOWED_NPY_LAYOUT if cache.windowed else
                       "one file per video and array: {stem}_{array}.npy in this folder, first axis = the video's "
                       "views in view order (temporal x spatial), then the cached axes; frame_idx holds the "
                       "source frame indices of each view, time their presentation times in seconds"),
            "stem_rule": STEM_RULE,
            "views": {"temporal": cache.views.temporal, "spatial": cache.views.spatial, "count": n},
            "arrays": arrays, "shared": shared, "classes": classes,
            "videos": [{"video": v, "id": ids[v], "stem": stems[v], "path": paths[v], "label": int(labels[v]),
                        "class": classes[labels[v]] if 0 <= labels[v] < len(classes) else None,
                        "num_frames": int(num_frames[v]), **({"frames": frames_of[v]} if v in frames_of else {})}
                       for v in exported],
            "failures": failures,
            "not_extracted": [{"video": int(v), "id": ids[v], "path": paths[v]} for v in np.flatnonzero(~video_done)],
            "metadata": cache.meta,
        }
        (tmp / NPY_INDEX).write_text(json.dumps(index, indent=1, default=str), encoding="utf-8")
        stats.files += 1
        _refuse_if_being_written(cache)
        _replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    stats.arrays, stats.videos, stats.failed_videos = len(per_video), len(exported), len(failures)
    stats.out_bytes = _tree_bytes(out)
    stats.seconds = time.perf_counter() - t0
    return stats


WINDOWED_NPY_LAYOUT = (
    "one file per video and array: {stem}_{array}.npy in this folder, first axis = the video's frames in time "
    "(its windows concatenated, the padding of the last one dropped, a frame that overlapping windows share "
    "taken once, from the first window holding it), then the cached axes; {stem}_time.npy: each frame's "
    "presentation time in seconds; {stem}_timestamps_ms.npy: the same in milliseconds and {stem}_fps.npy: the "
    "sampling rate, as video_features writes them; a window that failed leaves a gap (see failures)")


def _write_windows(cache: Cache, tmp: Path, stems: list[str], per_video: dict[str, str], video_ok: np.ndarray,
                   valid: np.ndarray, bar, stats: ExchangeStats) -> dict[int, int]:
    """A windowed cache's npy export: per video and feature array one (frames, ...) file, filled window by
    window (memory: a block of windows, not the video); returns the frames written per video."""
    lay = cache.layout
    first = lay.first_clips
    sample = cache.read("clips/frame_idx")          # fps: each frame's sample index on the video's grid
    real = cache.read("clips/valid_frames")
    times = cache.read("clips/time")
    fps = float(cache.meta["sampling"]["fps"])
    out = {}
    for v in np.flatnonzero(video_ok):
        picks, last = [], -1                         # per valid window: (row, its frames kept)
        for r in range(int(first[v]), int(first[v + 1])):
            if not valid[r]:
                continue
            ks = sample[r, : real[r]]
            keep = np.flatnonzero(ks > last)
            if len(keep):
                picks.append((r, keep))
                last = int(ks[keep[-1]])
        n = sum(len(k) for _, k in picks)
        stem = stems[v]
        t = np.concatenate([times[r, k] for r, k in picks]) if picks else np.zeros(0)
        np.save(tmp / f"{stem}_time.npy", t)
        np.save(tmp / f"{stem}_timestamps_ms.npy", t * 1000.0)
        np.save(tmp / f"{stem}_fps.npy", np.array(fps))
        stats.files += 3
        rows = [r for r, _ in picks]
        for name, suffix in per_video.items():
            dst = None
            pos = 0
            for a in range(0, len(rows), 64):        # 64 windows per read
                chunk = rows[a:a + 64]
                block = cache.read(name, np.array(chunk, dtype=np.int64))
                if dst is None:
                    dst = np.lib.format.open_memmap(tmp / f"{stem}_{suffix}.npy", mode="w+", dtype=block.dtype,
                                                    shape=(n, *block.shape[2:]))
                for i, (_, keep) in enumerate(picks[a:a + 64]):
                    dst[pos:pos + len(keep)] = block[i, keep]
                    pos += len(keep)
                bar.update(block.nbytes)
                stats.raw_bytes += block.nbytes
            if dst is None:
                shape = cache.root[name].shape[2:]
                np.save(tmp / f"{stem}_{suffix}.npy", np.zeros((0, *shape), cache.read(name, slice(0, 0)).dtype))
            else:
                dst.flush()
                del dst
            stats.files += 1
        out[int(v)] = n
    return out


def _dims(a) -> list[str] | None:
    dims = getattr(a.metadata, "dimension_names", None)
    return [str(d) for d in dims] if dims is not None else None
