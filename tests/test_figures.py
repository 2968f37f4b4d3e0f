"""Figures generated, not typed: benchmarks/report.py checks every '<!-- fig FILE:KEY -->' figure in README.md
and docs/ against the result file it names, and every generated table against what --write makes."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "report.py"
RESULTS = ROOT / "benchmarks" / "results"


def report(*args):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_the_repositorys_readme_and_docs_match_their_result_files():
    res = report("--check")
    assert res.returncode == 0, res.stdout + res.stderr
    marked = [p for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if "<!-- fig " in p.read_text()]
    assert ROOT / "README.md" in marked and ROOT / "docs" / "performance.md" in marked


def test_a_readme_figure_edited_by_hand_fails_naming_it(tmp_path):
    text = (ROOT / "README.md").read_text()
    # README's first plain decimal figure, whichever result file it names today
    m = re.search(r"(?<![\d.,])(\d+)\.(\d+)(<!-- fig ([^ ]+?) -->)", text)
    assert m, "README.md quotes no decimal figure with a '<!-- fig FILE:KEY -->' mark"
    old, mark, ref = m.group(1) + "." + m.group(2), m.group(3), m.group(4)
    last = int(m.group(2)[-1])
    edited = m.group(1) + "." + m.group(2)[:-1] + str(last + 1 if last < 9 else last - 1)
    good, bad = tmp_path / "good" / "README.md", tmp_path / "bad" / "README.md"
    for p in (good, bad):
        p.parent.mkdir()
    good.write_text(text)
    bad.write_text(text[:m.start()] + edited + mark + text[m.end():])
    assert report("--check", "--docs", good, "--results", RESULTS).returncode == 0
    res = report("--check", "--docs", bad, "--results", RESULTS)
    line = text[:m.start()].count("\n") + 1
    assert res.returncode == 1
    assert res.stdout.splitlines() == [f"README.md:{line}: {edited} ({ref}): the file says {old}"]


def test_the_rounding_rule_units_and_missing_figures(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"sections": {"s": {
        "eff": 0.9801, "rate": 1713.4, "frac": 0.978, "list": [1.5, 2.25], "name with spaces (x)": {"v": 4.137}}}}))
    ok = ("0.98<!-- fig r.json:s.eff --> 1.0<!-- fig r.json:s.eff --> 1,713 MiB/s<!-- fig r.json:s.rate --> "
          "97.8%<!-- fig r.json:s.frac --> 2.25<!-- fig r.json:s.list.1 --> "
          "4.14x<!-- fig r.json:s.name with spaces (x).v -->\n")
    doc = tmp_path / "ok.md"
    doc.write_text("# ok\n" + ok)
    res = report("--check", "--docs", doc, "--results", tmp_path)
    assert res.returncode == 0, res.stdout
    doc = tmp_path / "bad.md"
    doc.write_text("0.981<!-- fig r.json:s.eff -->\n"      # 0.9801 at three decimals is 0.980
                   "1,714 MiB/s<!-- fig r.json:s.rate -->\n"
                   "0.98<!-- fig r.json:s.nothing -->\n"
                   "0.98<!-- fig gone.json:s.eff -->\n"
                   "text<!-- fig r.json:s.eff -->\n")
    out = report("--check", "--docs", doc, "--results", tmp_path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "bad.md:1: 0.981 (r.json:s.eff): the file says 0.980",
        "bad.md:2: 1,714 MiB/s (r.json:s.rate): the file says 1713 MiB/s",
        "bad.md:3: 0.98 (r.json:s.nothing): r.json has no key s.nothing (missing 'nothing')",
        f"bad.md:4: 0.98 (gone.json:s.eff): no result file gone.json in {tmp_path}",
        "bad.md:5: a '<!-- fig FILE:KEY -->' not right after a number"]


def test_a_generated_table_edited_by_hand_fails_and_write_restores_it(tmp_path):
    shutil.copy(RESULTS / "vm-20261206.json", tmp_path)
    doc = tmp_path / "perf.md"
    doc.write_text("# perf\n\n<!-- report:begin reading vm-20261206.json -->\n<!-- report:end -->\n\nafter\n")
    assert report("--check", "--docs", doc, "--results", tmp_path).returncode == 1     # empty region: not made
    res = report("--write", "--docs", doc, "--results", tmp_path)
    assert res.returncode == 0, res.stdout
    made = doc.read_text()
    assert "From `vm-20261206.json`: 2026-12-06 14:10, vm (2 cores" in made and made.endswith("after\n")
    assert report("--check", "--docs", doc, "--results", tmp_path).returncode == 0
    lines = made.splitlines()
    row = next(i for i, x in enumerate(lines) if x.startswith("| 813.0 |"))
    lines[row] = lines[row].replace("| 813.0 |", "| 913.0 |")
    doc.write_text("\n".join(lines) + "\n")
    res = report("--check", "--docs", doc, "--results", tmp_path)
    assert res.returncode == 1
    assert res.stdout.splitlines() == [f"perf.md:3: table reading from vm-20261206.json: line {row + 1} differs from "
                                       "the file (edited by hand? python benchmarks/report.py --write)"]
    assert report("--write", "--docs", doc, "--results", tmp_path).returncode == 0
    assert doc.read_text() == made


def test_the_repositorys_generated_tables_are_what_write_makes(tmp_path):
    perf = (ROOT / "docs" / "performance.md").read_text()
    assert perf.count("<!-- report:begin ") >= 5
    lines = perf.splitlines()
    begin = next(i for i, x in enumerate(lines) if x.startswith("<!-- report:begin "))
    row = next(i for i in range(begin, len(lines)) if lines[i].startswith("| ") and "---" not in lines[i + 1])
    lines[row] = lines[row].replace("|", "| hand-edited |", 1)
    doc = tmp_path / "performance.md"
    doc.write_text("\n".join(lines) + "\n")
    res = report("--check", "--docs", doc, "--results", RESULTS)
    assert res.returncode == 1 and len(res.stdout.splitlines()) == 1
    assert f"performance.md:{begin + 1}: table " in res.stdout and f"line {row + 1} differs" in res.stdout


def test_plots_are_written_next_to_the_result_file(tmp_path):
    shutil.copy(RESULTS / "vm-20261206.json", tmp_path)
    res = report("--plots", "vm-20261206.json", "--results", tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("vm-20261206-ceilings.png", "vm-20261206-training-cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = report("--plots", "nothing.json", "--results", tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and not bad.stdout
