"""`cachefeat verify`: read every chunk of a cache, check its checksums and metadata, and say which
clips must be re-extracted. `extract --repair` (store.writer) uses the report to re-extract only the damaged shards.

Shards are the unit of writing, so they are the unit of repair: a damaged chunk anywhere in a shard's
rows (features, pixels, per-clip or per-video tables written with the shard) sends the whole shard back
to be extracted. Checksums prove bytes intact; each shard's checksum record (layout.RECORD) proves every
chunk is the one written at its place, so a chunk copied or moved over another, a deleted chunk (which
reads as the fill value) and a progress flag that does not match its shard are found too. The tables
written once at creation (video list, labels, text embeddings, int8 steps) are checked against the
checksums in the metadata, and --repair writes them again from the manifest. Damaged metadata cannot be
repaired by re-extraction: the cache must be made again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..fmt import ranges
from .layout import CLIP_TABLES, SHARD_VIDEO_TABLES, Layout, per_clip_chunks, record_slots
from .reader import NOT_DAMAGE, Cache


@dataclass
class VerifyReport:
    damaged: dict[str, list[int]] = field(default_factory=dict)   # array -> damaged rows (clips or videos)
    shards: set[int] = field(default_factory=set)                 # shards to extract again
    fatal: list[str] = field(default_factory=list)                 # damage re-extraction cannot mend
    suspicious: list[str] = field(default_factory=list)            # readable but wrong-looking
    tables: list[str] = field(default_factory=list)                # creation tables --repair writes again
    chunks_checked: int = 0
    zero_rows: dict[str, set[int]] = field(default_factory=dict, repr=False)   # feature rows of only zeros

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.fatal or self.suspicious or self.tables)

    def clips(self, layout: Layout) -> list[int]:
        return sorted(r for s in self.shards for r in layout.shard_rows_range(s))

    def to_dict(self, cache: Cache) -> dict:
        clips = self.clips(cache.layout)
        video = cache.layout.clip_video()
        vids = sorted({int(video[c]) for c in clips})
        ids = cache.read("videos/id") if vids and "videos/id" not in self.damaged else None
        return {"ok": self.ok, "chunks_checked": self.chunks_checked, "damaged": self.damaged,
                "shards_to_reextract": sorted(self.shards), "clips_to_reextract": clips,
                "tables_to_rewrite": self.tables,
                "videos_to_reextract": [str(ids[v]) if ids is not None else int(v) for v in vids],
                "fatal": self.fatal, "suspicious": self.suspicious}


def verify(cache: Cache, progress=None) -> VerifyReport:
    rep = VerifyReport()
    lay = cache.layout
    _check_metadata(cache, rep)
    if rep.fatal:
        return rep
    for name in [*lay.creation_tables(), *cache.meta.get("extras", [])]:     # written once, at creation
        rep.chunks_checked += _nchunks(cache.root[name])
        try:
            cache.table(name)
        except NOT_DAMAGE:
            raise
        except Exception:
            rep.tables.append(name)
    done = cache.shard_done()
    row_arrays = list(lay.row_arrays())
    for s in range(lay.num_shards):
        rows, vids = lay.shard_rows_range(s), lay.shard_videos_range(s)
        if not done[s]:
            if cache.record(s) is not None:
                rep.suspicious.append(f"shard {s}: recorded as written, but its progress flag is off (lost, or "
                                      f"reset by hand)")
                rep.shards.add(s)
            continue  # not data yet: the next extract writes it
        moved = _check_record(cache, s, rep)
        for name in row_arrays:
            if name not in moved:
                _check_block(cache, name, slice(rows.start, rows.stop), rep, s)
        for name in SHARD_VIDEO_TABLES:
            if name not in moved:
                _check_block(cache, name, slice(vids.start, vids.stop), rep, s)
        if progress:
            progress(1)
    if not rep.fatal:
        _check_values(cache, rep, done)
    return rep


def _check_record(cache: Cache, shard: int, rep: VerifyReport) -> set[str]:
    """Compare what a finished shard holds with its checksum record; returns the arrays found wrong (their
    rows are reported here)."""
    if not cache.has_records:
        return set()                 # made before records: chunk places cannot be checked
    lay = cache.layout
    rec = cache.record(shard)
    if rec is None:
        rep.suspicious.append(f"shard {shard}: flagged done but it has no checksum record (the flag was set by "
                              f"hand, or the record deleted)")
        rep.shards.add(shard)
        return set()
    held = cache.stored_checksums(shard)
    wrong = set()
    for name, where in record_slots(lay).items():
        bad = np.flatnonzero(held[where] != rec[where])
        if not len(bad):
            continue
        wrong.add(name)
        if name in SHARD_VIDEO_TABLES and lay.windowed:     # one chunk per video
            rows = [lay.shard_videos_range(shard).start + int(i) for i in bad]
        elif name in per_clip_chunks(lay):              # one chunk per clip
            rows = [lay.shard_rows_range(shard).start + int(i) for i in bad]
        else:
            span = lay.shard_videos_range(shard) if name.startswith("videos/") else lay.shard_rows_range(shard)
            rows = list(span)
        rep.damaged.setdefault(name, []).extend(rows)
        rep.shards.add(shard)
    return wrong


def _nchunks(arr) -> int:
    return int(np.prod([-(-n // c) for n, c in zip(arr.shape, arr.chunks)])) if arr.shape else 1


def _check_block(cache: Cache, name: str, sel: slice, rep: VerifyReport, shard: int) -> None:
    arr = cache.root[name]
    rep.chunks_checked += -(-(sel.stop - sel.start) // arr.chunks[0])
    try:
        data = cache.read_stored(name, sel)     # the shard files, checksums included; else zarr
    except NOT_DAMAGE:
        raise
    except Exception:
        bad = cache.unreadable_rows(name, sel) or list(range(sel.start, sel.stop))
        rep.damaged.setdefault(name, []).extend(bad)
        rep.shards.add(shard)
        return
    if name not in cache.layout.feature_arrays():
        return
    bad, zero = [], rep.zero_rows.setdefault(name, set())
    for i, row in enumerate(data):            # row by row: no copy of a whole shard of a big array
        if data.dtype.kind == "f" and not np.isfinite(row).all():   # intact bytes can still be NaN or Inf
            bad.append(sel.start + i)
        elif not row.any():                    # a chunk deleted from its shard reads as zeros
            zero.add(sel.start + i)
    if bad:
        rep.suspicious.append(f"{name}: clips {ranges(bad)} hold NaN or Inf values")
        rep.shards.add(shard)


def _check_metadata(cache: Cache, rep: VerifyReport) -> None:
    """The arrays missing from a copy (opening the cache checked the shapes, dtypes and chunks of those
    present: store.validate) and labels beyond the class list."""
    lay = cache.layout
    for name in [*lay.row_arrays(), *lay.video_tables(), *CLIP_TABLES, "progress"]:
        if not cache.has_array(name):
            rep.fatal.append(f"array {name} is missing")
    classes = cache.classes
    try:
        labels = cache.root["videos/label"][:]
        if classes and labels.size and labels.max() >= len(classes):
            rep.fatal.append(f"labels go up to {labels.max()} but there are {len(classes)} classes")
    except NOT_DAMAGE:
        raise
    except Exception:  # nosec B110
        pass  # an unreadable label table is reported with the tables


def _check_values(cache: Cache, rep: VerifyReport, done: np.ndarray) -> None:
    """Valid clips of finished shards must hold features in every feature array: a row of only zeros means
    nothing was written there (or its chunk was deleted from the shard file, which then reads as zeros)."""
    try:
        valid = cache.root["clips/valid"][:] & cache.done_rows()
    except NOT_DAMAGE:
        raise
    except Exception:
        return
    lay = cache.layout
    for name, zero in rep.zero_rows.items():
        empty = sorted(r for r in zero if valid[r])
        shards = {r // lay.shard_rows for r in empty} - rep.shards
        for s in sorted(shards):
            n = sum(1 for r in empty if r // lay.shard_rows == s)
            rep.suspicious.append(f"shard {s}: {n} valid clips hold no features in {name}")
        rep.shards |= shards
