"""The small spec languages of the CLI (--layers, --tokens, --views, --sampling), parsed once into values.

Each parser raises SpecError with a one-line message that says what is accepted; the CLI turns it into a
usage error. The parsed values are plain dataclasses that serialise to the cache metadata and back.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass


class SpecError(ValueError):
    """A spec string that cannot be parsed or does not fit the model."""


# --------------------------------------------------------------------------------------------- layers
def parse_layers(spec: str, depth: int) -> list[int]:
    """`all`, `last:K` or `i,j,k` (negative indices count from the end) -> sorted block indices.

    Layer i is the output of the visual transformer's block i (0-indexed): the raw residual stream,
    before ln_post, CLS at position 0.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(depth))
    m = re.fullmatch(r"last:(\d+)", spec)
    if m:
        k = int(m.group(1))
        if not 1 <= k <= depth:
            raise SpecError(f"--layers last:{k}: K must be between 1 and {depth} for this model ({depth} blocks)")
        return list(range(depth - k, depth))
    try:
        raw = [int(p) for p in spec.split(",") if p.strip() != ""]
    except ValueError:
        raise SpecError(f"--layers {spec!r}: expected all, last:K or a comma list of block indices "
                        f"like 3,7,11") from None
    if not raw:
        raise SpecError("--layers is empty: expected all, last:K or a comma list of block indices")
    out = set()
    for i in raw:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise SpecError(f"--layers: block index {i} is out of range; this model has blocks 0..{depth - 1} "
                            f"(or -{depth}..-1)")
        out.add(j)
    return sorted(out)


