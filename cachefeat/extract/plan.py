"""Stage one's settings and planning: what goes into a cache (ExtractSettings), the one planner of its
arrays and shards (`plan_layout`, shared by `extract` and `--dry-run`), and the metadata it records."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..fmt import human_bytes, table
from ..specs import AugmentSpec, PixelSpec, SamplingSpec, SpecError, ViewSpec, parse_layers, parse_tokens
from ..store import DEFAULT_CODEC, Layout
from .backbone import Backbone, model_geometry
from .manifest import Manifest, is_url
from .sampling import sample_count, window_count
from .video import DecodeError, probe

INT8_HEADROOM = 1.1      # int8 step = headroom * max|x| / 127 over the calibration videos

SHORT_VIDEO_POLICY = ("uniform: frames repeat in order when the video has fewer frames than segments; "
                      "dense: the clip starts at frame 0 and indices past the end repeat the last frame; "
                      "fps: a video gets at least one window; samples past its last one repeat it "
                      "(clips/valid_frames counts the real ones)")
TIME_DEFINITION = ("clips/time: each frame's presentation time in seconds on its video's own timeline (pts x "
                   "time_base, as PyAV's frame.time; decord's timestamps when decord read it; a frame folder's "
                   "index / --frame-rate, NaN without one); fps: sample k is the frame nearest start + k / fps")
LAYER_DEFINITION = ("layer i = output of image-tower block i (0-indexed), the residual stream before the final "
                    "norm; cls holds, per layer, what model.cls says (the class token, or the mean of the patch "
                    "tokens), tokens/<i> its patch tokens (class and register tokens excluded); embed = the "
                    "tower's pooled output (open_clip: encode_image, not L2-normalised; timm: pre-logits features)")


@dataclass
class ExtractSettings:
    """Everything about what goes into the cache (not how fast): the CLI's options."""
    model: str = "ViT-B/16"
    pretrained: str = "none"
    layers: str = "all"
    tokens: str = "cls"
    frames: int = 8
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    views: ViewSpec = field(default_factory=ViewSpec)
    dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    shard_size: int | None = None      # clips per shard; None = automatic
    seed: int = 0                      # random-init seed for pretrained=none
    quick_gelu: bool | None = None
    trust_pretrained: bool = False     # a --pretrained file may be unpickled in full (runs its code)
    device: str = "auto"
    precision: str = "auto"
    pixels: PixelSpec | None = None        # also keep small frames (DiST-style pixel encoders)
    augment: AugmentSpec | None = None     # random training views instead of the test views
    text: bool = True                      # class-name text embeddings, when the model has a text tower
    text_template: str = "{}"
    int8_calibration_videos: int = 32

    @property
    def cache_views(self) -> ViewSpec:
        """The views each video gets in the cache: K augmented views with --aug-views, else --views."""
        return ViewSpec(self.augment.views, 1) if self.augment else self.views


@dataclass
class Timeline:
    """fps sampling: every video's timeline from its header (start and duration, seconds; NaN where the
    probe failed: the video then gets one window and its decoding says why), its samples and windows."""
    start: np.ndarray
    duration: np.ndarray
    samples: np.ndarray
    windows: np.ndarray
    problems: list[str]           # per video: why its probe failed ("" when it did not)

    @property
    def hours(self) -> float:
        return float(np.nansum(self.duration)) / 3600

    def arrays(self) -> dict[str, np.ndarray]:
        return {"start": self.start, "duration": self.duration}


REMOTE_PROBES = 32                    # headers probed at once when the input lists videos in a bucket
_PROBES: dict[tuple, object] = {}     # (path, size, mtime, rate) -> Probe or DecodeError: dry run, plan and
                                      # free-space check probe each file once per process


def _probe(path: str, frame_rate: float | None):
    try:
        # an object in a bucket is probed once per process under its URL
        st = None if is_url(path) else os.stat(path)
        key = (path, frame_rate) if st is None else (path, st.st_size, st.st_mtime_ns, frame_rate)
    except OSError:
        key = None
    if key is None or key not in _PROBES:
        try:
            got = probe(path, frame_rate)
        except DecodeError as e:
            got = e
        except Exception as e:     # a reader's own error type: the decode will meet it too
            got = DecodeError("open", f"{type(e).__name__}: {e}")
        if key is None:
            return got
        _PROBES[key] = got
    return _PROBES[key]


