"""`--sections adapters`: every adapter trained on cached features of two differently generated temporal
data sets, with the settings docs/adapters.md recommends for a set of this size (`cachefeat train`'s
defaults: --epochs auto, i.e. at least 1,000 optimiser steps), seeds 0-2 (`run.py --seeds N`), held-out val
top-1: the mean over seeds with its 95% t-interval.

    shapes  cachefeat.synth "shapes": 8 classes (4 time-reversed pairs: moving right/left, down/up,
            growing/shrinking, warm-to-cool/cool-to-warm), 24 training and 24 val videos per class,
            32 frames of 96 px (192 training videos, as in issue 19's report; 192 val videos)
    alt     cachefeat.synth "alt": 12 classes (6 pairs: diagonal travel, orbits, two shapes meeting, wipes,
            light, stretching; striped backgrounds and a drifting distractor), 18 training and 18 val
            videos per class, 24 frames of 128 px, another seed (216 / 216 videos)

As many val videos as training videos: one val video is 0.5 (shapes) or 0.46 (alt) points of top-1, so
the comparisons below are not decided by a handful of videos.

Both are extracted with ViT-B/32 (random weights: no download), every block, CLS plus 2x2-pooled patch
tokens, 8 frames, pixels 32 px at 2x the frames (for dist). Classes that are each other's time reversal hold
the same frames, so the frame-averaging probe sits near chance inside each pair.

Goals (issue 19): on each set, madapter, evl and dist each reach >= temporal - 0.05 and >= probe + 0.3
(on the means over seeds).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import TINY, WORK, fmt_mean_ci, mean_ci

SETS = {
    "shapes": {"motions": "shapes", "classes": 8, "videos_per_class": 48, "val_fraction": 0.5, "frames": 32,
               "size": 96, "fps": 12, "seed": 0},
    "alt": {"motions": "alt", "classes": 12, "videos_per_class": 36, "val_fraction": 0.5, "frames": 24, "size": 128,
            "fps": 8, "seed": 1},
}
MODEL = "ViT-B/32"
EXTRACT = ["--model", MODEL, "--pretrained", "none", "--layers", "all", "--tokens", "pooled:2x2", "--frames", "8",
           "--pixels", "32x2", "--batch-size", "32", "--decode-workers", "1", "--quiet"]
# the recommended settings for a small set: train's defaults, plus what the cache asks for (TCA needs the
# full patch grid; these caches pool it to 2x2)
# `run.py --smoke`: a two-class set and the tiny ViT, one epoch per run (the code path, not the figures)
SMOKE_SETS = {"smoke": {"motions": "shapes", "classes": 2, "videos_per_class": 4, "val_fraction": 0.5, "frames": 8,
                        "size": 32, "fps": 8, "seed": 0}}
SMOKE_EXTRACT = ["--model", TINY, "--pretrained", "none", "--layers", "all", "--tokens", "pooled:2x2", "--frames",
                 "2", "--pixels", "32x2", "--batch-size", "8", "--decode-workers", "1", "--quiet"]
SMOKE_TRAIN = {"epochs": 1, "batch_size": 4}
ADAPTERS = {"probe": {}, "temporal": {}, "evl": {"tca": False}, "dist": {}, "madapter": {}}
SEEDS = (0, 1, 2)    # `run.py --seeds N` sets how many; the five adapters on both sets take hours of 2 cores
GOAL_VS_TEMPORAL, GOAL_VS_PROBE = -0.05, 0.3
CHECKED = ("madapter", "evl", "dist")


def data_set(name: str, work: Path = WORK) -> Path:
    """The synthetic set `name` under work/, written once."""
    from cachefeat.synth import generate
    s = {**SETS, **SMOKE_SETS}[name]
    out = work / f"temporal-{name}-v2"
    if not (out / "synth.json").is_file():
        generate(out, num_classes=s["classes"], videos_per_class=s["videos_per_class"], frames=s["frames"],
                 size=s["size"], seed=s["seed"], val_fraction=s["val_fraction"], fps=s["fps"], progress=False,
                 motions=s["motions"])
    return out


def caches(name: str, work: Path = WORK, log=print, extract=EXTRACT) -> dict[str, Path]:
    """{train, val} caches of set `name` (extracted once, by `cachefeat extract` processes)."""
    data = data_set(name, work)
    out = {}
    for split in ("train", "val"):
        path = work / f"temporal-{name}-v2-{split}.zarr"
        if not (path / "zarr.json").is_file() or not _complete(path):
            t0 = time.time()
            # no --overwrite: an interrupted extraction resumes with its unfinished shards
            subprocess.run([sys.executable, "-m", "cachefeat", "extract", str(data / f"{split}.txt"), "--out",
                            str(path), *extract], check=True, stdout=subprocess.DEVNULL)
            log(f"  extracted {path.name} in {time.time() - t0:.0f} s")
        out[split] = path
    return out


def _complete(path: Path) -> bool:
    from cachefeat.store import open_cache
    try:
        return open_cache(path).complete
    except Exception:
        return False


def _code_hash(adapter: str) -> str:
    """A hash of the code a training run's result depends on: the adapter's module, the shared adapter
    code and the training package."""
    import hashlib
    root = Path(__file__).resolve().parents[1] / "cachefeat"
    files = [root / "adapters" / f"{n}.py" for n in ("base", "blocks", "registry", adapter)]
    h = hashlib.sha256()
    for p in sorted([*files, *root.glob("train/*.py")]):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def train_one(adapter: str, opts: dict, train: Path, val: Path, seed: int, **settings) -> dict:
    """One `cachefeat train` run (Python API, one thread): last and best val top-1, epochs, steps, time.
    Results are kept under work/runs/, keyed by the caches, the settings and the code's hash, so a section
    run again (or another section with the same run) reuses them instead of training again."""
    import hashlib
    import json

    from cachefeat.train import TrainConfig, cpu_threads, open_run
    from cachefeat.train import train as run_training
    cfg = TrainConfig(adapter=adapter, adapter_opts=dict(opts), seed=seed, device="cpu", threads=1, **settings)
    key = hashlib.sha256(json.dumps([str(train), str(val), cfg.to_dict(), _code_hash(adapter)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:20]
    memo = Path(train).parent / "runs" / f"{key}.json"
    if memo.is_file():
        return json.loads(memo.read_text())
    with cpu_threads(1):
        run = open_run(cfg, str(train), str(val))
        t0 = time.perf_counter()
        res = run_training(run, None, log=lambda *a: None)
    h = res.history
    out = {"top1": h[-1]["val_top1"], "best_top1": max(x["val_top1"] for x in h), "train_top1": h[-1]["train_top1"],
           "reversal": h[-1].get("val_reversal_accuracy"), "epochs": len(h),
           "steps": len(h) * run.train_source.steps(0, train=True), "params": run.model.num_trainable(),
           "seconds": round(time.perf_counter() - t0, 1), "curve": [round(x["val_top1"], 4) for x in h]}
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps(out))
    return out


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'model',
    'settings',
    'seeds',
    'goals',
    'sets.*.train_clips',
    'sets.*.val_videos',
    'sets.*.verdicts',
    'sets.*.adapters.*.runs',
    'sets.*.adapters.*.params',
    'sets.*.adapters.*.top1',
    'sets.*.adapters.*.mean_top1',
    'sets.*.adapters.*.ci95',
)


def seeds_of(mode, seeds=None) -> tuple[int, ...]:
    """The seeds an accuracy section runs: those given, else `run.py --seeds N`'s first N, else SEEDS."""
    if seeds is not None:
        return tuple(seeds)
    return tuple(range(mode.seeds)) if mode is not None else SEEDS


