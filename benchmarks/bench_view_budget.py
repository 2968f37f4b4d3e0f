"""`--sections view_budget`: how many cached augmented views recover online augmentation?

A cache holds K augmented views per training video, fixed at extraction; online training (the papers)
draws a fresh view every time a video is used. Measured on the "shapes" synthetic set of the adapters
section (8 classes, 192 training and 128 val videos): one training cache of KMAX views per video is
extracted once (views are drawn independently from (seed, video, view), so its first K views ARE a K-view
cache), then the same adapter trains with

    K = 1, 2, 4, 8, 16    `--train-views first:K`: each epoch one of the video's first K views
    online                `--train-views cycle`: epoch e uses view e, a fresh view every epoch (KMAX >= the
                          epochs trained), what running the frozen backbone on freshly augmented clips gives
    none                  a cache of the plain centre view (no augmentation), for reference

with `cachefeat train`'s defaults (--epochs auto) and seeds 0-2 (`run.py --seeds N`: mean and 95% t-interval);
val top-1 on the 128 held-out videos.
The augmentation is EVL's RandAugment (rand-m7-n4-mstd0.5-inc1) with a random-resized crop (0.4-1), TSN
temporal jitter and flips that swap "moving right" and "moving left" (--flip-pairs).

The backbone is the tiny registered ViT (random weights, 32 px) so that KMAX views of every video can be
extracted on a CPU; storage is reported as measured for it and as the bytes one view costs for the real
caches of the recipes (ViT-B/16, Kinetics-400 train, 8 frames), which is what the advice in
docs/adapters.md is about.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import TINY, WORK, fmt_mean_ci, mean_ci

KS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
ADAPTER, ADAPTER_OPTS = "temporal", {}
MODEL = "cachefeat-tiny-ViT"
AUG = ["--randaugment", "rand-m7-n4-mstd0.5-inc1", "--aug-scale", "0.4,1.0"]
EXTRACT = ["--model", MODEL, "--pretrained", "none", "--layers", "all", "--tokens", "cls", "--frames", "8",
           "--batch-size", "256", "--decode-workers", "1", "--quiet"]
K400_VIDEOS = 240_000
# bytes of one view of one 8-frame clip in the recipes' caches (float16): ViT-B/16 EVL (last 5 blocks, all
# 197 tokens) and a CLS-only cache of all 12 blocks (temporal, madapter)
PER_VIEW_B16 = {"evl cache (last:5, all tokens)": 8 * 5 * 197 * 768 * 2, "CLS cache (all 12 blocks)": 8 * 12 * 768 * 2}


def _extract(manifest: Path, out: Path, *extra, log=print, args=EXTRACT) -> None:
    from bench_adapters import _complete
    if (out / "zarr.json").is_file() and _complete(out):
        return
    t0 = time.time()
    # no --overwrite: an interrupted extraction resumes with its unfinished shards
    subprocess.run([sys.executable, "-m", "cachefeat", "extract", str(manifest), "--out", str(out), *args, *extra],
                   check=True, stdout=subprocess.DEVNULL)
    log(f"  extracted {out.name} in {time.time() - t0:.0f} s")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'model',
    'train_videos',
    'val_videos',
    'epochs',
    'kmax',
    'seeds',
    'recovered_at',
    'measured_bytes_per_view_per_video',
    'variants.*.views',
    'variants.*.top1',
    'variants.*.mean_top1',
    'variants.*.ci95',
    'variants.*.bytes_per_video',
    'variants.*.k400_tb',
)


def run(mode, log=print, ks=KS, seeds=None, work: Path = WORK) -> dict:
    from bench_adapters import SMOKE_TRAIN, data_set, seeds_of, train_one

    from cachefeat.store import open_cache
    from cachefeat.train.config import TrainConfig, planned_epochs
    seeds = seeds_of(mode, seeds) if mode is not None or seeds is not None else SEEDS
    smoke = mode is not None and mode.smoke
    # smoke: the adapters section's two-class set, the tiny ViT at 2 frames, K = 1, 2 over 2 epochs
    args = [*EXTRACT[:EXTRACT.index("--frames")], "--frames", "2", "--batch-size", "8", "--decode-workers", "1",
            "--quiet"] if smoke else EXTRACT
    ks = (1, 2) if smoke else ks
    data = data_set("smoke" if smoke else "shapes", work)
    (work / "shapes-flip-pairs.txt").write_text("moving right\tmoving left\n")
    n_train = len((data / "train.txt").read_text().split())  // 2
    steps = -(-n_train // TrainConfig.batch_size)
    epochs = 2 if smoke else planned_epochs(0, TrainConfig.min_steps, steps)
    settings = {**SMOKE_TRAIN, "epochs": epochs} if smoke else {}
    kmax = max(max(ks), epochs)
    log(f"[view_budget] shapes set, {n_train} training videos: {epochs} epochs of {steps} steps (auto); a cache of "
        f"{kmax} views per video")
    caches = {"aug": work / f"budget-aug{kmax}.zarr", "plain": work / "budget-plain.zarr",
              "val": work / "budget-val.zarr"}
    _extract(data / "train.txt", caches["aug"], "--aug-views", str(kmax), *AUG, "--flip-pairs",
             str(work / "shapes-flip-pairs.txt"), log=log, args=args)
    _extract(data / "train.txt", caches["plain"], log=log, args=args)
    _extract(data / "val.txt", caches["val"], log=log, args=args)
    views_bytes = _du(caches["aug"])
    per_view_video = views_bytes / (kmax * n_train)
    variants = {f"K={k}": ("aug", f"first:{k}", k) for k in ks}
    variants["online"] = ("aug", "cycle", epochs)
    variants["none"] = ("plain", "one", 1)
    res = {"model": TINY if smoke else MODEL, "adapter": ADAPTER, "adapter_opts": ADAPTER_OPTS,
           "augmentation": " ".join(AUG) +
           " --flip-pairs (moving right <-> moving left), TSN temporal jitter", "train_videos": n_train,
           "val_videos": int(open_cache(caches["val"]).valid().sum()), "epochs": epochs, "kmax": kmax,
           "seeds": list(seeds), "measured_bytes_per_view_per_video": per_view_video, "variants": {}}
    for name, (cache, views, k) in variants.items():
        runs = [train_one(ADAPTER, ADAPTER_OPTS, caches[cache], caches["val"], seed, train_views=views, **settings)
                for seed in seeds]
        top = [r["top1"] for r in runs]
        ci = mean_ci(top)
        res["variants"][name] = {"views": k, "train_views": views, "top1": top, "mean_top1": ci["mean"],
                                 "ci95": ci["ci95"], "half_width": ci["half_width"],
                                 "std_top1": statistics.pstdev(top), "train_top1": [r["train_top1"] for r in runs],
                                 "bytes_per_video": k * per_view_video,
                                 "k400_tb": {n: k * b * K400_VIDEOS / 1e12 for n, b in PER_VIEW_B16.items()}}
        log(f"  {name}: val top-1 {statistics.mean(top):.3f} (seeds {', '.join(f'{t:.3f}' for t in top)}), "
            f"train top-1 {statistics.mean(r['train_top1'] for r in runs):.3f}")
    online = res["variants"]["online"]["mean_top1"]
    res["recovered_at"] = next((k for k in ks if res["variants"][f"K={k}"]["mean_top1"] >= online - 0.02), None)
    plot(res, work / "view_budget.png")
    res["plot"] = str(work / "view_budget.png")
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [v["views"] for n, v in res["variants"].items() if n.startswith("K=")]
    mean = [v["mean_top1"] for n, v in res["variants"].items() if n.startswith("K=")]
    std = [v["std_top1"] for n, v in res["variants"].items() if n.startswith("K=")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=f"K cached views ({res['adapter']})")
    for name, style in (("online", "--"), ("none", ":")):
        v = res["variants"][name]
        a.axhline(v["mean_top1"], linestyle=style, color="k" if name == "online" else "0.5",
                  label=f"{'online (a fresh view every epoch)' if name == 'online' else 'no augmentation'} "
                        f"{v['mean_top1']:.3f}")
    a.set_xscale("log", base=2)
    a.set_xticks(ks, [str(k) for k in ks])
    a.set_xlabel("cached augmented views per video (K)")
    a.set_ylabel("val top-1")
    a.set_title(f"{res['train_videos']} training videos, {res['epochs']} epochs, mean of {len(res['seeds'])} seeds")
    a.legend(fontsize=7)
    for name in next(iter(res["variants"].values()))["k400_tb"]:
        b.plot(ks, [res["variants"][f"K={k}"]["k400_tb"][name] for k in ks], marker="o", label=name)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xticks(ks, [str(k) for k in ks])
    b.set_xlabel("cached augmented views per video (K)")
    b.set_ylabel("TB (float16)")
    b.set_title("storage: Kinetics-400 train, ViT-B/16, 8 frames")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(r: dict) -> list[str]:
    names = list(next(iter(r["variants"].values()))["k400_tb"])
    lines = [f"### View budget ({r['adapter']} on {r['model']} features of the shapes set: {r['train_videos']} "
             f"training / {r['val_videos']} val videos, {r['epochs']} epochs, seeds {r['seeds']}; "
             f"{r['augmentation']})", "",
             "| training views | val top-1 (mean, 95% interval) +- std | per seed | train top-1 | "
             "bytes per video (this cache) | "
             + " | ".join(f"K400 TB, {n}" for n in names) + " |", "|---|---|---|---|---|" + "---|" * len(names)]
    for name, v in r["variants"].items():
        if name == "online":   # nothing cached: the backbone runs on a fresh view every epoch
            cost = [f"none cached; the backbone runs every epoch ({r['epochs']} x the extraction)"] + [""] * len(names)
        else:
            cost = [f"{v['bytes_per_video'] / 1024:.1f} KiB"] + [f"{v['k400_tb'][n]:.2f}" for n in names]
        lines.append(f"| {name} | {fmt_mean_ci(v)} +- {v['std_top1']:.3f} | "
                     f"{', '.join(f'{t:.3f}' for t in v['top1'])} | {statistics.mean(v['train_top1']):.3f} | "
                     + " | ".join(cost) + " |")
    rec = r.get("recovered_at")
    lines += ["", f"Online augmentation recovered (within 0.02 of its top-1) at K = {rec}." if rec else
              "No K up to the largest measured came within 0.02 of online augmentation.", ""]
    return lines


if __name__ == "__main__":
    # python benchmarks/bench_view_budget.py RESULT.json OUT.png: the plot again, from a kept result file
    import json
    doc = json.loads(Path(sys.argv[1]).read_text())
    plot(doc["sections"]["view_budget"] if "sections" in doc else doc, Path(sys.argv[2]))
