"""Video readers and the per-video decode step that decode workers run.

A reader opens one file (or a folder of frames) and returns RGB frames for a list of indices, with their
presentation times (`times(indices)`, after `get`), or the frames nearest a list of times (`frames_at`, for
--sampling fps). Readers are pluggable through READERS; `auto` tries decord first (fast random access) and
falls back to PyAV, which opens what decord cannot (odd pixel formats, some containers); with fps sampling
`auto` tries PyAV first (exact timestamps from the pts, one sequential pass per request, seeking across
long gaps). Add a reader (a GPU decoder, say) by registering a class with `name`, `num_frames`,
`get(indices)`, `times(indices)` and `frames_at(times)`. A folder of JPEG/PNG frames is read by
FrameFolderReader whatever the reader asked for.

decode_video() never raises: it returns a DecodeResult whose `error`/`stage` say what went wrong, so one bad
file is recorded and the extraction goes on. This module imports neither torch nor open_clip: it runs in
light worker processes (decode_pool.py). A request for an `s3://` URL is fetched into a temporary file first
(fetch.py) and decoded as a local file.

Video files are untrusted input: what a header claims (frame size, frame count, duration) is checked against
bounds no real video reaches (MAX_SIDE, MAX_PIXELS, MAX_FRAMES, MAX_SECONDS) before anything is allocated
for it, and each decoded frame's size before it is converted; such a file fails with stage `header`. What is
allocated follows the sampler (the clip's frames), never the claimed count. A decode that still runs out of
memory (the workers' memory limit, decode_pool.py) fails with stage `memory`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from ..specs import AugmentSpec, PixelSpec, SamplingSpec, ViewSpec
from .preprocess import Preprocessing, augmented_crop, crops, draw_augmentation, small
from .sampling import clip_indices, pixel_indices, window_samples

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SEEK_GAP = 10.0      # seconds: fps sampling seeks to a sample this far past the decoder's position
# Bounds on what a header may claim: far past any real video (8K UHD is 7680x4320 = 33 M pixels; a week of
# 60 fps video is 36 M frames), far below what would exhaust a worker's memory or the cache's size.
MAX_SIDE = 16384
MAX_PIXELS = 1 << 26
MAX_FRAMES = 1 << 26
MAX_SECONDS = 7 * 24 * 3600.0


class DecodeError(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage, self.message = stage, message


def check_frame_size(width: int, height: int, what: str = "the header claims") -> None:
    """DecodeError (stage `header`) for a frame size no real video has: before anything of that size exists."""
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE and width * height <= MAX_PIXELS):
        raise DecodeError("header", f"{what} frames of {width}x{height} pixels; cachefeat decodes at most "
                                    f"{MAX_SIDE} a side and {MAX_PIXELS / 1e6:.0f} million pixels")


def check_length(frames: int = 0, seconds: float = 0.0) -> None:
    """DecodeError (stage `header`) for a frame count or duration no real video has (a lying header)."""
    if frames > MAX_FRAMES:
        raise DecodeError("header", f"the header claims {frames} frames; cachefeat decodes at most {MAX_FRAMES}")
    if not seconds <= MAX_SECONDS:   # NaN too
        raise DecodeError("header", f"the header claims {seconds:.6g} s of video; cachefeat decodes at most "
                                    f"{MAX_SECONDS:g} s (a week)")


def _check_stream(container, stream) -> None:
    """The claims of a PyAV stream's header: its frame size (when the header gives one), count and duration."""
    cc = stream.codec_context
    if cc.width or cc.height:
        check_frame_size(cc.width, cc.height)
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    check_length(max(stream.frames, 0), max(seconds, (container.duration or 0) / 1e6))


class ShortStream(Exception):
    """The stream delivered fewer frames than its header promised (a truncated file): sample again over
    the frames that really decode."""
    def __init__(self, frames: int):
        super().__init__(f"only {frames} frames decode")
        self.frames = frames


