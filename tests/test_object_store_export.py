"""`cachefeat export s3://BUCKET/PREFIX OUT` (store/exchange.py reading a reader.RemoteCache), against a real
HTTP server (tests/s3server.py): a pushed cache exports to HDF5 and npy exactly as its local folder does (every
dataset, its storage settings and every attribute equal; the source attributes name the URL), read in row
blocks; a bucket cache with a live lease, an incomplete or a damaged one is refused in one line naming the URL,
as a local one is; outputs (and import) are local only."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("boto3")

from conftest import run_cli, tiny_extract_args  # noqa: E402
from helpers import invoke, on_contract  # noqa: E402

pytestmark = pytest.mark.timeout(120)
MARK = "cachefeat_export"           # exchange.HDF5_MARK
VOLATILE = ("exported", "source")   # what differs between two exports of one cache: when, and from where


@pytest.fixture(scope="module")
def local(synth_small, tmp_path_factory):
    """A tiny-ViT int8 cache with every layer's tokens and pixels, 5 videos x 2 views in 3 shards, the last
    video missing (a recorded failure): quantization scales, strings, several chunks per shard object."""
    d = tmp_path_factory.mktemp("objstore-export")
    lines = (synth_small / "val.txt").read_text().splitlines()
    manifest = d / "list.txt"
    manifest.write_text("\n".join([f"{synth_small / line.split()[0]} {line.split()[1]}" for line in lines]
                                  + [f"{d / 'gone' / 'missing.mp4'} 2"]) + "\n")
    out = d / "c.zarr"
    run_cli(*tiny_extract_args(manifest, out, "--layers", "all", "--tokens", "all", "--dtype", "int8", "--frames",
                               "2", "--views", "2x1", "--shard-size", "4", "--pixels", "8"))
    return out


@pytest.fixture(scope="module")
def pushed(s3, local):
    """`local` pushed once to a bucket of its own: (url, bucket, key prefix). The tests reading it change
    nothing there."""
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/caches/c.zarr"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env().items():
            mp.setenv(k, v)
        run_cli("push", local, url, "-q")
    return url, bucket, "caches/c.zarr"


def _bits(x):
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x.view(f"u{x.dtype.itemsize}")
    if isinstance(x, np.ndarray) and x.dtype.kind in "OSTU":
        return np.array([v.decode() if isinstance(v, bytes) else v for v in x.reshape(-1).tolist()], dtype=object)
    return x


def _hdf5_nodes(path: Path) -> dict:
    """name -> (storage settings, attributes, values) of every group and dataset of an HDF5 file."""
    out = {}
    with h5py.File(path, "r") as f:
        def one(name, node):
            attrs = {k: node.attrs[k] for k in node.attrs}
            if isinstance(node, h5py.Dataset):
                settings = (node.dtype, node.shape, node.chunks, node.compression, node.compression_opts,
                            node.shuffle, node.fletcher32)
                out[name] = (settings, attrs, _bits(node[()]))
            else:
                out[name] = ("group", attrs, None)
        one("/", f)
        f.visititems(one)
    return out


def _same_hdf5(a: Path, b: Path, source_a: str, source_b: str) -> None:
    na, nb = _hdf5_nodes(a), _hdf5_nodes(b)
    assert list(na) == list(nb)
    mark_a, mark_b = (json.loads(n["/"][1].pop(MARK)) for n in (na, nb))
    assert (mark_a["source"], mark_b["source"]) == (source_a, source_b)
    assert {k: v for k, v in mark_a.items() if k not in VOLATILE} == \
        {k: v for k, v in mark_b.items() if k not in VOLATILE}
    for name, (settings, attrs, values) in na.items():
        settings_b, attrs_b, values_b = nb[name]
        assert settings == settings_b, name
        assert attrs.keys() == attrs_b.keys(), name
        for k, v in attrs.items():
            assert np.array_equal(v, attrs_b[k]), f"attribute {k} of {name} differs"
        if values is not None:
            assert values.shape == values_b.shape and np.array_equal(values, values_b), f"dataset {name} differs"


def _same_npy(a: Path, b: Path, source_a: str, source_b: str) -> None:
    files_a, files_b = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    assert files_a == files_b and len(files_a) > 20
    for name in files_a:
        if name != "index.json":   # np.save of equal arrays: equal bytes (header, dtype and values)
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    assert (ia["source"], ib["source"]) == (source_a, source_b)
    assert {k: v for k, v in ia.items() if k not in VOLATILE} == {k: v for k, v in ib.items() if k not in VOLATILE}


# ------------------------------------------------------------------------------------------- same export
def test_a_bucket_cache_exports_as_its_local_folder(env, local, pushed, tmp_path, monkeypatch):
    from cachefeat.store import exchange
    url = pushed[0]
    run_cli("export", local, tmp_path / "local.h5", "--format", "hdf5", "-q")
    run_cli("export", local, tmp_path / "local_npy", "--format", "npy", "-q")
    # read in row blocks of one shard each (the bound a large cache gets from _BLOCK_BYTES)
    blocks = []
    row_blocks = exchange._row_blocks
    monkeypatch.setattr(exchange, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(exchange, "_row_blocks", lambda *a: blocks.append(a) or row_blocks(*a))
    res = run_cli("export", url, tmp_path / "bucket.h5", "--format", "hdf5", "-q")      # OUT local, through the CLI
    assert f"to {tmp_path / 'bucket.h5'}" in res.output and "cachefeat-s3-" not in res.output
    embed = next(a for a in blocks if a[0][0] == 10 and a[1] == 4)            # (10 clips, ...), shards of 4 rows
    assert [s.stop - s.start for s in row_blocks(*embed)] == [4, 4, 2]
    _same_hdf5(tmp_path / "local.h5", tmp_path / "bucket.h5", str(local), url)
    res = run_cli("export", url, tmp_path / "bucket_npy", "--format", "npy", "-q")
    assert "exported 4 videos" in res.output and "1 failed videos" in res.output
    _same_npy(tmp_path / "local_npy", tmp_path / "bucket_npy", str(local), url)

    # the export from the bucket imports back to the local cache (import: local files only)
    run_cli("import", tmp_path / "bucket.h5", "--out", tmp_path / "back.zarr", "-q")
    from helpers import assert_caches_equal
    assert_caches_equal(local, tmp_path / "back.zarr", exact=True)
    line = on_contract(invoke("import", tmp_path / "bucket.h5", "--out", url), (2,), "import into a bucket")
    assert "writes local files only" in line and "cachefeat push" in line
    line = on_contract(invoke("export", url, url + "-copy.h5", "--format", "hdf5", "-q"), (2,), "export to a bucket")
    assert "writes local files only" in line


def test_help_names_urls():
    out = " ".join(run_cli("export", "--help").output.split())     # click wraps the lines
    assert "s3://BUCKET/PREFIX" in out and "cachefeat export s3://" in out and "import` reads and writes local" in out


# ------------------------------------------------------------------------------------------- refusals
def test_a_bucket_cache_with_a_live_lease_is_refused(env, pushed, tmp_path):
    url, bucket, prefix = pushed
    lease_key = f"{prefix}/cachefeat.lease"
    lease = env.plant_lease(bucket, lease_key, 10)
    for fmt in ("hdf5", "npy"):
        out = tmp_path / f"busy.{fmt}"
        line = on_contract(invoke("export", url, out, "--format", fmt, "-q"), (2,), f"export {fmt} of a leased cache")
        assert line.startswith(f"Error: {url} is being written by another cachefeat process (push, pid 4242 on "
                               f"elsewhere, since {lease['since']}, lease expires {lease['expires']})"), line
        assert "export it when that run has finished" in line and "cachefeat-s3-" not in line
        assert not out.exists() and not list(tmp_path.iterdir())
    try:
        env.plant_lease(bucket, lease_key, -1)        # a killed push's, expired: readers go on
        run_cli("export", url, tmp_path / "after.h5", "--format", "hdf5", "-q")
        with h5py.File(tmp_path / "after.h5") as f:
            assert "cachefeat.lease" not in f and json.loads(f.attrs[MARK])["source"] == url
    finally:
        env.client().delete_object(Bucket=bucket, Key=lease_key)      # `pushed` as it was


def test_an_incomplete_bucket_cache_is_refused_as_a_local_one(env, local, tmp_path):
    from cachefeat.store import Cache
    from cachefeat.store.writer import reset_shards
    src = tmp_path / "src.zarr"
    shutil.copytree(local, src)
    reset_shards(Cache(src, mode="r+"), [2])     # a run killed before its last shard (push refuses it: upload it raw)
    bucket = env.new_bucket()
    client = env.client()
    files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:     # the root document last, as push orders it
        list(pool.map(lambda k: client.upload_file(str(src / k), bucket, f"part.zarr/{k}"),
                      [k for k in files if k != "zarr.json"]))
    client.upload_file(str(src / "zarr.json"), bucket, "part.zarr/zarr.json")
    url = f"s3://{bucket}/part.zarr"
    want = on_contract(invoke("export", src, tmp_path / "l.h5", "--format", "hdf5", "-q"), (2,), "local incomplete")
    line = on_contract(invoke("export", url, tmp_path / "b.h5", "--format", "hdf5", "-q"), (2,), "bucket incomplete")
    assert line == want.replace(str(src), url) and "incomplete (2 of 3 shards done)" in line and url in line
    assert not (tmp_path / "b.h5").exists()
    run_cli("export", src, tmp_path / "l.h5", "--format", "hdf5", "--allow-incomplete", "-q")
    run_cli("export", url, tmp_path / "b.h5", "--format", "hdf5", "--allow-incomplete", "-q")
    _same_hdf5(tmp_path / "l.h5", tmp_path / "b.h5", str(src), url)
    run_cli("export", url, tmp_path / "b_npy", "--format", "npy", "--allow-incomplete", "-q")
    index = json.loads((tmp_path / "b_npy" / "index.json").read_text())
    assert [v["video"] for v in index["videos"]] == [0, 1, 2, 3] and [v["video"] for v in index["not_extracted"]] == [4]

    # a chunk corrupted in the bucket: one line naming the URL, the clips and the repair for a bucket
    key = "part.zarr/embed/c/1/0/0"
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[10] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    line = on_contract(invoke("export", url, tmp_path / "d.h5", "--format", "hdf5", "--allow-incomplete", "-q"), (1,),
                       "a damaged bucket cache")
    assert line.startswith(f"Error: {url}: array embed, clips 4: cannot be read") and "in the bucket is damaged" in line
    assert f"`cachefeat verify {url}`, then `cachefeat push LOCAL_CACHE {url}` again" in line
    assert not (tmp_path / "d.h5").exists()
