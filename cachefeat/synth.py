"""A synthetic video data set whose classes differ only in temporal order.

Classes come in pairs that are each other's time reversal: a video of "moving left" is drawn exactly as a
"moving right" video (same distribution of shapes, colours, positions) and then played backwards. Both
classes of a pair therefore contain the same distribution of frames, so a classifier that averages
frames cannot tell them apart better than chance, while one that models time can. With random-weight
backbones this makes "temporal adapters work on cached features" testable on a CPU.

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
MAX_CLASSES = 2 * len(PAIRS)


def class_names(num_classes: int) -> list[str]:
    if num_classes < 2 or num_classes % 2 or num_classes > MAX_CLASSES:
        raise ValueError(f"--classes must be an even number between 2 and {MAX_CLASSES} (classes come in "
                         f"time-reversed pairs)")
    return [name for fwd, rev, _ in PAIRS[: num_classes // 2] for name in (fwd, rev)]


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


def render_video(label: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    motion = PAIRS[label // 2][2]
    clip = _frames_forward(motion, frames, size, rng)
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
             seed: int = 0, val_fraction: float = 0.25, fps: int = 12, progress: bool = True) -> dict:
    """Write the data set; returns its settings (also saved as synth.json)."""
    out = Path(out)
    names = class_names(num_classes)
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
        write_mp4(out / rel, render_video(c, frames, size, rng), fps=fps)
        lines[split].append(f"{rel.as_posix()} {c}")
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    for split, ls in lines.items():
        (out / f"{split}.txt").write_text("\n".join(ls) + "\n")
    settings = {"classes": names, "videos_per_class": videos_per_class, "train_per_class": n_train,
                "val_per_class": n_val, "frames": frames, "size": size, "fps": fps, "seed": seed,
                "reversal_pairs": [[2 * k, 2 * k + 1] for k in range(num_classes // 2)]}
    (out / "synth.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings
