"""Figures generated, not typed: docs/performance.md's tables from named result files, and a check of every figure.

    python benchmarks/report.py --check [--docs PATHS] [--results DIR]   exit 1: one line per wrong figure
    python benchmarks/report.py --write [--docs PATHS] [--results DIR]   regenerate the marked tables
    python benchmarks/report.py --plots [--results DIR] FILE...          PNGs next to each result file

Figure markup. A number quoted from a result file carries an invisible HTML comment right after it (and
after its unit, if any):

    0.98<!-- fig vm-20261202-io-7.json:io.writer_efficiency -->
    4.14x<!-- fig vm-20261206.json:training.ViT-B/32.variants.online.time_over_cached -->

`grep -n '<!-- fig' README.md docs/*.md` lists them all. FILE is a name in benchmarks/results/ (or
--results); KEY is a dotted path into that file's `sections` object (list items by their index; a name may
hold spaces). The rule, the only one: the shown number, thousands commas removed, equals the file's value
formatted to the shown number of decimals (`f"{value:.{d}f}"`). Units allowed between the number and the
comment: `x`, `%`, ` s`, ` ms`, ` MiB`, ` MiB/s`, ` GiB/s`, ` frames/s`. Only `%` changes the value: it is
shown as value * 100, so a key whose value is a fraction (0.978) is shown as 97.8%; a key already in percent
(int8 top-1) is quoted bare.

Generated regions. docs/performance.md holds tables between

    <!-- report:begin NAME FILE -->
    ...
    <!-- report:end -->

where NAME is a table below (TABLES) and FILE the result file it is made from; each table is headed by its
file, date, machine and code version (the file's `date`, `machine` and `git_describe` fields; a file without a
date takes it from its name; what is missing reads 'unknown'). --write rewrites them; --check fails where a
region differs from what --write would write (a table edited by hand).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIG = re.compile(
    # a minus sign counts only after a space, '(', '|' or the line's start: in "381-401" the 401 is positive
    r"(?P<shown>(?:(?<![^\s(|])-)?(?<![\d.,])\d[\d,]*(?:\.\d+)?)"
    r"(?P<unit>x|%| s| ms| MiB/s| GiB/s| MiB| frames/s)?"
    r"<!-- fig (?P<file>[^\s:]+):(?P<key>.+?) -->")
BEGIN = re.compile(r"^<!-- report:begin (?P<name>\S+) (?P<file>\S+) -->$")
END = "<!-- report:end -->"


def default_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


class Results:
    """Result files by name, each read once; a missing or unreadable file is None."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cache: dict[str, dict | None] = {}

    def get(self, name: str) -> dict | None:
        if name not in self.cache:
            path = self.folder / name
            try:
                data = json.loads(path.read_text()) if "/" not in name and path.is_file() else None
            except (OSError, ValueError):
                data = None
            self.cache[name] = data if isinstance(data, dict) else None
        return self.cache[name]


def lookup(data: dict, key: str):
    """The value at a dotted path under `sections`; KeyError naming the first missing part."""
    node = data.get("sections", {})
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(part)
    return node


