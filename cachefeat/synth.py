"""A synthetic video data set whose classes differ only in temporal order.

Classes come in pairs that are each other's time reversal: a video of "moving left" is drawn exactly as a
"moving right" video (same distribution of shapes, colours, positions) and then played backwards. Both
classes of a pair therefore contain the same distribution of frames, so a classifier that averages
frames cannot tell them apart better than chance, while one that models time can. With random-weight
backbones this makes "temporal adapters work on cached features" testable on a CPU.

Two families of motions (`motions`): "shapes" (the default: one shape translating, growing, changing colour,
a turning hand, fading in) and "alt", a differently generated set for checking that a result is not a
property of one generator: other motions (diagonal travel, orbiting, two shapes meeting, a wipe, the
light changing, stretching), other shapes (ring, cross, diamond), striped backgrounds, a small distractor
that drifts in a random direction, and usually other sizes and frame counts (the caller's choice).

Output (deterministic for a seed): OUT/{train,val}/<class>/<nnnn>.mp4 (H.264 via PyAV), the manifests
OUT/train.txt and OUT/val.txt (`path class` lines), OUT/classes.txt and OUT/synth.json (the settings).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# (forward class, reversed class, motion): the reversed class is the forward video played backwards
PAIRS = [
    ("moving right", "moving left", "translate_x"),
    ("moving down", "moving up", "translate_y"),
    ("growing", "shrinking", "scale"),
    ("warm to cool", "cool to warm", "colour"),
    ("turning clockwise", "turning anticlockwise", "rotate"),
    ("appearing", "disappearing", "fade"),
]
ALT_PAIRS = [
    ("travelling down-right", "travelling up-left", "diagonal"),
    ("orbiting clockwise", "orbiting anticlockwise", "orbit"),
    ("coming together", "moving apart", "meet"),
    ("wiping in", "wiping out", "wipe"),
    ("lights coming on", "lights going off", "light"),
    ("stretching wide", "stretching tall", "stretch"),
]
FAMILIES = {"shapes": PAIRS, "alt": ALT_PAIRS}
MAX_CLASSES = 2 * len(PAIRS)


def class_names(num_classes: int, motions: str = "shapes") -> list[str]:
    pairs = _family(motions)
    if num_classes < 2 or num_classes % 2 or num_classes > 2 * len(pairs):
        raise ValueError(f"--classes must be an even number between 2 and {2 * len(pairs)} (classes come in "
                         f"time-reversed pairs)")
    return [name for fwd, rev, _ in pairs[: num_classes // 2] for name in (fwd, rev)]


def _family(motions: str) -> list:
    if motions not in FAMILIES:
        raise ValueError(f"--motions {motions!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[motions]


def family_of(classes: list[str]) -> str | None:
    """The motion family whose class list `classes` is (in generate's order), else None."""
    for name in FAMILIES:
        try:
            if list(classes) == class_names(len(classes), name):
                return name
        except ValueError:
            pass
    return None


def reversal_partner(label: int) -> int:
    """The class that is `label` played backwards."""
    return label ^ 1


# ------------------------------------------------------------------------------------------- drawing
def _shape_mask(kind: str, yy, xx, cy, cx, r, angle=0.0):
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "triangle":
        return (dy <= r * 0.7) & (dy >= -r + 1.7 * np.abs(dx))
    if kind == "hand":  # an asymmetric bar with a knob: rotation has a visible direction
        c, s = math.cos(angle), math.sin(angle)
        u, v = dx * c + dy * s, -dx * s + dy * c
        bar = (u >= -r * 0.2) & (u <= r) & (np.abs(v) <= r * 0.18)
        knob = (u - r) ** 2 + v ** 2 <= (r * 0.32) ** 2
        return bar | knob
    raise ValueError(kind)


def _frames_forward(motion: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The forward-time version of one video: (frames, size, size, 3) uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # a static, per-video background: a base colour plus a soft random texture
    base = rng.uniform(20, 110, size=3)
    tex = rng.normal(0, 1, size=(6, 6, 3))
    tex = np.kron(tex, np.ones((math.ceil(size / 6), math.ceil(size / 6), 1)))[:size, :size]
    background = np.clip(base + 18 * tex, 0, 255).astype(np.float32)
    kind = rng.choice(["circle", "square", "triangle"])
    colour = rng.uniform(150, 255, size=3)
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.15)
    out = np.empty((frames, size, size, 3), np.uint8)
    warm, cool = np.array([235.0, rng.uniform(60, 140), 40.0]), np.array([40.0, rng.uniform(90, 170), 235.0])
    x0, x1 = rng.uniform(0.15, 0.35), rng.uniform(0.65, 0.85)
    r0, r1 = rng.uniform(0.05, 0.08), rng.uniform(0.2, 0.27)
    a0 = rng.uniform(0, 2 * math.pi)
    sweep = rng.uniform(0.6, 0.9) * math.pi
    for t in range(frames):
        p = t / max(frames - 1, 1)
        shape, col, alpha, ang = kind, colour, 1.0, 0.0
        y, x, rad = cy, cx, r
        if motion == "translate_x":
            x = x0 + (x1 - x0) * p
        elif motion == "translate_y":
            y = x0 + (x1 - x0) * p
        elif motion == "scale":
            rad = r0 + (r1 - r0) * p
        elif motion == "colour":
            col = warm + (cool - warm) * p
        elif motion == "rotate":
            shape, rad, ang = "hand", 0.3, a0 + sweep * p  # image y points down: increasing angle = clockwise
            y, x = 0.5, 0.5
        elif motion == "fade":
            alpha = p
        mask = _shape_mask(shape, yy, xx, y, x, rad, ang)[..., None]
        img = np.where(mask, alpha * col + (1 - alpha) * background, background)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _frames_alt(motion: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The forward-time version of one video of the "alt" family: (frames, size, size, 3) uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # a striped background (random angle, period and colours) instead of the soft texture
    theta, period = rng.uniform(0, math.pi), rng.uniform(0.15, 0.4)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    c0, c1 = rng.uniform(30, 120, size=3), rng.uniform(30, 120, size=3)
    background = (c0 + (c1 - c0) * stripes[..., None]).astype(np.float32)
    kind = str(rng.choice(["ring", "cross", "diamond"]))
    colour = rng.uniform(160, 255, size=3)
    other = rng.uniform(160, 255, size=3)
    r = rng.uniform(0.09, 0.13)
    start = rng.uniform(0.15, 0.3, size=2)
    travel = rng.uniform(0.45, 0.6)
    a0, sweep = rng.uniform(0, 2 * math.pi), rng.uniform(1.0, 1.5) * math.pi
    orbit = rng.uniform(0.22, 0.3)
    horizontal = bool(rng.random() < 0.5)          # meet/wipe: along x or along y
    dark = rng.uniform(0.25, 0.45)                 # light: the darkest the scene gets
    # a small distractor drifting in a random direction: motion that says nothing about the class
    d_pos, d_vel = rng.uniform(0.2, 0.8, size=2), rng.uniform(-0.25, 0.25, size=2)
    out = np.empty((frames, size, size, 3), np.uint8)

    def shape(img, y, x, rad, col, ry=1.0, rx=1.0):
        dy, dx = (yy - y) / ry, (xx - x) / rx
        if kind == "ring":
            d = np.sqrt(dy * dy + dx * dx)
            m = (d <= rad) & (d >= 0.55 * rad)
        elif kind == "cross":
            m = ((np.abs(dy) <= rad) & (np.abs(dx) <= 0.3 * rad)) | ((np.abs(dx) <= rad) & (np.abs(dy) <= 0.3 * rad))
        else:
            m = np.abs(dy) + np.abs(dx) <= rad
        return np.where(m[..., None], col, img)

    for t in range(frames):
        p = t / max(frames - 1, 1)
        img = background.copy()
        dy, dx = (d_pos + d_vel * p) % 1.0
        img = np.where(((yy - dy) ** 2 + (xx - dx) ** 2 <= 0.03 ** 2)[..., None], other, img)
        if motion == "diagonal":
            img = shape(img, start[0] + travel * p, start[1] + travel * p, r, colour)
        elif motion == "orbit":   # image y points down: increasing angle = clockwise
            a = a0 + sweep * p
            img = shape(img, 0.5 + orbit * math.sin(a), 0.5 + orbit * math.cos(a), r, colour)
        elif motion == "meet":
            gap = 0.38 * (1 - p) + 0.08
            for sgn, col in ((-1, colour), (1, other)):
                y, x = (0.5, 0.5 + sgn * gap) if horizontal else (0.5 + sgn * gap, 0.5)
                img = shape(img, y, x, r * 0.8, col)
        elif motion == "wipe":
            edge = 0.05 + 0.9 * p
            covered = (xx if horizontal else yy) <= edge
            img = np.where(covered[..., None], 0.35 * img + 0.65 * colour, img)
        elif motion == "light":
            img = shape(img, 0.5, 0.5, r * 1.5, colour) * (dark + (1 - dark) * p)
        elif motion == "stretch":
            s = 0.55 + 1.2 * p                          # wide at the end, tall at the start
            img = shape(img, 0.5, 0.5, r * 1.4, colour, ry=1 / s, rx=s)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def render_video(label: int, frames: int, size: int, rng: np.random.Generator, motions: str = "shapes") -> np.ndarray:
    motion = _family(motions)[label // 2][2]
    clip = (_frames_forward if motions == "shapes" else _frames_alt)(motion, frames, size, rng)
    return clip[::-1].copy() if label % 2 else clip


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 12, crf: int = 18) -> None:
    """Encode RGB uint8 frames (T, H, W, 3) as H.264 in an mp4 with PyAV (FFmpeg libraries in the wheel)."""
    import av
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        # threads=1: same bytes every run
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "threads=1"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: stream.height, : stream.width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate(out: str | Path, num_classes: int = 6, videos_per_class: int = 24, frames: int = 32, size: int = 96,
             seed: int = 0, val_fraction: float = 0.25, fps: int = 12, progress: bool = True,
             motions: str = "shapes") -> dict:
    """Write the data set; returns its settings (also saved as synth.json)."""
    out = Path(out)
    names = class_names(num_classes, motions)
    if videos_per_class < 2:
        raise ValueError("--videos-per-class must be at least 2 (one train, one val)")
    if size < 16:
        raise ValueError("--size must be at least 16 pixels")
    if frames < 2:
        raise ValueError("--frames must be at least 2")
    n_val = max(1, int(round(videos_per_class * val_fraction)))
    n_train = videos_per_class - n_val
    if n_train < 1:
        raise ValueError("--val-fraction leaves no training videos")
    splits = {"train": n_train, "val": n_val}
    jobs = [(split, c, i) for split, n in splits.items() for c in range(num_classes) for i in range(n)]
    lines: dict[str, list[str]] = {s: [] for s in splits}
    from tqdm import tqdm
    for split, c, i in tqdm(jobs, desc="synth", unit="video", disable=not progress):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, c, i])
        rel = Path(split) / names[c].replace(" ", "_") / f"{i:04d}.mp4"
        write_mp4(out / rel, render_video(c, frames, size, rng, motions), fps=fps)
        lines[split].append(f"{rel.as_posix()} {c}")
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    for split, ls in lines.items():
        (out / f"{split}.txt").write_text("\n".join(ls) + "\n")
    settings = {"classes": names, "motions": motions, "videos_per_class": videos_per_class, "train_per_class": n_train,
                "val_per_class": n_val, "frames": frames, "size": size, "fps": fps, "seed": seed,
                "reversal_pairs": [[2 * k, 2 * k + 1] for k in range(num_classes // 2)]}
    (out / "synth.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings
