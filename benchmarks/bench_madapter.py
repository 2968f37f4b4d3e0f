"""`--sections madapter`: the ablation behind each of M-adapter's design choices (cachefeat/adapters/madapter.py).

M-adapter's paper gives only its outline ("hierarchically combined multi-level output adapters, each a
fusion module and a temporal module"), so every internal choice is ours and is measured here: starting from
the default, one option changes at a time (levels, fusion, temporal module, hierarchy, width, which layers,
which tokens), trained on both synthetic sets of the adapters section (the same caches) with a fixed
schedule (100 epochs), seeds 0-2 (`run.py --seeds N`; mean and 95% t-interval), and compared on held-out
val top-1. `temporal` (the transformer
over the last block's CLS) runs under the same schedule as the yardstick.

The kept result (benchmarks/results/vm-20261201-madapter.json) ran each set in a process of its own,
side by side (`run(mode, sets=(name,))`), on the sets' first val split: 8 (shapes) and 6 (alt) val videos
per class; the section now evaluates on the adapters section's larger val split.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from common import WORK, fmt_mean_ci, mean_ci

BASE = {}   # madapter's defaults
VARIANTS = {
    "default": {},
    "levels=1": {"levels": 1}, "levels=2": {"levels": 2}, "levels=12": {"levels": 12},
    "fusion=concat": {"fusion": "concat"},
    "temporal=conv": {"temporal": "conv"}, "temporal=mlp": {"temporal": "mlp"},
    "combine=parallel": {"combine": "parallel"},
    "dim=128": {"dim": 128}, "dim=512": {"dim": 512},
    "layers=last:4": {"layers": "last:4"},
    "tokens=patch": {"tokens": "patch"},
}
SEEDS = (0, 1, 2)
SCHEDULE = {"epochs": 100}     # 600 steps on shapes, 700 on alt: enough to rank the variants, not to converge


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'schedule',
    'seeds',
    'mean_over_sets',
    'sets.*.classes',
    'sets.*.variants.*.top1',
    'sets.*.variants.*.mean_top1',
    'sets.*.variants.*.ci95',
    'sets.*.variants.*.params',
)


def run(mode, log=print, sets=("shapes", "alt"), variants=None, seeds=None, work: Path = WORK) -> dict:
    from bench_adapters import SETS, SMOKE_EXTRACT, SMOKE_SETS, SMOKE_TRAIN, caches, seeds_of, train_one
    seeds = seeds_of(mode, seeds) if mode is not None or seeds is not None else SEEDS
    smoke = mode is not None and mode.smoke
    variants = variants or ({"default": {}} if smoke else VARIANTS)
    schedule = SMOKE_TRAIN if smoke else SCHEDULE
    sets = tuple(SMOKE_SETS) if smoke else sets
    out = {"schedule": schedule, "seeds": list(seeds), "sets": {}}
    for name in sets:
        c = caches(name, work, log, SMOKE_EXTRACT) if smoke else caches(name, work, log)
        rows = {}
        log(f"[madapter] set {name}: {len(variants)} variants x {len(seeds)} seeds, {schedule}")
        for vname, opts in {"temporal (reference)": None, **variants}.items():
            adapter, o = ("temporal", {}) if opts is None else ("madapter", {**BASE, **opts})
            runs = [train_one(adapter, o, c["train"], c["val"], s, **schedule) for s in seeds]
            top = [r["top1"] for r in runs]
            ci = mean_ci(top)
            rows[vname] = {"adapter": adapter, "opts": o, "top1": top, "mean_top1": ci["mean"], "ci95": ci["ci95"],
                           "half_width": ci["half_width"],
                           "train_top1": statistics.mean(r["train_top1"] for r in runs), "params": runs[0]["params"],
                           "seconds": statistics.mean(r["seconds"] for r in runs)}
            log(f"  {vname}: val top-1 {rows[vname]['mean_top1']:.3f} ({', '.join(f'{t:.3f}' for t in top)}), "
                f"train {rows[vname]['train_top1']:.3f}, {runs[0]['params']:,} params, "
                f"{rows[vname]['seconds']:.0f} s")
        out["sets"][name] = {"classes": {**SETS, **SMOKE_SETS}[name]["classes"], "variants": rows}
    names = list(next(iter(out["sets"].values()))["variants"])
    out["mean_over_sets"] = {n: statistics.mean(s["variants"][n]["mean_top1"] for s in out["sets"].values())
                             for n in names}
    return out


def report(r: dict) -> list[str]:
    sets = list(r["sets"])
    lines = [f"### M-adapter ablation (one option changed at a time from the default; {r['schedule']['epochs']} "
             f"epochs, batch 32, seeds {r['seeds']}; val top-1)", "",
             "| variant | " + " | ".join(f"{s} ({r['sets'][s]['classes']} classes; mean, 95% interval)" for s in sets) +
             " | mean | trainable params |", "|---|" + "---|" * (len(sets) + 2)]
    for n, mean in r["mean_over_sets"].items():
        first = r["sets"][sets[0]]["variants"][n]
        lines.append(f"| {n} | " + " | ".join(fmt_mean_ci(r['sets'][s]['variants'][n]) for s in sets) +
                     f" | {mean:.3f} | {first['params']:,} |")
    lines.append("")
    return lines
