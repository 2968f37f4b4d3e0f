"""Which source frames each clip (view) uses.

Deterministic test views by default; `rng` draws the random training variant (TSN: a random frame inside
each segment; dense: a random clip start), used for augmented views.

Short-video policy (documented in the README): a clip never fails because the video is short.
- uniform: with fewer frames than segments, segments share frames, so frames repeat in temporal order
  (e.g. 3 frames, 8 segments -> 0 0 0 1 1 2 2 2).
- dense:S: when the video is shorter than the clip span, the clip starts at frame 0 and indices past the
  end are clamped to the last frame (the last frame repeats).
A video with zero decodable frames is a failure.
"""
from __future__ import annotations

import math

import numpy as np

from ..specs import SamplingSpec


def clip_indices(num_frames: int, frames: int, sampling: SamplingSpec, view: int = 0, num_views: int = 1,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices (int64, length `frames`, non-decreasing) of temporal view `view` of `num_views`."""
    if num_frames < 1:
        raise ValueError("a video with no frames cannot be sampled")
    if not 0 <= view < num_views:
        raise ValueError(f"view {view} out of range for {num_views} views")
    if sampling.method == "uniform":
        return _uniform(num_frames, frames, view, num_views, rng)
    if sampling.method == "dense":
        return _dense(num_frames, frames, sampling.stride, view, num_views, rng)
    raise ValueError(f"unknown sampling method {sampling.method!r}")


def _uniform(n: int, t: int, view: int, views: int, rng) -> np.ndarray:
    seg = n / t
    if rng is not None:
        offset = rng.random(t)                 # one random position inside every segment (TSN training)
    else:
        offset = np.full(t, (view + 0.5) / views)  # views spread evenly inside the segments
    idx = np.floor(seg * (np.arange(t) + offset)).astype(np.int64)
    return np.clip(idx, 0, n - 1)


def _dense(n: int, t: int, stride: int, view: int, views: int, rng) -> np.ndarray:
    span = (t - 1) * stride + 1
    room = max(n - span, 0)
    if rng is not None:
        start = int(rng.integers(0, room + 1))
    elif views == 1:
        start = room // 2                       # centre clip
    else:
        start = int(round(view * room / (views - 1)))  # clips spread from the start to the end
    idx = start + stride * np.arange(t, dtype=np.int64)
    return np.clip(idx, 0, n - 1)


def pixel_indices(idx: np.ndarray, num_frames: int, factor: int) -> np.ndarray:
    """The `factor` x denser frames for pixel-level encoders, aligned with the backbone's frames `idx`:
    pixel frame factor*t is backbone frame t, and the factor-1 after it sit evenly in the gap before the
    next backbone frame (after the last one, the previous gap is reused; past the end, the last frame)."""
    idx = np.asarray(idx, dtype=np.int64)
    if factor == 1:
        return idx.copy()
    gaps = np.diff(idx)
    last_gap = gaps[-1] if len(gaps) else 1
    gaps = np.append(gaps, last_gap)
    steps = np.arange(factor)
    out = idx[:, None] + (gaps[:, None] * steps[None, :]) // factor
    return np.clip(out.reshape(-1), 0, num_frames - 1)


# ------------------------------------------------------------------------------------------- fps windows
# fps:F. Sample k of a video is taken at time start + k / F on the video's own timeline (start = its first
# frame's presentation time), for every k with k / F < duration: ceil(duration * F) samples. The frame each
# sample shows is the one whose presentation time is nearest (ties: the earlier), as FFmpeg's fps filter
# does, so a video's frame rate may vary. Windows of T samples start every S samples (S = T: side by side;
# S < T: they overlap) until one reaches the last sample; samples past the last one repeat it (padding,
# counted in clips/valid_frames).
_EPS = 1e-6


def sample_count(duration: float, fps: float) -> int:
    """Samples of a video of `duration` seconds at `fps` (at least one)."""
    if not duration > 0:
        return 1
    return max(1, math.ceil(duration * fps - _EPS))


def window_count(samples: int, frames: int, stride: int) -> int:
    """Windows of `frames` samples, `stride` apart, that cover `samples` samples."""
    return 1 + max(0, -(-(samples - frames) // stride))


def window_samples(first: int, count: int, samples: int, frames: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices (count, frames) of windows first .. first+count-1, padded by repeating each window's
    last real sample, and the number of real samples of each window (count,)."""
    start = (first + np.arange(count, dtype=np.int64)) * stride
    idx = start[:, None] + np.arange(frames, dtype=np.int64)[None, :]
    real = np.clip(samples - start, 0, frames)
    last = start + np.maximum(real, 1) - 1
    return np.minimum(idx, last[:, None]), real.astype(np.int16)
