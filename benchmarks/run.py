"""`make bench`: measure the claims of the two-stage design side by side, in one run.

    python benchmarks/run.py            quick CPU mode (a few minutes; small data, ViT-B/32)
    python benchmarks/run.py --full     GPU mode: ViT-B/16 and ViT-L/14 at their real sizes
    python benchmarks/run.py --sections extraction,storage

Writes benchmarks/results/<host>-<date>[-full].json and prints Markdown tables; every figure is a ratio of
two measurements taken in this one process. A goal that is missed is printed with the shortfall.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, WORK, Mode, fmt_ratio, machine  # noqa: E402

SECTIONS = ["extraction", "storage"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU mode with real model sizes (ViT-B/16, ViT-L/14)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, help="result JSON path (default benchmarks/results/<host>-<date>.json)")
    args = ap.parse_args(argv)
    import torch
    torch.manual_seed(0)
    mode = Mode.create(args.full, args.device)
    WORK.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    info = machine()
    print(f"cachefeat benchmarks ({'full' if mode.full else 'quick'} mode) on {info['host']}: "
          f"{info.get('gpu', info['processor'])}, {info['cpu_count']} CPU cores, torch {info['torch']}, device {mode.device}")
    t0 = time.time()
    results = {"machine": info, "mode": "full" if mode.full else "quick", "device": mode.device,
               "date": time.strftime("%Y-%m-%d %H:%M"), "sections": {}}
    for name in wanted:
        module = __import__(f"bench_{name}")
        results["sections"][name] = module.run(mode, log=print)
    results["seconds"] = round(time.time() - t0, 1)
    out = args.out or RESULTS / f"{info['host']}-{time.strftime('%Y%m%d')}{'-full' if mode.full else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float))
    print()
    print(report(results))
    print(f"\nresults: {out} ({results['seconds']:.0f} s)")
    return 0


def report(results: dict) -> str:
    """The Markdown tables the README quotes."""
    s = results["sections"]
    lines = []
    if "extraction" in s:
        lines += ["### Extraction efficiency (goal: >= 0.90 on GPU)", "",
                  "| model | device | extract frames/s | bare forward frames/s | efficiency | vs goal | decoders alone frames/s | written MiB/s | bottleneck (share of pipeline time) | taps / plain forward | naive loop frames/s | extract / naive |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model, r in s["extraction"].items():
            gap = r["efficiency"] - 0.90
            verdict = "met" if gap >= 0 else f"missed by {-gap:.2f}"
            shares = r.get("time_shares", {})
            neck = max(shares, key=shares.get) if shares else "?"
            neck = {"wait_decode": "decoding", "forward": "backbone", "wait_write": "writing"}.get(neck, neck)
            lines.append(f"| {model} | {r['device']} | {r['extract_frames_per_s']:.1f} | {r['bare_frames_per_s']:.1f} | "
                         f"{fmt_ratio(r['efficiency'])} | {verdict} | {r.get('decode_only_frames_per_s', float('nan')):.1f} | "
                         f"{r.get('written_mib_per_s', float('nan')):.0f} | {neck} ({shares.get(max(shares, key=shares.get), 0) if shares else 0:.0%}) | "
                         f"{fmt_ratio(r['taps_over_plain'])} | {r['naive_frames_per_s']:.1f} | {fmt_ratio(r['extract_over_naive'])} |")
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
            q = next(x for x in rows if x["dtype"] == "int8" and all(x[k] == r[k] for k in ("model", "tokens", "layers")))
            lines.append(f"| {r['model']} | {r['tokens']} | {r['layers']} | {_b(r['bytes_per_frame'])} | "
                         f"{r['k400_8f_tb']:.2f} TB | {_b(q['bytes_per_frame'])} | {q['k400_8f_tb']:.2f} TB |")
        cd = st["codecs"]
        lines += ["", f"### Codecs on {cd['model']} tokens ({cd['raw_mib']:.0f} MiB float16, random weights)", "",
                  "| codec (+ CRC32C) | ratio | write MiB/s | read MiB/s | random clip reads MiB/s |", "|---|---|---|---|---|"]
        for k, r in cd["codecs"].items():
            lines.append(f"| {k} | {r['ratio']:.3f} | {r['write_mib_s']:.0f} | {r['read_mib_s']:.0f} | "
                         f"{r['random_clip_read_mib_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _b(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