# --------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class TokenSpec:
    """What is kept of each tapped layer's tokens. CLS is always kept (array `cls`).

    kind: "cls"    -> only the class token;
          "all"    -> also every patch token (grid = the model's patch grid);
          "pooled" -> also the patch grid average-pooled to `grid` (adaptive average pooling).
    """
    kind: str
    grid: tuple[int, int] | None = None

    @property
    def num_patch_tokens(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    def __str__(self) -> str:
        if self.kind == "pooled":
            return f"pooled:{self.grid[0]}x{self.grid[1]}"
        return self.kind

    def to_dict(self) -> dict:
        return {"kind": self.kind, "grid": list(self.grid) if self.grid else None}

    @classmethod
    def from_dict(cls, d: dict) -> TokenSpec:
        return cls(d["kind"], tuple(d["grid"]) if d.get("grid") else None)


def parse_tokens(spec: str, patch_grid: tuple[int, int]) -> TokenSpec:
    spec = spec.strip().lower()
    if spec == "cls":
        return TokenSpec("cls", None)
    if spec == "all":
        return TokenSpec("all", tuple(patch_grid))
    m = re.fullmatch(r"pooled:(\d+)x(\d+)", spec)
    if m:
        h, w = int(m.group(1)), int(m.group(2))
        if not (1 <= h <= patch_grid[0] and 1 <= w <= patch_grid[1]):
            raise SpecError(f"--tokens {spec}: the pooled grid must be between 1x1 and the model's patch grid "
                            f"{patch_grid[0]}x{patch_grid[1]}")
        return TokenSpec("pooled", (h, w))
    raise SpecError(f"--tokens {spec!r}: expected cls, all or pooled:HxW (e.g. pooled:4x4)")


# --------------------------------------------------------------------------------------------- views
SPATIAL_CROPS = (1, 3)


@dataclass(frozen=True)
class ViewSpec:
    """Test views: `temporal` clips along time times `spatial` crops (1 = centre; 3 = both ends and centre of
    the longer side, the papers' three-crop protocol). View index = temporal_index * spatial + spatial_index."""
    temporal: int = 1
    spatial: int = 1

    @property
    def count(self) -> int:
        return self.temporal * self.spatial

    def __str__(self) -> str:
        return f"{self.temporal}x{self.spatial}"


def parse_views(spec: str) -> ViewSpec:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", spec.lower())
    if not m:
        raise SpecError(f"--views {spec!r}: expected TxS, temporal clips x spatial crops, e.g. 1x1, 3x1 or 4x3")
    t, s = int(m.group(1)), int(m.group(2))
    if t < 1:
        raise SpecError(f"--views {spec}: need at least one temporal clip")
    if s not in SPATIAL_CROPS:
        raise SpecError(f"--views {spec}: spatial crops must be 1 (centre) or 3 (three crops along the longer side)")
    return ViewSpec(t, s)


# --------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingSpec:
    """How the frames of one clip are chosen (see sampling.py).

    uniform   : TSN segments: the video is cut into `frames` equal segments, one frame from each.
    dense:S   : `frames` consecutive frames `S` apart (one clip of span (frames-1)*S+1).
    fps:F     : F frames per second of the video's own timeline (the frame nearest each time start + k/F,
                from the presentation timestamps), cut into windows of `frames` samples that start
                `window_stride` samples apart; every window is a clip row of its video.

    `frame_rate`: the rate of frame-folder inputs (their timestamps are index / frame_rate); recorded
    only when given.
    """
    method: str = "uniform"
    stride: int | None = None
    fps: float | None = None
    window_stride: int | None = None
    frame_rate: float | None = None

    @property
    def windowed(self) -> bool:
        return self.method == "fps"

    def __str__(self) -> str:
        if self.method == "fps":
            return f"fps:{self.fps:g}"
        return f"dense:{self.stride}" if self.method == "dense" else "uniform"

    def to_dict(self) -> dict:
        """The metadata's `sampling`: {method, stride}, plus fps and window_stride for fps sampling and
        frame_rate when given (so caches made before these existed keep their fingerprint)."""
        d = asdict(self)
        return {k: v for k, v in d.items() if k in ("method", "stride") or v is not None}


def parse_sampling(spec: str) -> SamplingSpec:
    spec = spec.strip().lower()
    if spec in ("uniform", "segments", "tsn"):
        return SamplingSpec("uniform", None)
    m = re.fullmatch(r"dense:(\d+)", spec)
    if m:
        stride = int(m.group(1))
        if stride < 1:
            raise SpecError("--sampling dense:STRIDE needs STRIDE >= 1")
        return SamplingSpec("dense", stride)
    m = re.fullmatch(r"fps:(\d+(?:\.\d*)?|\.\d+)", spec)
    if m:
        fps = float(m.group(1))
        if not 0.001 <= fps <= 1000:
            raise SpecError(f"--sampling {spec}: F must be between 0.001 and 1000 frames per second")
        return SamplingSpec("fps", None, fps)
    raise SpecError(f"--sampling {spec!r}: expected uniform, dense:STRIDE (e.g. dense:8) or fps:F (e.g. fps:1)")


def with_windows(sampling: SamplingSpec, frames: int, window_stride: int | None,
                 frame_rate: float | None = None) -> SamplingSpec:
    """The sampling with its window stride resolved (fps sampling; default: `frames`, windows side by side)
    and the frame folders' rate; SpecError (one line) for a stride that does not fit."""
    from dataclasses import replace
    if frame_rate is not None and not frame_rate > 0:
        raise SpecError(f"--frame-rate {frame_rate:g}: expected a positive number of frames per second")
    if not sampling.windowed:
        if window_stride is not None:
            raise SpecError("--window-stride applies to --sampling fps:F (windows of --frames samples)")
        return replace(sampling, frame_rate=frame_rate)
    stride = frames if window_stride is None else window_stride
    if not 1 <= stride <= frames:
        raise SpecError(f"--window-stride {stride}: expected 1 to --frames ({frames}); below --frames the "
                        f"windows overlap")
    return replace(sampling, window_stride=stride, frame_rate=frame_rate)


# --------------------------------------------------------------------------------------------- dtype
STORAGE_DTYPES = ("float16", "float32", "int8")


def parse_dtype(spec: str) -> str:
    spec = spec.strip().lower()
    aliases = {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    spec = aliases.get(spec, spec)
    if spec not in STORAGE_DTYPES:
        raise SpecError(f"--dtype {spec!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    return spec


# --------------------------------------------------------------------------------------------- pixels
@dataclass(frozen=True)
class PixelSpec:
    """Small frames kept beside the features for pixel-level temporal encoders (DiST): the model's crop
    resized to size x size, for `factor` times as many frames as the backbone sees."""
    size: int
    factor: int = 1

    def __str__(self) -> str:
        return f"{self.size}x{self.factor}" if self.factor != 1 else str(self.size)

    def to_dict(self) -> dict:
        return {"size": self.size, "factor": self.factor}


def parse_pixels(spec: str) -> PixelSpec:
    m = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+))?\s*", spec.lower())
    if not m:
        raise SpecError(f"--pixels {spec!r}: expected SIZE or SIZExK, e.g. 112 or 112x2 (K times the frames)")
    size, factor = int(m.group(1)), int(m.group(2) or 1)
    if not 8 <= size <= 1024:
        raise SpecError(f"--pixels {spec}: SIZE must be between 8 and 1024 pixels")
    if not 1 <= factor <= 8:
        raise SpecError(f"--pixels {spec}: K must be between 1 and 8")
    return PixelSpec(size, factor)


# --------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentSpec:
    """Random training views baked into a cache: each of `views` views of a video gets its own random
    frames (TSN jitter / random clip start), random-resized crop, optional flip, colour jitter and
    RandAugment, drawn from (seed, video, view), so the same seed reproduces them exactly. `flip_pairs`:
    class index pairs a horizontal flip turns into each other (SSv2's "left to right" / "right to left"):
    a flipped view of such a class trains as its partner."""
    views: int
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_jitter: tuple[float, float, float, float] | None = None   # brightness, contrast, saturation, hue
    seed: int = 0
    randaugment: str | None = None                                  # timm's config, e.g. rand-m7-n4-mstd0.5-inc1
    flip_pairs: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict:
        d = {"views": self.views, "scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip,
             "color_jitter": list(self.color_jitter) if self.color_jitter else None, "seed": self.seed}
        if self.randaugment:        # absent when off: caches written before these keys keep their fingerprint
            d["randaugment"] = self.randaugment
        if self.flip_pairs:
            d["flip_pairs"] = [list(p) for p in self.flip_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentSpec | None:
        if not d:
            return None
        cj = d.get("color_jitter")
        return cls(d["views"], tuple(d["scale"]), tuple(d["ratio"]), d["flip"], tuple(cj) if cj else None, d["seed"],
                   d.get("randaugment"), tuple(tuple(int(x) for x in p) for p in d.get("flip_pairs") or ()))

    def partner(self) -> dict[int, int]:
        """class -> the class its horizontal flip shows (both directions)."""
        out = {}
        for a, b in self.flip_pairs:
            out[a], out[b] = b, a
        return out


# DiST's SSv2 loader (dataset/base/base_dataset.py): a flipped clip of class 86 trains as 87 and so on
SSV2_FLIP_PAIRS = ((86, 87), (93, 94), (166, 167))


def parse_flip_pairs(text: str, classes: list[str] | None, where: str = "--flip-pairs") -> tuple[tuple[int, int], ...]:
    """A flip-pairs file: one pair per line, two class indices (`86 87`) or two class names separated by a
    tab; `#` starts a comment. Each class in at most one pair."""
    pairs, seen = [], set()
    names = {c: i for i, c in enumerate(classes or [])}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split("\t")] if "\t" in line else line.replace(",", " ").split()
        if len(parts) != 2:
            raise SpecError(f"{where} line {n}: expected two class indices (or two class names separated by a "
                            f"tab), got {raw.strip()!r}")
        pair = []
        for p in parts:
            if re.fullmatch(r"\d+", p):
                i = int(p)
                if classes is not None and not 0 <= i < len(classes):
                    raise SpecError(f"{where} line {n}: class {i} is not in the class list (0..{len(classes) - 1})")
            elif p in names:
                i = names[p]
            else:
                raise SpecError(f"{where} line {n}: {p!r} is neither a class index nor a class name")
            pair.append(i)
        if pair[0] == pair[1] or seen & set(pair):
            raise SpecError(f"{where} line {n}: each class may appear in one pair only, with another class")
        seen |= set(pair)
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise SpecError(f"{where}: no pairs in the file")
    return tuple(pairs)


def parse_range(spec: str, name: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in spec.split(","))
    except ValueError:
        raise SpecError(f"{name} {spec!r}: expected two numbers, e.g. {lo},{hi}") from None
    if not (0 < a <= b):
        raise SpecError(f"{name} {spec}: expected 0 < MIN <= MAX")
    return a, b


def parse_color_jitter(spec: str) -> tuple[float, float, float, float]:
    try:
        vals = [float(x) for x in spec.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or any(v < 0 for v in vals) or vals[3] > 0.5:
        raise SpecError(f"--color-jitter {spec!r}: expected brightness,contrast,saturation,hue, e.g. 0.4,0.4,0.2,0.1 "
                        f"(hue at most 0.5)")
    return tuple(vals)
