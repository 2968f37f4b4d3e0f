"""Geometric preprocessing of decoded frames: the model's own eval transform (open_clip's, or timm's data
config), minus ToTensor/Normalize.

It runs in the decode worker processes, which import neither torch nor open_clip, so it is written against
PIL and replicates torchvision's `Resize(int)` + `CenterCrop` arithmetic exactly (tests compare it with
open_clip's and timm's own transforms). timm's `crop_pct` resizes the shorter side to floor(size / crop_pct)
before the centre crop (`resize`; open_clip resizes it to the crop size). What leaves a worker is uint8
HxWx3 crops; scaling to [0, 1] and the mean/std normalisation happen on the compute device
(backbone.normalize), as ToTensor + Normalize would.

Spatial views: 1 = the centre crop (what open_clip does); 3 = crops at the start, centre and end of the
longer side after the shorter side is resized to the crop size (the papers' three-crop test protocol).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


@dataclass(frozen=True)
class Preprocessing:
    """The model's preprocessing settings, as open_clip's PreprocessCfg or timm's data config gives them.
    `resize`: the shorter side (squash: both sides) before the centre crop to `size`; None = the crop size."""
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    resize: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["resize"] is None:      # absent unless set: the metadata (and fingerprints) of earlier caches stay
            del d["resize"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bicubic"), resize_mode=d.get("resize_mode", "shortest"),
                   fill_color=d.get("fill_color", 0), resize=d.get("resize"))

    @classmethod
    def from_timm(cls, cfg: dict) -> Preprocessing:
        """timm's data config (`resolve_model_data_config`) -> the settings of `transforms_imagenet_eval`:
        crop_mode center (shorter side to floor(size / crop_pct), centre crop) or squash (both sides to it,
        centre crop). Raises ValueError for what that transform does that this module does not (border
        mode, non-square crops)."""
        _, h, w = cfg["input_size"]
        mode = cfg.get("crop_mode") or "center"
        if h != w or mode not in ("center", "squash"):
            raise ValueError(f"timm preprocessing with input size {h}x{w} and crop_mode {mode!r} is not supported "
                             f"(square sizes with crop_mode center or squash are)")
        if cfg["interpolation"] not in _INTERPOLATION:
            raise ValueError(f"timm interpolation {cfg['interpolation']!r} is not supported")
        scale = math.floor(h / (cfg.get("crop_pct") or 0.875))
        return cls(size=(h, w), mean=tuple(float(m) for m in cfg["mean"]), std=tuple(float(s) for s in cfg["std"]),
                   interpolation=cfg["interpolation"], resize_mode="shortest" if mode == "center" else "squash",
                   resize=None if scale == h else scale)

    @classmethod
    def from_open_clip(cls, cfg: dict) -> Preprocessing:
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation=cfg.get("interpolation", "bicubic"), resize_mode=cfg.get("resize_mode", "shortest"),
                   fill_color=cfg.get("fill_color", 0))

    def check_spatial_views(self, spatial: int) -> None:
        if spatial != 1 and not (self.resize_mode == "shortest" and self.size[0] == self.size[1]):
            raise ValueError(f"{spatial} spatial crops need a square crop after a shortest-side resize; this "
                             f"model preprocesses with resize_mode={self.resize_mode}, size={self.size}")


def _resize_shortest(img: Image.Image, size: int, interpolation) -> Image.Image:
    # torchvision.transforms.functional.resize(img, [size]) for a PIL image
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), interpolation)


def _crop_or_pad(img: Image.Image, top: int, left: int, th: int, tw: int, fill: int) -> Image.Image:
    w, h = img.size
    if tw > w or th > h:  # torchvision's CenterCrop pads a too-small image before cropping
        canvas = Image.new("RGB", (max(w, tw), max(h, th)), (fill, fill, fill))
        pl, pt = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
        canvas.paste(img, (pl, pt))
        img, (w, h) = canvas, canvas.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def crops(frame: np.ndarray, prep: Preprocessing, spatial: int = 1) -> list[np.ndarray]:
    """One decoded RGB frame (H, W, 3) uint8 -> `spatial` model-sized uint8 crops (h, w, 3)."""
    img = Image.fromarray(frame)
    th, tw = prep.size
    interp = _INTERPOLATION[prep.interpolation]
    if prep.resize_mode == "squash":
        if prep.resize is None:
            return [np.asarray(img.resize((tw, th), interp))] * spatial
        img = img.resize((prep.resize, prep.resize), interp)     # timm: squash to size / crop_pct, centre crop
        top, left = int(round((prep.resize - th) / 2.0)), int(round((prep.resize - tw) / 2.0))
        return [np.asarray(_crop_or_pad(img, top, left, th, tw, prep.fill_color))] * spatial
    if prep.resize_mode == "longest":
        return [_longest(img, prep)] * spatial
    if th != tw:
        raise ValueError(f"non-square crop {prep.size} with resize_mode=shortest is not supported")
    img = _resize_shortest(img, prep.resize or th, interp)
    w, h = img.size
    centre = (int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)))
    if spatial == 1:
        positions = [centre]
    elif w >= h:  # three crops along the width
        positions = [(centre[0], 0), centre, (centre[0], max(w - tw, 0))]
    else:
        positions = [(0, centre[1]), centre, (max(h - th, 0), centre[1])]
    return [np.asarray(_crop_or_pad(img, t, l, th, tw, prep.fill_color)) for t, l in positions]


def _longest(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    # Rare for ViTs; delegate to open_clip's own classes so the result is exactly theirs.
    from open_clip.transform import CenterCropOrPad, InterpolationMode, ResizeKeepRatio
    mode = InterpolationMode(prep.interpolation)
    out = ResizeKeepRatio(prep.size, interpolation=mode, longest=1)(img)
    out = CenterCropOrPad(prep.size, fill=prep.fill_color)(out)
    return np.asarray(out)


# ------------------------------------------------------------------------------------------- augmentation
# Training views baked into a cache (--aug-views). The parameters are drawn once per view from a numpy
# Generator and applied to every frame of the view alike (a clip is cropped, flipped and coloured as one),
# with torchvision's RandomResizedCrop / ColorJitter arithmetic on PIL images, and (--randaugment) timm's
# RandAugment on the decoded frame before the crop, as EVL does (randaugment.py).

def draw_augmentation(rng: np.random.Generator, width: int, height: int, aug) -> dict:
    """Random parameters for one view of a (width x height) video; `aug` is a specs.AugmentSpec."""
    i, j, h, w = _random_resized_crop(rng, width, height, aug.scale, aug.ratio)
    params = {"crop": [int(i), int(j), int(h), int(w)], "flip": bool(aug.flip and rng.random() < 0.5), "jitter": None}
    if aug.color_jitter:
        b, c, s, hue = aug.color_jitter
        params["jitter"] = {"brightness": float(rng.uniform(max(0.0, 1 - b), 1 + b)),
                            "contrast": float(rng.uniform(max(0.0, 1 - c), 1 + c)),
                            "saturation": float(rng.uniform(max(0.0, 1 - s), 1 + s)),
                            "hue": float(rng.uniform(-hue, hue)), "order": rng.permutation(4).tolist()}
    if getattr(aug, "randaugment", None):     # drawn last: views without it are drawn as before
        from .randaugment import draw
        params["randaugment"] = [[op[0], *(float(a) if isinstance(a, float) else int(a) for a in op[1:])]
                                 for op in draw(rng, _randaugment_config(aug.randaugment))]
    return params


@functools.lru_cache(maxsize=8)
def _randaugment_config(spec: str):
    from .randaugment import RandAugmentConfig
    return RandAugmentConfig.parse(spec)


def _random_resized_crop(rng, width, height, scale, ratio):
    # torchvision.transforms.RandomResizedCrop.get_params, drawing from `rng`
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augmented_crop(frame: np.ndarray, prep: Preprocessing, params: dict) -> np.ndarray:
    """Apply one view's augmentation to a decoded frame: RandAugment (when drawn), crop, resize to the model
    size with the model's interpolation, flip, colour jitter. Returns a model-sized uint8 crop."""
    i, j, h, w = params["crop"]
    img = Image.fromarray(frame)
    if params.get("randaugment"):
        from .randaugment import apply
        img = apply(img, params["randaugment"])
    img = img.crop((j, i, j + w, i + h))
    img = img.resize((prep.size[1], prep.size[0]), _INTERPOLATION[prep.interpolation])
    if params["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    jit = params.get("jitter")
    if jit:
        for op in jit["order"]:
            if op == 0:
                img = ImageEnhance.Brightness(img).enhance(jit["brightness"])
            elif op == 1:
                img = ImageEnhance.Contrast(img).enhance(jit["contrast"])
            elif op == 2:
                img = ImageEnhance.Color(img).enhance(jit["saturation"])
            else:
                img = _adjust_hue(img, jit["hue"])
    return np.asarray(img)


def _adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    # torchvision.transforms.functional_pil.adjust_hue
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def small(crop: np.ndarray, size: int) -> np.ndarray:
    """A model-sized crop resized to size x size (bilinear, antialiased) for the cached pixels."""
    if crop.shape[0] == size and crop.shape[1] == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
