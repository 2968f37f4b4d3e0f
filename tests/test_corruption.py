"""The corruption suite: damage that checksums alone cannot show, each made by hand on a copy of a real cache
(3 shards of 4 videos). Every kind must be found by `verify` (exit 1), refused by `train` and `eval` (exit
1, one line, no run folder left), and mended by `extract --repair` into a cache equal to the undamaged one.

    a chunk deleted from its shard file       (reads as zeros, its index and checksums valid)
    a chunk copied over another in its shard  (its checksum is valid: only its place is wrong)
    a whole shard file copied over another
    label chunks deleted                      (read as the fill value: labels of 0)
    a progress flag deleted                   (the shard looks unwritten though its data is there)
    a flag without its shard's record         (a flag set by hand on a shard never finished)
    a per-clip table chunk copied from another shard
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cachefeat.store import Cache, open_cache
from cachefeat.store.layout import RECORD
from cachefeat.store.shard_file import ShardFile

from conftest import run_cli, tiny_extract_args
from helpers import assert_caches_equal, invoke, on_contract


@pytest.fixture(scope="module")
def world(synth_small, tmp_path_factory):
    """A reference cache (one video fails: a different valid mask in its shard), and a probe trained on it."""
    d = tmp_path_factory.mktemp("corruption")
    lines = (synth_small / "train.txt").read_text().splitlines()
    manifest = d / "list.txt"
    manifest.write_text("\n".join(f"{synth_small / l.split()[0]} {l.split()[1]}" for l in lines[:11])
                        + f"\n{d / 'missing.mp4'} 1\n")
    args = tiny_extract_args(manifest, d / "ref.zarr", "--frames", "2", "--shard-size", "4")
    run_cli(*args)
    run_cli("train", "--cache", d / "ref.zarr", "--adapter", "probe", "--epochs", "1", "--batch-size", "4",
            "--threads", "1", "--out", d / "run", "--quiet")
    return {"ref": d / "ref.zarr", "manifest": manifest, "run": d / "run"}


def _chunk_file(cache: Path, name: str, block: int) -> Path:
    arr = Cache(cache).root[name]
    return cache / name / arr.metadata.encode_chunk_key((block,) + (0,) * (arr.ndim - 1))


# the feature damage is in `embed`, what the probe reads: train and eval refuse what they would read (they
# check each chunk against its shard's record as they read it); verify checks every array
def _delete_chunk(c: Path):
    emb = ShardFile.open(c / "embed")
    rows = emb.read(slice(4, 8))
    rows[1] = 0                                  # zarr leaves a zero chunk out: as if deleted from the index
    emb.write(1, rows)
    return {"embed": [5]}, [1]


def _copy_chunk_in_shard(c: Path):
    emb = ShardFile.open(c / "embed")
    rows = emb.read(slice(4, 8))
    rows[2] = rows[0]                            # clip 4's chunk, with its valid checksum, at clip 6
    emb.write(1, rows)
    return {"embed": [6]}, [1]


def _copy_shard_file(c: Path):
    emb = ShardFile.open(c / "embed")
    shutil.copyfile(emb.path(0), emb.path(2))
    return {"embed": [8, 9, 10, 11]}, [2]


def _delete_label_chunks(c: Path):
    _chunk_file(c, "videos/label", 1).unlink()
    _chunk_file(c, "clips/label", 2).unlink()
    return {}, []


def _delete_flag(c: Path):
    _chunk_file(c, "progress", 1).unlink()
    return {}, [1]


def _flag_without_record(c: Path):
    _chunk_file(c, RECORD, 0).unlink()
    return {}, [0]


def _copy_table_chunk(c: Path):
    shutil.copyfile(_chunk_file(c, "clips/valid", 0), _chunk_file(c, "clips/valid", 2))   # shard 2 has the failure
    return {"clips/valid": [8, 9, 10, 11]}, [2]


DAMAGE = {"deleted-chunk": _delete_chunk, "chunk-copied-in-shard": _copy_chunk_in_shard,
          "shard-file-copied": _copy_shard_file, "label-chunks-deleted": _delete_label_chunks,
          "flag-deleted": _delete_flag, "flag-without-record": _flag_without_record,
          "table-chunk-copied": _copy_table_chunk}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_found_refused_and_repaired(world, tmp_path, kind):
    cache = tmp_path / "c.zarr"
    shutil.copytree(world["ref"], cache)
    damaged, shards = DAMAGE[kind](cache)

    res = invoke("verify", cache, "--json")
    report = json.loads(res.stdout)
    assert res.exit_code == 1 and not report["ok"] and not report["fatal"], report
    assert report["shards_to_reextract"] == shards, report
    assert {k: v for k, v in report["damaged"].items() if k in damaged} == damaged, report
    if kind == "label-chunks-deleted":
        assert report["tables_to_rewrite"] == ["videos/label", "clips/label"], report

    for what, args in {"train": ["train", "--cache", cache, "--adapter", "probe", "--epochs", "1", "--threads", "1",
                                 "--out", tmp_path / "run", "--quiet"],
                       "eval": ["eval", "--checkpoint", world["run"], "--cache", cache, "--out", tmp_path / "ev"]
                       }.items():
        line = on_contract(invoke(*args), {1}, f"{what} on {kind}")
        assert str(cache) in line, line
        assert not (tmp_path / "run").exists()

    run_cli(*tiny_extract_args(world["manifest"], cache, "--frames", "2", "--shard-size", "4"), "--repair")
    assert run_cli("verify", cache).exit_code == 0
    assert_caches_equal(cache, world["ref"])
    assert np.array_equal(Cache(cache).root[RECORD][:], Cache(world["ref"]).root[RECORD][:])


def test_edited_metadata_is_refused_on_open(world, tmp_path):
    """A value of the metadata changed by hand (here a class name): the metadata no longer matches its
    fingerprint, so the arrays may not be what it says; every reader refuses it in one line, as input it
    cannot use (exit 2: metadata is not data a re-extraction mends)."""
    cache = tmp_path / "c.zarr"
    shutil.copytree(world["ref"], cache)
    zj = json.loads((cache / "zarr.json").read_text())
    zj["attributes"]["cachefeat"]["classes"][0] = "renamed"
    (cache / "zarr.json").write_text(json.dumps(zj))
    for args in (["verify", cache], ["info", cache], ["train", "--cache", cache, "--out", tmp_path / "run"]):
        line = on_contract(invoke(*args), {2}, args[0])
        assert "metadata was edited" in line, line
    with pytest.raises(Exception, match="metadata was edited"):
        open_cache(cache)


def test_a_record_array_deleted_is_damage_not_an_old_cache(world, tmp_path):
    cache = tmp_path / "c.zarr"
    shutil.copytree(world["ref"], cache)
    shutil.rmtree(cache / RECORD)
    line = on_contract(invoke("verify", cache), {1}, "verify")
    assert RECORD in line and "missing" in line, line