def shown_matches(shown: str, unit: str, value) -> tuple[bool, str]:
    """(whether `shown` is `value` at the shown digits, the value as it should be shown)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False, f"not a number ({type(value).__name__})"
    number = shown.replace(",", "")
    digits = len(number.split(".")[1]) if "." in number else 0
    value = value * 100 if unit == "%" else value
    want = f"{value:.{digits}f}"
    return float(want) == float(number), want + unit


def check_figures(doc: Path, results: Results) -> list[str]:
    problems = []
    for lineno, line in enumerate(doc.read_text().splitlines(), 1):
        for m in FIG.finditer(line):
            shown, unit, name, key = m["shown"], m["unit"] or "", m["file"], m["key"]
            where = f"{doc.name}:{lineno}: {shown}{unit} ({name}:{key})"
            data = results.get(name)
            if data is None:
                problems.append(f"{where}: no result file {name} in {results.folder}")
                continue
            try:
                value = lookup(data, key)
            except KeyError as e:
                problems.append(f"{where}: {name} has no key {key} (missing {e.args[0]!r})")
                continue
            ok, want = shown_matches(shown, unit, value)
            if not ok:
                problems.append(f"{where}: the file says {want}")
        # a fig comment not right after a number is markup that names nothing
        if line.count("<!-- fig ") != len(FIG.findall(line)):
            problems.append(f"{doc.name}:{lineno}: a '<!-- fig FILE:KEY -->' not right after a number")
    return problems


# ---- tables ----

def fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def header(name: str, data: dict) -> str:
    m = data.get("machine")
    if isinstance(m, dict):
        machine = f"{m.get('host', 'unknown')} ({m.get('cpu_count', '?')} cores, Python {m.get('python', '?')}, " \
                  f"torch {m.get('torch', '?')})"
    else:
        machine = "unknown"
    date = data.get("date")
    if not date:
        found = re.search(r"(20\d\d)(\d\d)(\d\d)", name)
        date = "-".join(found.groups()) if found else "unknown"
    code = data.get("git_describe") or "unknown"
    return f"From `{name}`: {date}, {machine}, code {code}, {data.get('mode', '?')} mode."


def verdict(value, goal) -> str:
    if goal is None or value is None:
        return "no goal"
    return "met" if value <= goal else f"missed by {value - goal:.2f}"


def table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def t_io(s: dict) -> list[str]:
    s = s["io"]
    eff = lambda v: f"{v:.2f}" + (" (goal >= 0.8: met)" if v >= 0.8 else " (goal >= 0.8: missed)")  # noqa: E731
    return table(["what", "rate", "its ceiling", "efficiency"], [
        ["shard writer, fsync", f"{fmt(s['writer_mib_s'], 0)} MiB/s",
         f"raw write {fmt(s['raw_write_mib_s'], 0)} MiB/s", eff(s["writer_efficiency"])],
        ["free-backbone pipeline", f"{fmt(s['free_backbone_frames_per_s'], 0)} frames/s",
         f"decoders alone {fmt(s['decoders_frames_per_s'], 0)}, writer alone {fmt(s['writer_frames_per_s'], 0)}"
         " frames/s", eff(s["io_ceiling_efficiency"])],
        ["the same, round by round", "", "", ", ".join(f"{v:.2f}" for v in s["free_backbone_round_efficiencies"])],
        ["writer without fsync", f"{fmt(s['writer_mib_s_no_fsync'], 0)} MiB/s",
         f"raw write {fmt(s['raw_write_mib_s_no_fsync'], 0)} MiB/s", f"{s['writer_efficiency_no_fsync']:.2f}"],
        ["writer, codec zstd:3", f"{fmt(s['writer_mib_s_zstd3'], 0)} MiB/s",
         f"raw write {fmt(s['raw_write_mib_s_zstd3'], 0)} MiB/s", f"{s['writer_efficiency_zstd3']:.2f}"],
    ]) + ["", f"Bound by: {s.get('free_backbone_bottleneck') or s.get('limiting_side', 'unknown')}."]


def t_extraction(s: dict) -> list[str]:
    rows = [[m, v.get("device"), f"{v['layers']} / {v['tokens']}", fmt(v["extract_frames_per_s"], 1),
             fmt(v["bare_frames_per_s"], 1), f"{v['efficiency']:.2f}",
             "met" if v["efficiency"] >= 0.9 else f"missed by {0.9 - v['efficiency']:.2f}",
             f"{v['extract_over_naive']:.2f}", f"{v['taps_over_plain']:.2f}", v.get("bottleneck", "not timed")]
            for m, v in s["extraction"].items() if isinstance(v, dict) and "efficiency" in v]
    return table(["model", "device", "layers / tokens", "extract frames/s", "bare forward frames/s (ceiling)",
                  "efficiency", "vs goal 0.90", "extract / naive loop", "taps / plain forward", "bound by"], rows)


def t_storage(s: dict) -> list[str]:
    c = s["storage"]["codecs"]
    rows = [[name, f"{v['ratio']:.3f}", fmt(v["write_mib_s"], 0), fmt(v["read_mib_s"], 0),
             fmt(v.get("direct_read_mib_s"), 0), fmt(v.get("random_clip_read_mib_s"), 0),
             fmt(v.get("direct_random_clip_read_mib_s"), 0)] for name, v in c["codecs"].items()]
    return [f"{c['model']} tokens, {fmt(c['raw_mib'], 1)} MiB raw:", ""] + table(
        ["codec (+ CRC32C)", "ratio", "write MiB/s", "read MiB/s: zarr", "shard-file reader",
         "random clips: zarr", "shard-file reader"], rows)


def size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def t_bytes(s: dict) -> list[str]:
    rows: dict[tuple, dict] = {}
    for r in s["storage"]["bytes_per_frame"]:
        rows.setdefault((r["model"], r["tokens"], r["layers"]), {})[r["dtype"]] = r
    return table(["model", "tokens", "layers", "float16 per frame", "float16 K400", "int8 per frame", "int8 K400"],
                 [[*k, size(v["float16"]["bytes_per_frame"]), f"{v['float16']['k400_8f_tb']:.2f} TB",
                   size(v["int8"]["bytes_per_frame"]), f"{v['int8']['k400_8f_tb']:.2f} TB"] for k, v in rows.items()])


def t_reading(s: dict) -> list[str]:
    r = s["reading"]
    return table(["in RAM clips/s", "streamed clips/s", "efficiency", "goal", "first epoch", "later epochs",
                  "first batch: first / later epochs", "one process: shard files / zarr clips/s"], [[
        fmt(r["ram_clips_per_s"], 1), fmt(r["streamed_clips_per_s"], 1), f"{r['efficiency']:.2f}",
        f">= {r['goal']}: {r['verdict']}", f"{r['first_epoch_efficiency']:.2f}", f"{r['later_epochs_efficiency']:.2f}",
        f"{r['streamed_first_batch_s']:.2f} s / {r['streamed_later_first_batch_s']:.3f} s",
        f"{fmt(r['single_process_read_clips_per_s'], 0)} / {fmt(r['single_process_read_zarr_clips_per_s'], 0)}"]])


VARIANTS = {"cached": "(a) from the cache", "online": "(b) online, frozen backbone",
            "finetune": "(c1) full fine-tuning", "st_adapter": "(c2) ST-Adapter in the backbone"}


def t_training(s: dict) -> list[str]:
    rows = []
    for model, m in s["training"].items():
        for key, v in m["variants"].items():
            if v.get("error"):
                rows.append([model, VARIANTS.get(key, key), "-", f"failed: {v['error']}", "", "", "", "", ""])
                continue
            rows.append([model, VARIANTS.get(key, key), fmt(v["trainable_params"]), fmt(v["ms_per_step"], 0),
                         f"{v['time_over_cached']:.2f}", f"{fmt(v['peak_mib'], 0)} MiB",
                         f"{v['memory_over_cached']:.2f}", f"{fmt(v['above_floor_mib'], 0)} MiB",
                         f"{v['above_floor_over_cached']:.2f}"])
    return table(["model", "variant", "trainable params", "ms/step", "time / (a)", "peak RSS", "memory / (a)",
                  "above the import floor", "that / (a)"], rows)


def t_ablation(s: dict) -> list[str]:
    a = s["ablation"]
    m = a["measured"]
    rows = [[m["K"], m["E"], m["K"] * m["E"], f"{m['cached_s']:.1f} s", f"{m['online_s']:.1f} s",
             f"{m['ratio']:.2f}", "measured end to end"]]
    rows += [[d["K"], d["E"], d["KxE"], f"{d['cached_s']:.0f} s", f"{d['online_s']:.0f} s", f"{d['ratio']:.1f}",
              "derived"] for d in a["derived"]]
    return [f"Per unit: extraction X = {a['extraction_s']:.1f} s; per epoch cached c = {a['cached_epoch_s']:.3f} s, "
            f"online o = {a['online_epoch_s']:.3f} s (o/c = {a['epoch_ratio']:.1f}); break-even at K x E = "
            f"{a['breakeven_KxE']:.1f}; derived rows: {a['formula']}.", ""] + table(
        ["K", "E", "K x E", "cached total", "online total", "online / cached", "how"], rows)


def t_int8(s: dict) -> list[str]:
    i = s["int8"]
    rows = [[dt, f"{v['bytes_train'] / 2**20:.1f} MiB", f"{v['bytes_per_frame_on_disk'] / 1024:.1f} KiB",
             ", ".join(f"{v['top1'][str(k)]:.2f}" for k in i["seeds"]), f"{i[dt + '_mean_top1']:.2f}"]
            for dt, v in i["dtypes"].items()]
    return table(["dtype", "train cache on disk", "bytes/frame on disk", "val top-1 per seed (%)", "mean top-1 (%)"],
                 rows) + ["", f"int8 - float16: {i['mean_diff']:+.2f} points (goal: lose at most 0.5: {i['verdict']}; "
                          f"1 val video = {i['points_per_video']:.2f} points); size ratio {i['size_ratio']:.2f}; the "
                          f"float16-trained weights on the int8 val cache: {i['same_weights_mean_diff']:+.2f} points, "
                          f"{i['same_weights_agreement'] * 100:.1f}% of videos predicted alike."]


def t_scale(s: dict) -> list[str]:
    sc = s["scale"]
    small, big = (str(n) for n in sc["sizes"])
    rows = []
    for step, r in sc["ratios"].items():
        a, b = sc["per_size"][small]["steps"][step], sc["per_size"][big]["steps"][step]
        rows.append([step, f"{a['ms_per_clip']:.2f} / {b['ms_per_clip']:.2f} ms", f"{r['time_per_clip_ratio']:.2f}",
                     verdict(r["time_per_clip_ratio"], r["time_goal"]),
                     f"{a['peak_mib']:.0f} / {b['peak_mib']:.0f} MiB", f"{r['rss_ratio']:.2f}",
                     verdict(r["rss_ratio"], r["rss_goal"])])
    return table(["step", f"time per clip {small} / {big}", "ratio", "vs goal", f"peak RSS {small} / {big}", "ratio",
                  "vs goal"], rows)


def t_long(s: dict) -> list[str]:
    lg = s["long"]
    a, b = (lg["per_length"][str(n)] for n in lg["minutes"])
    r = lg["ratios"]
    return table(["what", f"{a['minutes']} min", f"{b['minutes']} min", "ratio", "vs goal"], [
        ["peak RSS, extract process", f"{a['peak_mib']:.0f} MiB", f"{b['peak_mib']:.0f} MiB",
         f"{r['peak_mib']['ratio']:.2f}", verdict(r["peak_mib"]["ratio"], r["peak_mib"]["goal"])],
        ["peak RSS, decode worker", f"{a['decode_worker_mib']:.0f} MiB", f"{b['decode_worker_mib']:.0f} MiB",
         f"{r['decode_worker_mib']['ratio']:.2f}", verdict(r["decode_worker_mib"]["ratio"],
                                                           r["decode_worker_mib"]["goal"])],
        ["wall time (hours of video per hour)", f"{a['seconds']:.1f} s ({a['hours_of_video_per_hour']:.0f})",
         f"{b['seconds']:.1f} s ({b['hours_of_video_per_hour']:.0f})",
         f"{r['seconds_per_video_hour']['ratio']:.2f} per hour of video", "no goal"],
    ])


def accuracy_table(section: str):
    """The accuracy sections' tables are the ones `run.py` prints (bench_<section>.report), less their heading:
    one way to render them."""
    def render_section(s: dict) -> list[str]:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        lines = __import__(f"bench_{section}").report(s[section])
        return lines[2:] if lines and lines[0].startswith("#") else lines
    return render_section


TABLES = {"io": t_io, "extraction": t_extraction, "bytes": t_bytes, "storage": t_storage, "reading": t_reading,
          "training": t_training, "ablation": t_ablation, "int8": t_int8, "scale": t_scale, "long": t_long,
          **{name: accuracy_table(name) for name in ("adapters", "madapter", "view_budget")}}


def render(name: str, file: str, results: Results) -> list[str] | str:
    """The region's lines, or a string saying why it cannot be made."""
    if name not in TABLES:
        return f"unknown table {name!r} (tables: {', '.join(TABLES)})"
    data = results.get(file)
    if data is None:
        return f"no result file {file} in {results.folder}"
    try:
        return [header(file, data), "", *TABLES[name](data.get("sections", {}))]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return f"{file} lacks what the {name} table needs ({type(e).__name__}: {e})"