def run(mode, log=print, sets=tuple(SETS), seeds=None, adapters=None, work: Path = WORK) -> dict:
    if adapters is None and mode is not None and mode.adapters:
        unknown = set(mode.adapters) - set(ADAPTERS)
        if unknown:
            raise SystemExit(f"adapters: unknown {sorted(unknown)}; choose from {', '.join(ADAPTERS)}")
        adapters = {a: ADAPTERS[a] for a in mode.adapters}
    adapters = adapters or ADAPTERS
    seeds = seeds_of(mode, seeds)
    smoke = mode is not None and mode.smoke
    extract, train_settings = (SMOKE_EXTRACT, SMOKE_TRAIN) if smoke else (EXTRACT, {})
    sets = tuple(SMOKE_SETS) if smoke else sets
    out = {"model": TINY if smoke else MODEL, "extract_args": " ".join(extract), "seeds": list(seeds), "sets": {},
           "settings": "cachefeat train defaults (--epochs auto: >= 30 epochs and >= 1000 steps; batch 32, "
                       "lr 1e-3, AdamW, weight decay 0.05, label smoothing 0.1)",
           "adapter_opts": adapters, "goals": {"vs_temporal": GOAL_VS_TEMPORAL, "vs_probe": GOAL_VS_PROBE}}
    for name in sets:
        s = {**SETS, **SMOKE_SETS}[name]
        log(f"[adapters] set {name}: {s['classes']} classes, {s['motions']} motions, {s['frames']} frames of "
            f"{s['size']} px")
        c = caches(name, work, log, extract)
        from cachefeat.store import open_cache
        n_train, n_val = (int(open_cache(c[k]).valid().sum()) for k in ("train", "val"))
        per = {}
        for adapter, opts in adapters.items():
            runs = {}
            for seed in seeds:
                r = train_one(adapter, opts, c["train"], c["val"], seed, **train_settings)
                runs[str(seed)] = r
                log(f"  {adapter} seed {seed}: val top-1 {r['top1']:.3f} (best {r['best_top1']:.3f}, train "
                    f"{r['train_top1']:.3f}), {r['epochs']} epochs / {r['steps']} steps, {r['seconds']:.0f} s")
            top = [r["top1"] for r in runs.values()]
            ci = mean_ci(top)
            per[adapter] = {"runs": runs, "top1": top, "mean_top1": ci["mean"], "ci95": ci["ci95"],
                            "half_width": ci["half_width"], "min_top1": min(top), "max_top1": max(top),
                            "params": next(iter(runs.values()))["params"]}
        verdicts = {}
        for a in CHECKED:
            if a not in per or "temporal" not in per or "probe" not in per:
                continue
            m = per[a]["mean_top1"]
            d_t, d_p = m - per["temporal"]["mean_top1"], m - per["probe"]["mean_top1"]
            verdicts[a] = {"minus_temporal": d_t, "minus_probe": d_p,
                           "met": d_t >= GOAL_VS_TEMPORAL and d_p >= GOAL_VS_PROBE}
        out["sets"][name] = {**s, "train_clips": n_train, "val_videos": n_val, "adapters": per, "verdicts": verdicts}
    return out


