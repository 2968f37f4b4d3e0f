"""What a store must be before anything of it is read: the one check of a cache, made when it is opened
(`open_store`, behind every `Cache`: train, eval, ablate, info, verify, export, extract's resume and the
Python API). A cache may come from elsewhere, so its metadata is input, checked the way a parser checks a
file, before any size it claims is used:

1. Its nodes: the zarr.json of the root and of every group and array below it (not the chunk folders, so
   the cost does not grow with the cache), each read without following a link (confine.py), at most
   MAX_ROOT_DOC / MAX_ARRAY_DOC bytes, valid JSON holding only the keys Zarr v3 defines; node names are
   plain names; no link and no special file among them.
2. Every array's document: a shape and a regular chunk grid of non-negative (chunks: positive) integers
   within MAX_ROWS, a data type and a codec chain of those cachefeat writes (bytes or vlen-utf8, at most one
   of zstd, gzip and blosc, then crc32c; shards: sharding_indexed with a crc32c-checked index), at most
   MAX_CHUNK_BYTES decoded per chunk and MAX_SHARD_ROWS chunks per shard.
3. The `cachefeat` attributes: every key a reader uses has its type and a value in range; the layout's
   numbers are those of a cache cachefeat could write (limits below), and the copies of them outside the
   layout agree with it; names the metadata gives arrays (extras, table checksums) are arrays of the format
   (so never `..`, never a path); the fingerprint matches (a value edited by hand).
4. The sizes, against the files: the video list (videos/path, videos/id: written whole when the store is
   created, never empty strings) has a chunk file on disk for every chunk of the videos it claims, listed
   without reading them; a windowed cache's clip counts are read only then, and must sum to its clips and
   match their recorded hash.
5. The arrays the layout describes have exactly its shapes, dtypes and chunks; those every reader needs are
   present (a missing one is damage a copy can mend: exit status 1, CacheDamaged).

Anything else is refused in one line, exit status 2 (UnsafeStore). Reads afterwards check only what they
read (checksums, records, and that each file is a regular file inside the store), never the metadata again:
the training hot path pays nothing for this.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ..specs import SPATIAL_CROPS, STORAGE_DTYPES
from .confine import open_group, read_json, real_root, refusal
from .layout import (
    ATTR,
    CLIP_TABLES,
    RECORD,
    SCHEMA_VERSION,
    CacheDamaged,
    CacheError,
    Layout,
    UnsafeStore,
    content_fingerprint,
    per_clip_chunks,
    record_slots,
)

MAX_ROOT_DOC = 64 << 20      # the root's zarr.json: class names, prompts, checksums (Kinetics-400: ~60 KB)
MAX_ARRAY_DOC = 1 << 20      # an array's zarr.json (~1.5 KB)
MAX_NODES = 4096             # groups and arrays (a cache with every layer's tokens of a 48-block tower: ~70)
MAX_DEPTH = 8
MAX_ROWS = 2 ** 31 - 1       # videos and clips: their indices are int32 (clips/video, clips/frame_idx)
MAX_SHARD_ROWS = 1 << 20     # clips per shard (a shard is assembled in memory) and rows per table chunk
MAX_CHUNK_BYTES = 1 << 30    # decoded bytes of one chunk (a clip of 64 frames x 1024 tokens x 4096 floats: 512 MiB)
MAX_WIDTH = 16384            # transformer width and embedding size (ViT-22B: 6144)
MAX_FRAMES = 4096
MAX_LAYER = 1024             # block indices
MAX_GRID = 1024              # patch grid side
MAX_VIEWS = 1024
MAX_WINDOWS = 1 << 24        # windows of one video (a day at 30 fps, stride 1: 2.6 M)
MAX_CLASSES = 1 << 20
MAX_NAME = 4096              # characters of a string value (class names, paths)

_NODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DTYPE_BYTES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "float32": 4,
                "float64": 8, "string": 16}      # string: what a decoded element costs at least (an object)
_GROUP_KEYS = {"zarr_format", "node_type", "attributes", "consolidated_metadata"}
_ARRAY_KEYS = {"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value",
               "codecs", "attributes", "dimension_names", "storage_transformers"}
_BLOSC_CNAMES = ("lz4", "lz4hc", "blosclz", "zstd", "zlib")
_BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
# table dtypes by kind ("T" string, "i" integer, "u" unsigned, "f" float, "b" bool)
_TABLE_KINDS = {"videos/path": "T", "videos/id": "T", "videos/error": "T", "videos/label": "i",
                "videos/status": "u", "videos/num_frames": "i", "videos/num_clips": "i", "videos/start": "f",
                "videos/duration": "f", "clips/video": "i", "clips/view": "i", "clips/label": "i"}


class _Bad(Exception):
    """What is wrong, in a few words (open_store adds where)."""


@dataclass(frozen=True)
class ArrayDoc:
    """An array's zarr.json, as checked."""
    shape: tuple[int, ...]
    data_type: str
    chunks: tuple[int, ...]            # the chunk grid (sharded: the shard's shape)
    inner: tuple[int, ...] | None      # sharded: the chunks inside a shard

    @property
    def kind(self) -> str:
        return "T" if self.data_type == "string" else {"bool": "b", "uint8": "u"}.get(self.data_type,
                                                                                     self.data_type[0])


