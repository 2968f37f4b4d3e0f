"""PIL's resize, bit for bit, as two matrix products that run on any torch device.

Pillow resizes an 8-bit image in two passes, horizontal then vertical (Resample.c). For each output pixel
it weighs a window of input pixels with filter coefficients computed in double precision, normalised to
sum to 1, then rounded to fixed point with 22 fractional bits; it accumulates integer products from
1 << 21 (for rounding) and clips the sum, shifted back by 22 bits, to 0..255 before the next pass. The
same coefficients as a dense (out, in) integer matrix make each pass one matrix product. The products and
their sums stay below 2**31, so float64 holds them exactly (float32 would not), and the result equals PIL's
on every pixel: tests compare the two on real decoded frames of several sizes, upscales included.

Which pass comes first differs between Pillow builds: the C source runs the horizontal pass first, while
the installed Pillow 13 wheel runs the vertical one first for some sizes (e.g. 340x256 -> 224x224) by a
rule we could not find. So the order is found once per (input size, output size, filter) by resizing a
probe image with PIL both ways (`pass_order`); a size for which neither order gives PIL's bytes is left to
PIL (None), so the cache never differs.

This lets stage one decode in its workers and resize on the GPU, without changing a byte of the cache.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: float) -> float:
    a = -0.5                                     # Pillow's bicubic (Keys, a = -0.5)
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@lru_cache(maxsize=256)
def coefficients(in_size: int, out_size: int, interpolation: str, box: tuple[float, float] | None = None) -> np.ndarray:
    """(out_size, in_size) int64: Pillow's fixed-point weights of each input pixel for each output pixel
    (precompute_coeffs + normalize_coeffs_8bpc); `box` = (start, end) of the input span, default all of it."""
    f, support0 = FILTERS[interpolation]
    in0, in1 = box if box is not None else (0.0, float(in_size))
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = support0 * filterscale
    out = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [f((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = sum(w)
        for x in range(xmax):
            k = w[x] / total if total != 0.0 else w[x]
            out[xx, xmin + x] = int(-0.5 + k * (1 << PRECISION_BITS)) if k < 0 else int(0.5 + k * (1 << PRECISION_BITS))
    return out


def _matrix(in_size: int, out_size: int, interpolation: str, device) -> torch.Tensor:
    return torch.from_numpy(coefficients(in_size, out_size, interpolation).astype(np.float64)).to(device)


def _pass(x: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass along `dim` (1: rows, i.e. vertical; 2: columns): fixed-point sums, rounded and clipped."""
    y = torch.matmul(k, x) if dim == 1 else torch.matmul(x, k.T)
    y = torch.floor((y + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS))   # (sum + 2**21) >> 22
    return y.clamp_(0, 255)


def _resize(frames: torch.Tensor, width: int, height: int, interpolation: str, order: str) -> torch.Tensor:
    h, w = frames.shape[1:3]
    x = frames.permute(0, 3, 1, 2).to(torch.float64)          # (N, 3, H, W)
    for axis in order:                                        # "hv": horizontal pass first; "vh": vertical
        if axis == "h" and w != width:
            x = _pass(x, _matrix(w, width, interpolation, frames.device), dim=2)
        elif axis == "v" and h != height:
            x = _pass(x, _matrix(h, height, interpolation, frames.device), dim=1)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@lru_cache(maxsize=256)
def pass_order(h: int, w: int, height: int, width: int, interpolation: str) -> str | None:
    """The order of the two passes ("hv" or "vh") that gives the installed PIL's bytes for this resize,
    found on a probe image; None when neither does (the caller then uses PIL itself)."""
    from PIL import Image
    probe = np.random.default_rng([h, w, height, width]).integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    want = np.asarray(Image.fromarray(probe).resize((width, height), pil))
    x = torch.from_numpy(probe)[None]
    for order in ("hv", "vh"):
        if np.array_equal(_resize(x, width, height, interpolation, order)[0].numpy(), want):
            return order
    return None


