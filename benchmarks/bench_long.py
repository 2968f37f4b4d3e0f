"""Long videos at a fixed rate (issue 20): `extract --sampling fps:1` on one video of 10 minutes and one of
60 minutes, so what grows with a video's length shows up as a ratio of the two.

The videos are synthetic (a moving bar over a counter in the colours), 256x192 at 4 frames/s, written once
under benchmarks/work/long/ (libx264, ultrafast): large enough that holding a video would show. Decoded at
its own size, the 60-minute video is 14,400 frames of 144 KiB, 2.0 GiB; its 3,600 samples alone 0.5 GiB.

Each length runs the real `cachefeat extract` in a process of its own (bench_scale.run_step): the tiny
registered ViT with random weights, the last block's CLS, windows of 16 frames side by side, one decode
worker. Measured: wall time, peak resident memory of the extract process (VmHWM, written as it exits)
and of its largest child (the decode worker: the frames live there; VmHWM sampled from /proc), and the
samples, windows and frames the cache holds.

Goal (issue 20): peak RSS of the 60-minute extraction <= 1.2x that of the 10-minute one, for the extract
process and for the decode worker alike: memory is bounded by a decode request (a few windows), not by
the video.
"""
from __future__ import annotations

from pathlib import Path

MINUTES = (10, 60)
SIZE = (256, 192)            # width, height
FPS = 4
MODEL = "cachefeat-tiny-ViT"
RSS_GOAL = 1.2
EXTRACT = ["--model", MODEL, "--pretrained", "none", "--layers", "last:1", "--sampling", "fps:1", "--frames", "16",
           "--decode-workers", "1", "--batch-size", "64"]


def make_video(path: Path, minutes: float, fps: int = FPS, size: tuple[int, int] = SIZE) -> Path:
    """A synthetic video of `minutes`, written frame by frame (never held whole)."""
    import av
    import numpy as np
    if path.is_file():
        return path
    w, h = size
    n = int(round(minutes * 60 * fps))
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast"}
        frame = np.zeros((h, w, 3), np.uint8)
        for i in range(n):
            frame[...] = (i % 256, (i // 256) * 7 % 256, 64)
            frame[:, (i * 3) % w, :] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)
    return path


def one_length(work: Path, minutes: float, log=print, size: tuple[int, int] = SIZE) -> dict:
    from bench_scale import run_step

    from cachefeat.store import open_cache
    video = make_video(work / f"video-{minutes:g}min.mp4", minutes, size=size)
    manifest = work / f"list-{minutes:g}.txt"
    manifest.write_text(f"{video.name}\n")
    cache = work / f"cache-{minutes:g}.zarr"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    r = run_step(["extract", manifest, "--out", cache, *EXTRACT, "--overwrite", "--quiet"],
                 logs / f"extract-{minutes:g}.log")
    c = open_cache(cache)
    real = c.read("clips/valid_frames")
    hours = float(c.read("videos/duration").sum()) / 3600
    out = {"minutes": minutes, "seconds": r["seconds"], "peak_mib": r["peak_mib"],
           "decode_worker_mib": r["largest_child_mib"], "decode_worker": r["largest_child"],
           "windows": int(c.num_clips), "valid_windows": int(c.valid().sum()), "samples": int(real.sum()),
           "video_hours": hours, "video_frames": int(c.read("videos/num_frames")[0]),
           "video_bytes": video.stat().st_size,
           "decoded_video_mib": int(c.read("videos/num_frames")[0]) * size[0] * size[1] * 3 / 2 ** 20,
           "hours_of_video_per_hour": hours * 3600 / r["seconds"]}
    log(f"  {minutes:g} min: {out['samples']} samples in {out['windows']} windows, {r['seconds']:.1f} s "
        f"({out['hours_of_video_per_hour']:.0f} h of video per hour), peak RSS {r['peak_mib']:.0f} MiB, "
        f"decode worker {r['largest_child_mib'] or 0:.0f} MiB")
    return out


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'minutes',
    'size',
    'fps',
    'extract_args',
    'memory_what',
    'ratios.seconds_per_video_hour.ratio',
    'per_length.*.minutes',
    'per_length.*.peak_mib',
    'per_length.*.decode_worker_mib',
    'per_length.*.samples',
    'per_length.*.valid_windows',
    'per_length.*.windows',
    'per_length.*.seconds',
    'per_length.*.hours_of_video_per_hour',
    'per_length.*.decoded_video_mib',
    'ratios.peak_mib.ratio',
    'ratios.peak_mib.goal',
    'ratios.peak_mib.margin',
    'ratios.decode_worker_mib.ratio',
    'ratios.decode_worker_mib.goal',
    'ratios.decode_worker_mib.margin',
)


def run(mode, log=print, minutes=MINUTES, work: Path | None = None) -> dict:
    from common import WORK
    smoke = mode is not None and mode.smoke      # a 0.5- and a 1-minute video of 64x48: the code path, seconds
    minutes, size = ((0.5, 1) if smoke else minutes), ((64, 48) if smoke else SIZE)
    work = Path(work or WORK / "long")
    work.mkdir(parents=True, exist_ok=True)
    log(f"[long] one video of {' and '.join(f'{m:g}' for m in minutes)} minutes ({size[0]}x{size[1]}, {FPS} "
        f"frames/s), `cachefeat extract {' '.join(EXTRACT)}`, each a process of its own")
    per = {f"{m:g}": one_length(work, m, log, size) for m in minutes}
    short, long_ = per[f"{minutes[0]:g}"], per[f"{minutes[-1]:g}"]
    ratios = {}
    for key in ("peak_mib", "decode_worker_mib"):
        ratio = long_[key] / short[key] if short.get(key) and long_.get(key) else None
        ratios[key] = {"ratio": ratio, "goal": RSS_GOAL, "margin": None if ratio is None else RSS_GOAL - ratio}
    ratios["seconds_per_video_hour"] = {"ratio": (long_["seconds"] / long_["video_hours"]) /
                                        (short["seconds"] / short["video_hours"]), "goal": None, "margin": None}
    return {"minutes": list(minutes), "size": list(size), "fps": FPS, "model": MODEL, "extract_args": " ".join(EXTRACT),
            "memory_what": "VmHWM of the extract process, written as it exits; decode worker: its largest child "
                           "process, VmHWM sampled from /proc every 0.25 s",
            "per_length": per, "ratios": ratios}
