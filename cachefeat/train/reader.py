"""Reading a cache for stage two: only the arrays an adapter asks for, in RAM when they fit, else streamed
a buffer of shards at a time by reader processes that read on across epochs.

- `Needs` (cachefeat.adapters): which arrays an adapter reads, and so which this reader reads (final
  embedding, CLS of some layers, patch tokens of some layers, pixels).
- `CacheDataset`: a torch Dataset of the valid clips of a cache, returning per-clip tensors with label,
  video and view; `load()`s the selection into RAM (a shard at a time) or reads on demand. Feature rows
  come straight from the shard files (shard_file.py): ~0.05 ms per clip and array instead of zarr's ~0.5 ms
  (the reading benchmark's single-process rates).
- `plan_epoch`: the order of an epoch as batches of rows, a function of (seed, epoch) only. Training takes
  one view per video per epoch (one of the cache's augmented views, or one of its test views), shuffled:
  fully in RAM, or shard-buffered when streaming (shuffle the shards, then the clips inside a buffer of a
  few shards), so a streaming worker reads a shard file once per epoch.
- `FeatureSource`: where training batches come from. `CachedSource` reads the cache; `online.OnlineSource`
  decodes the videos and runs the frozen backbone on the fly, producing the same batches for the same plan
  (the equivalence that justifies the cache).

Batches are dicts of numpy arrays, clip axis first and time second: embed (B, T, E), cls (B, T, L, D),
tokens (B, T, L', N, D), pixels (B, T*K, S, S, 3) uint8, and label, video, view, row (B,).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..adapters.base import CacheMismatch, Needs
from ..store import Cache, CacheError, open_cache

IN_MEMORY_CHOICES = ("auto", "yes", "no")
TRAIN_VIEWS_CHOICES = ("one", "all", "cycle", "first:K")


def check_train_views(value: str) -> str:
    """one, all, cycle or first:K (K >= 1); ValueError otherwise."""
    v = str(value).strip().lower()
    if v in ("one", "all", "cycle"):
        return v
    if v.startswith("first:") and v[6:].isdigit() and int(v[6:]) >= 1:
        return f"first:{int(v[6:])}"
    raise ValueError(f"train views {value!r}: expected one, all, cycle or first:K")


@dataclass(frozen=True)
class ClipTables:
    """Every clip's label, video and view, read from a cache once; `tables(rows)` is a batch's share."""
    label: np.ndarray
    video: np.ndarray
    view: np.ndarray

    @classmethod
    def of(cls, cache: Cache) -> ClipTables:
        return cls(clip_labels(cache), cache.clip_video().astype(np.int64), cache.clip_view().astype(np.int64))

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"label": self.label[rows], "video": self.video[rows], "view": self.view[rows], "row": rows}


def clip_labels(cache: Cache) -> np.ndarray:
    """The class each clip trains as: its video's label, except that a horizontally flipped view of a class
    with a flip partner (extract --flip-pairs; `clips/aug` records each view's flip) is labelled as the
    partner, as DiST's SSv2 loader swaps 86<->87, 93<->94, 166<->167 when it flips."""
    labels = cache.labels().astype(np.int64)
    pairs = (cache.augment or {}).get("flip_pairs")
    if not pairs:
        return labels
    import json
    partner = np.arange(max(len(cache.classes), int(labels.max(initial=0)) + 1))
    for a, b in pairs:
        partner[a], partner[b] = b, a
    aug = cache.root["clips/aug"][:]
    flipped = np.array([bool(s) and json.loads(s)["flip"] for s in aug.tolist()], dtype=bool)
    swap = flipped & (labels >= 0)
    labels[swap] = partner[labels[swap]]
    return labels


def read_rows(cache: Cache, sel: Needs, rows) -> dict[str, np.ndarray]:
    """The selected arrays for `rows` (a slice, or an int array in any order, repeats allowed), through the
    cache API."""
    try:
        return _read_rows(cache, sel, rows)
    except KeyError as e:
        raise CacheError(f"{cache.path}: array {e.args[0]} is missing from the store (damaged or partly "
                         f"copied? `cachefeat verify` checks a cache)") from None


def _read_rows(cache: Cache, sel: Needs, rows) -> dict[str, np.ndarray]:
    reads = {}
    if sel.embed:
        reads["embed"] = lambda: cache.read("embed", rows)
    if sel.cls_layers:
        reads["cls"] = lambda: cache.read_cls(rows, layers=list(sel.cls_layers))
    tokens = None
    if sel.token_layers:
        # the layers' rows decoded straight into their places in one (clips, T, layers, N, D) block: no stack copy
        first = f"tokens/{sel.token_layers[0]}"
        shape = cache.root[first].shape
        count = len(range(*rows.indices(shape[0]))) if isinstance(rows, slice) else len(rows)
        per_clip = shape[1:]
        tokens = np.empty((count, per_clip[0], len(sel.token_layers), *per_clip[1:]), cache.read_dtype(first))
    for i, layer in enumerate(sel.token_layers):
        reads[f"tokens/{layer}"] = lambda i=i, layer=layer: cache.read(f"tokens/{layer}", rows, out=tokens[:, :, i])
    if sel.pixels:
        reads["pixels"] = lambda: cache.read("pixels", rows)
    if getattr(cache, "location", None) is not None and len(reads) > 1:
        # a cache in a bucket: every array's requests in flight together, not one array's after another's
        # (each read waits on the network, not on this process), the shards' checksum records fetched first in
        # one round rather than by every array's thread
        from concurrent.futures import ThreadPoolExecutor
        idx = np.arange(*rows.indices(cache.num_clips)) if isinstance(rows, slice) else np.asarray(rows)
        cache.load_records(np.unique(idx // cache.layout.shard_rows))
        with ThreadPoolExecutor(len(reads)) as pool:
            got = dict(zip(reads, pool.map(lambda read: read(), reads.values())))
    else:
        got = {k: read() for k, read in reads.items()}
    out = {k: got[k] for k in ("embed", "cls") if k in got}
    if sel.token_layers:
        out["tokens"] = tokens
    if sel.pixels:
        out["pixels"] = got["pixels"]
    return out


class CacheDataset:
    """The valid clips of a cache (or the given rows) as a torch-style Dataset: `ds[i]` is a dict of
    per-clip arrays plus label, video, view and row. `in_memory`: yes = load the selection into RAM now,
    no = read on demand, auto = load when it takes under half the available memory."""

    def __init__(self, cache: Cache | str, selection: Needs, rows=None, in_memory: str = "auto",
                 memory_fraction: float = 0.5, tables: ClipTables | None = None):
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        problems = selection.problems("the reader", self.cache.meta)
        if problems:
            raise CacheMismatch(f"{self.cache.path}: {'; '.join(problems)}")
        self.selection = selection
        valid = self.cache.valid()
        self.rows = np.flatnonzero(valid) if rows is None else np.asarray(rows, dtype=np.int64)
        self.tables = tables or ClipTables.of(self.cache)
        if in_memory not in IN_MEMORY_CHOICES:
            raise ValueError(f"in_memory must be one of {IN_MEMORY_CHOICES}")
        self.data: dict[str, np.ndarray] | None = None
        self._pos = None
        if in_memory == "yes" or (in_memory == "auto" and self.fits_in_memory(memory_fraction)):
            self.load()

    @property
    def in_memory(self) -> bool:
        return self.data is not None

    def nbytes(self) -> int:
        return len(self.rows) * self.selection.bytes_per_clip(self.cache.meta)

    def fits_in_memory(self, fraction: float = 0.5) -> bool:
        import psutil
        return self.nbytes() <= fraction * psutil.virtual_memory().available

    def load(self) -> None:
        """Read the selection of every row into RAM, a shard at a time."""
        rows = np.sort(self.rows)
        shard_of = rows // self.cache.layout.shard_rows
        data: dict[str, np.ndarray] = {}
        for shard in np.unique(shard_of):
            part = rows[shard_of == shard]
            block = read_rows(self.cache, self.selection, part)
            for k, v in block.items():
                if k not in data:
                    data[k] = np.empty((len(rows), *v.shape[1:]), v.dtype)
                data[k][np.searchsorted(rows, part)] = v
        self._pos = np.full(self.cache.num_clips, -1, np.int64)
        self._pos[rows] = np.arange(len(rows))
        self.data = data

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        import torch
        batch = self.gather(self.rows[[i]])
        return {k: torch.from_numpy(np.ascontiguousarray(v[0])) if isinstance(v[0], np.ndarray) else int(v[0])
                for k, v in batch.items()}

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """A batch for these rows, in this order."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.data is not None:
            pos = self._pos[rows]
            if (pos < 0).any():
                raise IndexError("rows outside this dataset")
            out = {k: v[pos] for k, v in self.data.items()}
        else:
            order = np.argsort(rows, kind="stable")
            got = read_rows(self.cache, self.selection, rows[order])
            inv = np.empty_like(order)
            inv[order] = np.arange(len(order))
            out = {k: v[inv] for k, v in got.items()}
        return {**out, **self.tables(rows)}


def open_dataset(cache: Cache | str, embed: bool = False, cls_layers=(), token_layers=(), pixels: bool = False,
                 rows=None, in_memory: str = "auto") -> CacheDataset:
    """A torch-style Dataset of the valid clips of a cache (a path or an open Cache) with only these arrays:
    `ds[i]` -> {embed (T,E), cls (T,L,D), tokens (T,L',N,D), pixels, label, video, view, row}."""
    needs = Needs(embed=embed, cls_layers=tuple(cls_layers), token_layers=tuple(token_layers), pixels=pixels)
    return CacheDataset(cache, needs, rows=rows, in_memory=in_memory)


# ------------------------------------------------------------------------------------------- epoch plans
@dataclass
class Buffer:
    """Batches that a reader serves from one read of `shards`."""
    shards: list[int]
    batches: list[np.ndarray] = field(default_factory=list)


def select_rows(valid: np.ndarray, videos: np.ndarray, labels: np.ndarray, seed: int, epoch: int,
                views: str = "one", train: bool = True) -> np.ndarray:
    """Rows an epoch uses. Evaluation: every valid row. Training: labelled rows; with views=one, one valid
    view per video, drawn anew every epoch (the cache's augmented views, or its test views as jitter);
    first:K, the same from the video's first K views only (what a cache of K views would give: views are
    drawn independently, so the first K of a larger cache are a K-view cache); cycle, view `epoch mod V` of
    each video, so that every view is used once before any repeats (with as many views as epochs, what
    online augmentation gives: a fresh view every epoch)."""
    rows = np.flatnonzero(valid if not train else valid & (labels >= 0))
    if not train or views == "all" or len(rows) == 0:
        return rows
    vids = videos[rows]
    starts = np.flatnonzero(np.r_[True, vids[1:] != vids[:-1]])      # rows are grouped by video, views in order
    counts = np.diff(np.r_[starts, len(rows)])
    if views == "cycle":
        return rows[starts + epoch % counts]
    if views.startswith("first:"):
        counts = np.minimum(counts, int(views[6:]))
    rng = np.random.default_rng([seed, epoch, 101])
    return rows[starts + rng.integers(0, counts)]


def plan_epoch(rows: np.ndarray, shard_rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool,
               buffer_shards: int | None = None) -> list[Buffer]:
    """Cut `rows` into batches. buffer_shards=None: one buffer, fully shuffled (RAM). Otherwise groups of
    `buffer_shards` shards (in shuffled order when shuffling), shuffled inside each group; a batch never
    spans two groups."""
    rng = np.random.default_rng([seed, epoch, 202])
    shard_of = rows // shard_rows
    if buffer_shards is None:
        groups = [np.unique(shard_of)]
    else:
        shards = np.unique(shard_of)
        if shuffle:
            shards = rng.permutation(shards)
        groups = [shards[i:i + buffer_shards] for i in range(0, len(shards), buffer_shards)]
    plan = []
    for g in groups:
        part = rows[np.isin(shard_of, g)] if buffer_shards is not None else rows
        if shuffle:
            part = rng.permutation(part)
        plan.append(Buffer([int(s) for s in g], [part[i:i + batch_size] for i in range(0, len(part), batch_size)]))
    return plan


def part_of_batch(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Worker `rank`'s share of a global batch in data-parallel training: every world-th row from its rank
    (DistributedSampler's split), so the workers' shares differ by at most one row and together make the
    batch. A batch smaller than the world is repeated to one row per worker (every worker must step)."""
    if len(rows) < world:
        rows = np.resize(rows, world)
    return rows[rank::world]


@dataclass
class EpochPlanner:
    """The clips, order and batching of every epoch of a source: a function of (seed, epoch) only, and
    small enough to hand to reader processes, which compute the plans of the epochs they read ahead."""
    valid: np.ndarray
    videos: np.ndarray
    labels: np.ndarray
    seed: int
    train_views: str
    shard_rows: int
    batch_size: int
    buffer_shards: int | None
    part: tuple[int, int]

    def rows(self, epoch: int, train: bool) -> np.ndarray:
        return select_rows(self.valid, self.videos, self.labels, self.seed, epoch, self.train_views, train)

    def plan(self, epoch: int, train: bool) -> list[Buffer]:
        plan = plan_epoch(self.rows(epoch, train), self.shard_rows, self.batch_size, self.seed, epoch,
                          shuffle=train, buffer_shards=self.buffer_shards)
        rank, world = self.part
        if train and world > 1:
            for buf in plan:
                buf.batches = [part_of_batch(b, rank, world) for b in buf.batches]
        return plan


# ------------------------------------------------------------------------------------------- sources
class FeatureSource:
    """Batches of adapter inputs for training and evaluation over the clips of a cache. The clips, their
    order and the batching are decided here (`plan`); subclasses only say how a buffer's batches are made."""

    def __init__(self, cache: Cache, selection: Needs, batch_size: int, seed: int = 0, train_views: str = "one"):
        train_views = check_train_views(train_views)
        self.cache, self.selection = cache, selection
        self.batch_size, self.seed, self.train_views = batch_size, seed, train_views
        self.valid = cache.valid()
        self.tables = ClipTables.of(cache)
        self.buffer_shards: int | None = None
        self.part = (0, 1)   # (rank, world): in data-parallel training, this worker's slice of every batch

    @property
    def meta(self) -> dict:
        return self.cache.meta

    def planner(self) -> EpochPlanner:
        return EpochPlanner(self.valid, self.tables.video, self.tables.label, self.seed, self.train_views,
                            self.cache.layout.shard_rows, self.batch_size, self.buffer_shards, self.part)

    def rows(self, epoch: int, train: bool) -> np.ndarray:
        return self.planner().rows(epoch, train)

    def plan(self, epoch: int, train: bool) -> list[Buffer]:
        return self.planner().plan(epoch, train)

    def steps(self, epoch: int = 0, train: bool = True) -> int:
        return sum(len(b.batches) for b in self.plan(epoch, train))

    def batches(self, epoch: int, train: bool) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CachedSource(FeatureSource):
    """Batches read from the cache: from RAM when the selection fits (or in_memory=yes), else streamed by
    `workers` processes that each read whole buffers of shards, with prefetch; batches come out in plan order
    whatever the number of workers."""

    def __init__(self, cache: Cache, selection: Needs, batch_size: int, seed: int = 0, in_memory: str = "auto",
                 workers: int = 2, buffer_shards: int = 4, prefetch: int = 2, train_views: str = "one"):
        super().__init__(cache, selection, batch_size, seed, train_views)
        self.dataset = CacheDataset(cache, selection, in_memory=in_memory, tables=self.tables)
        self.workers, self.prefetch = max(0, workers), max(1, prefetch)
        if getattr(cache, "location", None) is not None:
            # a cache in a bucket (store.RemoteCache) is read in this process, many requests in flight: its
            # client (obstore's tokio runtime) does not survive the fork that starts reader processes
            self.workers = 0
        self.buffer_shards = None if self.dataset.in_memory else max(1, buffer_shards)
        self._stream: _Stream | None = None

    def batches(self, epoch: int, train: bool) -> Iterator[dict[str, np.ndarray]]:
        if self.dataset.in_memory:
            for buf in self.plan(epoch, train):
                for rows in buf.batches:
                    yield self.dataset.gather(rows)
            return
        if self.workers == 0 and getattr(self.cache, "location", None) is not None:
            # a bucket: the next `prefetch` buffers are fetched by a thread while this one's batches train
            # (its requests wait on the network, and obstore's threads hold no GIL)
            for buf, block in _read_ahead(self.cache, self.selection, self.plan(epoch, train), self.prefetch):
                yield from _serve(buf, *block, self.tables)
            return
        if self.workers == 0:
            for buf in self.plan(epoch, train):
                yield from _buffer_batches(self.cache, self.selection, buf, self.tables)
            return
        if self._stream is None or not self._stream.serves(epoch, train):
            self.close()
            self._stream = _Stream(self, epoch, train)
        stream = self._stream
        try:
            yield from stream.epoch(epoch)
        finally:
            if not train:                    # evaluation streams read no further: free their processes
                self.close()

    def close(self) -> None:
        """Stop the reader processes (a later `batches` starts new ones)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _buffer_batches(cache: Cache, sel: Needs, buf: Buffer, tables) -> Iterator[dict[str, np.ndarray]]:
    """Read a buffer's rows once (each shard file opened once), then serve its batches from that block."""
    if buf.batches:
        yield from _serve(buf, *_read_buffer(cache, sel, buf), tables)


def _read_buffer(cache: Cache, sel: Needs, buf: Buffer) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the buffer's rows in batch order; the selected arrays of those rows). Read in that order, the chunks are
    decoded straight into their batches' places, so each batch is a run of the block (_serve): no gather copy
    of every batch."""
    order = np.concatenate(buf.batches) if buf.batches else np.zeros(0, np.int64)
    return order, (read_rows(cache, sel, order) if len(order) else {})


def _serve(buf: Buffer, order: np.ndarray, block: dict[str, np.ndarray], tables) -> Iterator[dict[str, np.ndarray]]:
    """The buffer's batches as views of the block `_read_buffer` read in batch order."""
    start = 0
    for rows in buf.batches:
        end = start + len(rows)
        yield {**{k: v[start:end] for k, v in block.items()}, **tables(rows)}
        start = end


def _read_ahead(cache: Cache, sel: Needs, plan: list[Buffer], depth: int):
    """(buffer, _read_buffer of it) in plan order, read by one thread up to `depth` buffers ahead of the one
    being served (so at most depth + 1 buffers are held); reads not yet started are cancelled when the
    consumer stops early."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1, thread_name_prefix="cachefeat-read-ahead") as pool:
        pending: deque = deque()
        try:
            for buf in plan:
                pending.append((buf, pool.submit(_read_buffer, cache, sel, buf)))
                if len(pending) > depth:
                    first, got = pending.popleft()
                    yield first, got.result()
            while pending:
                first, got = pending.popleft()
                yield first, got.result()
        finally:
            for _, got in pending:
                got.cancel()


class _BufferReader:
    """What each torch DataLoader worker runs: the buffers of epoch `first`'s plan, then (when training,
    `epochs` None) of every following epoch's, numbered on across epochs; worker w of n serves buffers w,
    w+n, w+2n, ... and tags every batch with (epoch, buffer, batch) so the consumer can restore plan order.
    A batch goes back packed in one torch tensor, which the DataLoader passes through shared memory."""

    def __init__(self, path: str, sel: Needs, planner: EpochPlanner, first: int, train: bool,
                 epochs: int | None, tables: ClipTables):
        self.path, self.sel, self.planner = path, sel, planner
        self.first, self.train, self.epochs = first, train, epochs
        self.tables = tables

    def __iter__(self):
        import itertools

        import torch.utils.data as tud
        info = tud.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        cache = open_cache(self.path)
        epochs = itertools.count(self.first) if self.epochs is None else range(self.first, self.first + self.epochs)
        g = 0                                            # buffers numbered on across epochs
        for epoch in epochs:
            for b, buf in enumerate(self.planner.plan(epoch, self.train)):
                if g % n == wid:
                    for j, batch in enumerate(_buffer_batches(cache, self.sel, buf, self.tables)):
                        yield epoch, b, j, *_pack(batch)
                g += 1


def _pack(batch: dict[str, np.ndarray]) -> tuple:
    """A batch as one uint8 tensor and its layout [(name, dtype, shape, offset)]. The DataLoader hands each
    tensor over through shared memory with its own file-descriptor handshake, which costs the training
    process far more than the copy into one block costs the reader: one tensor per batch."""
    import torch
    layout, end = [], 0
    for k, v in batch.items():
        start = -(-end // 64) * 64
        layout.append((k, v.dtype.str, v.shape, start))
        end = start + v.nbytes
    buf = torch.empty(end, dtype=torch.uint8)
    flat = buf.numpy()
    for (_, dtype, shape, start), v in zip(layout, batch.values()):
        flat[start:start + v.nbytes].view(dtype).reshape(shape)[...] = v
    return buf, layout


def _unpack(buf, layout) -> dict[str, np.ndarray]:
    flat = buf.numpy()
    return {k: flat[start:start + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
            for k, dtype, shape, start in layout}


class _Stream:
    """Reader processes serving a source's epochs in order. A training stream reads on into the next
    epoch's plan as soon as this one's is read (as far as the prefetch allows), so the next epoch starts
    on batches already read, with no reader start-up; an evaluation stream serves one pass."""

    def __init__(self, src: CachedSource, epoch: int, train: bool):
        import torch
        import torch.utils.data as tud

        class _Iterable(tud.IterableDataset):
            def __init__(self, reader):
                self.reader = reader

            def __iter__(self):
                return iter(self.reader)

        self.planner, self.train, self.next_epoch, self.path = src.planner(), train, epoch, src.cache.path
        reader = _BufferReader(str(src.cache.path), src.selection, self.planner, epoch, train,
                               None if train else 1, src.tables)
        plan = self.planner.plan(epoch, train)
        workers = min(src.workers, max(1, len(plan))) if not train else src.workers
        # its own generator: starting workers draws a seed, which must not move the training's torch RNG
        # (dropout draws would then depend on whether a stream was started or went on)
        loader = tud.DataLoader(_Iterable(reader), batch_size=None, num_workers=workers,
                                prefetch_factor=src.prefetch, collate_fn=_passthrough, persistent_workers=False,
                                generator=torch.Generator().manual_seed(0))
        self.it = iter(loader)
        self.pending: dict[tuple[int, int, int], dict] = {}
        self.broken = False

    def serves(self, epoch: int, train: bool) -> bool:
        return not self.broken and self.train and train and epoch == self.next_epoch

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        expected = [(epoch, b, j) for b, buf in enumerate(self.planner.plan(epoch, self.train))
                    for j in range(len(buf.batches))]
        self.broken = True                   # until every batch of this epoch has been handed out
        for key in expected:
            while key not in self.pending:
                try:
                    e, b, j, buf, layout = next(self.it)
                except StopIteration:
                    raise CacheError(f"streaming {self.path} lost batches of epoch {epoch}") from None
                except Exception as e:
                    raise _from_worker(e) from None
                self.pending[(int(e), int(b), int(j))] = _unpack(buf, layout)
            yield self.pending.pop(key)
        self.broken, self.next_epoch = False, epoch + 1

    def close(self) -> None:
        it, self.it = self.it, None
        shutdown = getattr(it, "_shutdown_workers", None)   # what the iterator's __del__ does, without waiting for GC
        if shutdown is not None:
            shutdown()


def _from_worker(e: Exception) -> Exception:
    """A reader process's error as if raised here: the DataLoader re-raises it with the worker's traceback in
    its message ("Caught CacheDamaged in DataLoader worker process 0. Original Traceback ..."); the error
    the user sees is its last line, the original message, with its type."""
    text = str(e)
    if "in DataLoader worker process" not in text:
        return e
    last = text.rstrip().splitlines()[-1]
    try:
        return type(e)(last.split(": ", 1)[1] if ": " in last else last)
    except Exception:
        return e


def _passthrough(item):
    return item
