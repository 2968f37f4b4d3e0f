"""What must not break at Kinetics scale: eval, info and train outputs at 400 and 10,000 classes (memory
measured in a fresh process, figures of a bounded size), caches that are unfinished or being written
(refused unless --allow-incomplete, counted with it), extractions that fail entirely or exceed their
failure budget, a cache too large for its disk, and `train --overwrite` checking everything first."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

from cachefeat.store import Cache
from cachefeat.store.writer import reset_shards

from conftest import REPO, run_cli, tiny_extract_args

FEW = ["--layers", "last:1", "--frames", "2", "--no-text", "--shard-size", "4"]


def _class_names(n: int) -> list[str]:
    return [f"class {i:05d} with spaces" for i in range(n)]


def _manifest(path, data, names: list[str]) -> None:
    """A list manifest (path TAB class name) of every synth_small video, the 4 synthetic classes spread over
    `names`, plus one missing file: 17 videos, 1 of them failing at extraction."""
    step = len(names) // 4
    lines = []
    for split in ("train", "val"):
        for line in (data / f"{split}.txt").read_text().splitlines():
            video, label = line.rsplit(" ", 1)
            lines.append(f"{data / video}\t{names[int(label) * step]}")
    lines.append(f"{data / 'missing.mp4'}\t{names[1]}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def wide(synth_small, tmp_path_factory):
    """For 4, 400 and 10,000 classes: a cache of the 17 videos (list manifest with class names holding
    spaces), and a probe trained 3 epochs on it (validated on it too)."""
    root = tmp_path_factory.mktemp("wide")
    out = {}
    for n in (4, 400, 10_000):
        d = root / str(n)
        d.mkdir()
        names = _class_names(n)
        (d / "classes.txt").write_text("\n".join(names) + "\n")
        _manifest(d / "list.txt", synth_small, names)
        run_cli(*tiny_extract_args(d / "list.txt", d / "cache.zarr", "--classes", d / "classes.txt", *FEW))
        run_cli("train", "--cache", d / "cache.zarr", "--val-cache", d / "cache.zarr", "--adapter", "probe",
                "--epochs", "3", "--lr", "0.05", "--threads", "1", "--out", d / "run", "--quiet")
        out[n] = d
    return out


def _eval_in_fresh_process(run, cache, out) -> tuple[int, int, str]:
    """`cachefeat eval` in a new Python process: (exit status, its peak RSS in bytes, its output)."""
    # VmHWM: the peak RSS of this process's memory since its exec (ru_maxrss would include the parent's
    # RSS at fork time on Linux)
    code = ("import runpy, sys\n"
            "sys.argv = ['cachefeat'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('cachefeat', run_name='__main__')\n"
            "finally:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "    print('PEAK_RSS_KB', hwm, file=sys.stderr)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", code, "eval", "--checkpoint", run, "--cache", cache, "--out", out,
                        "--threads", "1", "--read-workers", "0"], capture_output=True, text=True, env=env, timeout=600)
    peak = int(p.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) * 1024
    return p.returncode, peak, p.stdout + p.stderr


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_eval_memory_and_outputs_do_not_grow_with_the_classes(wide, tmp_path):
    """Measured peak RSS of a fresh `cachefeat eval` process at 400 and 10,000 classes is within 300 MiB of
    the same eval at 4 classes. (Before: the 400-class confusion.png alone was a ~24k x 24k px canvas, 22 GB
    peak; 10,000 classes raised MemoryError.) metrics.json is valid JSON with the coverage; the whole
    confusion matrix is in confusion.npz; above 50 classes a per_class.png of fixed size replaces the
    per-cell confusion.csv/png."""
    peaks = {}
    for n, d in wide.items():
        status, peaks[n], output = _eval_in_fresh_process(d / "run", d / "cache.zarr", tmp_path / f"ev{n}")
        assert status == 0, output
        ev = tmp_path / f"ev{n}"
        m = json.loads((ev / "metrics.json").read_text())
        assert m["videos"] == 16 and m["coverage"] == {"videos": 17, "evaluated": 16, "failed": 1, "unwritten": 0,
                                                       "complete": True}
        assert "16 videos evaluated of 17: 1 failed at extraction" in output
        assert len(m["per_class"]) == n and "confusion" not in m
        conf = np.load(ev / "confusion.npz")
        assert conf["count"].sum() == 16 and len(conf["classes"]) == n
        right = conf["count"][conf["true"] == conf["pred"]].sum()
        assert right / 16 == pytest.approx(m["top1"])
        logits = np.load(ev / "logits.npz")
        assert logits["video_logits"].shape == (16, n) and logits["clip_logits"].shape == (16, n)
        assert len(logits["video_id"]) == 16 and set(logits["label"]) == {i * (n // 4) for i in range(4)}
        assert (logits["video_logits"].argmax(1) == logits["label"]).mean() == pytest.approx(m["top1"])
        files = set(m["files"].values())
        if n <= 50:
            assert {"confusion.csv", "confusion.png"} <= files and "per_class.png" not in files
        else:
            assert "per_class.png" in files and not (ev / "confusion.csv").exists()
            assert _png_size(ev / "per_class.png") == (1400, 700)
    budget = 300 * 2**20
    assert peaks[400] - peaks[4] < budget and peaks[10_000] - peaks[4] < budget, {
        n: f"{p / 2**20:.0f} MiB" for n, p in peaks.items()}


def test_eval_json_and_text_at_many_classes(wide, tmp_path):
    d = wide[10_000]
    ev = json.loads(run_cli("eval", "--checkpoint", d / "run", "--cache", d / "cache.zarr", "--json",
                            "--out", tmp_path / "a").output)
    assert ev["coverage"]["failed"] == 1 and ev["files"]["confusion"] == "confusion.npz"
    assert sum(v is None for v in ev["per_class"].values()) == 10_000 - 4    # no videos: null, never NaN
    text = run_cli("eval", "--checkpoint", d / "run", "--cache", d / "cache.zarr", "--out", tmp_path / "b").output
    assert len(text.splitlines()) <= 5 and "per-class accuracy over 4 classes with videos (of 10000)" in text
    # the best epoch's checkpoint is kept beside the last, and evaluates like any checkpoint
    summary = json.loads((d / "run" / "summary.json").read_text())
    assert summary["files"]["best_checkpoint"] == "checkpoint_best"
    from cachefeat.train import load_checkpoint
    best = load_checkpoint(d / "run" / "checkpoint_best")
    assert best["epoch"] == summary["best_epoch"]
    assert best["history"][-1]["val_top1"] == summary["best_val_top1"]
    run_cli("eval", "--checkpoint", d / "run" / "checkpoint_best", "--cache", d / "cache.zarr", "--json",
            "--out", tmp_path / "c")


def test_info_plot_is_readable_at_400_classes(wide, tmp_path):
    run_cli("info", wide[400] / "cache.zarr", "--plot", tmp_path / "p.png")
    w, h = _png_size(tmp_path / "p.png")
    assert w <= 1600 and h <= 600
    run_cli("info", wide[4] / "cache.zarr", "--plot", tmp_path / "q.png")


def test_list_manifest_class_names_with_spaces_through_extract(wide):
    from cachefeat.store import open_cache
    c = open_cache(wide[400] / "cache.zarr")
    assert c.classes == _class_names(400)
    assert sorted(set(c.labels()[c.valid()])) == [0, 100, 200, 300]


# ------------------------------------------------------------------------------------------- incomplete caches
@pytest.fixture
def unfinished(wide, tmp_path):
    """A copy of the 4-class cache whose last shard's flag is cleared (what a killed extraction leaves)."""
    import shutil
    cache = tmp_path / "cache.zarr"
    shutil.copytree(wide[4] / "cache.zarr", cache)
    c = Cache(cache, mode="r+")
    reset_shards(c, [c.layout.num_shards - 1])     # its flag off, no checksum record
    return cache


def _one_line_refusal(res, *words):
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), res.output


def test_unfinished_caches_are_refused_unless_allowed_then_counted(wide, unfinished, tmp_path):
    run = wide[4] / "run"
    for args in (["eval", "--checkpoint", run, "--cache", unfinished, "--out", tmp_path / "e"],
                 ["train", "--cache", unfinished, "--epochs", "1", "--out", tmp_path / "t"],
                 ["train", "--cache", wide[4] / "cache.zarr", "--val-cache", unfinished, "--epochs", "1",
                  "--out", tmp_path / "t"]):
        _one_line_refusal(run_cli(*args, ok=False), "is incomplete: 4 of 5 shards written", "--allow-incomplete")
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()
    ev = json.loads(run_cli("eval", "--checkpoint", run, "--cache", unfinished, "--out", tmp_path / "e", "--json",
                            "--allow-incomplete").output)
    # 17 videos in shards of 4: the last shard holds video 16 (the missing file, which never got its row)
    assert ev["coverage"] == {"videos": 17, "evaluated": 16, "failed": 0, "unwritten": 1, "complete": False}
    res = run_cli("train", "--cache", unfinished, "--epochs", "1", "--out", tmp_path / "t", "--allow-incomplete")
    assert "train cache: 16 videos used of 17: 1 unwritten" in res.output
    cov = json.loads((tmp_path / "t" / "summary.json").read_text())["coverage"]["train"]
    assert (cov["usable"], cov["failed"], cov["unwritten"]) == (16, 0, 1)


