"""Video readers and the per-video decode step that decode workers run.

A reader opens one file and returns RGB frames for a list of indices. Readers are pluggable through
READERS; `auto` tries decord first (fast random access) and falls back to PyAV, which opens what decord
cannot (odd pixel formats, some containers). Add a reader (a GPU decoder, say) by registering a class
with `name`, `num_frames` and `get(indices)`.

decode_video() never raises: it returns a DecodeResult whose `error`/`stage` say what went wrong, so one bad
file is recorded and the extraction goes on. This module imports neither torch nor open_clip: it runs in
light worker processes (decode_pool.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..specs import AugmentSpec, PixelSpec, SamplingSpec, ViewSpec
from .preprocess import Preprocessing, augmented_crop, crops, draw_augmentation, small
from .sampling import clip_indices, pixel_indices


class DecodeError(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage, self.message = stage, message


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
        return self._vr.get_batch([int(i) for i in indices]).asnumpy()


class PyAVReader:
    """Sequential decode with PyAV (FFmpeg's own libraries, shipped in the wheel). Slower than decord for
    sparse sampling of long videos, but opens nearly anything FFmpeg can."""
    name = "pyav"

    def __init__(self, path: str):
        import av
        self._path = path
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError("open", "the file has no video stream")
            stream = container.streams.video[0]
            n = stream.frames
            if n <= 0:  # not in the header: count packets that carry a frame
                n = sum(1 for p in container.demux(stream) if p.size > 0)
        self.num_frames = int(n)

    def get(self, indices: np.ndarray) -> np.ndarray:
        import av
        wanted = sorted(set(int(i) for i in indices))
        got: dict[int, np.ndarray] = {}
        last = None
        with av.open(self._path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                last = i
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
        if last is None:
            raise DecodeError("decode", "no frame could be decoded")
        if last < wanted[-1]:  # the header promised more frames than the stream holds
            raise ShortStream(last + 1)
        return np.stack([got[int(i)] for i in indices])


READERS = {"decord": DecordReader, "pyav": PyAVReader}
READER_CHOICES = ("auto", *READERS)


def open_video(path: str, reader: str = "auto"):
    """Open with the named reader; `auto` = decord, then PyAV when decord fails."""
    if not os.path.exists(path):
        raise DecodeError("missing", f"no such file: {path}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DecodeError("open", "the file is empty (0 bytes)")
    if os.path.isfile(path) and _is_text(path):
        # FFmpeg would "decode" it with its tty demuxer, rendering the characters as frames
        raise DecodeError("open", "this is a text file, not a video")
    order = list(READERS) if reader == "auto" else [reader]
    errors = []
    for name in order:
        try:
            r = READERS[name](path)
            if r.num_frames < 1:
                raise DecodeError("empty", "the video has no frames")
            return r
        except DecodeError as e:
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

    @property
    def num_views(self) -> int:
        return self.augment.views if self.augment else self.views.count


@dataclass
class DecodeResult:
    key: int
    pixels: np.ndarray | None = None      # (views, frames, h, w, 3) uint8, view = temporal * S + spatial
    frame_idx: np.ndarray | None = None   # (views, frames) int32 source frame indices
    small: np.ndarray | None = None       # (views, frames*K, s, s, 3) uint8 when pixels were asked for
    small_idx: np.ndarray | None = None   # (views, frames*K) int32
    decoded: np.ndarray | None = None     # raw requests: (U, H, W, 3) uint8, each frame any view uses, once
    decoded_idx: np.ndarray | None = None  # (U,) their indices, ascending
    augment: list | None = None           # per view: the augmentation parameters drawn
    num_frames: int = 0
    reader: str = ""
    stage: str | None = None              # where it failed: missing/open/empty/decode/preprocess/timeout/crash
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def decode_video(req: DecodeRequest) -> DecodeResult:
    """Decode each needed frame once, for all views, then crop. Never raises."""
    try:
        reader = open_video(req.path, req.reader)
        try:
            return _decode_with(reader, req)
        except DecodeError as e:
            # decord may open a file it then cannot decode; give PyAV its chance before recording a failure
            if e.stage != "decode" or req.reader != "auto" or reader.name == "pyav":
                raise
            try:
                return _decode_with(PyAVReader(req.path), req)
            except DecodeError as e2:
                raise DecodeError(e2.stage, f"{e.message}; pyav: {e2.message}") from None
            except Exception as e2:
                raise DecodeError("decode", f"{e.message}; pyav: {type(e2).__name__}: {_first_line(e2)}") from None
    except DecodeError as e:
        return DecodeResult(req.key, stage=e.stage, error=e.message)
    except Exception as e:  # a failure nobody anticipated is still recorded, not raised
        return DecodeResult(req.key, stage="decode", error=f"{type(e).__name__}: {_first_line(e)}")


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
        except DecodeError:
            raise
        except Exception as e:  # decord.DECORDError, av.error.*: the reader's own types
            raise DecodeError("decode", f"{reader.name}: {type(e).__name__}: {_first_line(e)}") from None
    else:
        raise DecodeError("decode", f"{reader.name}: the stream ended early twice")
    if decoded.ndim != 4 or decoded.shape[-1] != 3 or decoded.shape[0] != len(unique):
        raise DecodeError("decode", f"{reader.name} returned frames of shape {decoded.shape}")
    frame_idx = np.stack([p[0] for p in plans]).astype(np.int32)
    small_idx = np.stack([p[1] for p in plans]).astype(np.int32) if req.pixels else None
    if req.raw and not req.augment:
        return DecodeResult(req.key, frame_idx=frame_idx, small_idx=small_idx, decoded=decoded, decoded_idx=unique,
                            num_frames=n, reader=reader.name)
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
                       augment=aug_params or None, small_idx=small_idx)
    if req.pixels:
        res.small = np.stack(small_frames)
    return res
