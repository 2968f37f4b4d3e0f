"""Real media files for tests, written with PyAV (FFmpeg's codecs in the wheel): good, odd and broken."""
from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from cachefeat.synth import render_video, write_mp4


def good_video(path, label: int = 0, frames: int = 16, size: int = 48, seed: int = 0) -> Path:
    write_mp4(path, render_video(label, frames, size, np.random.default_rng(seed)))
    return Path(path)


def faststart_copy(src, dst) -> Path:
    """Remux an mp4 with the moov atom first (as streaming sites serve them), so a truncated copy still opens."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.dts is None:
                continue
            p.stream = s
            o.mux(p)
    return Path(dst)


def truncated(src, dst, fraction: float) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def random_bytes(path, n: int = 20000, seed: int = 0) -> Path:
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return Path(path)


def encode(path, frames: np.ndarray, codec: str = "libx264", pix_fmt: str = "yuv420p", fps=12, options=None) -> Path:
    """Encode RGB frames (T, H, W, 3) with any codec / pixel format PyAV offers."""
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if options:
            s.options = options
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


def fifo(path) -> Path:
    """A named pipe: a decoder that opens it blocks forever (nobody writes), a real hang."""
    os.mkfifo(path)
    return Path(path)


def encode_in_fresh_process(path, frames: np.ndarray, codec: str, pix_fmt: str = "yuv420p") -> Path:
    """encode() in a new Python process. decord's wheel bundles its own FFmpeg libraries; once decord is
    loaded, PyAV's VP9 encoder in the same process fails to open (EINVAL). The product never encodes
    where it decodes; tests that need a VP9 file after decoding something make it here."""
    import subprocess
    import sys
    npy = Path(str(path) + ".npy")
    np.save(npy, frames)
    code = (f"import sys, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r}); from media import encode; "
            f"encode({str(path)!r}, np.load({str(npy)!r}), {codec!r}, {pix_fmt!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    npy.unlink()
    return Path(path)
