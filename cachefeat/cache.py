"""The cache: one Zarr v3 store per split, self-describing, written shard by shard. docs/cache-format.md
documents every array and attribute; this module is the only code that knows the layout.

Rows are clips: clip = video * views + view, a fixed order decided when the store is created, so any
number of writers, crashes and resumes give the same arrays. A shard is `shard_videos` consecutive videos
(all their views); it is written whole, by one writer, once, and only then marked done in `progress`.
Zarr's sharding codec rewrites a whole shard file on a partial update, so two writers must never share a
shard; and a shard whose progress flag is not set is never read as data (a crash mid-write leaves it
unmarked, and the next run writes it again).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec
from zarr.core.sync import sync as zarr_sync

from .shard_file import ShardFile, ShardFileError
from .specs import PixelSpec, TokenSpec, ViewSpec

SCHEMA_VERSION = 1
ATTR = "cachefeat"
CREATING = "cachefeat_creating"
LOCK_NAME = "cachefeat.lock"

# video status values in videos/status
PENDING, OK, FAILED = 0, 1, 2


class CacheError(Exception):
    """A store that cannot be used as asked; the message says why, in one line."""


# ------------------------------------------------------------------------------------------- codecs
CODEC_HELP = "none, zstd[:LEVEL], blosc-lz4, blosc-zstd[:LEVEL] or gzip[:LEVEL]"
DEFAULT_CODEC = "zstd:3"


def parse_codec(spec: str) -> list:
    """A --codec value -> zarr compressors. A CRC32C checksum is always appended, so corruption on disk
    is detected when the chunk is read."""
    name, _, level = spec.strip().lower().partition(":")
    try:
        lvl = int(level) if level else None
    except ValueError:
        raise CacheError(f"--codec {spec!r}: the level must be an integer") from None
    if name == "none":
        chain = []
    elif name == "zstd":
        chain = [ZstdCodec(level=3 if lvl is None else lvl)]
    elif name == "gzip":
        chain = [GzipCodec(level=1 if lvl is None else lvl)]
    elif name == "blosc-lz4":
        chain = [BloscCodec(cname="lz4", clevel=5 if lvl is None else lvl, shuffle="shuffle")]
    elif name == "blosc-zstd":
        chain = [BloscCodec(cname="zstd", clevel=1 if lvl is None else lvl, shuffle="shuffle")]
    else:
        raise CacheError(f"--codec {spec!r}: expected {CODEC_HELP}")
    return chain + [Crc32cCodec()]


# ------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Shapes of every array, derived from a few numbers (stored in the attrs as `layout`)."""
    num_videos: int
    views: ViewSpec
    frames: int
    layers: tuple[int, ...]
    tokens: TokenSpec
    width: int
    embed_dim: int
    dtype: str                          # float16, float32 or int8 (then dequantized on read)
    shard_videos: int
    pixels: PixelSpec | None = None     # small frames for pixel-level encoders
    augmented: bool = False             # views are random training views (clips/aug records them)

    @property
    def num_clips(self) -> int:
        return self.num_videos * self.views.count

    @property
    def shard_rows(self) -> int:
        return self.shard_videos * self.views.count

    @property
    def num_shards(self) -> int:
        return -(-self.num_videos // self.shard_videos)

    def shard_videos_range(self, shard: int) -> range:
        return range(shard * self.shard_videos, min((shard + 1) * self.shard_videos, self.num_videos))

    def shard_rows_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.num_clips))

    def feature_arrays(self) -> dict[str, tuple]:
        """name -> per-clip shape (without the leading clip axis) of every backbone feature array."""
        T, L, D = self.frames, len(self.layers), self.width
        out = {"embed": (T, self.embed_dim), "cls": (T, L, D)}
        if self.tokens.kind != "cls":
            for layer in self.layers:
                out[f"tokens/{layer}"] = (T, self.tokens.num_patch_tokens, D)
        return out

    def row_arrays(self) -> dict[str, tuple[tuple, str]]:
        """Every array with one row per clip that a shard writer fills: name -> (per-clip shape, dtype)."""
        out = {name: (shape, self.dtype) for name, shape in self.feature_arrays().items()}
        if self.pixels:
            tk, s = self.frames * self.pixels.factor, self.pixels.size
            out["pixels"] = ((tk, s, s, 3), "uint8")
            out["clips/pixel_frame_idx"] = ((tk,), "int32")
        out["clips/valid"] = ((), "bool")
        out["clips/frame_idx"] = ((self.frames,), "int32")
        if self.augmented:
            out["clips/aug"] = ((), "str")
        return out

    def bytes_per_clip(self) -> dict[str, int]:
        """Stored (uncompressed) bytes per clip of the feature and pixel arrays."""
        names = [*self.feature_arrays(), *(["pixels"] if self.pixels else [])]
        arrays = self.row_arrays()
        return {k: int(np.prod(arrays[k][0])) * np.dtype(arrays[k][1]).itemsize for k in names}

    def to_dict(self) -> dict:
        return {"num_videos": self.num_videos, "views": [self.views.temporal, self.views.spatial],
                "frames": self.frames, "layers": list(self.layers), "tokens": self.tokens.to_dict(),
                "width": self.width, "embed_dim": self.embed_dim, "dtype": self.dtype,
                "shard_videos": self.shard_videos, "num_clips": self.num_clips, "num_shards": self.num_shards,
                "pixels": self.pixels.to_dict() if self.pixels else None, "augmented": self.augmented}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        px = d.get("pixels")
        return cls(num_videos=d["num_videos"], views=ViewSpec(*d["views"]), frames=d["frames"],
                   layers=tuple(d["layers"]), tokens=TokenSpec.from_dict(d["tokens"]), width=d["width"],
                   embed_dim=d["embed_dim"], dtype=d["dtype"], shard_videos=d["shard_videos"],
                   pixels=PixelSpec(**px) if px else None, augmented=bool(d.get("augmented", False)))


