"""Kinetics scale on one machine: 400 classes, the whole workflow at two data sizes (2,000 and 20,000 clips),
so what grows with the data set shows up as a ratio of the two.

Each size runs the real `cachefeat` command, one step per process, in this order:

    extract   the list manifest (N rows, `path<TAB>label`, class names with a space) -> a cache
              (the tiny registered ViT with random weights, the last block's CLS and patch tokens, 8 frames)
    train     EVL on the last block's tokens (what a streamed reader must not hold whole), streamed
              (--in-memory no), 1 epoch
    eval      that run on the same cache, streamed: metrics, confusion.npz, logits.npz (N x 400)
    ablate    2 configs (probe, temporal), 1 epoch each, train and val cache both the cache, streamed

The videos: a few short synthetic videos (cachefeat.synth) written once under benchmarks/work/, each reused
as many distinct files (hard links, or symlinks where links are refused), so every manifest row is a path
of its own and the decoders do the real work for each.

Measured per step: wall time of the process (imports and, for ablate, starting Ray included), time per
clip, and peak resident memory: VmHWM of the step's own process, written by the process as it exits (not
ru_maxrss, which Linux carries across fork and exec from the parent). The step's child processes (decode
workers, streaming readers, Ray and its workers) are sampled every SAMPLE_S seconds from /proc: for ablate
the largest Ray trial process (the worker that runs a trial's training) is reported beside the driver.

Goals (issue 16): at 20,000 clips, peak RSS of train (streamed), eval and ablate <= 1.2x their peak at 2,000
clips, and time per clip <= 1.3x. Fixed costs (imports, model build, starting Ray) weigh more at the small
size, so a time ratio well below 1 is expected; what the goal catches is growth faster than the data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CLASSES = 400
SOURCE_VIDEOS = 40
SIZES = (2000, 20000)
MODEL = "cachefeat-tiny-ViT"
SAMPLE_S = 0.25
RSS_GOAL, TIME_GOAL = 1.2, 1.3
RSS_GOAL_STEPS = ("train", "eval", "ablate_driver", "ablate_trial")
STEPS = ("extract", "train", "eval", "ablate_driver", "ablate_trial")
EXTRACT = ["--model", MODEL, "--pretrained", "none", "--layers", "last:1", "--tokens", "all", "--frames", "8",
           "--decode-workers", "1", "--batch-size", "64"]
TRAIN = ["--adapter", "evl", "--adapter-opt", "layers=1", "--adapter-opt", "tca=false", "--epochs", "1",
         "--batch-size", "32", "--in-memory", "no", "--read-workers", "1", "--threads", "1"]
EVAL = ["--batch-size", "64", "--in-memory", "no", "--read-workers", "1", "--threads", "1"]
SPEC = """\
# written by benchmarks/bench_scale.py: 2 configs x 1 epoch on the scale cache, streamed
train-cache: {cache}
val-cache: {cache}
train: {{epochs: 1, batch-size: 32, in-memory: "no", read-workers: 1, threads: 1}}
adapters:
  temporal: {{adapter-opt.dim: 64, adapter-opt.depth: 1}}
grid:
  adapter: [probe, temporal]
"""


def class_names() -> list[str]:
    return [f"action {i:03d}" for i in range(CLASSES)]


# ------------------------------------------------------------------------------------------- inputs
def source_videos(work: Path, count: int = SOURCE_VIDEOS) -> list[Path]:
    """`count` short synthetic videos (16 frames of 64 px), written once."""
    from cachefeat.synth import generate
    out = work / f"videos-{count}"
    if not (out / "synth.json").is_file():
        generate(out, num_classes=4, videos_per_class=-(-count // 4), frames=16, size=64, seed=0, progress=False)
    videos = sorted(out.glob("*/*/*.mp4"))[:count]
    if len(videos) < count:
        raise RuntimeError(f"{out}: {len(videos)} videos, {count} wanted")
    return videos


def make_manifest(work: Path, n: int, sources: list[Path]) -> Path:
    """work/list-N.txt: N rows `links/vNNNNNN.mp4<TAB>action KKK`, classes cycling over the 400, each row a
    distinct file (a hard link, else a symlink, of source video i % len(sources)); classes.txt beside it."""
    links = work / "links"
    links.mkdir(parents=True, exist_ok=True)
    rows = []
    names = class_names()
    for i in range(n):
        p = links / f"v{i:06d}.mp4"
        if not p.exists():
            src = sources[i % len(sources)]
            try:
                os.link(src, p)
            except OSError:
                p.symlink_to(src.resolve())
        rows.append(f"links/{p.name}\t{names[i % CLASSES]}")
    (work / "classes.txt").write_text("\n".join(names) + "\n")
    manifest = work / f"list-{n}.txt"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------- measuring
def _vm_hwm_kib(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class TreeSampler(threading.Thread):
    """Samples the VmHWM of every descendant of `root` (not root itself) every `every` seconds: the highest
    seen per process, with its command line (Ray workers name what they run, e.g. ray::ImplicitFunc.train)."""

    def __init__(self, root: int, every: float = SAMPLE_S):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.every)

    def sample(self):
        kids = _children_map()
        todo = list(kids.get(self.root, []))
        while todo:
            pid = todo.pop()
            todo += kids.get(pid, [])
            hwm = _vm_hwm_kib(pid)
            if hwm is None:
                continue
            self.peaks[pid] = max(hwm, self.peaks.get(pid, 0))
            name = _cmdline(pid)
            if name and (pid not in self.names or "ImplicitFunc" in name):
                self.names[pid] = name

    def stop(self):
        self._done.set()
        self.join()

    def largest(self, match) -> tuple[float | None, str | None]:
        hits = [(kib, self.names.get(pid, "")) for pid, kib in self.peaks.items() if match(self.names.get(pid, ""))]
        if not hits:
            return None, None
        kib, name = max(hits)
        return kib / 1024, name


def is_trial(name: str) -> bool:
    return "ImplicitFunc" in name


def run_step(args: list[str], log_path: Path, env_extra: dict | None = None) -> dict:
    """`cachefeat ARGS` in a process of its own; wall seconds, its VmHWM (MiB) and its children's."""
    hwm_file = log_path.with_suffix(".hwm")
    hwm_file.unlink(missing_ok=True)
    here = Path(__file__).resolve()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}),
               PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(here), "--hwm-out", str(hwm_file), "--", *map(str, args)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(p.pid)
        sampler.start()
        rc = p.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"cachefeat {' '.join(map(str, args))} exited {rc}:\n" + "\n".join(tail))
    own = json.loads(hwm_file.read_text())["vm_hwm_kib"] / 1024
    trial, trial_name = sampler.largest(is_trial)
    child, child_name = sampler.largest(lambda n: not is_trial(n))
    return {"seconds": wall, "peak_mib": own, "largest_trial_mib": trial, "largest_trial": trial_name,
            "largest_child_mib": child, "largest_child": (child_name or "")[:120] or None,
            "processes_seen": len(sampler.peaks)}


# ------------------------------------------------------------------------------------------- the section
def one_size(work: Path, n: int, sources: list[Path], log=print) -> dict:
    manifest = make_manifest(work, n, sources)
    cache, run_dir, ev, abl = (work / f"cache-{n}.zarr", work / f"run-{n}", work / f"eval-{n}", work / f"ablate-{n}")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    spec = work / f"ablate-{n}.yaml"
    spec.write_text(SPEC.format(cache=cache))
    steps = {}
    for name, args in (
            ("extract", ["extract", manifest, "--format", "list", "--out", cache, *EXTRACT, "--overwrite", "--quiet"]),
            ("train", ["train", "--cache", cache, *TRAIN, "--out", run_dir, "--overwrite", "--quiet"]),
            ("eval", ["eval", "--checkpoint", run_dir, "--cache", cache, *EVAL, "--out", ev, "--quiet", "--json"]),
            ("ablate", ["ablate", spec, "--out", abl, "--overwrite", "--cpus-per-trial", "1"])):
        r = run_step(args, logs / f"{name}-{n}.log")
        if name == "ablate":
            steps["ablate_driver"] = {"seconds": r["seconds"], "peak_mib": r["peak_mib"],
                                      "largest_child_mib": r["largest_child_mib"],
                                      "largest_child": r["largest_child"]}
            steps["ablate_trial"] = {"seconds": r["seconds"], "peak_mib": r["largest_trial_mib"],
                                     "process": r["largest_trial"],
                                     "reported_by_ablate_mib": _ablate_reported_peak(abl / "results.csv")}
        else:
            steps[name] = r
        log(f"  {n} clips, {name}: {r['seconds']:.1f} s ({1000 * r['seconds'] / n:.2f} ms/clip), peak RSS "
            f"{r['peak_mib']:.0f} MiB" + (f", largest trial process {r['largest_trial_mib']:.0f} MiB"
                                          if r.get("largest_trial_mib") else "")
            + (f", largest child {r['largest_child_mib']:.0f} MiB" if r.get("largest_child_mib") else ""))
    for s in steps.values():
        s["ms_per_clip"] = 1000 * s["seconds"] / n
    metrics = json.loads((ev / "metrics.json").read_text())
    return {"clips": n, "steps": steps, "eval_videos": metrics.get("videos", metrics.get("num_videos")),
            "cache_bytes": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())}


