"""Shared pieces of the benchmarks: the work folder, synthetic inputs, timing and memory measurement.
It imports torch and cachefeat only inside functions, so that standalone scripts (s3_libraries.py) can
import it in an environment without them.

Every figure the benchmarks report is a ratio of two measurements taken in the same process, one after
the other (or interleaved), on the same inputs: machines differ and timings drift by +-20% between runs,
but a ratio measured side by side is stable enough to make claims with.
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# CACHEFEAT_BENCH_WORK: another work folder (the smoke test's tmp folder), read once when this is imported
WORK = Path(os.environ.get("CACHEFEAT_BENCH_WORK") or ROOT / "work")
RESULTS = ROOT / "results"
TINY = "cachefeat-tiny-ViT"


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
    smoke: bool = False        # toy sizes, seconds per section: the sections' code paths, not their figures
    seeds: int = 3             # seeds per setting in the accuracy sections (adapters, madapter, view_budget)
    adapters: tuple[str, ...] = ()   # the adapters section's adapters (empty: all): run it in parts on 2 cores

    @classmethod
    def create(cls, full: bool, device: str = "auto", smoke: bool = False) -> Mode:
        import torch
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        cores = os.cpu_count() or 2
        if smoke:
            return cls(False, dev, [TINY], 4, 2, 4, 1, smoke=True)
        if full:
            return cls(True, dev, ["ViT-B/16", "ViT-L/14"], 384, 8, 64, max(1, min(14, cores - 2)))
        return cls(False, dev, ["ViT-B/32"], 16, 8, 32, max(1, cores - 1))


def machine() -> dict:
    import torch
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return info


def git_describe() -> str:
    """The code version a result file was made from: `git describe --always --dirty`, or "unknown"."""
    git = shutil.which("git")        # a full path (bandit B607); no git on the machine: "unknown"
    if git is None:
        return "unknown"
    try:
        return subprocess.run([git, "describe", "--always", "--dirty"], cwd=ROOT.parent, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def test_module(name: str):
    """tests/NAME.py as a module, loaded by path (the benchmarks put no test folder on sys.path, whose
    conftest and helpers would shadow other modules) and registered under its name (a dataclass needs it)."""
    import importlib.util
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT.parent / "tests" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def synth_data(name: str, classes: int, videos_per_class: int, frames: int = 32, size: int = 96, seed: int = 0) -> Path:
    """A synthetic data set under benchmarks/work/, made once and reused."""
    from cachefeat.synth import generate
    out = WORK / name
    if not (out / "synth.json").is_file():
        generate(out, num_classes=classes, videos_per_class=videos_per_class, frames=frames, size=size, seed=seed,
                 progress=False)
    return out


def sync(device) -> None:
    import torch
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


# two-sided 95% quantiles of Student's t by degrees of freedom (scipy is not a dependency); beyond 30, 1.96
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
       25: 2.060, 30: 2.042}


def mean_ci(values) -> dict:
    """Mean and 95% t-interval of per-seed values (one value: no interval)."""
    v = [float(x) for x in values]
    m = statistics.mean(v)
    if len(v) < 2:
        return {"mean": m, "ci95": None, "half_width": None, "n": len(v)}
    df = len(v) - 1
    t = T95.get(df) or (T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96)
    h = t * statistics.stdev(v) / len(v) ** 0.5
    return {"mean": m, "ci95": [m - h, m + h], "half_width": h, "n": len(v)}


def fmt_mean_ci(x: dict) -> str:
    """'0.812 (0.790-0.834)' from a result holding mean_top1 and ci95 (files from before the intervals were
    stored: the interval of their per-seed `top1` list)."""
    ci = x.get("ci95") or (mean_ci(x["top1"])["ci95"] if len(x.get("top1") or []) > 1 else None)
    return f"{x['mean_top1']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def check_keys(result: dict, keys, section: str) -> list[str]:
    """The dotted key paths of `keys` missing from `result` ('*' stands for every entry of a dict)."""
    missing = []

    def walk(node, parts, where):
        if not parts:
            return
        head, rest = parts[0], parts[1:]
        if head == "*":
            if not isinstance(node, dict) or not node:
                missing.append(f"{section}: {where or '.'} has no entries")
                return
            for k, v in node.items():
                walk(v, rest, f"{where}.{k}" if where else k)
        elif not isinstance(node, dict) or head not in node:
            missing.append(f"{section}: {where + '.' if where else ''}{head}")
        else:
            walk(node[head], rest, f"{where}.{head}" if where else head)
    for key in keys:
        walk(result, key.split("."), "")
    return missing


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