VIDEO_TABLES = ("videos/path", "videos/id", "videos/label", "videos/status", "videos/num_frames", "videos/error")
CLIP_TABLES = ("clips/video", "clips/view", "clips/label")

_DIMS = {"embed": ("clip", "frame", "channel"), "cls": ("clip", "frame", "layer", "channel"),
         "tokens": ("clip", "frame", "token", "channel"), "pixels": ("clip", "frame", "y", "x", "rgb"),
         "clips/valid": ("clip",), "clips/frame_idx": ("clip", "frame"), "clips/pixel_frame_idx": ("clip", "frame"),
         "clips/aug": ("clip",)}


def create_store(path: str | os.PathLike, meta: dict, layout: Layout, videos: list, codec: str = DEFAULT_CODEC,
                 extras: dict[str, np.ndarray] | None = None):
    """Create the store with every array (row arrays empty), the static per-video and per-clip tables,
    `extras` (small arrays known up front: text embeddings, int8 steps) and the metadata. `videos` are
    manifest.VideoEntry rows in cache order."""
    compressors = parse_codec(codec)
    # mode "a", not "w": the folder may already hold this writer's lock file, which "w" would delete;
    # the caller has made sure no other store content is there
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    root.attrs[CREATING] = True   # replaced by the metadata once every array exists (see is_unfinished_creation)
    C, V, n = layout.num_clips, layout.num_videos, layout.views.count
    rows, vids = layout.shard_rows, layout.shard_videos
    for name, (shape, dtype) in layout.row_arrays().items():
        dims = _DIMS[name] if name in _DIMS else _DIMS[name.split("/")[0]]
        if shape:  # big per-clip arrays: one chunk per clip, one shard file per shard
            root.create_array(name, shape=(C, *shape), dtype=dtype, chunks=(1, *shape), shards=(rows, *shape),
                              compressors=compressors, fill_value=0, dimension_names=dims)
        else:      # one value per clip: one chunk per shard
            root.create_array(name, shape=(C,), dtype=str if dtype == "str" else dtype, chunks=(rows,),
                              compressors=compressors, fill_value="" if dtype == "str" else 0, dimension_names=dims)

    def table(name, data, chunk, dims=None):
        data = np.asarray(data)
        a = root.create_array(name, shape=data.shape, dtype=data.dtype if data.dtype.kind != "U" else str,
                              chunks=(chunk, *data.shape[1:]), compressors=compressors,
                              fill_value="" if data.dtype.kind == "U" else 0, dimension_names=dims)
        a[...] = data
        return a

    table("videos/path", np.array([str(v.path) for v in videos], dtype=str), vids, ("video",))
    table("videos/id", np.array([str(v.video_id) for v in videos], dtype=str), vids, ("video",))
    table("videos/label", np.array([v.label for v in videos], dtype=np.int32), vids, ("video",))
    table("videos/status", np.zeros(V, np.uint8), vids, ("video",))
    table("videos/num_frames", np.zeros(V, np.int32), vids, ("video",))
    table("videos/error", np.array([""] * V, dtype=str), vids, ("video",))
    table("clips/video", np.repeat(np.arange(V, dtype=np.int32), n), rows, ("clip",))
    table("clips/view", np.tile(np.arange(n, dtype=np.int16), V), rows, ("clip",))
    table("clips/label", np.repeat(np.array([v.label for v in videos], dtype=np.int32), n), rows, ("clip",))
    for name, data in (extras or {}).items():
        dims = ("class", "channel") if name == "text/embed" else ("layer", "channel")[-np.ndim(data):]
        table(name, data, max(1, len(data)), dims)
    # one chunk per shard flag: each writer touches only its own files
    root.create_array("progress", shape=(layout.num_shards,), dtype=np.uint8, chunks=(1,),
                      compressors=[Crc32cCodec()], fill_value=0, dimension_names=("shard",))
    meta = dict(meta, schema_version=SCHEMA_VERSION, layout=layout.to_dict(), codec=codec,
                extras=sorted(extras or {}))
    meta["fingerprint"] = content_fingerprint(meta)
    root.attrs.put({ATTR: meta})  # last: until here the store reads as unfinished
    return root


