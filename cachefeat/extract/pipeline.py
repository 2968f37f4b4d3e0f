"""Stage one: videos -> frozen backbone -> cache, pipelined, resumable, failures recorded.

    decode workers (processes)  ->  forward (this thread, GPU/CPU)  ->  writer (thread)  ->  store
          bounded in-flight            batches within one shard          one shard at a time

Decode, forward and write overlap, so the backbone waits neither on decoding nor on the disk. Each video is
decoded once for all its views. Batches never straddle shards, so a shard's features do not depend on
which shards ran before it: a resumed or multi-worker run writes exactly what a single run writes.

`store.open_for_writing()` creates or re-opens the store (refusing one made with other settings),
`ShardExtractor.run()` fills any given shards (distributed.py runs the same class in Ray actors, each over
the shards it takes from a queue), and `extract()` ties them together for the single-process path.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Full, Queue

import numpy as np
import torch

from ..devices import cpu_threads
from ..specs import AugmentSpec, SamplingSpec
from ..store import FAILED, OK, Cache, CacheError, Layout, ShardData, open_for_writing, write_shard
from . import resample
from .backbone import Backbone, load_backbone
from .decode_pool import DecodePool
from .manifest import Manifest, VideoEntry
from .plan import INT8_HEADROOM, ExtractSettings, Plan, plan
from .sampling import sample_count
from .video import DecodeRequest, DecodeResult


def creation_extras(p: Plan, backbone: Backbone, pool: DecodePool, batch_size: int, reader: str = "auto",
                    log=print) -> dict[str, np.ndarray]:
    """Arrays computed once when a store is created: class-name text embeddings, and for int8 caches the
    per-channel quantization steps, calibrated on videos spread over the manifest."""
    out = {}
    if p.meta.get("text"):
        out["text/embed"] = backbone.text_embeddings(p.meta["text"]["prompts"])
    if p.layout.dtype == "int8":
        out.update(calibrate_int8(p, backbone, pool, batch_size, reader, log))
    return out


def calibrate_int8(p: Plan, backbone: Backbone, pool: DecodePool, batch_size: int, reader: str = "auto",
                   log=print) -> dict[str, np.ndarray]:
    videos = p.manifest.videos
    usable = [i for i, v in enumerate(videos) if not v.problem]
    n = min(p.meta["quantization"]["calibration_videos"], len(usable))
    picks = [usable[int(round(k))] for k in np.linspace(0, len(usable) - 1, n)] if n else []
    layers, tokens, sampling = list(p.layout.layers), p.layout.tokens, SamplingSpec(**p.meta["sampling"])
    absmax: dict[str, torch.Tensor] = {}
    for v in picks:
        if p.layout.windowed:   # the first windows of the video
            tl = p.timeline
            n = min(int(tl.windows[v]), max(1, REQUEST_FRAMES // p.layout.frames))
            pool.submit(DecodeRequest(v, videos[v].path, p.layout.frames, sampling, p.layout.views,
                                      backbone.preprocessing, reader, windows=(0, n), samples=int(tl.samples[v]),
                                      start=float(tl.start[v])))
            continue
        pool.submit(DecodeRequest(v, videos[v].path, p.layout.frames, sampling, p.layout.views,
                                  backbone.preprocessing, reader, p.layout.pixels,
                                  AugmentSpec.from_dict(p.meta.get("augment"))))
    got = 0
    for _ in picks:
        res = pool.get()
        if res is None or not res.ok:
            continue
        got += 1
        pixels = res.pixels if res.valid_frames is None else res.pixels[res.valid_frames > 0]
        frames = pixels.reshape(-1, *pixels.shape[2:])
        for b in range(0, len(frames), batch_size):
            out = backbone.features(torch.from_numpy(frames[b:b + batch_size]), layers, tokens)
            # NaN or Inf would spoil a whole channel's step; a video that has them fails, its finite values count
            out = {k: v.float().nan_to_num(0.0, 0.0, 0.0).abs() for k, v in out.items()}
            found = {"embed": out["embed"].amax(0), "cls": out["cls"].amax(0)}
            if "tokens" in out:
                per_layer = out["tokens"].amax(dim=(0, 2))  # (L, D)
                found.update({f"tokens/{l}": per_layer[i] for i, l in enumerate(layers)})
            for k, m in found.items():
                m = m.float().cpu()
                absmax[k] = m if k not in absmax else torch.maximum(absmax[k], m)
    if not got:
        raise CacheError("int8 calibration failed: none of the calibration videos could be decoded")
    log(f"int8: calibrated per-channel steps on {got} videos")
    return {f"quant/{k}": (INT8_HEADROOM * m.clamp_min(1e-6) / 127).numpy().astype(np.float32)
            for k, m in absmax.items()}


PREPROCESS_CHOICES = ("auto", "workers", "device")


# ------------------------------------------------------------------------------------------- shards
class _RowBuffers:
    """Shard-sized row arrays (Layout.row_arrays), reused from shard to shard once the writer is done with
    them. Memory that held a shard has its pages mapped; a fresh allocation faults on first touch, which made
    putting the features in place 7x slower (0.85 vs 0.12 ms per ViT-B/16 last:4 frame, measured). At most
    the shards in flight are held: the two being assembled, one queued and one being written. With `pinned`
    (a GPU backbone) the feature arrays are page-locked, so features copy into them from the GPU
    asynchronously."""

    def __init__(self, layout: Layout, pinned: bool = False):
        self.layout, self.pinned = layout, pinned
        self.free: dict[int, list[dict[str, np.ndarray]]] = {}
        self.lock = threading.Lock()

    def take(self, n_rows: int) -> dict[str, np.ndarray]:
        with self.lock:
            if self.free.get(n_rows):
                return self.free[n_rows].pop()
        features = self.layout.feature_arrays()
        return {name: (np.full(n_rows, "", dtype=object) if dtype == "str" else
                       self._pinned((n_rows, *shape), dtype) if self.pinned and name in features else
                       np.zeros((n_rows, *shape), dtype))
                for name, (shape, dtype) in self.layout.row_arrays().items()}

    @staticmethod
    def _pinned(shape: tuple, dtype: str) -> np.ndarray:
        return torch.zeros(shape, dtype=getattr(torch, dtype), pin_memory=True).numpy()

    def give(self, rows: dict[str, np.ndarray]) -> None:
        with self.lock:
            self.free.setdefault(len(rows["clips/valid"]), []).append(rows)


_BITS = {torch.float16: (torch.int16, 0x7FFF, 0x7C00), torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
         torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}   # integer view, all but the sign, exponent all ones


def _nonfinite(values: torch.Tensor) -> torch.Tensor:
    """Per frame (first dimension): does it hold NaN or Inf? Read as integers: a value is NaN or Inf when its
    exponent bits are all ones. One masked copy and one reduction that allocate only the mask's size (a
    float16 piece of rows still in the CPU's cache); torch.isfinite builds several temporaries, and amax with
    amin on the float32 features read them twice more from memory."""
    itype, magnitude, exponent = _BITS[values.dtype]
    return (values.view(itype).flatten(1) & magnitude).amax(1) >= exponent


PIECE_BYTES = 1 << 20   # CPU: features stored and checked a piece at a time, the piece still in the CPU's cache
                        # (2 MiB of L2 here) for its check


REQUEST_FRAMES = 32     # fps sampling: frames per decode request (whole windows, at least one): what a decode
                        # worker holds at once, whatever the length of the video


@dataclass(frozen=True)
class _Unit:
    """One decode request of a shard: all the views of a video, or (fps sampling) some of its windows."""
    key: int                               # the request's key: the video, or (windowed) its first row
    video: int
    rows: range                            # the clip rows it fills
    windows: tuple[int, int] | None = None   # windowed: (first window of the video, count)


def shard_units(layout: Layout, shard: int) -> list[_Unit]:
    """The decode requests of a shard, in row order: one per video, or (windowed) pieces of at most
    REQUEST_FRAMES frames of one video's windows in the shard."""
    if not layout.windowed:
        return [_Unit(v, v, layout.video_rows(v)) for v in layout.shard_videos_range(shard)]
    rows, first = layout.shard_rows_range(shard), layout.first_clips
    per = max(1, REQUEST_FRAMES // layout.frames)
    out, r = [], rows.start
    v = int(np.searchsorted(first, r, side="right")) - 1
    while r < rows.stop:
        end = min(int(first[v + 1]), rows.stop)
        for a in range(r, end, per):
            b = min(a + per, end)
            out.append(_Unit(a, v, range(a, b), (a - int(first[v]), b - a)))
        r, v = end, v + 1
    return out


class _ShardState:
    """One shard being assembled: decoded units (a video's views, or a piece of a video's windows) arrive
    in any order, frames go to the backbone in row order, everything lands in row arrays of the shard's
    size. They may hold an earlier shard's values: every row is written, a failed unit's rows with zeros.
    The per-video tables are those of the shard's videos (windowed: whose first window it holds)."""

    def __init__(self, shard: int, layout: Layout, buffers: _RowBuffers):
        self.shard = shard
        self.layout = layout
        self.vids = layout.shard_videos_range(shard)
        self.row0 = layout.shard_rows_range(shard).start
        self.rows = buffers.take(len(layout.shard_rows_range(shard)))
        self.status = np.zeros(len(self.vids), np.uint8)
        self.num_frames = np.zeros(len(self.vids), np.int32)
        self.errors = [""] * len(self.vids)
        self.units = shard_units(layout, shard)
        self.unit_of_row = np.repeat(np.arange(len(self.units)), [len(u.rows) for u in self.units])
        self.results: dict[int, DecodeResult] = {}
        self.to_submit = deque(self.units)
        self.next_unit = 0                     # next unit whose frames go into a batch
        self.frames: list[torch.Tensor] = []   # pending crops, each (n, h, w, 3) uint8, host or device
        self.copied = None                     # GPU: event after the last copy of features into `rows`
        self.finite_checks: list[tuple[np.ndarray, torch.Tensor]] = []   # (slots, frames not storable)
        self.slots: list[np.ndarray] = []      # their flat (row*T + t) positions in this shard
        self.pending = 0

    @property
    def resolved(self) -> bool:
        return self.next_unit >= len(self.units)

    @property
    def valid(self) -> np.ndarray:
        return self.rows["clips/valid"]

    def _local(self, u: _Unit) -> slice:
        return slice(u.rows.start - self.row0, u.rows.stop - self.row0)

    def _owned(self, u: _Unit) -> int | None:
        return u.video - self.vids.start if u.video in self.vids else None

    def take_ready(self, T: int, to_views) -> list[_Unit]:
        """Move the frames of consecutive decoded units into the pending batch; returns the units taken.
        `to_views(result)` -> (crops (V, T, h, w, 3) tensor, small pixel frames or None)."""
        taken = []
        while not self.resolved and self.units[self.next_unit].key in self.results:
            u = self.units[self.next_unit]
            res = self.results.pop(u.key)
            r, j = self._local(u), self._owned(u)
            if j is not None:
                self.num_frames[j] = max(self.num_frames[j], res.num_frames)
            if res.ok:
                if j is not None and self.status[j] != FAILED:
                    self.status[j] = OK
                has = np.ones(len(u.rows), bool) if res.valid_frames is None else res.valid_frames > 0
                self.rows["clips/valid"][r] = has
                self.rows["clips/frame_idx"][r] = res.frame_idx
                if "clips/time" in self.rows:
                    self.rows["clips/time"][r] = res.time
                if res.valid_frames is not None:
                    self.rows["clips/valid_frames"][r] = res.valid_frames
                    self.rows["clips/error"][r] = res.window_errors
                crops, small_frames = to_views(res)
                if small_frames is not None:
                    self.rows["pixels"][r] = small_frames
                    self.rows["clips/pixel_frame_idx"][r] = res.small_idx
                if res.augment is not None:
                    self.rows["clips/aug"][r] = [json.dumps(a, sort_keys=True) for a in res.augment]
                if not has.all():          # windows past the end of a stream its header promised: no frames
                    crops = crops[torch.from_numpy(np.flatnonzero(has)).to(crops.device)]
                rows = np.arange(r.start, r.stop)[has]
                self.frames.append(crops.reshape(-1, *crops.shape[2:]))
                self.slots.append((rows[:, None] * T + np.arange(T)[None, :]).reshape(-1))
                self.pending += len(rows) * T
            else:
                self.fail(u, f"{res.stage}: {res.error}")
            self.next_unit += 1
            taken.append(u)
        return taken

    def fail(self, u: _Unit, error: str) -> None:
        """Record a unit as failed: its rows hold zeros, as in a cache written in one go; its video fails
        (windowed: the rows say why in clips/error, and the video's table entry when the shard holds it)."""
        r, j = self._local(u), self._owned(u)
        for rows in self.rows.values():
            rows[r] = "" if rows.dtype == object else 0
        if "clips/error" in self.rows:
            self.rows["clips/error"][r] = error
        if j is not None:
            self.status[j] = FAILED
            self.errors[j] = self.errors[j] or error

    def drop_nonfinite(self, T: int) -> None:
        """Units whose features hold NaN or Inf, or values the cache's dtype cannot hold (beyond float16's
        range in a float16 cache), fail (stage `backbone`) instead of being written: nothing downstream
        should train on them. One look at the device per shard."""
        bad = {int(i) for slots, frames in self.finite_checks
               for i in np.unique(self.unit_of_row[slots[frames.cpu().numpy()] // T]).tolist()}
        self.finite_checks = []
        if bad and self.copied is not None:
            self.copied.synchronize()          # the GPU's copies into these rows land before they are zeroed
        for i in sorted(bad):
            u = self.units[i]
            j = self._owned(u)
            if j is None or self.status[j] != FAILED or self.layout.windowed:
                self.fail(u, "backbone: the features hold NaN or Inf, or values beyond the cache's dtype (check "
                             "the weights, compute with --precision fp32, or store --dtype float32)")

    def pop_batch(self, size: int) -> tuple[torch.Tensor, np.ndarray]:
        if len(self.frames) == 1:
            pixels = self.frames[0]
        elif self.frames[0].device.type == "cpu":       # a memcpy on this thread (torch.cat would use threads
            pixels = torch.from_numpy(np.concatenate([f.numpy() for f in self.frames]))   # that wait on decoders)
        else:
            pixels = torch.cat(self.frames)
        slots = np.concatenate(self.slots)
        self.frames, self.slots = [pixels[size:]], [slots[size:]]
        self.pending = len(slots) - min(size, len(slots))
        return pixels[:size], slots[:size]

    def data(self) -> ShardData:
        """What the writer writes; `rows` are the buffers themselves (given back once written)."""
        rows = dict(self.rows)
        for name in ("clips/aug", "clips/error"):
            if name in rows:
                rows[name] = rows[name].astype(str)
        return ShardData(self.shard, rows, {"videos/status": self.status, "videos/num_frames": self.num_frames,
                                            "videos/error": np.array(self.errors, dtype=str)})


@dataclass
class ExtractStats:
    shards: int = 0
    clips: int = 0
    frames: int = 0
    failed_videos: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    failures: list = field(default_factory=list)
    # where the pipeline's main thread spent its time: the largest names the bottleneck
    wait_decode_s: float = 0.0     # waiting for a decoded video
    forward_s: float = 0.0         # backbone forward and copy to the host
    wait_write_s: float = 0.0      # waiting for the writer thread to take a finished shard

    def bottleneck(self) -> str:
        """Where the time went, e.g. 'decoding (decoding 72%, the backbone 20%, writing 3% of the pipeline's
        time)'; empty when not measured (a distributed run's driver)."""
        parts = {"decoding": self.wait_decode_s, "the backbone": self.forward_s, "writing": self.wait_write_s}
        if self.seconds <= 0 or not any(parts.values()):
            return ""
        name, t = max(parts.items(), key=lambda kv: kv[1])
        shares = ", ".join(f"{k} {v / self.seconds:.0%}" for k, v in parts.items())
        return f"{name} ({shares} of the pipeline's time)"


class ShardExtractor:
    """Runs the pipeline over shards pulled from an iterable (which may be lazy: a Ray queue)."""

    def __init__(self, store: Cache, backbone: Backbone, videos: list[VideoEntry],
                 pool: DecodePool, batch_size: int = 64, reader: str = "auto", on_progress=None,
                 on_shard_done=None, max_inflight: int | None = None, preprocess: str = "auto",
                 fsync: bool = True):
        layout, meta = store.layout, store.meta
        self.store, self.fsync = store, fsync
        self.layout, self.backbone, self.videos, self.pool = layout, backbone, videos, pool
        self.batch_size = batch_size
        self.layers = list(layout.layers)
        self.tokens = layout.tokens
        self.sampling = SamplingSpec(**meta["sampling"])
        self.reader = reader
        self.on_progress = on_progress or (lambda clips: None)
        self.on_shard_done = on_shard_done or (lambda shard: None)
        self.augment = AugmentSpec.from_dict(meta.get("augment"))
        prep = backbone.preprocessing
        # test views cropped on the compute device (the same bytes as PIL's), the workers then only decode
        if preprocess not in PREPROCESS_CHOICES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_CHOICES}")
        self.device_crops = (preprocess == "device" or (preprocess == "auto" and backbone.device.type == "cuda")) \
            and self.augment is None and resample.supported(prep.size, prep.interpolation, prep.resize_mode)
        per_request = (max(1, REQUEST_FRAMES // layout.frames) if layout.windowed else layout.views.count) \
            * layout.frames
        self.max_inflight = max_inflight or max(4 * max(len(pool.pids), 1), 2 * math.ceil(batch_size / per_request))
        if layout.windowed:   # every video's timeline, as probed when the store was made
            self.start = store.read("videos/start")
            self.duration = store.read("videos/duration")
            self.samples = np.array([sample_count(d, self.sampling.fps) for d in self.duration], dtype=np.int64)
        self.videos_done, self.media_seconds_done = 0, 0.0     # progress in videos and in hours of video
        self.stop_requested = False
        dev = backbone.device
        # int8 caches quantize on the compute device with the steps fixed when the store was created
        self.steps = ({k: torch.from_numpy(store.quant_step(k)).to(dev) for k in layout.feature_arrays()}
                      if layout.dtype == "int8" else None)
        self.copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.dtype = getattr(torch, layout.dtype)       # the feature arrays' dtype
        self.buffers = _RowBuffers(layout, pinned=self.copy_stream is not None)   # kept across run() calls
        self._awaiting: dict[int, _ShardState] = {}     # run()'s submitted requests -> their shard

    # -- forward
    def _views(self, res: DecodeResult) -> tuple[torch.Tensor, np.ndarray | None]:
        """A decoded video's crops and small pixel frames: made here from its raw frames, or by its worker."""
        if res.decoded is None:
            return torch.from_numpy(res.pixels), res.small
        prep = self.backbone.preprocessing
        idx = res.frame_idx if res.pick is None else res.pick      # fps windows: positions in `decoded`
        return resample.views_from_frames(res.decoded, res.decoded_idx, idx, res.small_idx, prep,
                                          self.layout.views.spatial,
                                          self.layout.pixels.size if self.layout.pixels else None,
                                          self.backbone.device)

    def _forward(self, st: _ShardState, x: torch.Tensor, slots: np.ndarray) -> None:
        """One backbone batch, its features put straight into their rows of the shard (`slots`: flat
        row * T + t positions, in order; consecutive but for the gaps of failed videos). On a GPU nothing
        here waits: the copies to the host run on a side stream into page-locked rows, and the writer waits
        for the shard's last copy (`st.copied`) before it writes; on the CPU they are converted into place at
        once. Either way _stored makes the stored values and finds the frames the cache cannot hold."""
        gpu = self.copy_stream is not None
        if gpu and x.device.type == "cpu":
            x = x.pin_memory()
        out = self.backbone.features(x, self.layers, self.tokens)
        cuts = np.flatnonzero(np.diff(slots) != 1) + 1
        runs = [(int(a[0]), int(a[-1]) + 1, int(i)) for a, i in zip(np.split(slots, cuts), np.r_[0, cuts])]
        targets = [("embed", out["embed"]), ("cls", out["cls"])]
        if "tokens" in out:
            targets += [(f"tokens/{layer}", out["tokens"][:, li]) for li, layer in enumerate(self.layers)]
        bad = torch.zeros(len(slots), dtype=torch.bool, device=out["embed"].device)
        if gpu:   # converted and checked on the device, then copied to the host as stored, on the side stream
            stored = []
            for name, feats in targets:
                values, b = self._stored(name, feats)
                stored.append((name, values))
                bad |= b
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.backbone.device))
            with torch.cuda.stream(self.copy_stream):
                for name, values in stored:
                    values.record_stream(self.copy_stream)    # not reused by the next forward until copied
                    flat = st.rows[name].reshape(-1, *values.shape[1:])
                    for start, stop, at in runs:
                        torch.from_numpy(flat[start:stop]).copy_(values[at:at + stop - start], non_blocking=True)
                st.copied = self.copy_stream.record_event()
        else:     # converted straight into place a piece at a time, each checked while still in the CPU's cache;
            with cpu_threads(1):   # memory-bound: one thread, not threads that wait on busy decoder processes
                for name, feats in targets:
                    self._take_decoded()
                    flat = st.rows[name].reshape(-1, *feats.shape[1:])
                    piece = max(1, PIECE_BYTES // flat[0].nbytes)
                    for start, stop, at in runs:
                        for r in range(start, stop, piece):
                            i, j = at + r - start, at + min(stop, r + piece) - start
                            bad[i:j] |= self._stored(name, feats[i:j], torch.from_numpy(flat[r:r + j - i]))[1]
        st.finite_checks.append((slots, bad))     # frames the cache cannot hold: their videos fail with the shard

    def _stored(self, name: str, feats: torch.Tensor, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features as the cache stores them (written into `out` when given), and per frame whether the cache
        cannot hold them: NaN or Inf, which includes values beyond float16's range in a float16 cache (they
        convert to Inf). int8 caches quantize with the steps fixed when the store was created (value = int8 *
        step) and check the features before, as an Inf would clamp to +-127."""
        if self.steps is not None:
            values = torch.round(feats.float() / self.steps[name]).clamp_(-127, 127)
            return (out.copy_(values) if out is not None else values.to(torch.int8)), _nonfinite(feats)
        values = out.copy_(feats) if out is not None else feats.to(self.dtype)
        return values, _nonfinite(values)

    def _request(self, u: _Unit) -> DecodeRequest:
        e, v = self.videos[u.video], u.video
        if u.windows is not None:
            return DecodeRequest(u.key, e.path, self.layout.frames, self.sampling, self.layout.views,
                                 self.backbone.preprocessing, self.reader, raw=self.device_crops,
                                 windows=u.windows, samples=int(self.samples[v]), start=float(self.start[v]))
        return DecodeRequest(u.key, e.path, self.layout.frames, self.sampling, self.layout.views,
                             self.backbone.preprocessing, self.reader, self.layout.pixels, self.augment,
                             raw=self.device_crops)

    def unit_seconds(self, u: _Unit) -> float:
        """Seconds of video a unit covers (fps windows; the video's share of its duration otherwise: 0)."""
        if u.windows is None:
            return 0.0
        d = self.duration[u.video]
        if not np.isfinite(d):
            return 0.0
        step = self.sampling.window_stride / self.sampling.fps
        w0, n = u.windows
        last = u.rows.stop == self.layout.first_clips[u.video + 1]
        return float(min(d, d if last else (w0 + n) * step) - min(d, w0 * step))

    def _progress(self, units: list[_Unit]) -> None:
        for u in units:
            self.media_seconds_done += self.unit_seconds(u)
            self.videos_done += u.rows.stop == self.layout.first_clips[u.video + 1]
        self.on_progress(sum(len(u.rows) for u in units))

    def _take_decoded(self, timeout: float = 0) -> None:
        """Hand the decoded units that are ready to their shards (waiting up to `timeout` s for one); the
        pool gives its idle workers their next requests meanwhile. Also called between the steps of a batch:
        a worker holds DEPTH requests, fewer frames than a batch, and on a CPU workers fed only between
        batches sat idle while the batch's checks and copies ran."""
        while (res := self.pool.get(timeout=timeout)) is not None:
            st = self._awaiting.pop(res.key, None)
            if st is not None:
                st.results[res.key] = res
            timeout = 0

    def run(self, shards: Iterable[int]) -> ExtractStats:
        stats = ExtractStats()
        t0 = time.perf_counter()
        writes: Queue = Queue(maxsize=1)
        writer_error: list[BaseException] = []
        buffers = self.buffers

        def writer():
            while True:
                item = writes.get()
                if item is None:
                    return
                if writer_error:
                    continue
                state, data = item
                try:
                    if state.copied is not None:     # the GPU's copies into this shard's rows have landed
                        state.copied.synchronize()
                    write_shard(self.store, data, fsync=self.fsync)
                    buffers.give(state.rows)
                    self.on_shard_done(data.shard)
                except BaseException as e:  # reported by the main thread
                    writer_error.append(e)

        wt = threading.Thread(target=writer, name="cachefeat-writer", daemon=True)
        wt.start()
        it = iter(shards)
        exhausted = False
        open_shards: deque[_ShardState] = deque()
        self._awaiting = {}
        T = self.layout.frames
        try:
            while True:
                if writer_error:
                    raise writer_error[0]
                # 1. keep the decoders busy, at most two shards ahead
                while self.pool.in_flight < self.max_inflight:
                    # once a stop is requested, only the shard in flight (the head) is finished
                    candidates = list(open_shards)[:1] if self.stop_requested else open_shards
                    st = next((s for s in candidates if s.to_submit), None)
                    if st is None:
                        if exhausted or self.stop_requested or len(open_shards) >= 2:
                            break
                        s = next(it, None)
                        if s is None:
                            exhausted = True
                            break
                        st = _ShardState(int(s), self.layout, buffers)
                        open_shards.append(st)
                        continue
                    u = st.to_submit.popleft()
                    entry = self.videos[u.video]
                    if entry.problem:
                        st.results[u.key] = DecodeResult(u.key, stage="manifest", error=entry.problem)
                    else:
                        self._awaiting[u.key] = st
                        self.pool.submit(self._request(u))
                if not open_shards:
                    break
                # 2. the head shard: batch the decoded frames in video order, forward full batches
                head = open_shards[0]
                taken = head.take_ready(T, self._views)
                while head.pending >= self.batch_size or (head.resolved and head.pending):
                    self._take_decoded()     # idle decoders get work before each batch
                    pixels, slots = head.pop_batch(self.batch_size)
                    tf = time.perf_counter()
                    self._forward(head, pixels, slots)
                    stats.forward_s += time.perf_counter() - tf
                if taken:
                    self._progress(taken)
                if head.resolved:
                    open_shards.popleft()
                    head.drop_nonfinite(T)
                    tw = time.perf_counter()
                    item = (head, head.data())
                    while True:       # while the writer is busy, keep the decoders fed and their results taken
                        try:
                            writes.put(item, timeout=0.01)
                            break
                        except Full:
                            self._take_decoded()
                    stats.wait_write_s += time.perf_counter() - tw
                    stats.shards += 1
                    stats.clips += int(head.valid.sum())
                    stats.frames += (int(head.rows["clips/valid_frames"][head.valid].sum()) if self.layout.windowed
                                     else int(head.valid.sum()) * T)
                    bad = np.flatnonzero(head.status == FAILED)
                    stats.failed_videos += len(bad)
                    stats.failures += [(int(head.vids.start + j), head.errors[j]) for j in bad]
                    if self.stop_requested:
                        break
                    continue
                if taken:
                    continue
                # 3. wait for the next decoded video
                td = time.perf_counter()
                self._take_decoded(timeout=1.0)
                stats.wait_decode_s += time.perf_counter() - td
        finally:
            tw = time.perf_counter()
            writes.put(None)
            wt.join()
            stats.wait_write_s += time.perf_counter() - tw
        if writer_error:
            raise writer_error[0]
        stats.interrupted = self.stop_requested and (not exhausted or bool(open_shards))
        stats.seconds = time.perf_counter() - t0
        return stats


# ------------------------------------------------------------------------------------------- entry
@contextmanager
def stop_on_sigint(request_stop: Callable[[], None], say: Callable[[str], None], what: str):
    """Ctrl-C, the same for single-process and Ray extraction: the first asks the run to finish `what` and
    stop (`request_stop()`), a second stops at once (KeyboardInterrupt). Outside the main thread, where
    Python delivers no signals, nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    asked = []

    def on_sigint(signum, frame):
        if asked:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        asked.append(True)
        request_stop()
        say(f"interrupted: finishing {what} (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def extract(manifest: Manifest, out: str | Path, settings: ExtractSettings, batch_size: int = 64,
            decode_workers: int = 2, decode_timeout: float = 60.0, reader: str = "auto", overwrite: bool = False,
            progress: bool = True, log=print, repair: bool = False, preprocess: str = "auto",
            fsync: bool = True) -> ExtractStats:
    """Extract (or resume extracting) `manifest` into the cache at `out` (a folder, or an s3:// URL: see
    store/bucket_writer.py) in this process. With `repair`,
    shards that `cachefeat verify` finds damaged are extracted again. `preprocess`: where test views are
    resized and cropped (workers: PIL in the decode processes; device: on the backbone's device, the same
    bytes; auto: device on a GPU). `fsync`: each shard is on the disk before it counts as done."""
    from tqdm import tqdm
    backbone = load_backbone(settings.model, settings.pretrained, settings.device, settings.precision,
                             seed=settings.seed, quick_gelu=settings.quick_gelu,
                             trust_pretrained=settings.trust_pretrained)
    p = plan(settings, manifest, backbone)
    with DecodePool(decode_workers, decode_timeout) as pool, \
            open_for_writing(out, p.meta, p.layout, manifest.videos, settings.codec, overwrite, repair,
                             extras=lambda: creation_extras(p, backbone, pool, batch_size, reader, log),
                             log=log, timeline=p.timeline.arrays() if p.timeline else None) as store:
        if not store.todo:
            return ExtractStats()
        layout = store.layout
        total_clips = sum(len(layout.shard_rows_range(s)) for s in store.todo)
        bar = tqdm(total=total_clips, unit="clip", desc="extract", disable=not progress, dynamic_ncols=True)

        def on_progress(clips: int) -> None:
            bar.update(clips)
            if layout.windowed:    # long videos: also in videos and in hours of video
                bar.set_postfix_str(f"{ex.videos_done}/{todo_videos} videos, {ex.media_seconds_done / 3600:.2f}/"
                                    f"{todo_hours:.2f} h of video", refresh=False)

        ex = ShardExtractor(store.cache, backbone, manifest.videos, pool, batch_size, reader, on_progress=on_progress,
                            on_shard_done=store.shard_done, preprocess=preprocess, fsync=fsync)
        if layout.windowed:
            units = [u for s in store.todo for u in shard_units(layout, s)]
            todo_videos = sum(u.rows.stop == layout.first_clips[u.video + 1] for u in units)
            todo_hours = sum(ex.unit_seconds(u) for u in units) / 3600

        def request_stop():
            ex.stop_requested = True

        try:
            with stop_on_sigint(request_stop, bar.write, "the shard in flight"):
                return ex.run(store.todo)
        finally:
            bar.close()