def probe_timeline(settings: ExtractSettings, manifest: Manifest, threads: int = 8) -> Timeline:
    """fps sampling: read every video's duration from its header (PyAV; decord's index where PyAV cannot
    open it; a frame folder's count / --frame-rate; a bucket video's header through a few ranged GETs), a few
    files at a time in threads: about a millisecond per local file, no decoding. The number of windows, hence
    the cache's rows and shards, follows from it, so --dry-run and extract (and a resumed extract) announce and
    write the same cache."""
    from concurrent.futures import ThreadPoolExecutor
    s, videos = settings.sampling, manifest.videos
    if any(is_url(v.path) for v in videos):
        threads = max(threads, REMOTE_PROBES)      # a bucket's headers: a few ranged GETs each, latency-bound
    if not s.frame_rate:
        folders = sum(1 for v in videos if not v.problem and os.path.isdir(v.path))
        if folders:
            raise SpecError(f"the input lists {folders} frame folder{'s' * (folders > 1)}: --sampling fps needs "
                            f"--frame-rate (the rate the frames were extracted at) for their timestamps")
    with ThreadPoolExecutor(max(1, threads)) as ex:
        found = list(ex.map(lambda v: _probe(v.path, s.frame_rate) if not v.problem else None, videos))
    start = np.array([f.start if f is not None and not isinstance(f, DecodeError) else 0.0 for f in found])
    duration = np.array([f.duration if f is not None and not isinstance(f, DecodeError) else np.nan for f in found])
    samples = np.array([sample_count(d, s.fps) for d in duration], dtype=np.int64)
    windows = np.array([window_count(n, settings.frames, s.window_stride) for n in samples], dtype=np.int64)
    problems = [f"{f.stage}: {f.message}" if isinstance(f, DecodeError) else "" for f in found]
    return Timeline(start, duration, samples, windows, problems)


@dataclass
class Plan:
    """A resolved extraction: store layout and metadata, ready to create or resume (`timeline`: fps
    sampling's per-video start and duration, written with the store)."""
    layout: Layout
    meta: dict
    manifest: Manifest
    timeline: Timeline | None = None