def report(r: dict) -> list[str]:
    lines = [f"### Adapters on two temporal synthetic sets ({r['model']} random weights; {r['settings']}; "
             f"mean val top-1 over seeds {r['seeds']} with its 95% t-interval; goals: madapter, evl, dist >= temporal "
             f"{r['goals']['vs_temporal']:+.2f} and >= probe + {r['goals']['vs_probe']:.2f})", "",
             "| set | adapter | trainable params | val top-1 (mean, 95% interval) | per seed | train top-1 | "
             "epochs / steps | vs temporal | vs probe | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["sets"].items():
        for a, x in s["adapters"].items():
            runs = list(x["runs"].values())
            v = s["verdicts"].get(a)
            goal = "" if v is None else ("met" if v["met"] else "missed")
            vt = "" if v is None else f"{v['minus_temporal']:+.3f}"
            vp = "" if v is None else f"{v['minus_probe']:+.3f}"
            seeds = ", ".join(f"{q['top1']:.3f}" for q in runs)
            lines.append(f"| {name} ({s['classes']} classes, {s['train_clips']} train / {s['val_videos']} val) | {a} | "
                         f"{x['params']:,} | {fmt_mean_ci(x)} | {seeds} | "
                         f"{statistics.mean(q['train_top1'] for q in runs):.3f} | {runs[0]['epochs']} / "
                         f"{runs[0]['steps']} | {vt} | {vp} | {goal} |")
    lines.append("")
    return lines