@dataclass
class Opened:
    """A store that passed open_store: its zarr root group (every file confined), real folder, metadata,
    layout and array documents."""
    root: object
    real: str
    meta: dict
    layout: Layout
    arrays: dict[str, ArrayDoc]


def open_store(path, mode: str = "r") -> Opened:
    """Check the store at `path` (the module docstring, 1-5) and open it with zarr. CacheError when it is
    no cachefeat cache, UnsafeStore when it is not one cachefeat wrote, CacheDamaged when an array every
    reader needs is missing."""
    real = real_root(path)
    if not os.path.isdir(real) or not os.path.lexists(os.path.join(real, "zarr.json")):
        raise CacheError(f"{path} is not a cachefeat cache (no Zarr v3 store there)")
    try:
        groups, docs = _nodes(real)
        attrs = groups[""].get("attributes") or {}
        meta = attrs.get(ATTR)
        if not isinstance(meta, dict):
            raise CacheError(f"{path} is a Zarr store but not a cachefeat cache (no '{ATTR}' metadata)")
        arrays = {name: _array(name, doc) for name, doc in docs.items()}
        version = meta.get("schema_version")
        if type(version) is int and version > SCHEMA_VERSION:
            raise CacheError(f"{path} has cache schema {version}, newer than this cachefeat understands "
                             f"({SCHEMA_VERSION}); upgrade cachefeat")
        _check_meta(meta)
        lay = meta["layout"]
        _video_list_on_disk(real, arrays, lay.get("num_videos"))
        root = open_group(real, mode)
        counts = _clip_counts(root, arrays, lay) if lay.get("windowed") else None
        layout = _layout(meta, counts)
        _check_arrays(meta, layout, arrays)
    except _Bad as e:
        raise refusal(path, str(e)) from None
    missing = [n for n in (*layout.video_tables(), *CLIP_TABLES, "clips/valid", "progress",
                           *([RECORD] if "table_checksums" in meta else [])) if n not in arrays]
    if missing:      # a feature array an adapter does not read may be left out of a copy
        raise CacheDamaged(f"{path}: array{'s' * (len(missing) > 1)} {', '.join(missing[:4])} "
                           f"{'are' if len(missing) > 1 else 'is'} missing; restore it from a copy (or `cachefeat "
                           f"import` an HDF5 export of it), or delete it and run the same `cachefeat extract` again")
    return Opened(root, real, meta, layout, arrays)