def auto_shard_videos(bytes_per_clip: int, views: int, requested_clips: int | None, num_videos: int) -> int:
    """Videos per shard. Default: 64 clips, fewer when a clip is big (a shard is assembled in RAM: keep it
    under ~1 GiB)."""
    if requested_clips is not None:
        clips = requested_clips
    else:
        clips = max(1, min(64, (1 << 30) // max(bytes_per_clip, 1)))
    return max(1, min(num_videos, clips // views if clips >= views else 1))


def plan_layout(settings: ExtractSettings, num_videos: int, depth: int, patch_grid, width: int,
                embed_dim: int, timeline: Timeline | None = None) -> Layout:
    """The one planner of a cache's arrays and shards, from the model's geometry: `extract` (with the
    backbone built) and `--dry-run` (from the model's config alone) both call it, so they cannot disagree.
    fps sampling needs the `timeline` (probe_timeline): each video gets as many clip rows as it has windows,
    and a shard is `--shard-size` rows, whichever videos they belong to."""
    views = settings.cache_views
    windowed = settings.sampling.windowed
    if windowed:
        check_windowed(settings)
        if timeline is None or len(timeline.windows) != num_videos:
            raise ValueError("fps sampling plans from the videos' timeline (probe_timeline)")
    base = Layout(num_videos=num_videos, views=views, frames=settings.frames,
                  layers=tuple(parse_layers(settings.layers, depth)),
                  tokens=parse_tokens(settings.tokens, tuple(patch_grid)), width=width, embed_dim=embed_dim,
                  dtype=settings.dtype, shard_videos=1, pixels=settings.pixels, augmented=bool(settings.augment),
                  time=True)
    per_clip = sum(base.bytes_per_clip().values())
    if windowed:
        counts = tuple(int(w) for w in timeline.windows)
        clips = auto_shard_videos(per_clip, 1, settings.shard_size, sum(counts))
        return replace(base, shard_videos=0, clip_counts=counts, shard_clips=clips)
    return replace(base, shard_videos=auto_shard_videos(per_clip, views.count, settings.shard_size, num_videos))


def check_windowed(settings: ExtractSettings) -> None:
    """What fps sampling cannot be combined with (SpecError, one line)."""
    if settings.views.count != 1:
        raise SpecError(f"--views {settings.views}: with --sampling fps the windows are the clips of a video; "
                        f"use --views 1x1")
    if settings.augment:
        raise SpecError("--aug-views draws random clips per video; --sampling fps covers every video with "
                        "windows: choose one")
    if settings.pixels:
        raise SpecError("--pixels is not available with --sampling fps")


def plan(settings: ExtractSettings, manifest: Manifest, backbone: Backbone) -> Plan:
    backbone.preprocessing.check_spatial_views(settings.views.spatial)
    timeline = None
    if settings.sampling.windowed:
        check_windowed(settings)      # before probing every file
        timeline = probe_timeline(settings, manifest)
    layout = plan_layout(settings, len(manifest.videos), backbone.depth, backbone.patch_grid, backbone.width,
                         backbone.embed_dim, timeline)
    layers, tokens, views = list(layout.layers), layout.tokens, layout.views
    meta = {
        "tool": "cachefeat", "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": backbone.describe(), "layers": list(layers), "tokens": tokens.to_dict(), "dtype": settings.dtype,
        "frames": settings.frames, "sampling": settings.sampling.to_dict(),
        "views": {"temporal": views.temporal, "spatial": views.spatial},
        "preprocessing": backbone.preprocessing.to_dict(), "compute_precision": backbone.precision,
        "classes": manifest.classes,
        "source": {"format": manifest.format, "sha256": manifest.sha256, "num_videos": len(manifest.videos)},
        "source_path": manifest.source, "short_video_policy": SHORT_VIDEO_POLICY,
        "layer_definition": LAYER_DEFINITION, "time_definition": TIME_DEFINITION,
        "pixels": settings.pixels.to_dict() if settings.pixels else None,
        "augment": settings.augment.to_dict() if settings.augment else None,
        "text": None,
        "quantization": None,
    }
    if settings.text and manifest.classes and backbone.has_text_tower:
        backbone.tokenizer()     # one that cannot load fails here, before a store exists
        meta["text"] = {"template": settings.text_template,
                        "prompts": [settings.text_template.format(c) for c in manifest.classes]}
    if settings.dtype == "int8":
        meta["quantization"] = {"method": "symmetric per-channel int8", "headroom": INT8_HEADROOM,
                                "calibration_videos": settings.int8_calibration_videos,
                                "rule": "value = int8 * step; step = headroom * max|x| / 127 per layer and channel "
                                        "over the calibration videos (evenly spaced in the manifest); larger values "
                                        "saturate at +-127"}
    return Plan(layout, meta, manifest, timeline)


class SpaceError(ValueError):
    """The cache would not fit where it is to be written (a usage error: one line, exit status 2)."""


@dataclass
class SizeEstimate:
    """A cache's size before it is written, from the model's config alone (nothing is loaded): the planned
    layout, the model's geometry, the uncompressed bytes of each array per clip, and the text embeddings."""
    layout: Layout
    geometry: dict
    per_clip: dict[str, int]
    text_bytes: int
    timeline: Timeline | None = None

    @property
    def total(self) -> int:
        """Uncompressed bytes of the whole cache's features (what lossless codecs barely shrink)."""
        return sum(self.per_clip.values()) * self.layout.num_clips + self.text_bytes


def estimate_size(settings: ExtractSettings, manifest: Manifest) -> SizeEstimate:
    """The size of the cache these settings make of this manifest: `plan_layout` (the planner extract uses)
    on the model's geometry read from its config."""
    geo = model_geometry(settings.model)
    if settings.sampling.windowed:
        check_windowed(settings)      # before probing every file
    timeline = probe_timeline(settings, manifest) if settings.sampling.windowed else None
    layout = plan_layout(settings, len(manifest.videos), geo["depth"], geo["patch_grid"], geo["width"],
                         geo["embed_dim"], timeline)
    text = len(manifest.classes) * geo["embed_dim"] * 4 if settings.text and manifest.classes and geo["text"] else 0
    return SizeEstimate(layout, geo, layout.bytes_per_clip(), text, timeline)


@dataclass
class SpaceCheck:
    needed: int          # the whole cache, uncompressed estimate
    free: int            # free bytes of the file system that holds the target folder
    existing: int        # bytes of the store already at the target (resumed, or replaced with --overwrite)
    where: Path          # the existing folder whose file system was measured

    @property
    def fits(self) -> bool:
        return self.needed <= self.free + self.existing

    def describe(self) -> str:
        return (f"estimated cache size {human_bytes(self.needed)} (uncompressed features; --dry-run itemises), "
                f"{human_bytes(self.free)} free in {self.where}"
                + (f" (+{human_bytes(self.existing)} already in the store)" if self.existing else ""))


def check_free_space(estimate: SizeEstimate, out: str | os.PathLike, ignore: bool = False) -> SpaceCheck:
    """Does the cache fit on the file system of `out`? Its estimated size against the free space there plus
    what a store already at `out` takes (resumed: already written; --overwrite: freed first). Raises
    SpaceError (one line) when it does not, unless `ignore`."""
    target = Path(out).absolute()
    where = target
    while not where.exists():
        where = where.parent
    existing = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if target.is_dir() else 0
    check = SpaceCheck(estimate.total, shutil.disk_usage(where).free, existing, where)
    if not check.fits and not ignore:
        raise SpaceError(f"--out {out}: the cache needs about {human_bytes(check.needed)} and {where} has "
                         f"{human_bytes(check.free)} free" + (f" (+{human_bytes(existing)} in the store)" if existing
                                                              else "")
                         + "; keep fewer layers or tokens (--dry-run shows the sizes), write elsewhere, "
                           "or pass --ignore-free-space")
    return check


def dry_run_report(settings: ExtractSettings, manifest: Manifest) -> str:
    """What the cache will hold and take on disk, from the model's config alone (nothing is loaded)."""
    est = estimate_size(settings, manifest)
    geo, layout, per_clip = est.geometry, est.layout, est.per_clip
    C, T, layers = layout.num_clips, layout.frames, layout.layers
    groups: dict[str, int] = {}
    for name, b in per_clip.items():
        key = f"tokens/<layer> x{len(layers)}" if name.startswith("tokens/") else name
        groups[key] = groups.get(key, 0) + b
    rows = [[k, human_bytes(b / T), human_bytes(b * C)] for k, b in groups.items()]
    total = sum(per_clip.values())
    if est.text_bytes:
        rows.append([f"text/embed ({len(manifest.classes)} classes)", "-", human_bytes(est.text_bytes)])
    rows.append(["total", human_bytes(total / T), human_bytes(est.total)])
    head = (f"dry run: {geo['name']} ({geo['depth']} blocks, width {geo['width']}, patch grid "
            f"{geo['patch_grid'][0]}x{geo['patch_grid'][1]}), layers "
            f"{list(layers) if len(layers) < 8 else settings.layers}, tokens {layout.tokens}, {settings.dtype}\n")
    tl = est.timeline
    if tl is not None:
        s = settings.sampling
        unknown = int(np.isnan(tl.duration).sum())
        head += (f"{layout.num_videos} videos, {tl.hours:.2f} h of video (durations from the headers"
                 + (f"; {unknown} could not be probed, one window each" if unknown else "") + f") at {s} = "
                 f"{int(tl.samples.sum())} samples in {C} windows of {T} frames, {s.window_stride} apart = "
                 f"{C * T} frames; shards of {layout.shard_rows} clips ({layout.num_shards} shards)")
    else:
        head += (f"{layout.num_videos} videos x {layout.views.count} {'augmented ' if settings.augment else ''}"
                 f"views = {C} clips x {T} frames = {C * T} frames; shards of {layout.shard_rows} clips "
                 f"({layout.num_shards} shards)")
    note = ("uncompressed sizes; lossless compression of float16 features saves little (about 1.1x measured), "
            "so expect close to this on disk")
    return "\n".join([head, table(rows, ["array", "per frame", "whole cache"]), note])