def test_zeroshot_refuses_unfinished_and_warns_nothing_on_failed_rows(small_text_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a numpy divide warning would fail the test
        r = json.loads(run_cli("zeroshot", "--cache", small_text_cache, "--json").output)
    assert r["coverage"]["failed"] == 1 and r["videos"] == 16
    reset_shards(Cache(small_text_cache, mode="r+"), [0])
    _one_line_refusal(run_cli("zeroshot", "--cache", small_text_cache, ok=False), "is incomplete")
    r = json.loads(run_cli("zeroshot", "--cache", small_text_cache, "--json", "--allow-incomplete").output)
    assert r["coverage"]["unwritten"] == 4 and r["videos"] == 12


@pytest.fixture
def small_text_cache(synth_small, tmp_path):
    """The 4-class set with its text embeddings and one missing video, shards of 4 videos."""
    _manifest(tmp_path / "list.txt", synth_small, [str(i) for i in range(4)])
    (tmp_path / "classes.txt").write_text("0\n1\n2\n3\n")
    run_cli(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "text.zarr", "--classes", tmp_path / "classes.txt",
                               "--layers", "last:1", "--frames", "2", "--shard-size", "4"))
    return tmp_path / "text.zarr"


def test_a_cache_being_written_is_refused_unless_allowed(wide, tmp_path):
    import shutil
    busy = tmp_path / "busy.zarr"
    shutil.copytree(wide[4] / "cache.zarr", busy)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"train-cache: {busy}\nval-cache: {busy}\ntrain: {{epochs: 1}}\ngrid:\n  adapter: [probe]\n")
    # a live process holding the store's lock, as a writer does
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys, time; from cachefeat.store import StoreLock; "
                                "lock = StoreLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
                                "time.sleep(60)", str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline().strip() == "held"
        for args in (["eval", "--checkpoint", wide[4] / "run", "--cache", busy, "--out", tmp_path / "e"],
                     ["train", "--cache", busy, "--epochs", "1", "--out", tmp_path / "t"],
                     ["ablate", spec, "--check"]):
            res = run_cli(*args, ok=False)
            assert res.exit_code == 2 and "is being written by another cachefeat process" in res.output
            assert f"pid {sleeper.pid}" in res.output and "--allow-incomplete" in res.output
        ev = json.loads(run_cli("eval", "--checkpoint", wide[4] / "run", "--cache", busy, "--out", tmp_path / "e",
                                "--json", "--allow-incomplete").output)
        assert ev["coverage"]["evaluated"] == 16
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------- extract
def test_an_extraction_where_every_video_fails_exits_1_with_a_hint(tmp_path):
    (tmp_path / "list.txt").write_text("".join(f"clips/v{i}.mp4 a\n" for i in range(3)))
    res = run_cli(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "c.zarr", *FEW), ok=False)
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert "no valid clips: 3 of 3 videos failed" in last and "--video-root" in last
    assert str(tmp_path / "clips" / "v0.mp4") in last


def test_max_failed_fraction_is_a_failure_budget(wide):
    args = tiny_extract_args(wide[4] / "list.txt", wide[4] / "cache.zarr", "--classes", wide[4] / "classes.txt", *FEW)
    res = run_cli(*args, "--max-failed-fraction", "0.05", ok=False)       # 1 of 17 failed: 5.9%
    assert res.exit_code == 1 and "1 of 17 videos failed (5.9%, more than --max-failed-fraction 0.05" in res.output
    assert "estimated cache size" in run_cli(*args, "--max-failed-fraction", "0.1").output


def test_a_cache_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "list.txt").write_text("".join(f"v{i}.mp4 a\n" for i in range(2000)))
    out = tmp_path / "huge.zarr"
    res = run_cli("extract", tmp_path / "list.txt", "--out", out, "--model", "ViT-L-14", "--layers", "all",
                  "--tokens", "all", "--frames", "64", "--views", "4x3", ok=False)
    _one_line_refusal(res, "the cache needs about", "TiB", "free", "--ignore-free-space")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- train --overwrite
def test_train_overwrite_checks_every_option_before_deleting_the_old_run(wide, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(wide[4] / "run", run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = run_cli("train", "--cache", wide[4] / "cache.zarr", "--out", run, "--overwrite", "--device", "cpu",
                  "--precision", "fp16", ok=False)
    _one_line_refusal(res, "--precision fp16 needs a GPU")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    res = run_cli("train", "--cache", wide[4] / "cache.zarr", "--out", run, "--overwrite", "--adapter-opt", "nope=1",
                  ok=False)
    assert res.exit_code == 2 and {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

