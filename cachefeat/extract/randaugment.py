"""RandAugment for video views, as EVL trains with it (`--auto_augment rand-m7-n4-mstd0.5-inc1` in
OpenGVLab/efficient-video-recognition `scripts/train_k400_*.sh`): timm's RandAugment
(`timm/data/auto_augment.py`: its op list, magnitude-to-argument mapping and PIL operations, reproduced
here exactly; tests/test_augment.py compares every op with timm's own), drawn once per view and applied
alike to every frame of the view, as EVL's copy of SlowFast's video RandAugment does (one draw of ops,
magnitudes and signs per clip, `[aug_fn(img, *level_args) for img in img_list]`).

The draws come from the view's numpy Generator instead of Python's global `random`, so a cache's views
are a function of (seed, video, view) and are recorded in `clips/aug` (each op with its arguments). This
module imports neither torch nor timm: it runs in the decode workers.

EVL's settings (`video_dataset/transform.py` create_random_augment): fill colour (128, 128, 128) (timm's
default: no img_mean is passed), bicubic resampling, applied to the decoded frames before the
random-resized crop.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0          # timm's _LEVEL_DENOM: magnitudes are on a 0-10 scale
FILL = (128, 128, 128)      # timm's _FILL
TRANSLATE_PCT = 0.45        # timm's default translate_pct for the *Rel ops

RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
RAND_INCREASING_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel"]


class RandAugmentError(ValueError):
    pass


@dataclass(frozen=True)
class RandAugmentConfig:
    """timm's `rand-...` config string: m (magnitude, default 10), n (ops per view, 2), p (probability of
    each op, 0.5), mstd (std of the magnitude noise, 0; above 100 = uniform in [0, m]), mmax (upper bound
    of the magnitude, 10), inc (1 = the ops whose severity increases with the magnitude)."""
    magnitude: float = 10
    num_ops: int = 2
    prob: float = 0.5
    mstd: float = 0.0
    mmax: float | None = None
    increasing: bool = False

    @classmethod
    def parse(cls, spec: str) -> RandAugmentConfig:
        """`rand-m7-n4-mstd0.5-inc1` or the same without `rand-` (`m7-n4-mstd0.5-inc1`)."""
        text = spec.strip().lower()
        parts = text.split("-")
        if parts and parts[0] == "rand":
            parts = parts[1:]
        kw = {}
        for part in parts:
            m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d+)?)", part)
            if not m:
                raise RandAugmentError(f"--randaugment {spec!r}: {part!r} is not one of mN, nN, pX, mstdX, mmaxN, "
                                       f"incN (timm's config, e.g. m7-n4-mstd0.5-inc1)")
            key, val = m.group(1), float(m.group(2))
            if key == "m":
                kw["magnitude"] = int(val)
            elif key == "n":
                kw["num_ops"] = int(val)
            elif key == "p":
                kw["prob"] = val
            elif key == "mstd":
                kw["mstd"] = float("inf") if val > 100 else val
            elif key == "mmax":
                kw["mmax"] = int(val)
            else:
                kw["increasing"] = bool(int(val))
        cfg = cls(**kw)
        if not 1 <= cfg.num_ops <= 16 or not 0 <= cfg.prob <= 1:
            raise RandAugmentError(f"--randaugment {spec!r}: n must be 1-16 and p in [0, 1]")
        return cfg

    def canonical(self) -> str:
        s = f"rand-m{self.magnitude:g}-n{self.num_ops}"
        if self.prob != 0.5:
            s += f"-p{self.prob:g}"
        if self.mstd:
            s += "-mstd101" if math.isinf(self.mstd) else f"-mstd{self.mstd:g}"
        if self.mmax is not None:
            s += f"-mmax{self.mmax:g}"
        return s + ("-inc1" if self.increasing else "")

    @property
    def transforms(self) -> list[str]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


# ------------------------------------------------------------------------------------------- drawing
def _negate(rng: np.random.Generator, v: float) -> float:
    return -v if rng.random() > 0.5 else v          # timm's _randomly_negate


def level_args(name: str, magnitude: float, rng: np.random.Generator) -> list:
    """timm's LEVEL_TO_ARG[name](magnitude): the op's arguments (random signs drawn from `rng`)."""
    lv = magnitude / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return []
    if name == "Rotate":
        return [_negate(rng, lv * 30.0)]
    if name == "Posterize":
        return [int(lv * 4)]
    if name == "PosterizeIncreasing":
        return [4 - int(lv * 4)]
    if name == "Solarize":
        return [min(256, int(lv * 256))]
    if name == "SolarizeIncreasing":
        return [256 - min(256, int(lv * 256))]
    if name == "SolarizeAdd":
        return [min(128, int(lv * 110))]
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return [lv * 1.8 + 0.1]
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return [max(0.1, 1.0 + _negate(rng, lv * 0.9))]
    if name in ("ShearX", "ShearY"):
        return [_negate(rng, lv * 0.3)]
    if name in ("TranslateXRel", "TranslateYRel"):
        return [_negate(rng, lv * TRANSLATE_PCT)]
    raise RandAugmentError(f"unknown RandAugment op {name!r}")


def draw(rng: np.random.Generator, cfg: RandAugmentConfig) -> list[list]:
    """One view's RandAugment: the ops that apply, each [name, *args], in order (timm's RandAugment: n ops
    chosen with replacement; each applies with probability p, at a magnitude drawn around m)."""
    names = cfg.transforms
    picks = rng.integers(0, len(names), size=cfg.num_ops)
    out = []
    for k in picks:
        name = names[int(k)]
        if cfg.prob < 1.0 and rng.random() > cfg.prob:
            continue
        magnitude = float(cfg.magnitude)
        if cfg.mstd > 0:
            magnitude = rng.uniform(0, magnitude) if math.isinf(cfg.mstd) else rng.normal(magnitude, cfg.mstd)
        magnitude = max(0.0, min(magnitude, cfg.mmax or LEVEL_DENOM))
        out.append([name, *level_args(name, magnitude, rng)])
    return out


# ------------------------------------------------------------------------------------------- applying
def _affine(img: Image.Image, matrix) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    if img.mode in ("L", "RGB"):
        return img.point(lut * 3 if img.mode == "RGB" else lut)
    return img


def apply_op(img: Image.Image, op: list) -> Image.Image:
    """One recorded op ([name, *args]) on a PIL image, as timm's NAME_TO_OP[name] does it."""
    name, args = op[0], op[1:]
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(args[0], resample=Image.BICUBIC, fillcolor=FILL)
    if name in ("Posterize", "PosterizeIncreasing"):
        if args[0] <= 0:    # keep no bits: black (what PIL gave before it refused bits=0, which timm can ask for)
            return Image.new(img.mode, img.size)
        return img if args[0] >= 8 else ImageOps.posterize(img, args[0])
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(img, args[0])
    if name == "SolarizeAdd":
        return _solarize_add(img, args[0])
    if name in ("Color", "ColorIncreasing"):
        return ImageEnhance.Color(img).enhance(args[0])
    if name in ("Contrast", "ContrastIncreasing"):
        return ImageEnhance.Contrast(img).enhance(args[0])
    if name in ("Brightness", "BrightnessIncreasing"):
        return ImageEnhance.Brightness(img).enhance(args[0])
    if name in ("Sharpness", "SharpnessIncreasing"):
        return ImageEnhance.Sharpness(img).enhance(args[0])
    if name == "ShearX":
        return _affine(img, (1, args[0], 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, args[0], 1, 0))
    if name == "TranslateXRel":
        return _affine(img, (1, 0, args[0] * img.size[0], 0, 1, 0))
    if name == "TranslateYRel":
        return _affine(img, (1, 0, 0, 0, 1, args[0] * img.size[1]))
    raise RandAugmentError(f"unknown RandAugment op {name!r}")


def apply(img: Image.Image, ops: list[list]) -> Image.Image:
    for op in ops:
        img = apply_op(img, op)
    return img
