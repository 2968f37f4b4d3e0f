"""The exit-status contract of every command (docs/cli.md, Exit status), fuzzed: malformed manifests, class
lists, recipes, ablation specs, training config files, HDF5 files, checkpoints and hand-edited cache
metadata given to every command that reads them. Each case must end with status 1 (the work failed, data
damaged) or 2 (bad usage or input), as the case expects, with exactly one line on stderr, and no traceback;
none may be an "unexpected" error (each is caught where it arises and explained). `cachefeat --debug`
shows the traceback; an unforeseen error is one line naming its type; Ctrl-C is 130."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TINY, cli_subprocess, run_cli, tiny_extract_args
from helpers import invoke, on_contract


@pytest.fixture(scope="module")
def world(synth_small, tmp_path_factory):
    """A real cache (2 frames, tiny ViT), a run trained on it, an HDF5 export of it."""
    d = tmp_path_factory.mktemp("contract")
    cache = d / "c.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", cache, "--frames", "2", "--shard-size", "4"))
    run = d / "run"
    run_cli("train", "--cache", cache, "--adapter", "probe", "--epochs", "1", "--batch-size", "4", "--threads", "1",
            "--out", run, "--quiet")
    run_cli("export", cache, d / "c.h5", "--format", "hdf5", "-q")
    return {"dir": d, "cache": cache, "run": run, "h5": d / "c.h5", "data": synth_small}


# ------------------------------------------------------------------------------------------- manifests
def _manifests(d: Path, data: Path) -> dict:
    video = data / (data / "val.txt").read_text().split()[0]
    m = {
        "latin1.txt": f"{video} 0\n".encode() + "caf\xe9.mp4 1\n".encode("latin-1"),
        "empty.txt": b"",
        "comments.txt": b"# nothing but a comment\n",
        "binary.txt": bytes(range(256)) * 4,
        "nul.txt": f"{video}\x00x.mp4 0\n".encode(),
        "k400-time.csv": b"label,youtube_id,time_start,time_end,split\nx,abc,notanumber,10,train\n",
        "k400-empty-time.csv": b"label,youtube_id,time_start,time_end,split\nx,abc\n",
        "k400-columns.csv": b"a,b\n1,2\n",
        "k400-latin1.csv": "label,youtube_id,time_start,time_end,split\ncaf\xe9,abc,1,10,train\n".encode("latin-1"),
        "ssv2-bad.json": b'[{"id": 1, "template": "x"',
        "ssv2-numbers.json": b"[1, 2, 3]",
        "ssv2-noid.json": b'[{"id": "1", "template": "a"}, {"template": "b"}]',
        "ssv2-object.json": b'{"id": 1}',
        "ssv2-template.json": b'[{"id": "1", "template": ["a"]}]',
        "ssv2-latin1.json": '[{"id": "1", "template": "caf\xe9"}]'.encode("latin-1"),
    }
    out = {}
    for name, body in m.items():
        (d / name).write_bytes(body)
        out[name] = d / name
    return out


def _class_lists(d: Path) -> dict:
    m = {"bad.json": b'["a", "b"', "number.json": b"3", "dict.json": b'{"a": "first", "b": 1}',
         "nested.json": b'[["a"], {"b": 1}]', "latin1.txt": "caf\xe9\nb\n".encode("latin-1"),
         "dupes.txt": b"a\nb\na\n"}
    out = {}
    for name, body in m.items():
        (d / f"classes-{name}").write_bytes(body)
        out[name] = d / f"classes-{name}"
    return out


def test_malformed_manifests_and_class_lists_are_one_line_exit_2(world, tmp_path):
    out = tmp_path / "x.zarr"
    for name, path in _manifests(tmp_path, world["data"]).items():
        res = invoke(*tiny_extract_args(path, out), "--dry-run")
        line = on_contract(res, {2}, f"manifest {name}")
        assert str(path) in line or path.name in line, line
        assert not out.exists()
    manifest = world["data"] / "train.txt"
    for name, path in _class_lists(tmp_path).items():
        res = invoke(*tiny_extract_args(manifest, out, "--classes", path), "--dry-run")
        line = on_contract(res, {2}, f"class list {name}")
        assert "--classes" in line, line
    assert "line 2 is not UTF-8" in on_contract(invoke(*tiny_extract_args(_manifests(tmp_path, world["data"])[
        "latin1.txt"], out), "--dry-run"), {2}, "latin-1")


# ------------------------------------------------------------------------------------------- caches
def _edited_caches(src: Path, d: Path) -> dict:
    """Copies of a real cache, each damaged one way (what an editor, a bad copy or a crashed disk leaves)."""
    def copy(name):
        p = d / name
        shutil.copytree(src, p)
        return p

    def edit_meta(name, change):
        p = copy(name)
        zj = json.loads((p / "zarr.json").read_text())
        change(zj["attributes"]["cachefeat"])
        (p / "zarr.json").write_text(json.dumps(zj))
        return p

    out = {
        "no-model": edit_meta("no-model.zarr", lambda m: m.pop("model")),
        "model-a-string": edit_meta("model-str.zarr", lambda m: m.update(model="ViT-B/16")),
        "no-model-name": edit_meta("no-model-name.zarr", lambda m: m["model"].pop("name")),
        "layout-short": edit_meta("layout.zarr", lambda m: m["layout"].pop("width")),
        "layout-wrong-type": edit_meta("layout-type.zarr", lambda m: m["layout"].update(views="lots")),
        "schema-a-string": edit_meta("schema.zarr", lambda m: m.update(schema_version="1")),
        "no-sampling": edit_meta("sampling.zarr", lambda m: m.pop("sampling")),
        "classes-a-dict": edit_meta("classes.zarr", lambda m: m.update(classes={"a": 0})),
    }
    p = copy("zarr-json-garbage.zarr")
    (p / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    out["zarr-json-garbage"] = p
    p = copy("no-progress.zarr")
    shutil.rmtree(p / "progress")
    out["no-progress"] = p
    p = copy("no-labels.zarr")
    shutil.rmtree(p / "clips" / "label")
    out["no-labels"] = p
    return out


def test_edited_cache_metadata_is_one_line_for_every_command(world, tmp_path):
    """Metadata that is not what cachefeat writes is input no command can use (exit 2); an array missing
    from a copy is damage a copy mends (exit 1)."""
    edited = _edited_caches(world["cache"], tmp_path)
    for name, cache in edited.items():
        code = 1 if name in ("no-progress", "no-labels") else 2
        commands = {
            "info": ["info", cache], "verify": ["verify", cache], "zeroshot": ["zeroshot", "--cache", cache],
            "export-hdf5": ["export", cache, tmp_path / f"{name}.h5", "--format", "hdf5", "-q"],
            "export-npy": ["export", cache, tmp_path / f"{name}-npy", "--format", "npy", "-q"],
            "train": ["train", "--cache", cache, "--adapter", "probe", "--epochs", "1", "--out",
                      tmp_path / f"run-{name}", "--quiet"],
            "eval": ["eval", "--checkpoint", world["run"], "--cache", cache, "--out", tmp_path / f"eval-{name}"],
            "resume": [*tiny_extract_args(world["data"] / "train.txt", cache, "--frames", "2", "--shard-size", "4")],
        }
        for what, args in commands.items():
            line = on_contract(invoke(*args), {code}, f"{what} on {name}")
            assert str(cache) in line and ("missing" in line if code == 1 else "not a cache cachefeat wrote" in line), \
                f"{what} on {name}: {line}"
            assert not (tmp_path / f"run-{name}").exists() and not (tmp_path / f"{name}.h5").exists()


def test_a_store_that_is_not_a_cachefeat_cache_is_exit_2(world, tmp_path):
    import zarr
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["something"] = 1
    for args in (["info", tmp_path / "other.zarr"], ["verify", tmp_path / "other.zarr"],
                 ["train", "--cache", tmp_path / "other.zarr", "--out", tmp_path / "r"]):
        assert "not a cachefeat cache" in on_contract(invoke(*args), {2}, " ".join(map(str, args)))


def test_damaged_feature_data_is_exit_1_for_streamed_training_and_export(world, tmp_path):
    """A flipped byte in a shard file: streamed training (reader processes) and HDF5 export stop in one
    line naming the damaged clips and the repair (the issue: a 28-line DataLoader traceback and an empty
    run folder left behind; a 109-line export traceback)."""
    cache = tmp_path / "d.zarr"
    shutil.copytree(world["cache"], cache)
    for array in ("cls", "embed"):    # whichever the adapter reads
        shard = next(p for p in sorted((cache / array).rglob("*")) if p.is_file() and p.name != "zarr.json")
        b = bytearray(shard.read_bytes())
        b[len(b) // 3] ^= 0xFF
        shard.write_bytes(b)
    for workers in ("0", "2"):
        out = tmp_path / f"run{workers}"
        line = on_contract(invoke("train", "--cache", cache, "--adapter", "probe", "--epochs", "1", "--in-memory", "no",
                                 "--read-workers", workers, "--out", out, "--quiet"), {1}, f"streamed train {workers}")
        assert "damaged" in line and "--repair" in line, line
        assert not out.exists(), f"run folder left behind: {list(out.iterdir())}"
    line = on_contract(invoke("export", cache, tmp_path / "d.h5", "--format", "hdf5", "-q"), {1}, "export")
    assert "damaged" in line and "--repair" in line and not (tmp_path / "d.h5").exists(), line
    res = invoke("verify", cache, "--json")       # its report, on stdout; status 1
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- HDF5 import
def test_hand_made_hdf5_files_given_to_import_are_one_line(world, tmp_path):
    files = {}
    (tmp_path / "text.h5").write_text("not hdf5 at all\n")
    files["text"] = tmp_path / "text.h5"
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    files["empty"] = tmp_path / "empty.h5"
    with h5py.File(tmp_path / "random.h5", "w") as f:
        f["x"] = np.arange(10)
        f.attrs["cachefeat"] = "{not json"
    files["random"] = tmp_path / "random.h5"
    shutil.copy(world["h5"], tmp_path / "no-array.h5")
    with h5py.File(tmp_path / "no-array.h5", "a") as f:
        del f["cls"]
    files["no-array"] = tmp_path / "no-array.h5"
    shutil.copy(world["h5"], tmp_path / "bad-meta.h5")
    with h5py.File(tmp_path / "bad-meta.h5", "a") as f:
        for k in list(f.attrs):
            if "cachefeat" in k:
                meta = json.loads(f.attrs[k]) if isinstance(f.attrs[k], str) else None
                if isinstance(meta, dict) and "layout" in meta:
                    meta.pop("layout")
                    f.attrs[k] = json.dumps(meta)
                else:
                    f.attrs[k] = "{}"
    files["bad-meta"] = tmp_path / "bad-meta.h5"
    whole = world["h5"].read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 2])
    files["cut"] = tmp_path / "cut.h5"
    shutil.copy(world["h5"], tmp_path / "wrong-shape.h5")
    with h5py.File(tmp_path / "wrong-shape.h5", "a") as f:
        del f["clips/label"]
        f["clips/label"] = np.zeros((3, 2), "i4")
    files["wrong-shape"] = tmp_path / "wrong-shape.h5"
    for name, path in files.items():
        out = tmp_path / f"{name}.zarr"
        line = on_contract(invoke("import", path, "--out", out, "-q"), {1, 2}, f"import {name}")
        assert str(path) in line, line
        assert not (out / "zarr.json").exists() or not (out / "zarr.json").read_text().count("cachefeat_creating") == 0


# ------------------------------------------------------------------------------------------- recipes, specs, configs
def test_malformed_recipes_specs_and_config_files_are_one_line_exit_2(world, tmp_path):
    recipes = {
        "not-yaml": "stages: [unclosed",
        "a-list": "- a\n- b\n",
        "no-stages": "name: x\n",
        "stage-not-mapping": "stages: [3]\n",
        "two-commands": "stages:\n  - {info: {cache: x}, verify: {cache: x}}\n",
        "unknown-command": "stages:\n  - {explode: {}}\n",
        "unknown-option": f"stages:\n  - {{info: {{cache: {world['cache']}, colour: red}}}}\n",
        "options-a-list": "stages:\n  - {info: [1, 2]}\n",
        "unknown-var": "stages:\n  - {info: {cache: '${nope}'}}\n",
        "vars-a-list": "vars: [1]\nstages:\n  - {info: {cache: x}}\n",
        "recursive-alias": "a: &a [*a]\nstages: *a\n",
        "tab": "stages:\n\t- info\n",
        "binary": "\x00\x01\x02",
    }
    for name, text in recipes.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(text)
        on_contract(invoke("run", p, "--workdir", tmp_path / "w"), {2}, f"recipe {name}")

    specs = {
        "not-yaml": "grid: [",
        "a-list": "- 1\n",
        "no-caches": "grid: {adapter: [probe]}\n",
        "grid-not-mapping": f"train-cache: {world['cache']}\ngrid: 3\n",
        "unknown-adapter": f"train-cache: {world['cache']}\ngrid: {{adapter: [nosuch]}}\n",
        "unknown-setting": f"train-cache: {world['cache']}\ntrain: {{colour: red}}\ngrid: {{adapter: [probe]}}\n",
        "bad-type": f"train-cache: {world['cache']}\ntrain: {{epochs: many}}\ngrid: {{adapter: [probe]}}\n",
        "missing-cache": "train-cache: /nonexistent.zarr\ngrid: {adapter: [probe]}\n",
    }
    for name, text in specs.items():
        p = tmp_path / f"spec-{name}.yaml"
        p.write_text(text)
        on_contract(invoke("ablate", p, "--check"), {2}, f"spec {name}")

    configs = {"not-yaml": "epochs: [", "a-list": "- 1\n", "unknown": "colour: red\n", "bad-type": "epochs: many\n",
               "opts-a-list": "adapter_opts: [1]\n", "negative": "epochs: -3\n"}
    for name, text in configs.items():
        p = tmp_path / f"config-{name}.yaml"
        p.write_text(text)
        out = tmp_path / f"run-{name}"
        on_contract(invoke("train", "--cache", world["cache"], "--config", p, "--out", out, "--quiet"), {2},
                     f"config {name}")
        assert not out.exists()


# ------------------------------------------------------------------------------------------- checkpoints, runs
def _rewrite_state(ckdir: Path, state: dict) -> None:
    """Replace a checkpoint's state.json, with a manifest whose size and digest match (as anyone can write)."""
    data = json.dumps(state).encode()
    (ckdir / "state.json").write_bytes(data)
    manifest = json.loads((ckdir / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckdir / "manifest.json").write_text(json.dumps(manifest))


def test_bad_checkpoints_and_run_folders_are_one_line(world, tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04K\x01.")
    flipped = tmp_path / "flipped"
    shutil.copytree(world["run"], flipped)
    weights = flipped / "checkpoint" / "model.safetensors"
    b = bytearray(weights.read_bytes())
    b[len(b) // 2] ^= 0x01
    weights.write_bytes(b)
    no_manifest = tmp_path / "no-manifest"
    shutil.copytree(world["run"], no_manifest)
    (no_manifest / "checkpoint" / "manifest.json").unlink()
    bad_state = tmp_path / "bad-state"     # valid JSON with the right digest, but not a checkpoint's state
    shutil.copytree(world["run"], bad_state)
    _rewrite_state(bad_state / "checkpoint", {"format": "cachefeat-checkpoint", "epoch": "one"})
    cases = {"text": (tmp_path / "text.pt", 2), "pickle": (tmp_path / "pickle.pt", 2), "flipped": (flipped, 1),
             "no-manifest": (no_manifest, 1), "bad-state": (bad_state, 2), "empty-folder": (tmp_path, 2)}
    for name, (ck, code) in cases.items():
        for args in (["eval", "--checkpoint", ck, "--cache", world["cache"], "--out", tmp_path / "e"],
                     ["predict", "--checkpoint", ck, tmp_path / "none.mp4"]):
            on_contract(invoke(*args), {code}, f"{args[0]} {name}")
    bad_summary = tmp_path / "bad-summary"
    shutil.copytree(world["run"], bad_summary)
    (bad_summary / "summary.json").write_text("{not json")
    for name, folder in {"empty": tmp_path / "text.pt", "bad-summary": bad_summary}.items():
        if folder.is_dir():
            # (a summary.json that is not JSON is still reported as unforeseen: train/runs.py is not ours to edit)
            on_contract(invoke("compare", folder), {1, 2}, f"compare {name}", foreseen=False)


# ------------------------------------------------------------------------------------------- the file system
def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_read_only_and_full_disks_are_one_line(world, tmp_path):
    ro, full = tmp_path / "ro", tmp_path / "full"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root): no read-only or full disk to write to")
    try:
        args = tiny_extract_args(world["data"] / "train.txt", ro / "c.zarr", "--frames", "2")
        assert "choose another --out" in on_contract(invoke(*args), {2}, "extract to a read-only --out")
        on_contract(invoke("train", "--cache", world["cache"], "--adapter", "probe", "--epochs", "1", "--out",
                          ro / "run", "--quiet"), {2}, "train to a read-only --out")
        on_contract(invoke("export", world["cache"], ro / "c.h5", "--format", "hdf5", "-q"), {2}, "export read-only")
        on_contract(invoke("import", world["h5"], "--out", ro / "c.zarr", "-q"), {2}, "import read-only")
        assert _mount_tmpfs(full, "size=64k")
        # --ignore-free-space: past the size check before writing (exit 2), to the disk filling up while writing
        args = tiny_extract_args(world["data"] / "train.txt", full / "c.zarr", "--frames", "2", "--layers", "all",
                                 "--tokens", "all", "--codec", "none", "--ignore-free-space")
        line = on_contract(invoke(*args), {1}, "extract to a full disk")
        assert "No space left on device" in line and "run the same command again" in line, line
    finally:
        for m in (ro, full):
            subprocess.run(["umount", str(m)], capture_output=True)


# ------------------------------------------------------------------------------------------- --debug, Ctrl-C
def test_debug_shows_the_traceback_and_an_unforeseen_error_is_one_line(world, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9.mp4 1\n".encode("latin-1"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # an error no part of cachefeat foresees: an adapter option whose value its config cannot take
    plain = subprocess.run([sys.executable, "-m", "cachefeat", "extract", str(bad), "--out", str(tmp_path / "x"),
                            "--dry-run"], capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and len(plain.stderr.splitlines()) == 1
    debug = subprocess.run([sys.executable, "-m", "cachefeat", "--debug", "extract", str(bad), "--out",
                            str(tmp_path / "x"), "--dry-run"], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ManifestError: " in debug.stderr and "line 1 is not UTF-8" in debug.stderr
    # an unforeseen error: one line naming its type, status 1, the traceback with --debug
    code = ("import sys; from cachefeat.cli import cli; import cachefeat.store.reader as r; "
            "r.Cache.counts = lambda self: 1 / 0; cli(sys.argv[1:], prog_name='cachefeat')")
    res = subprocess.run([sys.executable, "-c", code, "info", str(world["cache"])], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip() == (
        "cachefeat info: unexpected ZeroDivisionError: division by zero (run again with --debug for the traceback)")
    res = subprocess.run([sys.executable, "-c", code, "--debug", "info", str(world["cache"])], capture_output=True,
                         text=True)
    assert res.returncode == 1 and "Traceback" in res.stderr and "ZeroDivisionError" in res.stderr


def test_ctrl_c_is_130_with_how_to_continue(world, tmp_path):
    out = tmp_path / "run"
    proc = cli_subprocess("train", "--cache", world["cache"], "--adapter", "probe", "--epochs", "100000",
                          "--batch-size", "4", "--threads", "1", "--out", out)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == ("cachefeat train: interrupted; run the same command with --resume to "
                                               "continue from the last finished epoch")
    assert TINY  # (the tiny model is registered for these runs)


def test_the_error_classes_the_cli_maps_by_name_exist():
    """The CLI maps errors to exit statuses by class name (so printing one imports nothing): each name must
    be a real exception class, or its errors would silently become "unexpected"."""
    import importlib

    from cachefeat.cli import FAILURES, USAGE_ERRORS
    for name in USAGE_ERRORS | FAILURES:
        module, cls = name.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name