def regions(doc: Path, results: Results) -> tuple[list[str], list[str]]:
    """(the document with every region regenerated, one problem line per region that differs or cannot be made)."""
    lines, out, problems, i = doc.read_text().splitlines(), [], [], 0
    while i < len(lines):
        m = BEGIN.match(lines[i])
        out.append(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == END), None)
        where = f"{doc.name}:{i + 1}: table {m['name']} from {m['file']}"
        if end is None:
            problems.append(f"{where}: no '{END}' after it")
            return lines, problems
        made = render(m["name"], m["file"], results)
        if isinstance(made, str):
            problems.append(f"{where}: {made}")
            made = lines[i + 1:end]
        elif made != lines[i + 1:end]:
            bad = next((k for k, (a, b) in enumerate(zip(made, lines[i + 1:end])) if a != b),
                       min(len(made), end - i - 1))
            problems.append(f"{where}: line {i + 2 + bad} differs from the file (edited by hand? "
                            "python benchmarks/report.py --write)")
        out += [*made, END]
        i = end + 1
    return out, problems


# ---- plots ----

def ceiling_pairs(s: dict) -> list[tuple[str, float, float, float]]:
    """(label, measured rate, its ceiling, the goal for their ratio) for each section whose data has one."""
    pairs = []
    if "io" in s:
        io = s["io"]
        pairs.append(("io: writer MiB/s", io["writer_mib_s"], io["raw_write_mib_s"], 0.8))
        pairs.append(("io: pipeline frames/s", io["free_backbone_frames_per_s"],
                      min(io["decoders_frames_per_s"], io["writer_frames_per_s"]), 0.8))
    for model, v in s.get("extraction", {}).items():
        if isinstance(v, dict) and "bare_frames_per_s" in v:
            pairs.append((f"extraction {model}: frames/s", v["extract_frames_per_s"], v["bare_frames_per_s"], 0.9))
    if "reading" in s:
        r = s["reading"]
        pairs.append(("reading: clips/s", r["streamed_clips_per_s"], r["ram_clips_per_s"], r.get("goal", 0.9)))
    return pairs


