"""Shared pieces of the benchmarks: the work folder, synthetic inputs, timing and memory measurement.

Every figure the benchmarks report is a ratio of two measurements taken in the same process, one after
the other (or interleaved), on the same inputs: machines differ and timings drift by +-20% between runs,
but a ratio measured side by side is stable enough to make claims with.
"""
from __future__ import annotations

import os
import platform
import resource
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"
RESULTS = ROOT / "results"


@dataclass
class Mode:
    """What a benchmark run measures: quick (CPU, minutes) or full (GPU, real sizes)."""
    full: bool
    device: str
    models: list[str]          # backbones for extraction and training cost
    videos: int                # synthetic videos for extraction
    frames: int
    batch_size: int
    decode_workers: int

    @classmethod
    def create(cls, full: bool, device: str = "auto") -> Mode:
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        cores = os.cpu_count() or 2
        if full:
            return cls(True, dev, ["ViT-B/16", "ViT-L/14"], 384, 8, 64, max(1, min(14, cores - 2)))
        return cls(False, dev, ["ViT-B/32"], 16, 8, 32, max(1, cores - 1))


def machine() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return info


def synth_data(name: str, classes: int, videos_per_class: int, frames: int = 32, size: int = 96, seed: int = 0) -> Path:
    """A synthetic data set under benchmarks/work/, made once and reused."""
    from cachefeat.synth import generate
    out = WORK / name
    if not (out / "synth.json").is_file():
        generate(out, num_classes=classes, videos_per_class=videos_per_class, frames=frames, size=size, seed=seed,
                 progress=False)
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, rounds: int, device="cpu") -> dict[str, float]:
    """Median seconds of each function, run in turn A B A B ... so drift hits all alike."""
    times = {k: [] for k in fns}
    for f in fns.values():   # warm-up
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
