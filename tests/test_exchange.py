"""Exports and imports: HDF5 round trips are exact, the npy export matches the cache, bad input is one line."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from cachefeat.store import Cache, open_cache
from cachefeat.store.exchange import safe_stems, store_nodes
from cachefeat.store.writer import record_again, reset_shards

from conftest import run_cli, tiny_extract_args
from helpers import assert_caches_equal

# (tokens, layers, dtype, extra options): every patch token or a pooled grid, several layers, every storage
# dtype, pixels; text embeddings are always there (the tiny model has a text tower)
CONFIGS = {"all-f16": ("all", "all", "float16", ["--pixels", "8x2"]),
           "pooled-f32": ("pooled:2x2", "1,3", "float32", []),
           "cls-int8": ("cls", "all", "int8", ["--pixels", "8"])}


@pytest.fixture(scope="module", params=list(CONFIGS))
def cache(request, tmp_path_factory, synth_small) -> Path:
    """A finished cache of 5 videos x 2 views in 3 shards; the last video is missing (a recorded failure)."""
    tokens, layers, dtype, extra = CONFIGS[request.param]
    d = tmp_path_factory.mktemp(f"exchange-{request.param}")
    lines = (synth_small / "val.txt").read_text().splitlines()
    manifest = d / "list.txt"
    manifest.write_text("\n".join([f"{synth_small / l.split()[0]} {l.split()[1]}" for l in lines]
                                  + [f"{d / 'gone' / 'missing.mp4'} 2"]) + "\n")
    out = d / "c.zarr"
    run_cli(*tiny_extract_args(manifest, out, "--tokens", tokens, "--layers", layers, "--dtype", dtype,
                               "--frames", "3", "--views", "2x1", "--shard-size", "4", *extra))
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_hdf5_round_trip_is_exact(cache, tmp_path):
    src = _copy(cache, tmp_path / "src.zarr")
    c = open_cache(src)
    assert c.complete and len(c.failures()) == 1 and c.views.count == 2 and len(c.layers) >= 2
    # values whose bits a lossy or normalising copy would change: -0.0, NaN payloads, inf, subnormals
    emb = zarr.open_array(str(src / "embed"), mode="r+")
    special = np.zeros(emb.shape[1:], emb.dtype)
    flat = special.reshape(-1)
    if emb.dtype.kind == "f":
        flat[:6] = [-0.0, np.inf, -np.inf, np.nan, np.finfo(emb.dtype).smallest_subnormal, -1.5]
        flat.view(f"u{emb.dtype.itemsize}")[6] = flat.view(f"u{emb.dtype.itemsize}")[3] | 1  # another NaN payload
    else:
        flat[:4] = [-128, 127, -127, 1]   # int8 extremes
    emb[1] = special
    record_again(Cache(src, mode="r+"))      # as if extracted so: the shard's checksum record lists them

    h5 = tmp_path / "c.h5"
    res = run_cli("export", src, h5, "--format", "hdf5", "--quiet")
    assert "exported" in res.output and h5.is_file()
    with h5py.File(h5, "r") as f:   # what a plain HDF5 reader sees
        assert json.loads(f.attrs["cachefeat"]) == c.meta
        _, arrays = store_nodes(c.root)
        assert all(name in f for name in arrays) and ("tokens" in f) == (c.tokens.kind != "cls")
        cls = f["cls"]
        assert cls.chunks == (1, *cls.shape[1:]) and cls.compression == "gzip" and cls.fletcher32 and cls.shuffle
        assert list(cls.attrs["dimension_names"]) == ["clip", "frame", "layer", "channel"]
        assert f["embed"].dtype == c.root["embed"].dtype
        assert f["videos/id"].asstr()[-1] == c.read("videos/id")[-1]
        assert ("pixels" in f) == bool(c.pixels) and (not c.pixels or f["pixels"].dtype == np.uint8)
        assert np.array_equal(f["text/embed"][...], c.text_embeddings())
        assert c.layout.dtype != "int8" or all(f"quant/{k}" in f for k in c.layout.feature_arrays())

    back = tmp_path / "back.zarr"
    res = run_cli("import", h5, "--out", back, "--quiet")
    assert "imported" in res.output
    assert_caches_equal(src, back, exact=True)
    assert open_cache(back).failures() == c.failures()
    assert "progress   complete" in run_cli("info", back).output


def test_imported_cache_resumes_as_complete(cache, tmp_path):
    """The import keeps everything extraction checks (settings fingerprint, layout, progress): running the
    original extract command on it finds nothing to do."""
    h5 = tmp_path / "c.h5"
    run_cli("export", cache, h5, "--format", "hdf5", "--compression", "lzf", "--quiet")
    back = tmp_path / "back.zarr"
    run_cli("import", h5, "--out", back, "--quiet")
    meta = open_cache(cache).meta
    args = ["--tokens", meta["tokens"]["kind"] + (":{}x{}".format(*meta["tokens"]["grid"])
                                                   if meta["tokens"]["kind"] == "pooled" else ""),
            "--layers", ",".join(map(str, meta["layers"])), "--dtype", meta["dtype"], "--frames", "3",
            "--views", "2x1", "--shard-size", "4"]
    if meta.get("pixels"):
        args += ["--pixels", f"{meta['pixels']['size']}x{meta['pixels']['factor']}"]
    res = run_cli(*tiny_extract_args(cache.parent / "list.txt", back, *args))
    assert "already complete" in res.output
    assert_caches_equal(cache, back, exact=True)


def test_incomplete_and_busy_caches_are_refused(cache, tmp_path):
    src = _copy(cache, tmp_path / "src.zarr")
    reset_shards(Cache(src, mode="r+"), [2])    # as a run killed before its last shard leaves it: no flag, no record
    res = run_cli("export", src, tmp_path / "x.h5", "--format", "hdf5", ok=False)
    assert res.exit_code == 2 and "incomplete (2 of 3 shards done)" in res.output and "--allow-incomplete" in res.output
    assert not (tmp_path / "x.h5").exists()
    # --allow-incomplete: the HDF5 keeps everything, progress flags included; npy keeps finished shards only
    run_cli("export", src, tmp_path / "x.h5", "--format", "hdf5", "--allow-incomplete", "-q")
    run_cli("import", tmp_path / "x.h5", "--out", tmp_path / "back.zarr", "-q")
    assert_caches_equal(src, tmp_path / "back.zarr", exact=True)
    assert not open_cache(tmp_path / "back.zarr").complete
    run_cli("export", src, tmp_path / "npy", "--format", "npy", "--allow-incomplete", "-q")
    index = json.loads((tmp_path / "npy" / "index.json").read_text())
    assert [v["video"] for v in index["videos"]] == [0, 1, 2, 3] and [v["video"] for v in index["not_extracted"]] == [4]
    assert index["complete"] is False and index["failures"] == []

    # a live process holding the store's lock (the lock a writer takes): a writer is running
    busy = _copy(cache, tmp_path / "busy.zarr")
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys, time; from cachefeat.store import StoreLock; "
                                "lock = StoreLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
                                "time.sleep(60)", str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline().strip() == "held"
        assert json.loads((busy / "cachefeat.lock").read_text())["host"] == socket.gethostname()
        for fmt in ("hdf5", "npy"):
            res = run_cli("export", busy, tmp_path / f"busy.{fmt}", "--format", fmt, ok=False)
            assert res.exit_code == 2 and "is being written by another cachefeat process" in res.output
            assert f"pid {sleeper.pid}" in res.output and not (tmp_path / f"busy.{fmt}").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the writer is gone: its leftover lock no longer blocks the export, and is not exported
    run_cli("export", busy, tmp_path / "after.h5", "--format", "hdf5", "-q")
    run_cli("import", tmp_path / "after.h5", "--out", tmp_path / "after.zarr", "-q")
    assert not (tmp_path / "after.zarr" / "cachefeat.lock").exists()


def test_npy_export_matches_cache(cache, tmp_path):
    cache = _copy(cache, tmp_path / "src.zarr")
    out = tmp_path / "npy"
    res = run_cli("export", cache, out, "--format", "npy", "--quiet")
    assert "exported 4 videos" in res.output and "1 failed videos" in res.output
    c = open_cache(cache)
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "cachefeat-npy" and index["metadata"] == c.meta and index["classes"] == c.classes
    ids, paths = c.read("videos/id"), c.read("videos/path")
    labels = c.read("videos/label")
    n = c.views.count
    suffixes = {"embed": "embed", "cls": "cls", "frame_idx": "clips/frame_idx", "time": "clips/time"}
    if c.tokens.kind != "cls":
        suffixes.update({f"tokens_{l}": f"tokens/{l}" for l in c.layers})
    if c.pixels:
        suffixes.update({"pixels": "pixels", "pixel_frame_idx": "clips/pixel_frame_idx"})
    assert {k: v["array"] for k, v in index["arrays"].items()} == suffixes
    assert index["arrays"]["cls"]["dims"] == ["view", "frame", "layer", "channel"]
    assert np.array_equal(np.load(out / "text_embed.npy"), c.read("text/embed"))
    assert index["shared"]["text_embed.npy"]["dims"] == ["class", "channel"]
    expected_files = {"index.json", "text_embed.npy"}
    for entry in index["videos"]:
        v = entry["video"]
        assert entry["id"] == ids[v] and entry["path"] == paths[v] and entry["label"] == labels[v]
        assert entry["class"] == c.classes[labels[v]] and "/" not in entry["stem"]
        assert c.valid()[v * n:(v + 1) * n].all()
        for suffix, name in suffixes.items():
            f = out / f"{entry['stem']}_{suffix}.npy"
            expected_files.add(f.name)
            got, want = np.load(f), c.read(name, slice(v * n, (v + 1) * n))
            assert (got.dtype == want.dtype
                    and got.shape == (n, *want.shape[1:]) == tuple(index["arrays"][suffix]["shape"]))
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), f.name
    assert {p.name for p in out.iterdir()} == expected_files   # nothing for the failed video
    assert [f["id"] for f in index["failures"]] == [ids[4]] and index["failures"][0]["stage"] == "missing"
    assert len(index["videos"]) == 4 and index["not_extracted"] == [] and index["complete"] is True
    # an existing export is replaced only with --overwrite
    res = run_cli("export", cache, out, "--format", "npy", ok=False)
    assert res.exit_code == 2 and "exists; pass --overwrite" in res.output
    run_cli("export", cache, out, "--format", "npy", "--overwrite", "-q")
    assert {p.name for p in out.iterdir()} == expected_files


def test_safe_stems():
    ids = ["k400/abseiling/-abc_000010_000020", "a/b", "a__b", "A__B", ".hidden", "x y:z?*", "",
           "été/vidéo", "n" * 300, "a/b"]
    stems = safe_stems(ids)
    assert stems[:4] == ["k400__abseiling__-abc_000010_000020", "a__b", "a__b-2", "A__B-3"]
    assert stems[4] == "_hidden" and stems[5] == "x_y_z__" and stems[6] == "_" and stems[7] == "été__vidéo"
    assert len(stems[8].encode()) <= 173 and stems[9] == "a__b-9"
    assert len({s.casefold() for s in stems}) == len(stems)
    assert all("/" not in s and "\\" not in s for s in stems)


def _error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output[res.output.index("Error: "):]   # click may wrap a list of choices over lines


def test_bad_input_is_one_line_exit_2(cache, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "is not a cachefeat cache" in _error(run_cli("export", plain, tmp_path / "x.h5", "--format", "hdf5",
                                                        ok=False))
    assert "'csv' is not one of" in _error(run_cli("export", cache, tmp_path / "x", "--format", "csv", ok=False))
    assert "Missing option '--format'" in _error(run_cli("export", cache, tmp_path / "x.h5", ok=False))
    assert "--compression 'zip'" in _error(run_cli("export", cache, tmp_path / "x.h5", "--format", "hdf5",
                                                   "--compression", "zip", ok=False))
    assert "hdf5 only" in _error(run_cli("export", cache, tmp_path / "x", "--format", "npy", "--compression", "lzf",
                                         ok=False))

    # outputs that exist: refused without --overwrite; with it, replaced only when they are our own kind
    (tmp_path / "notes.h5").write_text("mine")
    assert "exists; pass --overwrite" in _error(run_cli("export", cache, tmp_path / "notes.h5", "--format", "hdf5",
                                                        ok=False))
    assert "is not a cachefeat HDF5 export" in _error(run_cli("export", cache, tmp_path / "notes.h5",
                                                              "--format", "hdf5", "--overwrite", ok=False))
    assert (tmp_path / "notes.h5").read_text() == "mine"
    (plain / "thesis.tex").write_text("x")
    assert "is not a cachefeat npy export" in _error(run_cli("export", cache, plain, "--format", "npy", "--overwrite",
                                                             ok=False))
    assert (plain / "thesis.tex").exists()

    h5 = tmp_path / "c.h5"
    run_cli("export", cache, h5, "--format", "hdf5", "-q")
    run_cli("export", cache, h5, "--format", "hdf5", "--overwrite", "-q")
    assert "is not an HDF5 file" in _error(run_cli("import", tmp_path / "notes.h5", "--out", tmp_path / "a.zarr",
                                                   ok=False))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    assert "not a cachefeat export" in _error(run_cli("import", tmp_path / "other.h5", "--out", tmp_path / "a.zarr",
                                                      ok=False))
    assert "exists; pass --overwrite" in _error(run_cli("import", h5, "--out", cache, ok=False))
    assert "is not a cachefeat cache" in _error(run_cli("import", h5, "--out", plain, "--overwrite", ok=False))
    assert not list(tmp_path.glob(".*partial*"))   # nothing half-written left behind

    # metadata edited after export no longer matches the Zarr documents it travels with
    edited = Path(shutil.copy(h5, tmp_path / "edited.h5"))
    with h5py.File(edited, "r+") as f:
        meta = json.loads(f.attrs["cachefeat"])
        f.attrs["cachefeat"] = json.dumps(dict(meta, frames=99))
    assert "attribute 'cachefeat' of / differs" in _error(run_cli("import", edited, "--out", tmp_path / "e.zarr",
                                                                  ok=False))


def test_corrupt_export_fails_on_import(cache, tmp_path):
    """Every chunk carries a Fletcher-32 checksum: a flipped byte is caught, not imported as data."""
    h5 = tmp_path / "c.h5"
    run_cli("export", cache, h5, "--format", "hdf5", "--compression", "none", "-q")
    with h5py.File(h5, "r") as f:
        info = f["cls"].id.get_chunk_info(1)
    with open(h5, "r+b") as fh:
        fh.seek(info.byte_offset + 10)
        b = fh.read(1)
        fh.seek(info.byte_offset + 10)
        fh.write(bytes([b[0] ^ 0xFF]))
    res = run_cli("import", h5, "--out", tmp_path / "back.zarr", ok=False)
    assert res.exit_code == 1 and "import failed" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "back.zarr").exists() and not list(tmp_path.glob(".*partial*"))