def plots(path: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    s, written = data.get("sections", {}), []
    pairs = ceiling_pairs(s)
    if pairs:
        fig, ax = plt.subplots(figsize=(8, 1.0 + 0.55 * len(pairs)))
        labels = [p[0] for p in pairs]
        ax.barh(labels, [1.0] * len(pairs), color="#dddddd", label="ceiling")
        ax.barh(labels, [p[1] / p[2] for p in pairs], color="#3b75af", label="measured")
        for y, (_, got, ceil, goal) in enumerate(pairs):
            ax.text(0.01, y, f"{got:,.0f} of {ceil:,.0f}  ({got / ceil:.2f})", va="center", color="black")
            ax.plot([goal, goal], [y - 0.4, y + 0.4], color="#c44", lw=1.5, label="goal" if y == 0 else None)
        ax.set_xlim(0, max(1.05, max(p[1] / p[2] for p in pairs) + 0.05))
        ax.set_xlabel("throughput / its ceiling")
        ax.invert_yaxis()
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        ax.set_title(f"{path.name}: throughput against the ceiling", fontsize=9)
        fig.tight_layout()
        written.append(path.with_name(path.stem + "-ceilings.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if "ablation" in s:
        # per-epoch times of the same training, cached and online, and the extraction the cache costs once
        a = s["ablation"]
        epochs = list(range(0, 61))
        cached = [a["extraction_s"] + a["cached_setup_s"] + e * a["cached_epoch_s"] for e in epochs]
        online = [a["online_setup_s"] + e * a["online_epoch_s"] for e in epochs]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(epochs, online, label=f"online ({a['online_epoch_s']:.2f} s/epoch)")
        ax.plot(epochs, cached, label=f"cached (extraction {a['extraction_s']:.1f} s + {a['cached_epoch_s']:.3f} "
                                      "s/epoch)")
        m = a["measured"]
        ax.scatter([m["E"] * m["K"]] * 2, [m["online_s"], m["cached_s"]], color="k", s=12, zorder=3,
                   label="measured end to end (K x E)")
        ax.set_xlabel("epochs (one config)")
        ax.set_ylabel("seconds")
        ax.set_title(f"{path.name}: training cost as epochs grow ({a['model']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(path.with_name(path.stem + "-training-cost.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="every figure and generated table against its file")
    mode.add_argument("--write", action="store_true", help="regenerate the tables between report markers")
    mode.add_argument("--plots", nargs="+", metavar="FILE", help="result files (names in --results) to plot")
    p.add_argument("--docs", nargs="+", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    args = p.parse_args(argv)
    results = Results(args.results)
    if args.plots:
        for name in args.plots:
            path = args.results / name
            if results.get(name) is None:
                print(f"report: no readable result file {path}", file=sys.stderr)
                return 2
            for png in plots(path):
                print(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
        return 0
    docs = args.docs or default_docs()
    for doc in docs:
        if not doc.is_file():
            print(f"report: no such document {doc}", file=sys.stderr)
            return 2
    problems = []
    for doc in docs:
        regenerated, region_problems = regions(doc, results)
        if args.write:
            text = "\n".join(regenerated) + "\n"
            if text != doc.read_text():
                doc.write_text(text)
                print(f"wrote {doc}")
            problems += [q for q in region_problems if "differs" not in q]
        else:
            problems += region_problems + check_figures(doc, results)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