def _ablate_reported_peak(csv_path: Path) -> float | None:
    """The largest trial peak in ablate's results.csv (the trial's own ru_maxrss: a cross-check only)."""
    import csv
    with open(csv_path) as f:
        peaks = [int(r["peak_memory_bytes"]) for r in csv.DictReader(f) if r.get("peak_memory_bytes")]
    return max(peaks) / 2 ** 20 if peaks else None


def compare(small: dict, large: dict) -> dict:
    out = {}
    for step in STEPS:
        a, b = small["steps"].get(step), large["steps"].get(step)
        if not a or not b:
            continue
        rss = b["peak_mib"] / a["peak_mib"] if a.get("peak_mib") and b.get("peak_mib") else None
        tpc = b["ms_per_clip"] / a["ms_per_clip"]
        out[step] = {"rss_ratio": rss, "time_per_clip_ratio": tpc,
                     "rss_goal": RSS_GOAL if step in RSS_GOAL_STEPS else None, "time_goal": TIME_GOAL,
                     "rss_margin": None if rss is None or step not in RSS_GOAL_STEPS else RSS_GOAL - rss,
                     "time_margin": TIME_GOAL - tpc}
    return out


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'classes',
    'sizes',
    'model',
    'extract_args',
    'train_args',
    'eval_args',
    'memory_what',
    'per_size.*.clips',
    'per_size.*.steps.*.ms_per_clip',
    'per_size.*.steps.*.peak_mib',
    'ratios.*.time_per_clip_ratio',
    'ratios.*.time_margin',
    'ratios.*.rss_ratio',
    'ratios.*.rss_margin',
)


def run(mode, log=print, sizes=None, work: Path | None = None) -> dict:
    from common import WORK
    # smoke: one size, 8 clips from 8 source videos, compared with itself: every step and the ratios' code run
    # (a second size would only run the same processes again, at half a minute on 2 cores)
    smoke = mode is not None and mode.smoke
    sizes = list(sizes or ((8,) if smoke else SIZES))
    work = Path(work or WORK / "scale")
    work.mkdir(parents=True, exist_ok=True)
    sources = source_videos(work, 8) if smoke else source_videos(work)
    log(f"[scale] {CLASSES} classes, {sizes} clips ({len(sources)} synthetic videos reused as distinct files), "
        f"{MODEL}: extract -> train streamed -> eval -> 2-config ablation, each a `cachefeat` process")
    results = {}
    for n in sizes:
        results[n] = one_size(work, n, sources, log)
    small, large = results[sizes[0]], results[sizes[-1]]
    return {"classes": CLASSES, "sizes": sizes, "model": MODEL, "source_videos": len(sources),
            "extract_args": " ".join(EXTRACT), "train_args": " ".join(TRAIN), "eval_args": " ".join(EVAL),
            "ablate_spec": SPEC.format(cache="CACHE"), "sample_s": SAMPLE_S,
            "memory_what": "VmHWM of the step's process, written as it exits; ablate_trial: the largest Ray trial "
                           "process (ray::ImplicitFunc), its VmHWM sampled from /proc every "
                           f"{SAMPLE_S} s",
            "per_size": {str(n): r for n, r in results.items()}, "ratios": compare(small, large)}


def _hwm_main(argv: list[str]) -> int:
    """`python bench_scale.py --hwm-out FILE -- ARGS`: the cachefeat CLI in this process; its VmHWM written
    to FILE as it exits (also on an error exit)."""
    import atexit
    out = argv[argv.index("--hwm-out") + 1]
    args = argv[argv.index("--") + 1:]

    def write():
        Path(out).write_text(json.dumps({"vm_hwm_kib": _vm_hwm_kib()}))
    atexit.register(write)
    from cachefeat.cli import cli
    sys.argv = ["cachefeat", *args]
    cli(args=args, prog_name="cachefeat")
    return 0


if __name__ == "__main__":
    sys.exit(_hwm_main(sys.argv[1:]))
