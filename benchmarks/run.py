"""`make bench`: measure the claims of the two-stage design side by side, in one run.

    python benchmarks/run.py            quick CPU mode (a few minutes; small data, ViT-B/32)
    python benchmarks/run.py --full     GPU mode: ViT-B/16 and ViT-L/14 at their real sizes
    python benchmarks/run.py --sections extraction,storage
    python benchmarks/run.py --smoke    every section at toy sizes (seconds each): its code path and the keys
                                        its docs table needs (KEYS in each bench_*.py); writes no result file
    python benchmarks/run.py compare OLD.json NEW.json [--threshold 0.15]

Sections: io (stage one's I/O path against its ceilings: writer vs raw disk write, decoders, the pipeline
with a free backbone), extraction, storage, reading (cache read efficiency), object_store (a cache in an
S3-compatible bucket on a local moto server: push() against raw PUTs of the same bytes, reading through
open_cache(url) against raw ranged GETs of the same ranges), training (cost per step: cached, online, full
fine-tuning, ST-Adapter), ablation (K configs x E epochs), int8 (size and top-1 against float16),
scale (400 classes at 2,000 and 20,000 clips: extract, streamed train and eval, a 2-config ablation, each a
`cachefeat` process; peak RSS and time per clip as ratios of the two sizes), long (`extract --sampling fps:1`
on a 10-minute and a 60-minute video: peak RSS of the extract process and of its decode worker as ratios),
adapters (every adapter's accuracy on two differently generated temporal synthetic sets, recommended
settings), madapter (the ablation behind M-adapter's design), view_budget (accuracy vs cached augmented
views K, against online augmentation, and the storage each K costs). object_store takes ~80 s and needs
moto[server] (a test extra), scale ~9 minutes on 2 cores, long a few (it writes the videos once) and the
accuracy sections (adapters, madapter, view_budget) an hour or more each, so only `--sections NAME` runs
them; the default is every other section.

Writes benchmarks/results/<host>-<date>[-full].json, its log beside it (.log), and prints Markdown tables;
every figure is a ratio of two measurements taken in this one run, side by side (peak memory per training
variant in a process of its own). A goal that is missed is printed with the shortfall.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, WORK, Mode, check_keys, fmt_ratio, git_describe, machine  # noqa: E402

SECTIONS = ["io", "extraction", "storage", "reading", "object_store", "training", "ablation", "int8", "scale", "long",
            "adapters", "madapter", "view_budget"]
# `--sections scale` (400 classes, 2,000 and 20,000 clips) takes ~9 minutes on 2 quiet cores, `--sections long`
# (a 10- and a 60-minute video) a few, the accuracy sections (many training runs each) an hour or more: not
# run by default; nor object_store (~80 s in quick mode on 2 cores, and it needs moto[server], a test extra)
SLOW_SECTIONS = ("scale", "long", "adapters", "madapter", "view_budget", "object_store")
DEFAULT_SECTIONS = [s for s in SECTIONS if s not in SLOW_SECTIONS]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU mode with real model sizes (ViT-B/16, ViT-L/14)")
    ap.add_argument("--smoke", action="store_true",
                    help="every section at toy sizes: checks each runs and returns its KEYS; no result file")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--sections", help=f"comma list of {', '.join(SECTIONS)} (default: all but "
                                       f"{', '.join(SLOW_SECTIONS)}; with --smoke, all)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per setting in the accuracy sections (default 3)")
    ap.add_argument("--adapters", help="comma list: the adapters section trains only these (default: all; e.g. the "
                                       "cheap ones first, evl and dist in another run)")
    ap.add_argument("--out", type=Path, help="result JSON path (default benchmarks/results/<host>-<date>.json; "
                                             "with --smoke, none)")
    args = ap.parse_args(argv)
    import torch
    torch.manual_seed(0)
    mode = Mode.create(args.full, args.device, smoke=args.smoke)
    mode.seeds = 2 if args.smoke and "--seeds" not in argv else args.seeds
    mode.adapters = tuple(a.strip() for a in (args.adapters or "").split(",") if a.strip())
    WORK.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in (args.sections or ",".join(SECTIONS if args.smoke else DEFAULT_SECTIONS)).split(",")
              if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    info = machine()
    kind = "smoke" if mode.smoke else "full" if mode.full else "quick"
    out = args.out
    if out is None and not mode.smoke:
        out = RESULTS / f"{info['host']}-{time.strftime('%Y%m%d')}{'-full' if mode.full else ''}.json"
    lines = []

    def log(*a):
        print(*a, flush=True)
        lines.append(" ".join(str(x) for x in a))
    log(f"cachefeat benchmarks ({kind} mode) on {info['host']}: {info.get('gpu', info['processor'])}, "
        f"{info['cpu_count']} CPU cores, torch {info['torch']}, device {mode.device}")
    t0 = time.time()
    results = {"machine": info, "mode": kind, "device": mode.device, "date": time.strftime("%Y-%m-%d %H:%M"),
               "git_describe": git_describe(), "sections": {}}
    failed = []
    for name in wanted:
        module = __import__(f"bench_{name}")
        if not mode.smoke:
            results["sections"][name] = module.run(mode, log=log)
            continue
        t1 = time.time()
        try:
            res = module.run(mode, log=log)
            report({"sections": {name: res}})     # the tables render from it
        except Exception:
            failed.append(f"{name}: {traceback.format_exc().strip().splitlines()[-1]}")
            traceback.print_exc()
            continue
        missing = check_keys(res, module.KEYS, name)
        failed += missing
        log(f"[smoke] {name}: {time.time() - t1:.1f} s, " + ("keys missing" if missing else "every key present"))
        results["sections"][name] = res
    results["seconds"] = round(time.time() - t0, 1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float))
    log()
    log(report(results))
    log(f"\nresults: {out or 'not written (smoke)'} ({results['seconds']:.0f} s)")
    if out is not None:
        out.with_suffix(".log").write_text("\n".join(lines) + "\n")
    if failed:
        print("smoke: failed sections: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def figures(node, prefix: str = "") -> dict[str, float]:
    """Every numeric figure of a result, by dotted path (booleans are not figures)."""
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(figures(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.update(figures(v, f"{prefix}[{i}]"))
    elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
        out[prefix] = float(node)
    return out


def compare(old: dict, new: dict, threshold: float = 0.15) -> tuple[list[str], int]:
    """A table of every numeric figure both results hold (under sections), the new / old ratio, and a flag
    where it moved by more than `threshold` either way; and how many were flagged."""
    a, b = figures(old.get("sections", old)), figures(new.get("sections", new))
    shared = [k for k in a if k in b]
    lines = [f"| figure | old | new | new / old | moved > {threshold:.0%} |", "|---|---|---|---|---|"]
    flagged = 0
    for k in shared:
        x, y = a[k], b[k]
        ratio = y / x if x else (1.0 if y == x else None)
        moved = ratio is None or abs(ratio - 1) > threshold
        flagged += moved
        lines.append(f"| {k} | {x:.4g} | {y:.4g} | {'n/a' if ratio is None else f'{ratio:.3f}'} | "
                     f"{'**moved**' if moved else ''} |")
    lines.append(f"\n{len(shared)} shared figures, {flagged} moved by more than {threshold:.0%}; "
                 f"{len(set(a) - set(b))} only in the old, {len(set(b) - set(a))} only in the new")
    return lines, flagged


def compare_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="run.py compare", description="every figure two result files share, side "
                                 "by side, with the ratio; moves beyond the threshold flagged")
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--threshold", type=float, default=0.15, help="flag |new / old - 1| above this (default 0.15)")
    args = ap.parse_args(argv)
    try:
        old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    except (OSError, ValueError) as e:
        print(f"run.py compare: cannot read a result file: {e}", file=sys.stderr)
        return 2
    head = [f"old: {args.old} ({old.get('date', '?')}, {old.get('mode', '?')} mode)",
            f"new: {args.new} ({new.get('date', '?')}, {new.get('mode', '?')} mode)", ""]
    lines, _ = compare(old, new, args.threshold)
    print("\n".join(head + lines))
    return 0


def report(results: dict) -> str:
    """The Markdown tables the README quotes."""
    s = results["sections"]
    lines = []
    if "io" in s:
        r = s["io"]
        lines += [f"### Stage one's I/O path (goals: writer and io ceiling efficiency >= {0.8})", "",
                  "| what | rate | efficiency | vs goal |", "|---|---|---|---|"]
        for what, rate, eff in (
                (f"writer alone, codec {r['codec']}, fsync (vs raw write {r['raw_write_mib_s']:.0f} MiB/s)",
                 f"{r['writer_mib_s']:.0f} MiB/s", r["writer_efficiency"]),
                (f"free-backbone pipeline (vs {r['limiting_side']}: decoders {r['decoders_frames_per_s']:.0f}, "
                 f"writer {r['writer_frames_per_s']:.0f} frames/s)", f"{r['free_backbone_frames_per_s']:.0f} frames/s",
                 r["io_ceiling_efficiency"])):
            gap = eff - 0.8
            lines.append(f"| {what} | {rate} | {fmt_ratio(eff)} | {'met' if gap >= 0 else f'missed by {-gap:.2f}'} |")
        for key, what in (("_no_fsync", f"codec {r['codec']}, no fsync"), ("_zstd3", "codec zstd:3")):
            if f"writer_efficiency{key}" in r:
                lines.append(f"| writer alone, {what} (vs raw write {r[f'raw_write_mib_s{key}']:.0f} MiB/s) | "
                             f"{r[f'writer_mib_s{key}']:.0f} MiB/s | {fmt_ratio(r[f'writer_efficiency{key}'])} | "
                             f"for comparison |")
        if "free_backbone_round_efficiencies" in r:
            lines.append(f"| free-backbone pipeline, round by round (decoders alone and the pipeline alternate) | | "
                         f"{', '.join(fmt_ratio(x) for x in r['free_backbone_round_efficiencies'])} | |")
        if "free_backbone_cpu_ms_per_frame" in r:
            split = (f" (decoders {r['free_backbone_decoders_cpu_ms_per_frame']:.2f}, alone "
                     f"{r['decoders_cpu_ms_per_frame']:.2f}; the pipeline's process "
                     f"{r['free_backbone_process_cpu_ms_per_frame']:.2f})"
                     if "decoders_cpu_ms_per_frame" in r else " (decoders, main thread, writer)")
            lines.append(f"| CPU the free-backbone pipeline used{split} | "
                         f"{r['free_backbone_cpu_ms_per_frame']:.2f} ms per frame: at most "
                         f"{1000 * r['cores'] / r['free_backbone_cpu_ms_per_frame']:.0f} frames/s on {r['cores']} "
                         f"cores | | |")
        if "fsync_seconds_per_shard" in r:
            lines.append(f"| fsync per shard of {r['shard_clips']} clips | {r['fsync_seconds_per_shard']:.2f} s | | |")
        lines.append("")
    if "extraction" in s:
        lines += ["### Extraction efficiency (goal: >= 0.90 on GPU)", "",
                  "| model | device | extract frames/s | bare forward frames/s | efficiency | vs goal "
                  "| decoders alone frames/s | written MiB/s | bottleneck (share of pipeline time) "
                  "| taps / plain forward | naive loop frames/s | extract / naive |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model, r in s["extraction"].items():
            gap = r["efficiency"] - 0.90
            verdict = "met" if gap >= 0 else f"missed by {-gap:.2f}"
            shares = r.get("time_shares")   # absent from results of runs before it was measured
            if shares:
                key = max(shares, key=shares.get)
                name = {"wait_decode": "decoding", "forward": "backbone", "wait_write": "writing"}[key]
                neck = f"{name} ({shares[key]:.0%})"
            else:
                neck = "not measured"
            decode = f"{r['decode_only_frames_per_s']:.1f}" if "decode_only_frames_per_s" in r else "not measured"
            written = f"{r['written_mib_per_s']:.0f}" if "written_mib_per_s" in r else "not measured"
            lines.append(f"| {model} | {r['device']} | {r['extract_frames_per_s']:.1f} | "
                         f"{r['bare_frames_per_s']:.1f} | "
                         f"{fmt_ratio(r['efficiency'])} | {verdict} | {decode} | {written} | {neck} | "
                         f"{fmt_ratio(r['taps_over_plain'])} | {r['naive_frames_per_s']:.1f} | "
                         f"{fmt_ratio(r['extract_over_naive'])} |")
        lines.append("")
    if "storage" in s:
        st = s["storage"]
        lines += ["### Storage: bytes per frame (uncompressed; Kinetics-400 train at 8 frames = 1.92M frames)", "",
                  "| model | tokens | layers | float16 per frame | float16 K400 | int8 per frame | int8 K400 |",
                  "|---|---|---|---|---|---|---|"]
        rows = st["bytes_per_frame"]
        for r in rows:
            if r["dtype"] != "float16":
                continue
            q = next(x for x in rows
                     if x["dtype"] == "int8" and all(x[k] == r[k] for k in ("model", "tokens", "layers")))
            lines.append(f"| {r['model']} | {r['tokens']} | {r['layers']} | {_b(r['bytes_per_frame'])} | "
                         f"{r['k400_8f_tb']:.2f} TB | {_b(q['bytes_per_frame'])} | {q['k400_8f_tb']:.2f} TB |")
        cd = st["codecs"]
        lines += ["", f"### Codecs on {cd['model']} tokens ({cd['raw_mib']:.0f} MiB float16, random weights)", "",
                  "| codec (+ CRC32C) | ratio | write MiB/s | read MiB/s: zarr / shard files | "
                  "random clip reads MiB/s: zarr / shard files |", "|---|---|---|---|---|"]
        for k, r in cd["codecs"].items():
            lines.append(f"| {k} | {r['ratio']:.3f} | {r['write_mib_s']:.0f} | {r['read_mib_s']:.0f} / "
                         f"{r['direct_read_mib_s']:.0f} | {r['random_clip_read_mib_s']:.0f} / "
                         f"{r['direct_random_clip_read_mib_s']:.0f} |")
        lines.append("")
    if "reading" in s:
        r = s["reading"]
        lines += [f"### Cache read efficiency (goal: >= {r['goal']:.2f})", "",
                  f"{r['adapter']} {r['adapter_opts']} on {r['model']} reads {r['reads']}: {r['mib_per_clip']:.2f} MiB "
                  f"per clip, {r['clips']} clips per epoch, batch {r['batch_size']}, {r['shards']} shards, "
                  f"{r['workers']} reader processes; median of {r['rounds']} alternated training runs of "
                  f"{r['epochs']} epochs each.", "",
                  "| device | in RAM clips/s | streamed clips/s | efficiency | vs goal | first epoch | later epochs | "
                  "first batch: first / later epochs | one process reading: shard files / zarr, clips/s |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| {r['device']} | {r['ram_clips_per_s']:.1f} | {r['streamed_clips_per_s']:.1f} | "
                  f"{fmt_ratio(r['efficiency'])} | {r['verdict']} | {fmt_ratio(r['first_epoch_efficiency'])} | "
                  f"{fmt_ratio(r['later_epochs_efficiency'])} | {r['streamed_first_batch_s']:.2f} s / "
                  f"{r['streamed_later_first_batch_s']:.3f} s | {r['single_process_read_clips_per_s']:.0f} / "
                  f"{r['single_process_read_zarr_clips_per_s']:.0f} |", ""]
    if "object_store" in s:
        lines += object_store_report(s["object_store"])
    if "training" in s:
        lines += ["### Training cost per step, same adapter and batch", "",
                  "| model | device | variant | trainable params | ms/step | time / (a) | peak memory | memory / (a) | "
                  "above the import floor | that / (a) |", "|---|---|---|---|---|---|---|---|---|---|"]
        names = {"cached": "(a) from the cache", "online": "(b) online, frozen backbone",
                 "finetune": "(c1) full fine-tuning", "st_adapter": "(c2) ST-Adapter in the backbone"}
        for model, r in s["training"].items():
            for v, x in r["variants"].items():
                t = "n/a" if x["ms_per_step"] is None else f"{x['ms_per_step']:.0f}"
                m = "n/a" if x["peak_mib"] is None else f"{x['peak_mib']:.0f} MiB"
                note = f" ({x['error']})" if x.get("error") else ""
                af = "n/a" if x.get("above_floor_mib") is None else f"{x['above_floor_mib']:.0f} MiB"
                lines.append(f"| {model} | {r['device']} | {names[v]}{note} | {x['trainable_params'] or 0:,} | {t} | "
                             f"{fmt_ratio(x['time_over_cached'])} | {m} | {fmt_ratio(x['memory_over_cached'])} | "
                             f"{af} | {fmt_ratio(x.get('above_floor_over_cached'))} |")
            what = next((x["memory_what"] for x in r["variants"].values() if x.get("memory_what")), "")
            floor = next((x["floor_mib"] for x in r["variants"].values() if x.get("floor_mib")), None)
            lines.append(f"\n{model}: {r['adapter']} {r['adapter_opts']}, {r['clips_per_step']} clips x {r['frames']} "
                         f"frames per step, {r['precision']}; memory is {what} of a process per variant"
                         + (f"; the import floor is what a process holds after importing torch, open_clip and "
                            f"cachefeat, before building anything ({floor:.0f} MiB)" if floor else "") + ".\n")
    if "ablation" in s:
        a = s["ablation"]
        m = a["measured"]
        lines += [f"### Ablation cost: K configs x E epochs ({a['model']}, {a['device']}, {a['videos']} videos x "
                  f"{a['frames']} frames)", "",
                  f"Measured per unit: extraction X = {a['extraction_s']:.1f} s; per epoch cached c = "
                  f"{a['cached_epoch_s']:.3f} s, online o = {a['online_epoch_s']:.3f} s "
                  f"(o/c = {a['epoch_ratio']:.1f}); "
                  f"per-config setup s_c = {a['cached_setup_s']:.2f} s, s_o = {a['online_setup_s']:.2f} s.", "",
                  "| K | E | K x E | cached total | online total | online / cached | how |",
                  "|---|---|---|---|---|---|---|",
                  f"| {m['K']} | {m['E']} | {m['K'] * m['E']} | {m['cached_s']:.1f} s | {m['online_s']:.1f} s | "
                  f"{m['ratio']:.2f} | measured end to end |"]
        for d in a["derived"]:
            lines.append(f"| {d['K']} | {d['E']} | {d['KxE']} | {d['cached_s']:.0f} s | {d['online_s']:.0f} s | "
                         f"{d['ratio']:.1f} | derived: {a['formula']} |")
        be = a.get("breakeven_KxE")
        lines += ["", f"Derived: the ratio grows with K x E towards o/c = {a['epoch_ratio']:.1f}"
                  + (f"; the cache pays for itself from K x E ~ {be:.1f} epochs in all." if be else ".") + "", ""]
    if "int8" in s:
        q = s["int8"]
        f16, i8 = q["dtypes"]["float16"], q["dtypes"]["int8"]
        lines += [f"### int8 cache vs float16 ({q['model']}, layers {q['layers']}, tokens {q['tokens']}, "
                  f"{q['frames']} frames; temporal {q['adapter_opts']} x {q['epochs']} epochs)", "",
                  "| dtype | train cache on disk | bytes/frame on disk | val top-1 per seed (%) | mean top-1 (%) |",
                  "|---|---|---|---|---|"]
        for name, d, mean in (("float16", f16, q["float16_mean_top1"]), ("int8", i8, q["int8_mean_top1"])):
            per = ", ".join(f"{v:.2f}" for v in d["top1"].values())
            lines.append(f"| {name} | {_b(d['bytes_train'])} | {_b(d['bytes_per_frame_on_disk'])} | {per} | "
                         f"{mean:.2f} |")
        lines += ["", f"int8 - float16: {q['mean_diff']:+.2f} points mean over seeds {q['seeds']} (per seed: "
                  + ", ".join(f"{x:+.2f}" for x in q["per_seed_diff"]) + f"); goal: lose at most 0.5 points: "
                  f"{q['verdict']}. {q['val_videos']} val videos: 1 video = {q['points_per_video']:.2f} points. "
                  f"int8 store size / float16: {q['size_ratio']:.2f}. The float16-trained adapters on the int8 val "
                  f"cache (same weights, quantized features): {q['same_weights_mean_diff']:+.2f} points, "
                  f"{q['same_weights_agreement']:.1%} of val videos predicted alike.", ""]
    if "scale" in s:
        lines += scale_report(s["scale"])
    if "long" in s:
        lines += long_report(s["long"])
    for name in ("adapters", "madapter", "view_budget"):
        if name in s:
            lines += __import__(f"bench_{name}").report(s[name])
    return "\n".join(lines)


def _verdict(margin: float | None) -> str:
    if margin is None:
        return "no goal"
    return f"met (margin {margin:.2f})" if margin >= 0 else f"missed by {-margin:.2f}"


def scale_report(sc: dict) -> list[str]:
    small, large = (sc["per_size"][str(n)] for n in (sc["sizes"][0], sc["sizes"][-1]))
    a, b = f"{small['clips']:,}", f"{large['clips']:,}"
    names = {"extract": "extract", "train": "train (streamed)", "eval": "eval (streamed)",
             "ablate_driver": "ablate: driver process", "ablate_trial": "ablate: largest trial process"}
    lines = [f"### Kinetics scale: {sc['classes']} classes, {a} vs {b} clips (goals {b}/{a}: peak RSS <= 1.2 for "
             f"train, eval, ablate; time per clip <= 1.3)", "",
             f"| step | time per clip {a} / {b} | ratio | vs goal | peak RSS {a} / {b} | ratio | vs goal | growth |",
             "|---|---|---|---|---|---|---|---|"]
    for step, r in sc["ratios"].items():
        x, y = small["steps"][step], large["steps"][step]
        both = x.get("peak_mib") and y.get("peak_mib")
        rss = f"{x['peak_mib']:.0f} / {y['peak_mib']:.0f} MiB" if both else "not measured"
        growth = f"{y['peak_mib'] - x['peak_mib']:+.0f} MiB" if both else "n/a"
        lines.append(f"| {names.get(step, step)} | {x['ms_per_clip']:.2f} / {y['ms_per_clip']:.2f} ms | "
                     f"{fmt_ratio(r['time_per_clip_ratio'])} | {_verdict(r['time_margin'])} | {rss} | "
                     f"{fmt_ratio(r['rss_ratio'])} | {_verdict(r['rss_margin'])} | {growth} |")
    lines += ["", f"{sc['model']} (random weights), `extract {sc['extract_args']}`; `train {sc['train_args']}`; "
              f"`eval {sc['eval_args']}`; ablate: probe and temporal, 1 epoch each, streamed, the cache as val cache. "
              f"Each step one `cachefeat` process; time: its wall time over the clips (imports, model build and "
              f"starting Ray included, so fixed costs weigh more at {a}); memory: {sc['memory_what']}. Ablate's "
              f"time is the whole command for both trials.", ""]
    return lines


def object_store_report(o: dict) -> list[str]:
    w, r = o["write"], o["read"]
    return [f"### A cache in an S3-compatible bucket (goal: >= {o['goal']:.2f} of the raw requests' rate)", "",
            "| what | cachefeat MiB/s | raw requests MiB/s | efficiency | vs goal | CPU busy, of one core, cachefeat / "
            "raw: server | client |", "|---|---|---|---|---|---|---|",
            f"| write: `push()` vs one PUT per file | {w['push_mib_s']:.1f} | {w['raw_put_mib_s']:.1f} | "
            f"{fmt_ratio(w['efficiency'])} | {w['verdict']} | {w['server_busy_push']:.2f} / "
            f"{w['server_busy_raw']:.2f} | {w['client_busy_push']:.2f} / {w['client_busy_raw']:.2f} |",
            f"| read: an epoch of batches through `open_cache(url)` vs {r['requests_raw']} ranged GETs | "
            f"{r['reader_mib_s']:.1f} | {r['raw_get_mib_s']:.1f} | {fmt_ratio(r['efficiency'])} | {r['verdict']} | "
            f"{r['server_busy_reader']:.2f} / {r['server_busy_raw']:.2f} | {r['client_busy_reader']:.2f} / "
            f"{r['client_busy_raw']:.2f} |", "",
            f"Of the client's CPU, in the kernel (cachefeat / raw): write {w['client_kernel_push']:.2f} / "
            f"{w['client_kernel_raw']:.2f}, read {r['client_kernel_reader']:.2f} / {r['client_kernel_raw']:.2f} of a "
            f"core; minor page faults a round: write {w['page_faults_push']:,} / {w['page_faults_raw']:,}, read "
            f"{r['page_faults_reader']:,} / {r['page_faults_raw']:,} (memory mapped on first touch).", "",
            f"{o['model']} `--layers {o['layers']} --tokens {o['tokens']}`, {o['frames']} frames, {o['clips']} clips "
            f"in shards of {o['shard_clips']} (random float16 features): {o['objects']} objects, "
            f"{o['cache_mib']:.1f} MiB pushed; {o['feature_objects']} shard objects, {o['read_mib']:.1f} MiB read. "
            f"{o['in_flight']} requests in flight on both sides; medians of {o['rounds']} alternated rounds. Server: "
            f"{o['server']}: its one GIL caps the raw requests (a server busy near 1.0 is that GIL full); a client "
            f"busy near 1.0 or more with the server idle is the client's own cost. Opening the bucket cache (listing, "
            f"documents, tables) took {r['open_s']:.2f} s, not counted. The reader's own work on the bytes it reads "
            f"(every chunk's CRC32C checked and the chunk copied into new memory, in one thread, with no request) "
            f"took {r['checks_copy_s']:.2f} s, {fmt_ratio(r['checks_copy_share'])} of the raw GETs' time.", ""]


def long_report(lg: dict) -> list[str]:
    a, b = (lg["per_length"][f"{m:g}"] for m in (lg["minutes"][0], lg["minutes"][-1]))
    ma, mb = f"{a['minutes']:g} min", f"{b['minutes']:g} min"
    lines = [f"### Long videos at fps:1: one video of {ma} vs {mb} (goal {mb}/{ma}: peak RSS <= "
             f"{lg['ratios']['peak_mib']['goal']})", "",
             f"| what | {ma} | {mb} | ratio | vs goal |", "|---|---|---|---|---|"]
    for key, what in (("peak_mib", "peak RSS, extract process"), ("decode_worker_mib", "peak RSS, decode worker")):
        r = lg["ratios"][key]
        lines.append(f"| {what} | {a[key] or 0:.0f} MiB | {b[key] or 0:.0f} MiB | {fmt_ratio(r['ratio'])} | "
                     f"{_verdict(r['margin'])} |")
    lines += [f"| samples in windows (valid windows / windows) | {a['samples']:,} ({a['valid_windows']} / "
              f"{a['windows']}) | {b['samples']:,} ({b['valid_windows']} / {b['windows']}) | | |",
              f"| wall time (hours of video per hour) | {a['seconds']:.1f} s ({a['hours_of_video_per_hour']:.0f}) | "
              f"{b['seconds']:.1f} s ({b['hours_of_video_per_hour']:.0f}) | "
              f"{fmt_ratio(lg['ratios']['seconds_per_video_hour']['ratio'])} per hour of video | |",
              f"| the video decoded whole, for scale | {a['decoded_video_mib']:.0f} MiB | "
              f"{b['decoded_video_mib']:.0f} MiB | | |", "",
              f"{lg['size'][0]}x{lg['size'][1]} at {lg['fps']} frames/s, `extract {lg['extract_args']}`, one "
              f"process per length; memory: {lg['memory_what']}.", ""]
    return lines


def _b(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
