"""The cache's layout: one Zarr v3 store per split, self-describing, written shard by shard.
docs/cache-format.md documents every array and attribute; this package (cachefeat.store) is the only code
that knows the layout, and it imports nothing from stage one or stage two.

Rows are clips: clip = video * views + view, a fixed order decided when the store is created, so any
number of writers, crashes and resumes give the same arrays. A shard is `shard_videos` consecutive videos
(all their views); it is written whole, by one writer, once, and only then marked done in `progress`.
A windowed layout (--sampling fps) gives each video its own number of clips (its windows, from its
duration), in video order; a shard is then `shard_clips` consecutive rows, which may hold the end of one
video and the start of the next, and the per-video tables a shard writes are those of the videos whose
first window it holds.
Zarr's sharding codec rewrites a whole shard file on a partial update, so two writers must never share a
shard; and a shard whose progress flag is not set is never read as data (a crash mid-write leaves it
unmarked, and the next run writes it again).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property

import crc32c
import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

from ..errors import Damaged
from ..specs import PixelSpec, TokenSpec, ViewSpec

SCHEMA_VERSION = 2     # the newest schema this code reads; a store records the lowest that describes it:
                       # 1 (clips of `views` rows per video), 2 (windowed: clips per video vary)
ATTR = "cachefeat"
CREATING = "cachefeat_creating"
LOCK_NAME = "cachefeat.lock"

# video status values in videos/status
PENDING, OK, FAILED = 0, 1, 2


class CacheError(Exception):
    """A store that cannot be used as asked; the message says why, in one line."""


class CacheDamaged(CacheError, Damaged):
    """A store whose data is damaged (exit status 1); the message names what is damaged and the command that
    repairs it."""


class UnsafeStore(CacheError):
    """A store cachefeat does not open as it is (exit status 2): metadata that is not what cachefeat writes
    (crafted, edited or damaged zarr.json documents and attributes, sizes no file backs), or a link or a
    special file where a file should be (store.validate, store.confine). Never taken for damage a re-extraction
    mends, and never followed."""


# ------------------------------------------------------------------------------------------- codecs
CODEC_HELP = "none, zstd[:LEVEL], blosc-lz4, blosc-zstd[:LEVEL] or gzip[:LEVEL]"
DEFAULT_CODEC = "none"      # checksums only: see docs/performance.md, "Codecs"


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
    shard_videos: int                   # videos per shard (0 in a windowed layout: shards hold shard_clips rows)
    pixels: PixelSpec | None = None     # small frames for pixel-level encoders
    augmented: bool = False             # views are random training views (clips/aug records them)
    time: bool = False                  # clips/time: every frame's presentation time (absent from old caches)
    clip_counts: tuple[int, ...] | None = None   # windowed: clips (windows) of each video, each >= 1
    shard_clips: int = 0                # windowed: rows per shard

    @property
    def windowed(self) -> bool:
        return self.clip_counts is not None

    @property
    def schema_version(self) -> int:
        return 2 if self.windowed else 1

    @property
    def num_clips(self) -> int:
        if self.windowed:
            return int(self.first_clips[-1])
        return self.num_videos * self.views.count

    @property
    def shard_rows(self) -> int:
        return self.shard_clips if self.windowed else self.shard_videos * self.views.count

    @property
    def num_shards(self) -> int:
        if self.windowed:
            return max(1, -(-self.num_clips // self.shard_clips))
        return -(-self.num_videos // self.shard_videos)

    @cached_property
    def first_clips(self) -> np.ndarray:
        """(videos + 1,) int64: video v's clips are rows first_clips[v] .. first_clips[v + 1] - 1."""
        counts = self.clip_counts if self.windowed else np.full(self.num_videos, self.views.count)
        return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])

    def video_rows(self, video: int) -> range:
        return range(int(self.first_clips[video]), int(self.first_clips[video + 1]))

    def shard_videos_range(self, shard: int) -> range:
        """The videos whose per-video table entries the shard writes: all of its videos, or (windowed) those
        whose first clip it holds."""
        if self.windowed:
            rows = self.shard_rows_range(shard)
            starts = self.first_clips[:-1]
            return range(int(np.searchsorted(starts, rows.start)), int(np.searchsorted(starts, rows.stop)))
        return range(shard * self.shard_videos, min((shard + 1) * self.shard_videos, self.num_videos))

    def shard_rows_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.num_clips))

    def clip_video(self) -> np.ndarray:
        """(clips,) int32: the video of every row."""
        return np.repeat(np.arange(self.num_videos, dtype=np.int32), np.diff(self.first_clips))

    def clip_view(self) -> np.ndarray:
        """(clips,) int16: the view (windowed: the window) of every row within its video."""
        return (np.arange(self.num_clips, dtype=np.int64) - np.repeat(self.first_clips[:-1], np.diff(self.first_clips))
                ).astype(np.int16 if not self.windowed else np.int32)

    def video_done(self, shard_done: np.ndarray) -> np.ndarray:
        """(videos,) bool: every row of the video is in a finished shard."""
        if not self.windowed:
            return np.repeat(shard_done, self.shard_videos)[: self.num_videos]
        rows = np.repeat(shard_done, self.shard_rows)[: self.num_clips]
        return np.minimum.reduceat(rows, self.first_clips[:-1]) if self.num_videos else np.zeros(0, bool)

    def owner_done(self, shard_done: np.ndarray) -> np.ndarray:
        """(videos,) bool: the shard that writes the video's table entries is finished."""
        if not self.windowed:
            return self.video_done(shard_done)
        return np.asarray(shard_done)[self.first_clips[:-1] // self.shard_rows]

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
        if self.time:
            out["clips/time"] = ((self.frames,), "float64")
        if self.windowed:
            out["clips/valid_frames"] = ((), "int16")
            out["clips/error"] = ((), "str")
        if self.augmented:
            out["clips/aug"] = ((), "str")
        return out

    def video_tables(self) -> tuple[str, ...]:
        """The per-video tables: written at creation, but for SHARD_VIDEO_TABLES (written with a shard)."""
        return VIDEO_TABLES + (WINDOWED_VIDEO_TABLES if self.windowed else ())

    def video_chunk(self, name: str) -> int:
        """Videos per chunk of a per-video table: a shard's videos, so that each shard writes whole chunks of
        the tables it fills (windowed: one video, since a shard's videos vary in number)."""
        if name in SHARD_VIDEO_TABLES and self.windowed:
            return 1
        return max(1, self.shard_videos) if not self.windowed else max(1, min(self.num_videos, 4096))

    def creation_tables(self) -> tuple[str, ...]:
        """The tables written once, when the store is created (checked against table_checksums)."""
        return CREATION_TABLES + (WINDOWED_VIDEO_TABLES if self.windowed else ())

    def bytes_per_clip(self) -> dict[str, int]:
        """Stored (uncompressed) bytes per clip of the feature and pixel arrays."""
        names = [*self.feature_arrays(), *(["pixels"] if self.pixels else [])]
        arrays = self.row_arrays()
        return {k: int(np.prod(arrays[k][0])) * np.dtype(arrays[k][1]).itemsize for k in names}

    def to_dict(self) -> dict:
        d = {"num_videos": self.num_videos, "views": [self.views.temporal, self.views.spatial],
             "frames": self.frames, "layers": list(self.layers), "tokens": self.tokens.to_dict(),
             "width": self.width, "embed_dim": self.embed_dim, "dtype": self.dtype,
             "shard_videos": self.shard_videos, "num_clips": self.num_clips, "num_shards": self.num_shards,
             "pixels": self.pixels.to_dict() if self.pixels else None, "augmented": self.augmented}
        if self.time:      # only when true: the layout (and fingerprint) of a cache made before stays as it was
            d["time"] = True
        if self.windowed:  # the counts themselves are the array videos/num_clips
            d.update(windowed=True, shard_clips=self.shard_clips, clip_counts_sha256=hashlib.sha256(
                np.asarray(self.clip_counts, dtype="<i8").tobytes()).hexdigest()[:16])
        return d

    @classmethod
    def from_dict(cls, d: dict, clip_counts=None) -> Layout:
        """`clip_counts` (a windowed layout's videos/num_clips) must be given when d says `windowed`."""
        px = d.get("pixels")
        windowed = bool(d.get("windowed", False))
        if windowed and clip_counts is None:
            raise ValueError("a windowed layout needs its clip counts (videos/num_clips)")
        return cls(num_videos=d["num_videos"], views=ViewSpec(*d["views"]), frames=d["frames"],
                   layers=tuple(d["layers"]), tokens=TokenSpec.from_dict(d["tokens"]), width=d["width"],
                   embed_dim=d["embed_dim"], dtype=d["dtype"], shard_videos=d["shard_videos"],
                   pixels=PixelSpec(**px) if px else None, augmented=bool(d.get("augmented", False)),
                   time=bool(d.get("time", False)),
                   clip_counts=tuple(int(c) for c in clip_counts) if windowed else None,
                   shard_clips=int(d.get("shard_clips", 0)))


VIDEO_TABLES = ("videos/path", "videos/id", "videos/label", "videos/status", "videos/num_frames", "videos/error")
WINDOWED_VIDEO_TABLES = ("videos/num_clips", "videos/start", "videos/duration")
CLIP_TABLES = ("clips/video", "clips/view", "clips/label")
SHARD_VIDEO_TABLES = ("videos/status", "videos/num_frames", "videos/error")    # written with each shard

CREATION_TABLES = tuple(n for n in (*VIDEO_TABLES, *CLIP_TABLES) if n not in SHARD_VIDEO_TABLES)

# Each shard's checksum record: the CRC32C its crc32c codec stored for every chunk the shard wrote, in
# record_slots() order, written after the data and before the progress flag. A checksum proves a chunk's
# bytes intact; the record proves it is the chunk written at that place (not one copied or moved there,
# nor deleted: a deleted chunk reads as the fill value).
RECORD = "shard_checksums"
# what a store's folder holds (the first component of every node's name, the lock): a folder with anything
# else is not one cachefeat made, and is never deleted as an unfinished creation
STORE_ENTRIES = frozenset({"zarr.json", LOCK_NAME, "embed", "cls", "tokens", "pixels", "clips", "videos", "progress",
                           RECORD, "text", "quant"})
# the temporary file zarr's LocalStore writes a zarr.json through (_atomic_write: `zarr.<uuid hex>.partial`,
# renamed over zarr.json when whole): a process killed while writing the root's metadata leaves one behind
ZARR_PARTIAL = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
NOT_STORED = -1     # a chunk of only the fill value, which zarr leaves out
NO_RECORD = -2      # the record array's fill value: no record (the shard was never finished)


def record_slots(layout: Layout) -> dict[str, slice]:
    """Where each array's chunks sit in a shard's record: one per clip for the big per-clip arrays (one
    chunk per clip), one for the per-clip and per-video tables (one chunk per shard). A windowed layout's
    per-video tables have a chunk per video: a shard records one slot per row for them, slot j for the
    j-th video whose first window it holds (it holds at most one per row)."""
    out, k = {}, 0
    for name, (shape, _) in layout.row_arrays().items():
        n = layout.shard_rows if shape else 1
        out[name], k = slice(k, k + n), k + n
    for name in SHARD_VIDEO_TABLES:
        n = layout.shard_rows if layout.windowed else 1
        out[name], k = slice(k, k + n), k + n
    return out


def per_clip_chunks(layout: Layout) -> set[str]:
    """The arrays stored one chunk per clip (in shard files); the others have one chunk per shard (or, the
    per-video tables of a windowed layout, one per video)."""
    return {name for name, (shape, _) in layout.row_arrays().items() if shape}


def table_checksum(data: np.ndarray) -> int:
    """CRC32C of a table's contents (numbers as little-endian bytes, strings as their JSON list), recorded
    in the metadata when the store is created: a chunk of a table deleted (it reads as the fill value) or
    replaced shows as a different checksum."""
    data = np.asarray(data)
    raw = (json.dumps(data.tolist()).encode() if data.dtype.kind in "UOT"
           else np.ascontiguousarray(data, data.dtype.newbyteorder("<")).tobytes())
    return crc32c_of(raw)


def crc32c_of(data, value: int = 0) -> int:
    """CRC32C of `data` (extending `value`): the checksum of zarr's crc32c codec, of shard indexes and of
    the tables. Computed without holding the GIL: google_crc32c (zarr's) holds it, so the writer threads
    checksummed one at a time, and every other Python thread of stage one waited while they did."""
    return crc32c.crc32c(data, value, gil_release_mode=1)

_DIMS = {"embed": ("clip", "frame", "channel"), "cls": ("clip", "frame", "layer", "channel"),
         "tokens": ("clip", "frame", "token", "channel"), "pixels": ("clip", "frame", "y", "x", "rgb"),
         "clips/valid": ("clip",), "clips/frame_idx": ("clip", "frame"), "clips/pixel_frame_idx": ("clip", "frame"),
         "clips/aug": ("clip",), "clips/time": ("clip", "frame"), "clips/valid_frames": ("clip",),
         "clips/error": ("clip",)}


# ------------------------------------------------------------------------------------------- metadata
# What decides the arrays' contents: a resumed run must agree on all of it.
_CONTENT_KEYS = ("model", "layers", "tokens", "dtype", "frames", "sampling", "views", "preprocessing",
                 "compute_precision", "source", "layout", "codec", "classes", "pixels", "augment", "text",
                 "quantization")
_MODEL_IDENTITY = ("name", "pretrained", "init_seed", "quick_gelu", "weights_sha256")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _model_identity(meta: dict) -> dict:
    model = meta.get("model") or {}
    ident = {k: model.get(k) for k in _MODEL_IDENTITY}
    # what `cls` holds changes the features; it counts when it is not the class token (the only content
    # before it was recorded), so the fingerprints of those caches are unchanged
    if model.get("cls", "class token") != "class token":
        ident["cls"] = model["cls"]
    return ident


def content_fingerprint(meta: dict) -> str:
    sub = {k: meta.get(k) for k in _CONTENT_KEYS}
    sub["model"] = _model_identity(meta)
    return hashlib.sha256(_canonical(sub).encode()).hexdigest()[:16]


def feature_fingerprint(meta: dict) -> str:
    """Identity of the feature space: same backbone weights and preprocessing give comparable features,
    whatever the videos, frames, views or layers kept. Train and eval caches must share it."""
    sub = {"model": _model_identity(meta), "preprocessing": meta.get("preprocessing")}
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