# ------------------------------------------------------------------------------------------- 1. nodes
def _nodes(real: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """The zarr.json documents of every group and array, by name ("" for the root), found by listing the
    groups' folders (never an array's chunk folders)."""
    groups, arrays = {}, {}
    todo = [""]
    while todo:
        name = todo.pop()
        folder = os.path.join(real, name)
        doc = read_json(real, os.path.join(folder, "zarr.json"), MAX_ARRAY_DOC if name else MAX_ROOT_DOC)
        where = f"/{name}" if name else "the root"
        if doc.get("zarr_format") != 3:
            raise _Bad(f"{where} is not a Zarr v3 node (zarr_format {_show(doc.get('zarr_format'))})")
        kind = doc.get("node_type")
        if kind == "array":
            if not name:
                raise _Bad("the root is an array, not a group")
            arrays[name] = doc
        elif kind == "group":
            _keys(doc, _GROUP_KEYS, where)
            if doc.get("consolidated_metadata") is not None:   # zarr would read it instead of the nodes' own
                raise _Bad(f"{where} has consolidated metadata, which cachefeat never writes")
            if not isinstance(doc.get("attributes", {}), dict):
                raise _Bad(f"the attributes of {where} are not an object")
            groups[name] = doc
        else:
            raise _Bad(f"{where} has node_type {_show(kind)}")
        with os.scandir(folder) as it:
            for e in it:
                child = f"{name}/{e.name}" if name else e.name
                if e.is_symlink():
                    raise _Bad(f"{child} is a symbolic link (cachefeat never writes links)")
                if e.is_dir(follow_symlinks=False):
                    if kind == "group" and os.path.lexists(os.path.join(e.path, "zarr.json")):
                        if not _NODE_NAME.fullmatch(e.name) or child.count("/") >= MAX_DEPTH:
                            raise _Bad(f"a node is named {_show(child)}")
                        todo.append(child)
                        if len(groups) + len(arrays) + len(todo) > MAX_NODES:
                            raise _Bad(f"it has more than {MAX_NODES} groups and arrays")
                elif not e.is_file(follow_symlinks=False):
                    raise _Bad(f"{child} is not a regular file (a FIFO, a device or a socket)")
    return groups, arrays


# ------------------------------------------------------------------------------------------- 2. arrays
def _array(name: str, doc: dict) -> ArrayDoc:
    where = f"array {name}"
    _keys(doc, _ARRAY_KEYS, where)
    shape = _ints(doc.get("shape"), f"{where}: shape", 0, MAX_ROWS, 1, 6)
    dtype = doc.get("data_type")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise _Bad(f"{where} has data type {_show(dtype)}, not one cachefeat writes")
    grid = doc.get("chunk_grid")
    if not isinstance(grid, dict) or grid.get("name") != "regular" or set(grid) - {"name", "configuration"} \
            or not isinstance(grid.get("configuration"), dict) or set(grid["configuration"]) != {"chunk_shape"}:
        raise _Bad(f"{where} has chunk grid {_show(grid)}, not a regular one")
    chunks = _ints(grid["configuration"]["chunk_shape"], f"{where}: chunk shape", 1, MAX_ROWS, len(shape),
                   len(shape))
    keys = doc.get("chunk_key_encoding")
    if keys not in ({"name": "default", "configuration": {"separator": "/"}}, {"name": "default"}):
        raise _Bad(f"{where} has chunk key encoding {_show(keys)}, not the default one")
    _fill(doc.get("fill_value"), dtype, where)
    if doc.get("storage_transformers") not in (None, []):
        raise _Bad(f"{where} has storage transformers")
    dims = doc.get("dimension_names")
    if dims is not None and (not isinstance(dims, list) or len(dims) != len(shape)
                             or not all(d is None or (isinstance(d, str) and len(d) <= 64) for d in dims)):
        raise _Bad(f"{where} has dimension names {_show(dims)}")
    if not isinstance(doc.get("attributes", {}), dict):
        raise _Bad(f"the attributes of {where} are not an object")
    codecs = doc.get("codecs")
    if not isinstance(codecs, list) or not codecs:
        raise _Bad(f"{where} has no codecs")
    inner = None
    if isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed":
        cfg = _codec(codecs[0], {"chunk_shape", "codecs", "index_codecs", "index_location"}, where)
        if len(codecs) != 1:
            raise _Bad(f"{where}: codecs after sharding_indexed")
        inner = _ints(cfg.get("chunk_shape"), f"{where}: inner chunk shape", 1, MAX_ROWS, len(shape), len(shape))
        if any(c % i for c, i in zip(chunks, inner)):
            raise _Bad(f"{where}: inner chunks {list(inner)} do not tile its shards {list(chunks)}")
        if math.prod(c // i for c, i in zip(chunks, inner)) > MAX_SHARD_ROWS:
            raise _Bad(f"{where}: more than {MAX_SHARD_ROWS} chunks per shard")
        _chain(cfg.get("codecs"), dtype, where)
        index = cfg.get("index_codecs")
        if index not in ([{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                         [{"name": "bytes", "configuration": {"endian": "little"}},
                          {"name": "crc32c", "configuration": {}}]):
            raise _Bad(f"{where}: shard index codecs {_show(index)}, not little-endian bytes with a crc32c")
        if cfg.get("index_location", "end") not in ("end", "start"):
            raise _Bad(f"{where}: shard index location {_show(cfg.get('index_location'))}")
    else:
        _chain(codecs, dtype, where)
    if math.prod(inner or chunks) * _DTYPE_BYTES[dtype] > MAX_CHUNK_BYTES:
        raise _Bad(f"{where}: chunks of {list(inner or chunks)} {dtype} values, more than {MAX_CHUNK_BYTES >> 20} "
                   f"MiB each")
    return ArrayDoc(shape, dtype, chunks, inner)


def _chain(codecs, dtype: str, where: str) -> None:
    """[bytes | vlen-utf8, at most one compressor, crc32c]: what cachefeat writes (layout.parse_codec)."""
    if not isinstance(codecs, list) or not 2 <= len(codecs) <= 3:
        raise _Bad(f"{where}: codecs {_show(codecs)}, not a serializer, a compressor and a crc32c")
    first, *middle, last = codecs
    if dtype == "string":
        _codec(first, set(), where, "vlen-utf8")
    else:
        endian = _codec(first, {"endian"}, where, "bytes").get("endian", "little")
        if endian not in ("little", "big"):
            raise _Bad(f"{where}: byte order {_show(endian)}")
    for c in middle:
        name = c.get("name") if isinstance(c, dict) else None
        if name == "zstd":
            cfg = _codec(c, {"level", "checksum"}, where)
            _int(cfg.get("level", 0), f"{where}: zstd level", -131072, 22)
            if not isinstance(cfg.get("checksum", False), bool):
                raise _Bad(f"{where}: zstd checksum {_show(cfg.get('checksum'))}")
        elif name == "gzip":
            _int(_codec(c, {"level"}, where).get("level", 5), f"{where}: gzip level", 0, 9)
        elif name == "blosc":
            cfg = _codec(c, {"typesize", "cname", "clevel", "shuffle", "blocksize"}, where)
            if cfg.get("cname", "zstd") not in _BLOSC_CNAMES or cfg.get("shuffle", "shuffle") not in _BLOSC_SHUFFLES:
                raise _Bad(f"{where}: blosc settings {_show(cfg)}")
            _int(cfg.get("clevel", 5), f"{where}: blosc level", 0, 9)
            _int(cfg.get("typesize", 1), f"{where}: blosc typesize", 1, 16)
            _int(cfg.get("blocksize", 0), f"{where}: blosc block size", 0, MAX_CHUNK_BYTES)
        else:
            raise _Bad(f"{where}: codec {_show(name)}, not one cachefeat writes (zstd, gzip, blosc)")
    _codec(last, set(), where, "crc32c")


def _codec(c, allowed: set, where: str, name: str | None = None) -> dict:
    """A codec entry {name, configuration} whose configuration holds only `allowed` keys; returns it."""
    if not isinstance(c, dict) or set(c) - {"name", "configuration"} or (name and c.get("name") != name):
        raise _Bad(f"{where}: codec {_show(c)}" + (f" where {name} belongs" if name else ""))
    cfg = c.get("configuration", {})
    if not isinstance(cfg, dict) or set(cfg) - allowed:
        raise _Bad(f"{where}: {c.get('name')} settings {_show(cfg)}")
    return cfg


def _fill(v, dtype: str, where: str) -> None:
    ok = {"bool": lambda x: isinstance(x, bool), "string": lambda x: isinstance(x, str) and len(x) <= MAX_NAME}.get(
        dtype, lambda x: (type(x) is int and abs(x) < 2 ** 64) if dtype[0] in "iu" else
        (type(x) in (int, float) or x in ("NaN", "Infinity", "-Infinity")))
    if not ok(v):
        raise _Bad(f"{where}: fill value {_show(v)} for {dtype}")


# ------------------------------------------------------------------------------------------- 3. attributes
def _check_meta(meta: dict) -> None:
    """The types and ranges of everything readers take from the `cachefeat` attributes."""
    _int(_req(meta, "schema_version", ""), "schema_version", 1, SCHEMA_VERSION)
    model = _dict(_req(meta, "model", ""), "model")
    for key in ("name", "pretrained"):
        _str(_req(model, key, "model."), f"model.{key}")
    for key in ("depth", "heads", "width", "embed_dim"):
        if key in model:
            _int(model[key], f"model.{key}", 1, MAX_WIDTH)
    for key in ("patch_grid", "image_size", "patch_size"):
        if key in model:
            _ints(model[key], f"model.{key}", 1, 8192, 2, 2)
    for key in ("weights_sha256", "family", "cls", "rope", "open_clip_version", "timm_version", "torch_version"):
        if model.get(key) is not None:
            _str(model[key], f"model.{key}")
    for key in ("quick_gelu", "class_token", "text_tower"):
        if key in model and not isinstance(model[key], bool):
            raise _Bad(f"model.{key} is {_show(model[key])}, not true or false")
    if model.get("init_seed") is not None:
        _int(model["init_seed"], "model.init_seed", -2 ** 63, 2 ** 64)
    lay = _dict(_req(meta, "layout", ""), "layout")
    sampling = _dict(_req(meta, "sampling", ""), "sampling")
    method = sampling.get("method")
    if method not in ("uniform", "dense", "fps"):
        raise _Bad(f"sampling.method is {_show(method)}")
    if sampling.get("stride") is not None:
        _int(sampling["stride"], "sampling.stride", 1, MAX_ROWS)
    if method == "fps":
        _num(sampling.get("fps"), "sampling.fps", 0.001, 1000)
        _int(sampling.get("window_stride"), "sampling.window_stride", 1, MAX_FRAMES)
    if sampling.get("frame_rate") is not None:
        _num(sampling["frame_rate"], "sampling.frame_rate", 1e-6, 1e6)
    if (method == "fps") != bool(lay.get("windowed", False)):
        raise _Bad(f"sampling.method {method} and layout.windowed {_show(lay.get('windowed'))} disagree")
    prep = _dict(_req(meta, "preprocessing", ""), "preprocessing")
    _ints(_req(prep, "size", "preprocessing."), "preprocessing.size", 1, 8192, 1, 3)
    for key in ("mean", "std"):
        values = _req(prep, key, "preprocessing.")
        if not isinstance(values, list) or not 1 <= len(values) <= 4:
            raise _Bad(f"preprocessing.{key} is {_show(values)}")
        for v in values:
            _num(v, f"preprocessing.{key}", 1e-6 if key == "std" else -1e3, 1e3)
    for key in ("interpolation", "resize_mode"):
        _str(_req(prep, key, "preprocessing."), f"preprocessing.{key}")
    for key in ("dtype", "codec", "compute_precision", "fingerprint", "tool", "tool_version", "created",
                "source_path", "short_video_policy", "layer_definition", "time_definition"):
        if meta.get(key) is not None:
            _str(meta[key], key)
    classes = meta.get("classes") or []
    if not isinstance(classes, list) or len(classes) > MAX_CLASSES:
        raise _Bad(f"classes is {_show(classes)}, not a list of names")
    for c in classes:
        _str(c, "a class name")
    text = meta.get("text")
    if text is not None:
        text = _dict(text, "text")
        _str(_req(text, "template", "text."), "text.template")
        prompts = _req(text, "prompts", "text.")
        if not isinstance(prompts, list) or len(prompts) != len(classes):
            raise _Bad(f"text.prompts is not a list of {len(classes)} prompts, one per class")
        for p in prompts:
            _str(p, "a text prompt")
    aug = meta.get("augment")
    if aug is not None:
        aug = _dict(aug, "augment")
        _int(_req(aug, "views", "augment."), "augment.views", 1, MAX_VIEWS)
        _int(_req(aug, "seed", "augment."), "augment.seed", -2 ** 63, 2 ** 64)
        if not isinstance(_req(aug, "flip", "augment."), bool):
            raise _Bad(f"augment.flip is {_show(aug['flip'])}")
        for key in ("scale", "ratio"):
            if key in aug:
                if not isinstance(aug[key], list) or len(aug[key]) != 2:
                    raise _Bad(f"augment.{key} is {_show(aug[key])}")
                for v in aug[key]:
                    _num(v, f"augment.{key}", 0, 1e3)
        for pair in aug.get("flip_pairs") or []:
            _ints(pair, "augment.flip_pairs", 0, max(0, len(classes) - 1), 2, 2)
    quant = meta.get("quantization")
    if quant is not None:
        _int(_req(_dict(quant, "quantization"), "calibration_videos", "quantization."),
             "quantization.calibration_videos", 1, MAX_ROWS)
    for key in ("source", "pixels"):
        if meta.get(key) is not None:
            _dict(meta[key], key)
    extras = meta.get("extras", [])
    if not isinstance(extras, list):
        raise _Bad(f"extras is {_show(extras)}, not a list")
    sums = meta.get("table_checksums")
    if sums is not None:
        for k, v in _dict(sums, "table_checksums").items():
            _int(v, f"table_checksums[{_show(k)}]", 0, 2 ** 32 - 1)
    if meta.get("fingerprint") is not None and meta["fingerprint"] != content_fingerprint(meta):
        raise _Bad("its metadata was edited (it no longer matches its fingerprint, so the arrays may not be what "
                   "it describes)")


def _layout(meta: dict, counts) -> Layout:
    """The layout from its dict, every number checked, and the copies of it in the metadata compared."""
    d = meta["layout"]
    windowed = bool(d.get("windowed", False))
    _int(_req(d, "num_videos", "layout."), "layout.num_videos", 0, MAX_ROWS)
    views = _ints(_req(d, "views", "layout."), "layout.views", 1, MAX_VIEWS, 2, 2)
    if views[1] not in SPATIAL_CROPS:
        raise _Bad(f"layout.views has {views[1]} spatial crops")
    frames = _int(_req(d, "frames", "layout."), "layout.frames", 1, MAX_FRAMES)
    layers = _ints(_req(d, "layers", "layout."), "layout.layers", 0, MAX_LAYER - 1, 1, MAX_LAYER)
    if list(layers) != sorted(set(layers)):
        raise _Bad(f"layout.layers {_show(list(layers))} are not increasing")
    tokens = _dict(_req(d, "tokens", "layout."), "layout.tokens")
    if set(tokens) != {"kind", "grid"} or tokens["kind"] not in ("cls", "all", "pooled") \
            or (tokens["grid"] is None) != (tokens["kind"] == "cls"):
        raise _Bad(f"layout.tokens is {_show(tokens)}")
    if tokens["grid"] is not None:
        _ints(tokens["grid"], "layout.tokens.grid", 1, MAX_GRID, 2, 2)
    for key in ("width", "embed_dim"):
        _int(_req(d, key, "layout."), f"layout.{key}", 1, MAX_WIDTH)
    if _req(d, "dtype", "layout.") not in STORAGE_DTYPES:
        raise _Bad(f"layout.dtype is {_show(d['dtype'])}, not one of {', '.join(STORAGE_DTYPES)}")
    _int(_req(d, "shard_videos", "layout."), "layout.shard_videos", 0 if windowed else 1,
         0 if windowed else MAX_SHARD_ROWS)
    px = d.get("pixels")
    if px is not None:
        px = _dict(px, "layout.pixels")
        if set(px) != {"size", "factor"}:
            raise _Bad(f"layout.pixels is {_show(px)}")
        _int(px["size"], "layout.pixels.size", 8, 1024)
        _int(px["factor"], "layout.pixels.factor", 1, 8)
    for key in ("augmented", "time", "windowed"):
        if key in d and not isinstance(d[key], bool):
            raise _Bad(f"layout.{key} is {_show(d[key])}, not true or false")
    if windowed:
        _int(_req(d, "shard_clips", "layout."), "layout.shard_clips", 1, MAX_SHARD_ROWS)
    elif views[0] * views[1] * d["shard_videos"] > MAX_SHARD_ROWS:
        raise _Bad(f"shards of more than {MAX_SHARD_ROWS} clips")
    if not windowed and d["num_videos"] * views[0] * views[1] > MAX_ROWS:
        raise _Bad(f"more than {MAX_ROWS} clips")
    layout = Layout.from_dict(d, clip_counts=counts)
    for key, value in (("num_clips", layout.num_clips), ("num_shards", layout.num_shards)):
        if d.get(key) != value:
            raise _Bad(f"layout.{key} is {_show(d.get(key))}, its other numbers give {value}")
    if layout.windowed and layout.to_dict()["clip_counts_sha256"] != d.get("clip_counts_sha256"):
        raise _Bad("videos/num_clips is not what the layout recorded")
    if windowed and (views != (1, 1) or d.get("pixels") or d.get("augmented")):
        raise _Bad("a windowed layout with views, pixels or augmented views")
    copies = {"frames": frames, "layers": list(layers), "tokens": tokens, "dtype": d["dtype"], "pixels": px,
              "views": {"temporal": views[0], "spatial": views[1]}}
    for key, value in copies.items():
        if meta.get(key) != value:
            raise _Bad(f"{key} is {_show(meta.get(key))} but the layout says {_show(value)}")
    model = meta["model"]
    if "width" in model and model["width"] != layout.width:
        raise _Bad(f"model.width {model['width']} and layout.width {layout.width} disagree")
    if "depth" in model and layers[-1] >= model["depth"]:
        raise _Bad(f"layer {layers[-1]} of a model of {model['depth']} blocks")
    if tokens["kind"] == "all" and "patch_grid" in model and list(tokens["grid"]) != list(model["patch_grid"]):
        raise _Bad("layout.tokens.grid is not the model's patch grid")
    if layout.augmented != bool(meta.get("augment")):
        raise _Bad("layout.augmented and augment disagree")
    if layout.augmented and meta["augment"]["views"] != views[0]:
        raise _Bad("augment.views and layout.views disagree")
    return layout


# ------------------------------------------------------------------------------------------- 4. sizes
def _video_list_on_disk(real: str, arrays: dict[str, ArrayDoc], num_videos) -> None:
    """Every chunk of the video list a cache claims is a file on disk (in videos/path or videos/id, which
    are written whole when the store is created and hold no empty string): the claimed number of videos,
    and so of clips, rows and shards, is backed by files before anything is allocated for it. The chunk
    folders are listed, not read: a cost of the files there, never of the claim."""
    if type(num_videos) is not int or num_videos <= 0:
        return                   # (a bad value is named by the layout's check)
    present, expected = set(), None
    for name in ("videos/path", "videos/id"):
        doc = arrays.get(name)
        if doc is None:
            continue
        if doc.shape != (num_videos,) or doc.chunks[0] > MAX_SHARD_ROWS:
            raise _Bad(f"array {name} has shape {list(doc.shape)} in chunks of {doc.chunks[0]}, the layout says "
                       f"{num_videos} videos")
        n = -(-num_videos // doc.chunks[0])
        expected = n if expected is None else min(expected, n)
        try:
            with os.scandir(os.path.join(real, name, "c")) as it:
                for e in it:
                    if e.is_symlink():
                        raise _Bad(f"{name}/c/{e.name} is a symbolic link (cachefeat never writes links)")
                    if e.name.isdigit() and int(e.name) < n:
                        present.add(int(e.name))
        except (FileNotFoundError, NotADirectoryError):
            pass
    if expected is not None and len(present) < expected:
        first = min(set(range(expected)) - present)
        raise _Bad(f"it claims {num_videos} videos, but its video list (videos/path, videos/id) has no file for "
                   f"chunk {first} of {expected}")


def _clip_counts(root, arrays: dict[str, ArrayDoc], lay: dict):
    """A windowed cache's videos/num_clips, once its shape is the layout's and its chunks are on disk."""
    doc = arrays.get("videos/num_clips")
    if doc is None:
        return None              # missing: named with the other missing arrays
    if doc.shape != (lay["num_videos"],) or doc.data_type != "int32":
        raise _Bad(f"array videos/num_clips has shape {list(doc.shape)} of {doc.data_type}, the layout says "
                   f"({lay['num_videos']},) int32")
    try:
        counts = root["videos/num_clips"][:]
    except UnsafeStore:
        raise
    except Exception as e:
        raise CacheDamaged(f"{root.store.root}: videos/num_clips cannot be read ({type(e).__name__}); restore it "
                           f"from a copy, or delete it and run the same `cachefeat extract` again") from None
    if len(counts) and (counts.min() < 1 or counts.max() > MAX_WINDOWS):
        raise _Bad(f"videos/num_clips holds {int(counts.min())}..{int(counts.max())} windows per video")
    if int(counts.sum(dtype="int64")) > MAX_ROWS:
        raise _Bad(f"more than {MAX_ROWS} clips")
    return counts


# ------------------------------------------------------------------------------------------- 5. arrays vs layout
def _check_arrays(meta: dict, layout: Layout, arrays: dict[str, ArrayDoc]) -> None:
    """Every array the layout describes that is present has its shape, dtype and chunks; the names the
    metadata gives arrays are the format's."""
    C, V, S, rows = layout.num_clips, layout.num_videos, layout.num_shards, layout.shard_rows
    expect: dict[str, tuple] = {}          # name -> (shape, dtype or kind, chunks, inner)
    per_clip = per_clip_chunks(layout)
    for name, (shape, dtype) in layout.row_arrays().items():
        dt = "string" if dtype == "str" else dtype
        if name in per_clip:
            expect[name] = ((C, *shape), dt, (rows, *shape), (1, *shape))
        else:
            expect[name] = ((C,), dt, None, None)
    for name in layout.video_tables():
        expect[name] = ((V,), _TABLE_KINDS[name], None, None)
    for name in CLIP_TABLES:
        expect[name] = ((C,), _TABLE_KINDS[name], None, None)
    expect["progress"] = ((S,), "uint8", (1,), None)
    k = max(w.stop for w in record_slots(layout).values())
    expect[RECORD] = ((S, k), "int64", (1, k), None)
    extras = _extras(meta, layout)
    expect.update(extras)
    sums = meta.get("table_checksums") or {}
    unknown = set(sums) - set(layout.creation_tables()) - set(extras)
    if unknown:
        raise _Bad(f"table_checksums names {_show(sorted(unknown)[0])}, not a table of the cache")
    for name, (shape, dtype, chunks, inner) in expect.items():
        doc = arrays.get(name)
        if doc is None:
            continue
        kind_ok = doc.data_type == dtype if len(dtype) > 1 else doc.kind == dtype
        if doc.shape != shape or not kind_ok:
            raise _Bad(f"array {name} is {list(doc.shape)} {doc.data_type}, the metadata says {list(shape)} {dtype}")
        if (chunks is not None and doc.chunks != chunks) or (doc.inner or None) != inner:
            raise _Bad(f"array {name} is chunked {list(doc.chunks)}"
                       + (f" in {list(doc.inner)}" if doc.inner else "") + ", not as cachefeat writes it")
        if name in layout.video_tables() + CLIP_TABLES and doc.chunks[0] > MAX_SHARD_ROWS:
            raise _Bad(f"array {name} has chunks of {doc.chunks[0]} rows")


def _extras(meta: dict, layout: Layout) -> dict[str, tuple]:
    """The arrays `extras` names, each one of the format's: text/embed and quant/<feature array>."""
    classes = len(meta.get("classes") or [])
    allowed = {"text/embed": ((classes, layout.embed_dim), "float32", None, None)}
    for name in layout.feature_arrays():
        shape = (len(layout.layers), layout.width) if name == "cls" else \
            (layout.embed_dim,) if name == "embed" else (layout.width,)
        allowed[f"quant/{name}"] = (shape, "float32", None, None)
    out = {}
    for name in meta.get("extras", []):
        if not isinstance(name, str) or name not in allowed:
            raise _Bad(f"extras names {_show(name)}, not an array of the format")
        out[name] = allowed[name]
    if bool(meta.get("text")) != ("text/embed" in out):
        raise _Bad("text and extras disagree about text/embed")
    return out


# ------------------------------------------------------------------------------------------- checks
def _show(v) -> str:
    import json
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _req(d: dict, key: str, where: str):
    if key not in d:
        raise _Bad(f"{where}{key} is missing")
    return d[key]


def _dict(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise _Bad(f"{where} is {_show(v)}, not an object")
    return v


def _keys(doc: dict, allowed: set, where: str) -> None:
    extra = set(doc) - allowed
    if extra:
        raise _Bad(f"{where} has the key {_show(sorted(extra)[0])}, which Zarr v3 does not define")


def _int(v, where: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(f"{where} is {_show(v)}, not an integer in {lo}..{hi}")
    return v


def _ints(v, where: str, lo: int, hi: int, min_len: int, max_len: int) -> tuple[int, ...]:
    if not isinstance(v, list) or not min_len <= len(v) <= max_len:
        raise _Bad(f"{where} is {_show(v)}, not a list of {min_len}..{max_len} integers")
    return tuple(_int(x, where, lo, hi) for x in v)


def _num(v, where: str, lo: float, hi: float) -> float:
    if type(v) not in (int, float) or not lo <= v <= hi:
        raise _Bad(f"{where} is {_show(v)}, not a number in {lo:g}..{hi:g}")
    return float(v)


def _str(v, where: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_NAME:
        raise _Bad(f"{where} is {_show(v)}, not a string of at most {MAX_NAME} characters")
    return v