# ------------------------------------------------------------------------------------------- readers
class DecordReader:
    name = "decord"

    def __init__(self, path: str):
        import decord  # imported here: optional on platforms without wheels
        self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        self.num_frames = len(self._vr)

    def get(self, indices: np.ndarray) -> np.ndarray:
        # decord says nothing of the frame size before decoding: one frame first, its size checked, so a
        # lying stream costs one frame, not a batch of them
        idx = [int(i) for i in indices]
        first = self._vr.get_batch(idx[:1]).asnumpy()
        check_frame_size(first.shape[2], first.shape[1], "the stream decodes to")
        if len(idx) == 1:
            return first
        out = np.empty((len(idx), *first.shape[1:]), first.dtype)
        out[0] = first[0]
        out[1:] = self._vr.get_batch(idx[1:]).asnumpy()
        return out

    def times(self, indices: np.ndarray) -> np.ndarray:
        return self._vr.get_frame_timestamp([int(i) for i in indices])[:, 0].astype(np.float64)

    def frames_at(self, times: np.ndarray) -> Sampled:
        stamps = self._vr.get_frame_timestamp(range(self.num_frames)).astype(np.float64)
        return _nearest_on_timeline(stamps[:, 0], stamps[-1, 1], times, self.get)


class PyAVReader:
    """Sequential decode with PyAV (FFmpeg's own libraries, shipped in the wheel). Slower than decord for
    sparse sampling of long videos, but opens nearly anything FFmpeg can."""
    name = "pyav"

    def __init__(self, path: str, count: bool = True):
        import av
        self._path = path
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError("open", "the file has no video stream")
            stream = container.streams.video[0]
            _check_stream(container, stream)
            n = stream.frames
            if n <= 0 and count:  # not in the header: count packets that carry a frame
                n = sum(1 for p in container.demux(stream) if p.size > 0)
        self.num_frames = int(n)

    def get(self, indices: np.ndarray) -> np.ndarray:
        import av
        wanted = sorted(set(int(i) for i in indices))
        got: dict[int, np.ndarray] = {}
        self._times: dict[int, float] = {}
        last = None
        with av.open(self._path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                last = i
                if i in wanted:
                    check_frame_size(frame.width, frame.height, "the stream decodes to")
                    got[i] = frame.to_ndarray(format="rgb24")
                    self._times[i] = np.nan if frame.time is None else float(frame.time)
                if i >= wanted[-1]:
                    break
        if last is None:
            raise DecodeError("decode", "no frame could be decoded")
        if last < wanted[-1]:  # the header promised more frames than the stream holds
            raise ShortStream(last + 1)
        return np.stack([got[int(i)] for i in indices])

    def times(self, indices: np.ndarray) -> np.ndarray:
        """Presentation times of frames returned by the last get()."""
        return np.array([self._times[int(i)] for i in indices], dtype=np.float64)

    def frames_at(self, times: np.ndarray) -> Sampled:
        """The frame nearest each of `times` (sorted, seconds on the stream's timeline) in one sequential
        pass: a seek to the keyframe before the first (and before any sample more than SEEK_GAP seconds past
        the decoder's position), then decoding forward; only the chosen frames are converted and kept."""
        import av
        times = np.asarray(times, dtype=np.float64)
        n = len(times)
        frames, ids, stamps = [], [], []
        pick, past = np.zeros(n, np.int64), np.zeros(n, bool)

        def take(i: int, frame, ft: float) -> None:
            if not ids or ids[-1] != frame.pts:
                check_frame_size(frame.width, frame.height, "the stream decodes to")
                frames.append(frame.to_ndarray(format="rgb24"))
                ids.append(frame.pts)
                stamps.append(ft)
            pick[i] = len(frames) - 1

        with av.open(self._path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base
            step = 1.0 / float(stream.average_rate or stream.guessed_rate or 25)
            origin = float(stream.start_time * tb) if stream.start_time is not None else 0.0
            i, pos, prev, may_seek, sought = 0, None, None, True, -np.inf
            while i < n:
                target = times[i] - step
                seeked = may_seek and target - (origin if pos is None else pos) > SEEK_GAP
                if seeked:
                    container.seek(int(target / tb), stream=stream, backward=True)
                    sought = target
                prev, jumped, first, before = (None if seeked else prev), False, True, pos
                for frame in container.decode(stream):
                    ft = frame.time
                    if ft is None:
                        raise DecodeError("decode", "the frames carry no timestamps (pts): fps sampling needs "
                                                    "them; remux the file into a container (e.g. mp4)")
                    ft = float(ft)
                    if seeked and first:
                        if ft > times[i] + step / 2:
                            # the seek went past the sample (an index that lies): decode from the start instead
                            container.seek(0, stream=stream, backward=True)
                            may_seek, jumped = False, True
                            break
                        if before is not None and ft <= before:
                            # it landed no further than the decoder was: keyframes are further apart than the
                            # samples, so decoding straight on is as fast; no more seeks in this request
                            may_seek = False
                    first = False
                    pos = ft
                    while i < n and ft >= times[i]:
                        if prev is not None and times[i] - prev[1] <= ft - times[i]:
                            take(i, *prev)
                        else:
                            take(i, frame, ft)
                        i += 1
                    if i >= n:
                        break
                    prev = (frame, ft)
                    if may_seek and ft >= sought and times[i] - step - ft > SEEK_GAP:
                        jumped = True       # sparse: seek ahead rather than decode the gap
                        break
                if i >= n or jumped:
                    continue
                # the stream ended: the last frame shows until its duration is over, then there is none
                if prev is None:
                    raise DecodeError("decode", "no frame could be decoded")
                last, lt = prev
                dur = float(last.duration * tb) if getattr(last, "duration", None) else step
                for j in range(i, n):
                    if times[j] < lt + dur:
                        take(j, last, lt)
                    else:
                        past[j] = True
                        pick[j] = max(len(frames) - 1, 0)
                break
        if not frames:
            raise DecodeError("decode", "no frame could be decoded")
        return Sampled(np.stack(frames), np.array(stamps), pick, past)


class FrameFolderReader:
    """A folder of JPEG/PNG (or BMP, WebP) images, one frame each, in natural name order (frame_2 before
    frame_10); frame i shows at i / frame_rate seconds (NaN without a rate)."""
    name = "frames"

    def __init__(self, path: str, frame_rate: float | None = None):
        self._files = frame_files(path)
        if not self._files:
            raise DecodeError("empty", f"the frame folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.num_frames = len(self._files)
        self.rate = frame_rate

    def get(self, indices: np.ndarray) -> np.ndarray:
        from PIL import Image
        out = []
        for i in indices:
            try:
                with Image.open(self._files[int(i)]) as im:
                    out.append(np.asarray(im.convert("RGB")))
            except OSError as e:
                raise DecodeError("decode", f"{os.path.basename(self._files[int(i)])}: {_first_line(e)}") from None
            if out[-1].shape != out[0].shape:
                raise DecodeError("decode", f"{os.path.basename(self._files[int(i)])} is {out[-1].shape[1]}x"
                                            f"{out[-1].shape[0]}, other frames {out[0].shape[1]}x{out[0].shape[0]}")
        return np.stack(out)

    def times(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.float64)
        return idx / self.rate if self.rate else np.full(len(idx), np.nan)

    def frames_at(self, times: np.ndarray) -> Sampled:
        if not self.rate:
            raise DecodeError("open", "a frame folder needs --frame-rate for fps sampling")
        n = self.num_frames
        return _nearest_on_timeline(np.arange(n) / self.rate, n / self.rate, times, self.get)


def frame_files(path: str) -> list[str]:
    """The image files of a frame folder, in natural name order."""
    try:
        names = [e.name for e in os.scandir(path) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
                 and not e.name.startswith(".")]
    except OSError:
        return []
    return [os.path.join(path, n) for n in sorted(names, key=_natural)]


def _natural(name: str) -> list:
    import re
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


@dataclass
class Sampled:
    """The frames a reader chose for a list of times: each distinct frame once (`frames`, their presentation
    times `time`), which one each time shows (`pick`), and the times past the end of the stream (`past`)."""
    frames: np.ndarray     # (U, H, W, 3) uint8
    time: np.ndarray       # (U,) float64 seconds
    pick: np.ndarray       # (n,) index into frames
    past: np.ndarray       # (n,) bool


def _nearest_on_timeline(timeline: np.ndarray, end: float, times: np.ndarray, get) -> Sampled:
    """The frame nearest each time (ties: the earlier) on a known timeline; times at or after `end` are past."""
    n = len(timeline)
    j = np.searchsorted(timeline, times, side="left")
    lo, hi = np.clip(j - 1, 0, n - 1), np.clip(j, 0, n - 1)
    idx = np.where(timeline[hi] - times < times - timeline[lo], hi, lo)
    past = times >= end
    unique, pick = np.unique(idx, return_inverse=True)
    return Sampled(get(unique), timeline[unique].astype(np.float64), pick.reshape(-1), past)


READERS = {"decord": DecordReader, "pyav": PyAVReader}
READER_CHOICES = ("auto", *READERS)


@dataclass(frozen=True)
class Probe:
    """A video's timeline from its header (no decoding): the first frame's time and the duration, seconds."""
    start: float
    duration: float


def probe(path: str, frame_rate: float | None = None) -> Probe:
    """The timeline of a video file (PyAV's header; decord's index when PyAV cannot open it) or of a frame
    folder (count / frame_rate), or of an object in a bucket (`s3://`: PyAV's header read through ranged GETs,
    fetch.ObjectFile). DecodeError when neither can say."""
    if path.startswith("s3://"):
        return _probe_object(path)
    if os.path.isdir(path):
        n = len(frame_files(path))
        if not n:
            raise DecodeError("empty", "the frame folder holds no images")
        if not frame_rate:
            raise DecodeError("open", "a frame folder needs --frame-rate for fps sampling")
        return Probe(0.0, n / frame_rate)
    if not os.path.isfile(path):
        raise DecodeError("missing", f"no such file: {path}")
    errors = []
    try:
        return _probe_pyav(path)
    except DecodeError as e:
        if e.stage == "header":   # a lying header: no other reader's opinion makes it plan that much
            raise
        errors.append(f"pyav: {e.message}")
    except Exception as e:
        errors.append(f"pyav: {_first_line(e)}")
    try:
        import decord
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        first, last = vr.get_frame_timestamp([0, len(vr) - 1]).astype(np.float64)
        return Probe(float(first[0]), float(last[1] - first[0]))
    except DecodeError:
        raise
    except Exception as e:
        errors.append(f"decord: {type(e).__name__}: {_first_line(e)}")
    raise DecodeError("open", "; ".join(errors))


def _probe_object(url: str) -> Probe:
    from .fetch import FetchError, ObjectFile
    try:
        with ObjectFile(url) as raw, io.BufferedReader(raw, buffer_size=1 << 16) as f:
            try:
                return _probe_pyav(f)
            except (DecodeError, FetchError):
                raise
            except Exception as e:       # PyAV's, or a FetchError of a read that PyAV wrapped
                cause = e.__context__ if isinstance(e.__context__, FetchError) else None
                if cause is not None:
                    raise cause from None
                raise DecodeError("open", f"pyav: {_first_line(e)}") from None
    except FetchError as e:
        raise DecodeError(e.stage, e.message) from None


def _probe_pyav(path) -> Probe:
    import av
    with av.open(path) as c:
        if not c.streams.video:
            raise DecodeError("open", "the file has no video stream")
        s = c.streams.video[0]
        _check_stream(c, s)
        tb = s.time_base
        start = float(s.start_time * tb) if s.start_time is not None else 0.0
        if s.duration:
            return Probe(start, float(s.duration * tb))
        if c.duration:
            c_start = (c.start_time or 0) / 1e6
            return Probe(start, c.duration / 1e6 - (start - c_start))
        end = start                 # neither header says: the last packet's end
        for p in c.demux(s):
            if p.pts is not None:
                end = max(end, float((p.pts + (p.duration or 0)) * tb))
        return Probe(start, end - start)


def open_video(path: str, reader: str = "auto", frame_rate: float | None = None, windowed: bool = False):
    """Open with the named reader; `auto` = decord, then PyAV when decord fails (with `windowed`, fps
    sampling: PyAV, then decord). A folder is read as a frame folder, whatever `reader` says."""
    if not os.path.exists(path):
        raise DecodeError("missing", f"no such file: {path}")
    if os.path.isdir(path):
        return FrameFolderReader(path, frame_rate)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DecodeError("open", "the file is empty (0 bytes)")
    if os.path.isfile(path) and _is_text(path):
        # FFmpeg would "decode" it with its tty demuxer, rendering the characters as frames
        raise DecodeError("open", "this is a text file, not a video")
    order = (["pyav", "decord"] if windowed else list(READERS)) if reader == "auto" else [reader]
    errors = []
    for name in order:
        try:
            # fps sampling reads by time: PyAV need not count the frames of a header without the count (a
            # pass over the whole file for every request)
            r = PyAVReader(path, count=False) if name == "pyav" and windowed else READERS[name](path)
            check_length(r.num_frames)
            if r.num_frames < 1 and not (windowed and name == "pyav"):
                raise DecodeError("empty", "the video has no frames")
            return r
        except DecodeError as e:
            if e.stage == "header":     # a lying header is refused whatever another reader would make of it
                raise
            errors.append(f"{name}: {e.message}")
            if e.stage == "empty" and name == order[-1]:
                raise DecodeError("empty", "; ".join(errors)) from None
        except Exception as e:  # the readers raise their own types (decord.DECORDError, av.error.*)
            errors.append(f"{name}: {type(e).__name__}: {_first_line(e)}")
    raise DecodeError("open", "; ".join(errors))


def _is_text(path: str, probe: int = 4096) -> bool:
    """Every container cachefeat reads starts with binary header bytes; plain text has none."""
    with open(path, "rb") as f:
        head = f.read(probe)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""


# ------------------------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class DecodeRequest:
    """Everything a worker needs to turn one video into model-sized uint8 crops for all its views."""
    key: int                     # row of the video in the cache
    path: str
    frames: int
    sampling: SamplingSpec
    views: ViewSpec              # deterministic test views (ignored when `augment` is set)
    prep: Preprocessing
    reader: str = "auto"
    pixels: PixelSpec | None = None      # also return small frames for pixel-level encoders
    augment: AugmentSpec | None = None   # random training views instead of test views
    raw: bool = False                    # test views: return the decoded frames; the caller crops them
                                         # (resample.views_from_frames, on the GPU), the workers only decode
    # fps sampling (sampling.windowed): windows first .. first+count-1 of the video's `samples` samples,
    # sample k at start + k / fps seconds (the plan's probe of the video)
    windows: tuple[int, int] | None = None
    samples: int = 0
    start: float = 0.0

    @property
    def num_views(self) -> int:
        if self.windows is not None:
            return self.windows[1]
        return self.augment.views if self.augment else self.views.count

    @property
    def media_seconds(self) -> float:
        """Seconds of video this request covers (fps sampling), 0 otherwise: the decode timeout scales with it."""
        if self.windows is None:
            return 0.0
        return self.windows[1] * self.sampling.window_stride / self.sampling.fps


@dataclass
class DecodeResult:
    key: int
    pixels: np.ndarray | None = None      # (views, frames, h, w, 3) uint8, view = temporal * S + spatial
    frame_idx: np.ndarray | None = None   # (views, frames) int32 source frame indices (fps: sample indices)
    time: np.ndarray | None = None        # (views, frames) float64 presentation times, seconds
    valid_frames: np.ndarray | None = None  # fps windows: (windows,) real samples; the rest repeat the last
    window_errors: list | None = None     # fps windows: per window, why it holds no frame ("" = it has frames)
    pick: np.ndarray | None = None        # raw fps requests: (windows, frames) index into `decoded`
    small: np.ndarray | None = None       # (views, frames*K, s, s, 3) uint8 when pixels were asked for
    small_idx: np.ndarray | None = None   # (views, frames*K) int32
    decoded: np.ndarray | None = None     # raw requests: (U, H, W, 3) uint8, each frame any view uses, once
    decoded_idx: np.ndarray | None = None  # (U,) their indices, ascending
    augment: list | None = None           # per view: the augmentation parameters drawn
    num_frames: int = 0
    reader: str = ""
    stage: str | None = None              # where it failed: missing/fetch/open/header/empty/decode/memory/
                                          # preprocess/timeout/crash
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def decode_video(req: DecodeRequest) -> DecodeResult:
    """Decode each needed frame once, for all views, then crop. Never raises. An `s3://` video is fetched
    into a temporary file first (fetch.py), decoded there, and the file removed."""
    if req.path.startswith("s3://"):
        return _decode_fetched(req)
    windowed = req.sampling.windowed
    try:
        if windowed and req.windows is None:
            raise DecodeError("decode", "fps sampling decodes windows planned from the video's duration; "
                                        "this request names none (predict and online training take uniform or "
                                        "dense sampling)")
        decode = _decode_windows if windowed else _decode_with
        reader = open_video(req.path, req.reader, req.sampling.frame_rate, windowed)
        try:
            return decode(reader, req)
        except DecodeError as e:
            # decord may open a file it then cannot decode; give PyAV its chance before recording a failure
            other = "decord" if windowed else "pyav"
            if e.stage != "decode" or req.reader != "auto" or reader.name in (other, "frames"):
                raise
            try:
                return decode(PyAVReader(req.path, count=False) if other == "pyav" else READERS[other](req.path), req)
            except DecodeError as e2:
                raise DecodeError(e2.stage, f"{e.message}; {other}: {e2.message}") from None
            except MemoryError:
                raise
            except Exception as e2:
                raise DecodeError("decode", f"{e.message}; {other}: {type(e2).__name__}: {_first_line(e2)}") from None
    except DecodeError as e:
        return DecodeResult(req.key, stage=e.stage, error=e.message)
    except MemoryError as e:   # the worker's memory limit (decode_pool.py) or the machine's
        return DecodeResult(req.key, stage="memory", error=f"decoding needs more memory than a decode worker may "
                                                           f"use{_memory_limit()}: {_first_line(e)}")
    except Exception as e:  # a failure nobody anticipated is still recorded, not raised
        return DecodeResult(req.key, stage="decode", error=f"{type(e).__name__}: {_first_line(e)}")


def _decode_fetched(req: DecodeRequest) -> DecodeResult:
    """decode_video of an object in a bucket: fetched (stage `missing` or `fetch` when it cannot be), decoded
    as a local file; the failures name the URL, not the temporary file."""
    from dataclasses import replace

    from .fetch import FetchError, fetched
    try:
        with fetched(req.path) as local:
            res = decode_video(replace(req, path=local))
    except FetchError as e:
        return DecodeResult(req.key, stage=e.stage, error=e.message)
    except MemoryError as e:
        return DecodeResult(req.key, stage="memory", error=f"fetching {req.path}: {_first_line(e)}")
    except Exception as e:  # a failure nobody anticipated is still recorded, not raised
        return DecodeResult(req.key, stage="fetch", error=f"{req.path}: {type(e).__name__}: {_first_line(e)}")
    if res.error:
        res.error = res.error.replace(local, req.path)
    return res


def _memory_limit() -> str:
    import resource
    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return "" if soft == resource.RLIM_INFINITY else f" ({soft / 2**30:.3g} GiB, CACHEFEAT_DECODE_MEMORY)"


def _view_frames(req: DecodeRequest, n: int) -> list[tuple[np.ndarray, np.ndarray | None, np.random.Generator | None]]:
    """Per view: backbone frame indices, pixel frame indices, and (training views) the view's generator,
    whose later draws choose the crop. Test view v = temporal k * S + spatial s."""
    out = []
    for v in range(req.num_views):
        if req.augment:
            rng = np.random.default_rng([req.augment.seed, req.key, v])
            idx = clip_indices(n, req.frames, req.sampling, rng=rng)
        else:
            rng = None
            idx = clip_indices(n, req.frames, req.sampling, v // req.views.spatial, req.views.temporal)
        pix = pixel_indices(idx, n, req.pixels.factor) if req.pixels else None
        out.append((idx, pix, rng))
    return out


def _decode_with(reader, req: DecodeRequest) -> DecodeResult:
    n = reader.num_frames
    for _ in range(2):
        plans = _view_frames(req, n)
        unique = np.unique(np.concatenate([np.concatenate([i, p]) if p is not None else i for i, p, _ in plans]))
        try:
            decoded = reader.get(unique)
            break
        except ShortStream as e:  # truncated: the frames that decode are the video
            n = e.frames
        except (DecodeError, MemoryError):
            raise
        except Exception as e:  # decord.DECORDError, av.error.*: the reader's own types
            raise DecodeError("decode", f"{reader.name}: {type(e).__name__}: {_first_line(e)}") from None
    else:
        raise DecodeError("decode", f"{reader.name}: the stream ended early twice")
    if decoded.ndim != 4 or decoded.shape[-1] != 3 or decoded.shape[0] != len(unique):
        raise DecodeError("decode", f"{reader.name} returned frames of shape {decoded.shape}")
    frame_idx = np.stack([p[0] for p in plans]).astype(np.int32)
    small_idx = np.stack([p[1] for p in plans]).astype(np.int32) if req.pixels else None
    try:
        stamps = reader.times(unique)
    except Exception:   # a reader that cannot say: the cache records NaN (unknown)
        stamps = np.full(len(unique), np.nan)
    time = stamps[np.searchsorted(unique, frame_idx)]
    if req.raw and not req.augment:
        return DecodeResult(req.key, frame_idx=frame_idx, small_idx=small_idx, decoded=decoded, decoded_idx=unique,
                            num_frames=n, reader=reader.name, time=time)
    frames = {int(u): decoded[j] for j, u in enumerate(unique)}
    height, width = decoded.shape[1:3]
    try:
        view_crops: dict[int, list[np.ndarray]] = {}   # frame -> its S test crops, computed once

        def test_crop(i: int, s: int) -> np.ndarray:
            if i not in view_crops:
                view_crops[i] = crops(frames[i], req.prep, req.views.spatial)
            return view_crops[i][s]

        pixels, small_frames, aug_params = [], [], []
        for v, (idx, pix, rng) in enumerate(plans):
            if req.augment:
                params = draw_augmentation(rng, width, height, req.augment)
                aug_params.append(params)
                def view_crop(i, p=params):
                    return augmented_crop(frames[i], req.prep, p)
            else:
                def view_crop(i, s=v % req.views.spatial):
                    return test_crop(i, s)
            done = {int(i): view_crop(int(i)) for i in np.unique(idx)}
            pixels.append(np.stack([done[int(i)] for i in idx]))
            if pix is not None:
                small_frames.append(np.stack([small(done[int(i)] if int(i) in done else view_crop(int(i)),
                                                    req.pixels.size) for i in pix]))
    except Exception as e:
        raise DecodeError("preprocess", f"{type(e).__name__}: {_first_line(e)}") from None
    res = DecodeResult(req.key, pixels=np.stack(pixels), frame_idx=frame_idx, num_frames=n, reader=reader.name,
                       augment=aug_params or None, small_idx=small_idx, time=time)
    if req.pixels:
        res.small = np.stack(small_frames)
    return res


def _decode_windows(reader, req: DecodeRequest) -> DecodeResult:
    """fps sampling: the request's windows, each frame the one nearest its sample's time (reader.frames_at:
    each chosen frame decoded and cropped once). Samples past the end of the stream (a header that promised
    more) count as padding; a window left with no real sample holds no frame and says why."""
    first, count = req.windows
    s = req.sampling
    k, real = window_samples(first, count, req.samples, req.frames, s.window_stride)
    ks = np.unique(k)
    try:
        got = reader.frames_at(req.start + ks / s.fps)
    except (DecodeError, MemoryError):
        raise
    except Exception as e:  # decord.DECORDError, av.error.*: the reader's own types
        raise DecodeError("decode", f"{reader.name}: {type(e).__name__}: {_first_line(e)}") from None
    pos = np.searchsorted(ks, k)                                   # (windows, T) into ks
    past = got.past[pos] | (np.arange(req.frames)[None, :] >= real[:, None])
    valid = (~past).sum(axis=1).astype(np.int16)                   # past samples are a suffix of each window
    last = np.maximum(valid.astype(np.int64) - 1, 0)
    cols = np.minimum(np.arange(req.frames)[None, :], last[:, None])
    k = np.take_along_axis(k, cols, axis=1)                        # padding repeats the last real sample
    pick = got.pick[np.searchsorted(ks, k)]                        # (windows, T) into got.frames
    time = got.time[pick]
    end = req.start + ks[~got.past].max(initial=-1) / s.fps
    errors = ["" if v else f"decode: the stream ends at about {end:.2f} s, before this window (its header "
                           f"promised {req.samples / s.fps:.2f} s)" for v in valid]
    n = len(got.frames)
    if req.raw:
        return DecodeResult(req.key, frame_idx=k.astype(np.int32), time=time, valid_frames=valid,
                            window_errors=errors, decoded=got.frames, decoded_idx=np.arange(n), pick=pick,
                            num_frames=reader.num_frames, reader=reader.name)
    try:
        cropped = np.stack([crops(f, req.prep, 1)[0] for f in got.frames])
    except Exception as e:
        raise DecodeError("preprocess", f"{type(e).__name__}: {_first_line(e)}") from None
    return DecodeResult(req.key, pixels=cropped[pick], frame_idx=k.astype(np.int32), time=time, valid_frames=valid,
                        window_errors=errors, num_frames=reader.num_frames, reader=reader.name)
