"""Hostile caches (issue 28, point 4): a cache from elsewhere whose zarr.json documents or cachefeat attributes
are crafted or damaged, whose chunk files are links out of it, or whose records lie. Each is built from a copy
of a real cache and given to info, verify, train, export and the Python reader: one line, exit status 2, no
output left, nothing allocated for a size no file backs, and a sentinel folder outside the cache (the target
of every link) unchanged. extract's --repair, resume and --overwrite never write, delete or follow anything
outside the folder they were given. (Damage of a real cache, such as a flipped chunk byte, stays exit 1:
tests/test_corruption.py.)"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from cachefeat.store import Cache, UnsafeStore, content_fingerprint, open_cache
from cachefeat.store.layout import RECORD, table_checksum
from cachefeat.store.shard_file import ShardFile, ShardFileError
from cachefeat.store.writer import record_again, reset_shards

from conftest import REPO, run_cli, tiny_extract_args
from helpers import invoke, make_sentinel, on_contract, tree_state

EXTRACT = ("--frames", "2", "--shard-size", "4")


@pytest.fixture(scope="module")
def world(synth_small, tmp_path_factory):
    """A real cache (12 videos in 3 shards, text embeddings; default codec) and one compressed with zstd."""
    d = tmp_path_factory.mktemp("hostile")
    run_cli(*tiny_extract_args(synth_small / "train.txt", d / "ref.zarr", *EXTRACT))
    run_cli(*tiny_extract_args(synth_small / "train.txt", d / "zstd.zarr", *EXTRACT, "--codec", "zstd"))
    return {"ref": d / "ref.zarr", "zstd": d / "zstd.zarr", "manifest": synth_small / "train.txt"}


def _copy(src: Path, tmp_path: Path, name: str = "c.zarr") -> Path:
    p = tmp_path / name
    shutil.copytree(src, p, symlinks=True)
    return p


def _doc(p: Path, name: str = "") -> dict:
    return json.loads((p / name / "zarr.json").read_text())


def _put_doc(p: Path, name: str, doc) -> None:
    (p / name / "zarr.json").write_text(json.dumps(doc))


def _edit_meta(p: Path, change) -> None:
    """Change the cachefeat attributes as a crafter would: the fingerprint computed again, so only the
    checks of what the values are can refuse them."""
    zj = _doc(p)
    meta = zj["attributes"]["cachefeat"]
    change(meta)
    try:
        meta["fingerprint"] = content_fingerprint(meta)
    except AttributeError:              # a model that is not an object has no fingerprint
        pass
    _put_doc(p, "", zj)


def _edit_array(p: Path, name: str, change) -> None:
    d = _doc(p, name)
    change(d)
    _put_doc(p, name, d)


def _set_shape(name: str, axis: int, value):
    def change(p, s):
        _edit_array(p, name, lambda d: d["shape"].__setitem__(axis, value))
    return change


def _inner_codecs(d: dict) -> list:
    return d["codecs"][0]["configuration"]["codecs"] if d["codecs"][0]["name"] == "sharding_indexed" else d["codecs"]


def _claim_a_million_videos(p: Path, s: Path) -> None:
    """Every number and every array shape agrees on a million videos, the fingerprint too; only three chunk
    files of the video list are on disk."""
    n, shards = 10 ** 6, 250_000
    for name in ("videos/path", "videos/id", "videos/label", "videos/status", "videos/num_frames", "videos/error",
                 "clips/video", "clips/view", "clips/label", "clips/valid", "clips/frame_idx", "clips/time", "embed",
                 "cls"):
        _edit_array(p, name, lambda d: d["shape"].__setitem__(0, n))
    for name in ("progress", RECORD):
        _edit_array(p, name, lambda d: d["shape"].__setitem__(0, shards))

    def change(m):
        m["layout"].update(num_videos=n, num_clips=n, num_shards=shards)
        m["source"]["num_videos"] = n
    _edit_meta(p, change)


def _mkfifo_at(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _link_to_sentinel_copy(p: Path, s: Path, rel: str) -> None:
    """Replace `rel` (a file or folder of the cache) by a link to a copy of it inside the sentinel: following
    the link would read good bytes, so only refusing to follow it keeps cachefeat inside the cache."""
    src = p / rel
    dst = s / "copies" / rel.replace("/", "_")
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    shutil.rmtree(src) if src.is_dir() else src.unlink()
    src.symlink_to(dst)


# Metadata a crafter (or a damaged disk) leaves: refused when the cache is opened.
METADATA = {
    "shape-1e15": _set_shape("cls", 0, 10 ** 15),
    "shape-negative": _set_shape("clips/valid", 0, -3),
    "shape-a-string": lambda p, s: _edit_array(p, "embed", lambda d: d.update(shape="12")),
    "chunk-zero": lambda p, s: _edit_array(p, "clips/label", lambda d: d["chunk_grid"]["configuration"].update(
        chunk_shape=[0])),
    "inner-chunk-zero": lambda p, s: _edit_array(p, "cls", lambda d: d["codecs"][0]["configuration"].update(
        chunk_shape=[0, 2, 4, 64])),
    "chunk-of-terabytes": lambda p, s: _edit_array(p, "videos/label", lambda d: d.update(
        shape=[2 ** 31 - 1], chunk_grid={"name": "regular", "configuration": {"chunk_shape": [2 ** 31 - 1]}})),
    "dtype-complex": lambda p, s: _edit_array(p, "embed", lambda d: d.update(data_type="complex128")),
    "dtype-structured": lambda p, s: _edit_array(p, "clips/valid", lambda d: d.update(
        data_type={"name": "structured", "configuration": {"fields": [["a", "int8"]]}})),
    "codec-pickle": lambda p, s: _edit_array(p, "clips/label", lambda d: d["codecs"].insert(
        1, {"name": "numcodecs.pickle", "configuration": {}})),
    "codec-lzma": lambda p, s: _edit_array(p, "cls", lambda d: _inner_codecs(d).insert(
        1, {"name": "numcodecs.lzma", "configuration": {}})),
    "codec-transpose": lambda p, s: _edit_array(p, "clips/frame_idx", lambda d: d["codecs"].insert(
        0, {"name": "transpose", "configuration": {"order": [1, 0]}})),
    "no-checksum": lambda p, s: _edit_array(p, "progress", lambda d: d["codecs"].pop()),
    "storage-transformer": lambda p, s: _edit_array(p, "progress", lambda d: d.update(
        storage_transformers=[{"name": "x"}])),
    "consolidated-metadata": lambda p, s: _put_doc(p, "", {**_doc(p), "consolidated_metadata": {
        "kind": "inline", "must_understand": False, "metadata": {}}}),
    "layout-1e15-videos": lambda p, s: _edit_meta(p, lambda m: m["layout"].update(num_videos=10 ** 15)),
    "layout-claims-a-million-videos": _claim_a_million_videos,
    "views-a-string": lambda p, s: _edit_meta(p, lambda m: m["layout"].update(views="lots")),
    "classes-a-dict": lambda p, s: _edit_meta(p, lambda m: m.update(classes={"a": 0})),
    "frames-a-string": lambda p, s: _edit_meta(p, lambda m: m.update(frames="2")),
    "layers-an-int": lambda p, s: _edit_meta(p, lambda m: m["layout"].update(layers=3)),
    "width-a-dict": lambda p, s: _edit_meta(p, lambda m: m["layout"].update(width={"x": 1})),
    "model-a-list": lambda p, s: _edit_meta(p, lambda m: m.update(model=[1])),
    "extras-a-string": lambda p, s: _edit_meta(p, lambda m: m.update(extras="text/embed")),
    "checksums-a-list": lambda p, s: _edit_meta(p, lambda m: m.update(table_checksums=[1, 2])),
    "layout-a-list": lambda p, s: _edit_meta(p, lambda m: m.update(layout=[])),
    "sampling-missing": lambda p, s: _edit_meta(p, lambda m: m.pop("sampling")),
    "num-clips-missing": lambda p, s: _edit_meta(p, lambda m: m["layout"].pop("num_clips")),
    "frames-disagree": lambda p, s: _edit_meta(p, lambda m: m.update(frames=3)),
    "width-disagrees-with-arrays": lambda p, s: _edit_meta(p, lambda m: (m["layout"].update(width=128),
                                                                         m["model"].update(width=128))),
    "videos-disagree-with-arrays": lambda p, s: _edit_meta(p, lambda m: m["layout"].update(
        num_videos=16, num_clips=16, num_shards=4)),
    "layers-disagree-with-arrays": lambda p, s: _edit_meta(p, lambda m: (m["layout"].update(layers=[0, 1, 2]),
                                                                         m.update(layers=[0, 1, 2]))),
    "prompts-disagree": lambda p, s: _edit_meta(p, lambda m: m["text"].update(prompts=["a"])),
    "extra-dotdot": lambda p, s: _edit_meta(p, lambda m: m.update(extras=["../../sentinel", "text/embed"])),
    "extra-absolute": lambda p, s: _edit_meta(p, lambda m: m.update(extras=[str(s / "precious.txt")])),
    "checksum-name-dotdot": lambda p, s: _edit_meta(p, lambda m: m["table_checksums"].update(
        {"../../sentinel/precious.txt": 1})),
    "node-name": lambda p, s: shutil.copytree(p / "clips" / "valid", p / "clips" / "bad name"),
    "root-json-huge": lambda p, s: os.truncate(p / "zarr.json", 200 << 20),     # sparse: 200 MiB of zeros
    "array-json-huge": lambda p, s: (p / "cls" / "zarr.json").write_text(" " * (2 << 20) + "{}"),
    "root-json-binary": lambda p, s: (p / "zarr.json").write_bytes(bytes(range(256)) * 8),
    "root-json-a-list": lambda p, s: (p / "zarr.json").write_text("[1, 2]"),
    "root-json-deep": lambda p, s: (p / "zarr.json").write_text("[" * 100_000 + "]" * 100_000),
    "array-json-truncated": lambda p, s: (p / "embed" / "zarr.json").write_text('{"shape": [12, 2'),
    "root-json-link": lambda p, s: _link_to_sentinel_copy(p, s, "zarr.json"),
    "array-folder-link": lambda p, s: _link_to_sentinel_copy(p, s, "videos/path"),
    "video-list-chunk-link": lambda p, s: _link_to_sentinel_copy(p, s, "videos/id/c/1"),
    "root-json-a-fifo": lambda p, s: _mkfifo_at(p / "zarr.json"),
    "fifo-in-a-group": lambda p, s: os.mkfifo(p / "clips" / "pipe"),
}

# Chunk files and folders that are links out of the cache, or FIFOs: refused when they are reached.
LINKS = {
    "shard-file-link": lambda p, s: _link_to_sentinel_copy(p, s, "embed/c/0/0/0"),
    "shard-file-link-to-data": lambda p, s: (p / "embed/c/1/0/0").unlink() or (p / "embed/c/1/0/0").symlink_to(
        s / "sub" / "data.bin"),
    "chunk-folder-link": lambda p, s: _link_to_sentinel_copy(p, s, "embed/c"),
    "shard-folder-link": lambda p, s: _link_to_sentinel_copy(p, s, "embed/c/2"),      # embed: what the probe reads
    "table-chunk-link": lambda p, s: _link_to_sentinel_copy(p, s, "clips/valid/c/0"),
    "label-chunk-link": lambda p, s: (_link_to_sentinel_copy(p, s, "clips/label/c/1"),   # training's labels,
                                      _link_to_sentinel_copy(p, s, "videos/label/c/1")),  # the npy export's
    "progress-chunk-link": lambda p, s: _link_to_sentinel_copy(p, s, "progress/c/1"),
}


def _commands(cache: Path, out: Path) -> dict:
    return {
        "info": ["info", cache], "verify": ["verify", cache, "--json"],    # (--json: no progress bar on stderr)
        "train": ["train", "--cache", cache, "--adapter", "probe", "--epochs", "1", "--batch-size", "4",
                  "--threads", "1", "--out", out / "run", "--quiet"],
        "export-hdf5": ["export", cache, out / "c.h5", "--format", "hdf5", "-q"],
        "export-npy": ["export", cache, out / "npy", "--format", "npy", "-q"],
    }


def _read_all(cache: Path) -> None:
    """What a Python user does: open it, read features, tables, failures."""
    c = open_cache(cache)
    c.read("embed", slice(0, 4))
    c.read("cls", np.array([5, 1, 9]))
    c.valid()
    c.labels()
    c.clip_video()
    c.failures()
    c.record_problems(features=True)


def _refused_everywhere(cache: Path, tmp_path: Path, sentinel: Path, what: str) -> None:
    before = tree_state(sentinel)
    out = tmp_path / "out"
    out.mkdir()
    for command, args in _commands(cache, out).items():
        line = on_contract(invoke(*args), {2}, f"{command} on {what}")
        assert "not a cache cachefeat wrote" in line or "newer than this cachefeat" in line, f"{command}: {line}"
        assert not any(out.iterdir()), f"{command} on {what} left {list(out.iterdir())}"
    with pytest.raises(UnsafeStore):
        _read_all(cache)
    assert tree_state(sentinel) == before, f"{what}: the sentinel changed"


@pytest.mark.parametrize("kind", list(METADATA))
def test_crafted_metadata_is_refused_in_one_line(world, tmp_path, kind):
    sentinel = make_sentinel(tmp_path)
    cache = _copy(world["ref"], tmp_path)
    METADATA[kind](cache, sentinel)
    _refused_everywhere(cache, tmp_path, sentinel, kind)


@pytest.mark.parametrize("kind", list(LINKS))
def test_links_out_of_the_cache_are_never_followed(world, tmp_path, kind):
    sentinel = make_sentinel(tmp_path)
    cache = _copy(world["ref"], tmp_path)
    LINKS[kind](cache, sentinel)
    _refused_everywhere(cache, tmp_path, sentinel, kind)


def test_a_chunk_that_is_a_fifo_is_refused_without_waiting(world, tmp_path):
    """Opening a FIFO for reading waits for a writer: the reader must never open one (a real process, with a
    deadline, so a regression fails instead of hanging the suite)."""
    cache = _copy(world["ref"], tmp_path)
    _mkfifo_at(cache / "clips" / "valid" / "c" / "1")
    _mkfifo_at(cache / "embed" / "c" / "2" / "0" / "0")
    for args in (["verify", cache, "--json"], ["info", cache]):
        r = subprocess.run([sys.executable, "-m", "cachefeat", *map(str, args)], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "not a regular file" in lines[0], (r.returncode, r.stderr)


# verify's progress bar, drawn on stderr (text mode reads its carriage returns as line ends)
PROGRESS_BAR = re.compile(r"\s*verify:\s+\d+%\|")


def _limited(args: list, gib: int = 3) -> subprocess.CompletedProcess:
    """A cachefeat command in its own process with at most `gib` GiB of address space: an allocation in
    proportion to a claimed size fails it instead of passing unnoticed on a big machine."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))
    return subprocess.run([sys.executable, "-m", "cachefeat", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, preexec_fn=limit)


def test_claimed_sizes_are_checked_before_anything_is_allocated(world, tmp_path):
    for kind in ("shape-1e15", "layout-1e15-videos", "layout-claims-a-million-videos", "chunk-of-terabytes"):
        cache = _copy(world["ref"], tmp_path, f"{kind}.zarr")
        METADATA[kind](cache, tmp_path)
        for command in ("info", "verify"):
            r = _limited([command, cache])
            lines = [x for x in r.stderr.splitlines() if x.strip()]
            assert r.returncode == 2 and len(lines) == 1 and "not a cache cachefeat wrote" in lines[0], \
                (kind, command, r.returncode, r.stderr[-2000:])


def _rewrite_chunk(shard_path: Path, row: int, blob: bytes) -> None:
    """Replace one chunk of a shard file (index at the end, both CRC32C-checked) by `blob` + its checksum."""
    from cachefeat.store.layout import crc32c_of
    raw = shard_path.read_bytes()
    n = 4                                               # shard rows of these caches
    index = np.frombuffer(raw[-(n * 16 + 4):-4], "<u8").reshape(n, 2).copy()
    chunks = [raw[int(o):int(o + k)] for o, k in index]
    chunks[row] = blob + crc32c_of(blob).to_bytes(4, "little")
    pos, body = 0, b""
    for i, c in enumerate(chunks):
        index[i] = (pos, len(c))
        pos, body = pos + len(c), body + c
    ib = index.tobytes()
    shard_path.write_bytes(body + ib + crc32c_of(ib).to_bytes(4, "little"))


def test_a_compressed_chunk_claiming_a_terabyte_allocates_nothing(world, tmp_path):
    """A zstd frame whose header says it holds 2**40 bytes (its checksum valid): the shard file reader
    compares that with the chunk's size before decompressing; the cache is then damaged (exit 1), found in a
    process that could not have allocated the claim."""
    cache = _copy(world["zstd"], tmp_path)
    frame = (b"\x28\xb5\x2f\xfd" + bytes([0xC0]) + bytes([0x58]) + (2 ** 40).to_bytes(8, "little")
             + b"\x01\x00\x00")                        # FCS 8 bytes, a window, one empty last raw block
    _rewrite_chunk(cache / "embed" / "c" / "0" / "0" / "0", 1, frame)
    with pytest.raises(ShardFileError, match="zstd frame of 1099511627776 bytes"):
        ShardFile.open(cache / "embed").read(np.array([1]))
    r = _limited(["verify", cache])
    lines = [x for x in r.stderr.splitlines() if x.strip() and not PROGRESS_BAR.match(x)]
    assert r.returncode == 1 and "damaged: embed rows 1" in r.stdout and "Traceback" not in r.stderr, \
        (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert not lines or len(lines) == 1, r.stderr


# ------------------------------------------------------------------------------------------- records
def test_hostile_failure_records_are_shown_escaped_and_short(world, tmp_path):
    """videos/error and videos/id crafted with a terminal's escape sequences, line breaks and a megabyte of
    text, the shard's checksum record written again to match: info shows each failure on one short line."""
    cache = _copy(world["ref"], tmp_path)
    root = zarr.open_group(str(cache), mode="r+")
    evil = "decode: \x1b]0;owned\x07\x1b[2J\nsecond line\r" + "A" * 1_000_000
    root["videos/status"][0:4] = np.array([2, 1, 1, 1], np.uint8)
    root["videos/error"][0:4] = np.array([evil, "", "", ""])
    record_again(Cache(cache, mode="r+"))
    res = invoke("info", cache, "--failures")
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output and "\r" not in res.output
    assert max(len(line) for line in res.output.splitlines()) < 2000
    failure = open_cache(cache).failures()[0]
    assert failure["error"].isprintable() and len(failure["error"]) <= 1000


def test_crafted_tables_whose_checksums_match_are_refused(world, tmp_path):
    """clips/video pointing past the videos, and labels past the classes, with their table checksums (and
    the fingerprint) computed again: refused as a cache cachefeat did not write, before any is used as an
    index."""
    for name, values in (("clips/video", lambda a: a * 1000), ("clips/label", lambda a: a + 100)):
        cache = _copy(world["ref"], tmp_path, f"{name.replace('/', '_')}.zarr")
        root = zarr.open_group(str(cache), mode="r+")
        data = values(root[name][:])
        root[name][:] = data
        _edit_meta(cache, lambda m, name=name, data=data: m["table_checksums"].update({name: table_checksum(data)}))
        for args in (["verify", cache, "--json"], ["train", "--cache", cache, "--adapter", "probe", "--epochs", "1",
                                                   "--out", tmp_path / "run", "--quiet"]):
            line = on_contract(invoke(*args), {2}, f"{args[0]} on {name}")
            assert f"table {name}" in line and "not a cache cachefeat wrote" in line, line
            assert not (tmp_path / "run").exists()


def test_progress_flags_that_lie_are_damage_repair_mends_inside_the_cache(world, tmp_path):
    """A progress flag of 7 (a valid chunk, so no checksum fails) and a record of random numbers: damage
    like any other (exit 1, one line); --repair writes those shards again, inside the cache."""
    sentinel = make_sentinel(tmp_path)
    before = tree_state(sentinel)
    cache = _copy(world["ref"], tmp_path)
    root = zarr.open_group(str(cache), mode="r+")
    root["progress"][1] = 7
    root[RECORD][2] = np.random.default_rng(0).integers(0, 2 ** 31, root[RECORD].shape[1])
    for args in (["verify", cache, "--json"], ["train", "--cache", cache, "--adapter", "probe", "--epochs", "1",
                                               "--out", tmp_path / "run", "--quiet"]):
        res = invoke(*args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        if args[0] == "train":
            on_contract(res, {1}, "train")
    run_cli(*tiny_extract_args(world["manifest"], cache, *EXTRACT), "--repair")
    assert run_cli("verify", cache).exit_code == 0
    assert tree_state(sentinel) == before


# ------------------------------------------------------------------------------------------- writing
def _extract(manifest, cache, *extra):
    return invoke(*tiny_extract_args(manifest, cache, *EXTRACT, *extra))


def test_repair_resume_and_overwrite_never_reach_out_of_the_cache(world, tmp_path):
    sentinel = make_sentinel(tmp_path)
    for kind in ("shard-file-link", "chunk-folder-link", "table-chunk-link", "shard-folder-link"):
        cache = _copy(world["ref"], tmp_path, f"{kind}.zarr")
        LINKS[kind](cache, sentinel)
        before = tree_state(sentinel)
        on_contract(_extract(world["manifest"], cache, "--repair"), {2}, f"--repair on {kind}")
        assert tree_state(sentinel) == before, f"--repair on {kind}"
        try:     # resume: the shards the links are in are to be written again (when it opens at all)
            reset_shards(Cache(cache, mode="r+"), [0, 1, 2])
        except UnsafeStore:
            pass
        res = _extract(world["manifest"], cache)
        if res.exit_code:
            on_contract(res, {2}, f"resume on {kind}")
        assert tree_state(sentinel) == before, f"resume on {kind}"
        # --overwrite deletes only inside the cache, or (a link it sees when opening it) refuses to delete it
        res = _extract(world["manifest"], cache, "--overwrite")
        if res.exit_code:
            assert "symbolic link" in on_contract(res, {2}, f"--overwrite on {kind}")
        else:
            assert run_cli("verify", cache).exit_code == 0
            assert not any(p.is_symlink() for p in cache.rglob("*"))
        assert tree_state(sentinel) == before, f"--overwrite on {kind}"


def test_overwrite_deletes_nothing_that_is_not_a_cache(world, tmp_path):
    sentinel = make_sentinel(tmp_path)
    before = tree_state(sentinel)
    # a folder of the user's files, marked as a cache being created (the marker is all a crafter needs)
    marked = tmp_path / "marked"
    shutil.copytree(sentinel, marked)
    (marked / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                  "attributes": {"cachefeat_creating": True}}))
    held = tree_state(marked)
    for extra in ((), ("--overwrite",)):
        on_contract(_extract(world["manifest"], marked, *extra), {2}, f"marked folder {extra}")
        assert tree_state(marked) == held
    # --out a link to a real cache: nothing is deleted through a link
    target = _copy(world["ref"], tmp_path, "target.zarr")
    held = tree_state(target)
    link = tmp_path / "link.zarr"
    link.symlink_to(target)
    line = on_contract(_extract(world["manifest"], link, "--overwrite"), {2}, "--overwrite through a link")
    assert "symbolic link" in line, line
    assert tree_state(target) == held
    # a lock file that is a link (or a hard link) to a file outside: never truncated, never written
    for how in ("symlink", "hardlink"):
        cache = _copy(world["ref"], tmp_path, f"lock-{how}.zarr")
        lock = cache / "cachefeat.lock"
        os.symlink(sentinel / "precious.txt", lock) if how == "symlink" else os.link(sentinel / "precious.txt", lock)
        for extra in ((), ("--repair",), ("--overwrite",)):
            on_contract(_extract(world["manifest"], cache, *extra), {2}, f"lock {how} {extra}")
        assert tree_state(sentinel) == before, how
        lock.unlink()
    assert tree_state(sentinel) == before


def test_export_overwrite_never_follows_links_in_what_it_replaces(world, tmp_path):
    sentinel = make_sentinel(tmp_path)
    out = tmp_path / "npy"
    run_cli("export", world["ref"], out, "--format", "npy", "-q")
    (out / "escape").symlink_to(sentinel)                          # a link to a folder outside
    (out / "escape-file").symlink_to(sentinel / "precious.txt")
    before = tree_state(sentinel)
    run_cli("export", world["ref"], out, "--format", "npy", "-q", "--overwrite")
    assert tree_state(sentinel) == before
    assert not (out / "escape").exists()
    # a folder that is not an export is not replaced
    line = on_contract(invoke("export", world["ref"], sentinel, "--format", "npy", "-q", "--overwrite"), {2},
                       "export over a folder that is not an export")
    assert tree_state(sentinel) == before, line


# ------------------------------------------------------------------------------------------- windowed
def test_crafted_window_counts_are_refused(synth_small, tmp_path):
    """A windowed cache whose videos/num_clips claims a billion windows per video, every hash and checksum
    computed again so that only the range check can refuse it."""
    cache = tmp_path / "w.zarr"
    run_cli(*tiny_extract_args(synth_small / "val.txt", cache, "--frames", "2", "--sampling", "fps:4"))
    root = zarr.open_group(str(cache), mode="r+")
    counts = np.full(root["videos/num_clips"].shape, 10 ** 9, np.int32)
    root["videos/num_clips"][:] = counts
    import hashlib
    sha = hashlib.sha256(counts.astype("<i8").tobytes()).hexdigest()[:16]

    def change(m):
        m["layout"].update(clip_counts_sha256=sha, num_clips=int(counts.sum(dtype=np.int64)))
        m["table_checksums"]["videos/num_clips"] = table_checksum(counts)
    _edit_meta(cache, change)
    for args in (["info", cache], ["verify", cache]):
        line = on_contract(invoke(*args), {2}, args[0])
        assert "videos/num_clips" in line, line