def resize(frames: torch.Tensor, width: int, height: int, interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 (N, H, W, 3) frames on any device -> uint8 (N, height, width, 3), equal to PIL's
    `Image.resize((width, height), interpolation)` of each frame (no reducing_gap). Raises NotExact for a
    resize whose bytes this module cannot reproduce (see pass_order)."""
    n, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames
    order = "hv" if h == height or w == width else pass_order(h, w, height, width, interpolation)
    if order is None:
        raise NotExact(f"{w}x{h} -> {width}x{height} ({interpolation})")
    return _resize(frames, width, height, interpolation, order)


class NotExact(Exception):
    """A resize whose PIL bytes this module does not reproduce."""


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) of torchvision's Resize(size) of a PIL image (the shorter side to `size`)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def view_crops(frames: torch.Tensor, size: int, spatial: int, interpolation: str = "bicubic",
               short_side: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) decoded frames -> (S, N, size, size, 3): the shorter side resized to `short_side`
    (default `size`; timm's crop_pct makes it larger), then the centre crop (S = 1) or the start, centre and
    end crops along the longer side (S = 3): what preprocess.crops computes with PIL, frame by frame."""
    h, w = frames.shape[1:3]
    nh, nw = shortest_side_size(h, w, short_side or size)
    x = resize(frames, nw, nh, interpolation)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    if spatial == 1:
        positions = [(top, left)]
    elif nw >= nh:
        positions = [(top, 0), (top, left), (top, max(nw - size, 0))]
    else:
        positions = [(0, left), (top, left), (max(nh - size, 0), left)]
    return torch.stack([x[:, t:t + size, l:l + size] for t, l in positions])


def supported(size: tuple[int, int], interpolation: str, resize_mode: str) -> bool:
    """Whether view_crops reproduces preprocess.crops for these settings (else PIL in the workers): a square
    crop after a shortest-side resize (never padded) with a filter this module knows."""
    return resize_mode == "shortest" and size[0] == size[1] and interpolation in FILTERS


def views_from_frames(decoded: np.ndarray, decoded_idx: np.ndarray, frame_idx: np.ndarray, small_idx: np.ndarray | None,
                      prep, spatial: int, small_size: int | None, device):
    """A decode worker's raw frames -> what it would have sent: the views' crops (V, T, size, size, 3) as a
    tensor on `device`, and the small pixel frames (V, T*K, s, s, 3) uint8 on the host (or None). View v
    is temporal clip v // S with spatial crop v % S, as in video._decode_with. A frame size whose resize is
    not exact here is cropped with PIL (preprocess.crops) instead: the bytes never differ."""
    size = prep.size[0]
    try:
        crops = view_crops(torch.from_numpy(decoded).to(device), size, spatial, prep.interpolation,
                           prep.resize)                                                           # (S, U, ...)
    except NotExact:
        from .preprocess import crops as pil_crops
        crops = torch.from_numpy(np.stack([np.stack(pil_crops(f, prep, spatial)) for f in decoded], axis=1))
        crops = crops.to(device)
    s = torch.as_tensor(np.arange(len(frame_idx)) % spatial, device=crops.device)[:, None]
    pixels = crops[s, torch.as_tensor(np.searchsorted(decoded_idx, frame_idx), device=crops.device)]
    small = None
    if small_idx is not None:
        sel = crops[s, torch.as_tensor(np.searchsorted(decoded_idx, small_idx), device=crops.device)]
        try:
            small = resize(sel.reshape(-1, size, size, 3), small_size, small_size, "bilinear").cpu().numpy()
        except NotExact:
            from .preprocess import small as pil_small
            small = np.stack([pil_small(c, small_size) for c in sel.reshape(-1, size, size, 3).cpu().numpy()])
        small = small.reshape(*small_idx.shape, small_size, small_size, 3)
    return pixels, small