def is_unfinished_creation(path: str | os.PathLike) -> bool:
    """A store whose creation was interrupted: our marker but no metadata yet (or an empty group with
    nothing else in the folder but our lock). Safe to remove and create again."""
    p = Path(path)
    try:
        group = json.loads((p / "zarr.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    attrs = group.get("attributes") or {}
    if ATTR in attrs:
        return False
    if attrs.get(CREATING):
        return True
    return not attrs and {c.name for c in p.iterdir()} <= {"zarr.json", LOCK_NAME}


# ------------------------------------------------------------------------------------------- shards
@dataclass
class ShardData:
    """Everything one writer writes for one shard: arrays cover exactly the shard's rows / videos."""
    shard: int
    rows: dict[str, np.ndarray]       # Layout.row_arrays() name -> (shard rows, ...)
    videos: dict[str, np.ndarray]     # videos/status, videos/num_frames, videos/error -> (shard videos,)


def write_shard(root, layout: Layout, data: ShardData) -> None:
    """Write a whole shard, then flag it done. Killed anywhere before the flag, the shard reads as
    not done and is redone by the next run."""
    rows = layout.shard_rows_range(data.shard)
    vids = layout.shard_videos_range(data.shard)
    r, v = slice(rows.start, rows.stop), slice(vids.start, vids.stop)
    for name, arr in data.rows.items():
        _drop_chunk(root[name], data.shard)
        root[name][r] = arr
    for name, arr in data.videos.items():
        _drop_chunk(root[name], data.shard)
        root[name][v] = arr
    root["progress"][data.shard] = 1


def _drop_chunk(arr, index: int) -> None:
    """Delete the stored object holding the `index`-th block of rows (a shard file, or the chunk of a
    per-clip table). zarr's sharding codec otherwise reads the old shard before writing a new one, even
    when the write covers all of it: wasted work, and a damaged old shard would block its own rewrite."""
    coords = (index,) + (0,) * (arr.ndim - 1)
    key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
    zarr_sync(arr.store_path.store.delete(key))


# ------------------------------------------------------------------------------------------- metadata
# What decides the arrays' contents: a resumed run must agree on all of it.
_CONTENT_KEYS = ("model", "layers", "tokens", "dtype", "frames", "sampling", "views", "preprocessing",
                 "compute_precision", "source", "layout", "codec", "classes", "pixels", "augment", "text",
                 "quantization")
_MODEL_IDENTITY = ("name", "pretrained", "init_seed", "quick_gelu", "weights_sha256")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_fingerprint(meta: dict) -> str:
    sub = {k: meta.get(k) for k in _CONTENT_KEYS}
    sub["model"] = {k: (meta.get("model") or {}).get(k) for k in _MODEL_IDENTITY}
    return hashlib.sha256(_canonical(sub).encode()).hexdigest()[:16]


def feature_fingerprint(meta: dict) -> str:
    """Identity of the feature space: same backbone weights and preprocessing give comparable features,
    whatever the videos, frames, views or layers kept. Train and eval caches must share it."""
    sub = {"model": {k: (meta.get("model") or {}).get(k) for k in _MODEL_IDENTITY},
           "preprocessing": meta.get("preprocessing")}
    return hashlib.sha256(_canonical(sub).encode()).hexdigest()[:16]


def diff_meta(a: dict, b: dict, keys=_CONTENT_KEYS, prefix: str = "") -> list[str]:
    """Human-readable differences between two metadata dicts, e.g. ['layers: [8, 9] vs [0, 1, 2]']."""
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_meta(va, vb, sorted(set(va) | set(vb)), prefix=f"{prefix}{k}.")
        elif _canonical(va) != _canonical(vb):
            sa, sb = _short(va), _short(vb)
            out.append(f"{prefix}{k}: {sa} vs {sb}")
    return out


def _short(v) -> str:
    s = _canonical(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ------------------------------------------------------------------------------------------- reading
class Cache:
    """Read access to a cache store. Only complete shards count: rows of unfinished shards are never
    valid. Arrays are read lazily; `read` returns numpy arrays in the stored dtype."""
    direct_reads = True     # feature rows straight from the shard files (False: every read through zarr)

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise CacheError(f"{path} is not a cachefeat cache (no Zarr v3 store there)")
        try:
            self.root = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as e:
            raise CacheError(f"{path} is not a readable Zarr v3 store: {e}") from None
        meta = self.root.attrs.get(ATTR)
        if not isinstance(meta, dict) or "layout" not in meta:
            raise CacheError(f"{path} is a Zarr store but not a cachefeat cache (no '{ATTR}' metadata)")
        if meta.get("schema_version", 0) > SCHEMA_VERSION:
            raise CacheError(f"{path} has cache schema {meta['schema_version']}, newer than this cachefeat "
                             f"understands ({SCHEMA_VERSION}); upgrade cachefeat")
        self.meta = meta
        self.layout = Layout.from_dict(meta["layout"])
        self._shard_files: dict[str, ShardFile | None] = {}

    # -- what it holds
    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    @property
    def layers(self) -> list[int]:
        return list(self.layout.layers)

    @property
    def tokens(self) -> TokenSpec:
        return self.layout.tokens

    @property
    def frames(self) -> int:
        return self.layout.frames

    @property
    def num_clips(self) -> int:
        return self.layout.num_clips

    @property
    def num_videos(self) -> int:
        return self.layout.num_videos

    @property
    def views(self) -> ViewSpec:
        return self.layout.views

    @property
    def feature_fingerprint(self) -> str:
        return feature_fingerprint(self.meta)

    def array(self, name: str):
        return self.root[name]

    def array_names(self) -> list[str]:
        """Every array of the store: row arrays (features first), tables, extras, progress."""
        return [*self.layout.row_arrays(), *VIDEO_TABLES, *CLIP_TABLES, *self.meta.get("extras", []), "progress"]

    @property
    def pixels(self) -> PixelSpec | None:
        return self.layout.pixels

    @property
    def augment(self) -> dict | None:
        """The random-view settings of a training cache made with --aug-views, else None."""
        return self.meta.get("augment")

    @property
    def text(self) -> dict | None:
        """{template, prompts} when class-name text embeddings are stored (`text/embed`)."""
        return self.meta.get("text")

    def text_embeddings(self) -> np.ndarray:
        if not self.text:
            raise CacheError(f"{self.path} holds no class-name text embeddings (extracted with --no-text, or the "
                             f"model has no text tower, or the classes are unknown)")
        return self.root["text/embed"][:]

    # -- progress and validity
    def shard_done(self) -> np.ndarray:
        """(shards,) bool. A flag that cannot be read (corrupted on disk) counts as not done: that shard is
        written again by the next extract."""
        prog = self.root["progress"]
        try:
            return prog[:] == 1
        except Exception:
            out = np.zeros(prog.shape[0], bool)
            for s in range(prog.shape[0]):
                try:
                    out[s] = prog[s] == 1
                except Exception:
                    pass
            return out

    @property
    def complete(self) -> bool:
        return bool(self.shard_done().all())

    def done_rows(self) -> np.ndarray:
        done = self.shard_done()
        return np.repeat(done, self.layout.shard_rows)[: self.num_clips]

    def valid(self) -> np.ndarray:
        """(clips,) bool: decoded, extracted and in a finished shard."""
        return self.root["clips/valid"][:] & self.done_rows()

    def labels(self) -> np.ndarray:
        return self.root["clips/label"][:]

    def clip_video(self) -> np.ndarray:
        return self.root["clips/video"][:]

    def clip_view(self) -> np.ndarray:
        return self.root["clips/view"][:]

    def failures(self) -> list[dict]:
        """Videos that could not be extracted (in finished shards), with the stage and the reason."""
        status = self.root["videos/status"][:]
        done = np.repeat(self.shard_done(), self.layout.shard_videos)[: self.num_videos]
        bad = np.flatnonzero((status == FAILED) & done)
        if len(bad) == 0:
            return []
        paths, ids, errs = (self.root[f"videos/{k}"][:] for k in ("path", "id", "error"))
        out = []
        for i in bad:
            stage, _, msg = str(errs[i]).partition(": ")
            out.append({"video": int(i), "id": str(ids[i]), "path": str(paths[i]), "stage": stage, "error": msg})
        return out

    # -- features
    def read(self, name: str, rows=slice(None)) -> np.ndarray:
        """Rows of an array. Feature arrays of an int8 cache come back dequantized to float16, so readers
        never see the difference (except for the quantization error). Data that fails its checksum raises
        CacheError naming the array and the clips."""
        data = self._get(name, rows)
        if self.layout.dtype == "int8" and name in self.layout.feature_arrays():
            data = self._dequantize(name, data)
        return data

    def _get(self, name: str, rows, cols=None):
        data = self._read_direct(name, rows)
        if data is not None:
            return data if cols is None else data[(slice(None), *cols)]
        arr = self.root[name]
        try:
            return arr[rows] if cols is None else arr[(rows, *cols)]
        except Exception as e:
            bad = self.unreadable_rows(name, rows)
            where = f"clips {_ranges(bad)}" if bad else f"rows {rows}"
            raise CacheError(f"{self.path}: array {name}, {where}: cannot be read ({_first_line(e)}); the data on disk "
                             f"is damaged: run `cachefeat verify {self.path}`, then `cachefeat extract ... --repair`"
                             ) from None

    def _read_direct(self, name: str, rows) -> np.ndarray | None:
        """Rows of a sharded feature array decoded straight from its shard files (shard_file.py: the same
        bytes through the same codecs, without zarr's per-chunk cost), or None where that does not apply
        (direct reads off, a single row, another layout) or the bytes fail a check: zarr then reads them
        and the error names what is damaged."""
        if not self.direct_reads or isinstance(rows, (int, np.integer)):
            return None
        if isinstance(rows, slice):
            if rows.step not in (None, 1):
                return None
        else:
            rows = np.asarray(rows)
            if rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and rows.min() < 0):
                return None                  # zarr's indexing rules (negative rows count from the end)
        if name not in self._shard_files:
            self._shard_files[name] = ShardFile.open(self.path / name)
        reader = self._shard_files[name]
        if reader is None:
            return None
        try:
            return reader.read(rows)
        except (ShardFileError, OSError):
            return None

    def unreadable_rows(self, name: str, rows=slice(None)) -> list[int]:
        """The rows of `name` within `rows` that fail to read, one by one."""
        arr = self.root[name]
        idx = np.arange(arr.shape[0])[rows] if not isinstance(rows, (int, np.integer)) else [int(rows)]
        bad = []
        for r in np.atleast_1d(idx):
            try:
                arr[int(r)]
            except Exception:
                bad.append(int(r))
        return bad

    def read_cls(self, rows=slice(None), layers: list[int] | None = None) -> np.ndarray:
        """(clips, T, L', D) class tokens of `layers` (block indices; default all tapped)."""
        if layers is None:
            return self.read("cls", rows)
        pos = [self.layer_position(l) for l in layers]
        if pos == list(range(pos[0], pos[0] + len(pos))):
            data = self._get("cls", rows, (slice(None), slice(pos[0], pos[0] + len(pos))))
        else:
            data = self._get("cls", rows)[:, :, pos]
        if self.layout.dtype == "int8":
            data = self._dequantize("cls", data, pos)
        return data

    def quant_step(self, name: str) -> np.ndarray:
        """The int8 step of a feature array: value = int8 * step, per layer and channel."""
        if not hasattr(self, "_steps"):
            self._steps = {}
        if name not in self._steps:
            self._steps[name] = self.root[f"quant/{name}"][:]
        return self._steps[name]

    def _dequantize(self, name: str, q: np.ndarray, layer_pos: list[int] | None = None) -> np.ndarray:
        step = self.quant_step(name)          # cls: (L, D); embed and tokens/<i>: (D,)
        if layer_pos is not None:
            step = step[layer_pos]
        return (q.astype(np.float32) * step).astype(np.float16)

    def layer_position(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise CacheError(f"layer {layer} is not in the cache (it holds layers {self.layers})") from None

    def dataset(self, embed: bool = False, cls_layers=(), token_layers=(), pixels: bool = False, rows=None,
                in_memory: str = "auto"):
        """A torch-style Dataset of the valid clips with only these arrays (see cachefeat.data.CacheDataset):
        `ds[i]` -> {embed (T,E), cls (T,L,D), tokens (T,L',N,D), pixels, label, video, view, row}."""
        from .data import CacheDataset, Selection
        sel = Selection(embed=embed, cls_layers=tuple(cls_layers), token_layers=tuple(token_layers), pixels=pixels)
        return CacheDataset(self, sel, rows=rows, in_memory=in_memory)

    def disk_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                total += os.path.getsize(os.path.join(dirpath, f))
        return total

    def feature_bytes_raw(self) -> int:
        """Uncompressed bytes of the feature arrays' finished rows."""
        per_clip = sum(self.layout.bytes_per_clip().values())
        return int(self.done_rows().sum()) * per_clip


def _ranges(rows: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r != start else str(r))
            start = None
    return ", ".join(out)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200]}" if s else type(e).__name__


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cachefeat cache for reading."""
    return Cache(path, mode="r")


# ------------------------------------------------------------------------------------------- lock
class StoreLock:
    """One writer per store: an exclusive lock file inside the store naming its holder (host, pid).
    A lock left by a dead process on this host is taken over; a live holder makes acquire() fail."""

    def __init__(self, store: str | os.PathLike):
        self.path = Path(store) / LOCK_NAME
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def active_holder(self) -> dict | None:
        """The holder if a live process (or one on another host) holds the lock, else None. A lock file
        that cannot be parsed yet is being written by its holder, so it counts as held."""
        if not self.path.exists():
            return None
        h = self.holder()
        if h is None:
            return {} if self.path.exists() else None
        return None if self._stale(h) else h

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is None and self._age() < 5.0:  # its writer may not have filled it in yet
                    time.sleep(0.5)
                    continue
                if h is None or self._stale(h):
                    self._remove_stale()
                    continue
                raise CacheError(f"{self.path.parent} is being written by another cachefeat process "
                                 f"(pid {h.get('pid')} on {h.get('host')}, since {h.get('since')}); "
                                 f"wait for it, or stop it first")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise CacheError(f"could not take the lock {self.path}")

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    @staticmethod
    def _stale(h: dict) -> bool:
        if h.get("host") != socket.gethostname():
            return False  # cannot see another machine's processes: assume alive
        pid = int(h.get("pid", -1))
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _is_zombie(pid)

    def _remove_stale(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
