"""The local copy of fetched shards (store/local_copy.py, `train` / `eval --local-cache DIR`), against the S3
server of tests/test_object_store.py: a second pass over a bucket cache reads DIR only (it still reads with the
bucket's shard objects deleted, and training for two epochs fetches each object once), bit for bit as the local
cache; a damaged copy is fetched again; DIR stays under its bound, least recently used copies going first; a
DIR that is a link is refused in one line."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("boto3")

import test_object_store as tos  # noqa: E402

from conftest import run_cli, tiny_extract_args  # noqa: E402
from helpers import bits, invoke, on_contract  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def local(synth_small, tmp_path_factory):
    """A tiny-ViT cache, 12 clips in 3 shards, the last two layers' tokens (several chunks per shard object)."""
    out = tmp_path_factory.mktemp("localcopy") / "train.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", out, "--layers", "last:2", "--tokens", "all", "--frames",
                               "2", "--shard-size", "4"))
    return out


@pytest.fixture(autouse=True)
def no_copy_left_set():
    from cachefeat.store import local_copy
    yield
    local_copy.off()


def _features(cache) -> list[str]:
    return list(cache.layout.feature_arrays())


def _shard_objects(url: str, names) -> dict[str, int]:
    """key -> size of the shard objects of arrays `names` in the bucket."""
    from cachefeat.store.remote import list_objects, parse_url
    return {k: n for k, n in list_objects(parse_url(url)).items() if k.split("/c/")[0] in names and "/c/" in k}


def _dir_bytes(folder) -> int:
    return sum(os.lstat(os.path.join(folder, n)).st_size for n in os.listdir(folder))


def _copies(folder) -> list[str]:
    return [n for n in os.listdir(folder) if len(n) == 64]


def _same(a, b, names, rows=slice(None)):
    for name in names:
        assert np.array_equal(bits(a.read_stored(name, rows)), bits(b.read_stored(name, rows))), name


@pytest.fixture
def counted(monkeypatch):
    """The shard objects fetched whole into a local copy, and those read by ranged GETs, by key (counted only)."""
    from cachefeat.store import reader
    from cachefeat.store.local_copy import LocalCopy
    seen = {"whole": [], "ranges": []}
    fetch, ranges = LocalCopy._fetch, reader.get_ranges_async

    async def whole(self, loc, key, *rest):
        seen["whole"].append(key)
        return await fetch(self, loc, key, *rest)

    async def ranged(loc, key, starts, ends):
        seen["ranges"].append(key)
        return await ranges(loc, key, starts, ends)
    monkeypatch.setattr(LocalCopy, "_fetch", whole)
    monkeypatch.setattr(reader, "get_ranges_async", ranged)
    return seen


# ------------------------------------------------------------------------------------------- reading
def test_second_pass_reads_only_the_local_copy(env, local, tmp_path, counted, monkeypatch):
    """Reading every feature row twice: the first pass fetches each shard object once into DIR; the second
    still reads, bit for bit, once the bucket's shard objects are deleted. (A read of many shards holds the
    copies of IN_FLIGHT at a time: here 2, of 3.)"""
    from cachefeat.store import local_copy, open_cache, reader
    monkeypatch.setattr(reader, "IN_FLIGHT", 2)
    url, bucket, prefix = tos._fresh_copy(env, local)
    a = open_cache(local)
    names = _features(a)
    objects = _shard_objects(url, names)
    local_copy.use(tmp_path / "copy")
    b = open_cache(url)
    _same(a, b, names)
    assert sorted(counted["whole"]) == sorted(objects) and counted["ranges"] == []
    assert len(_copies(tmp_path / "copy")) == len(objects)
    assert _dir_bytes(tmp_path / "copy") == sum(objects.values())
    env.client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"{prefix}/{k}"} for k in objects]})
    counted["whole"].clear()
    _same(a, b, names)                                   # the whole arrays, from DIR alone
    _same(a, b, names, np.array([11, 0, 5, 5, 7, 2]))    # across shards, out of order, a repeat
    assert counted == {"whole": [], "ranges": []}


def test_train_two_epochs_fetch_each_object_once(env, local, tmp_path, counted):
    """`train --local-cache` for two epochs streamed shard by shard fetches each shard object it reads once,
    with no ranged GET; an eval sharing DIR fetches nothing and gives the local cache's logits, bit for bit.
    With a cache in a folder, --local-cache is ignored (a link there is no error)."""
    url, _, _ = tos._fresh_copy(env, local)
    folder, run = tmp_path / "copy", tmp_path / "run"
    res = run_cli("train", "--cache", url, "--adapter", "probe", "--epochs", "2", "--batch-size", "4", "--threads",
                  "1", "--in-memory", "no", "--device", "cpu", "--out", run, "--local-cache", folder,
                  "--local-cache-size", "64M")
    assert f"local copy of fetched shards: {folder}, at most 64.00 MiB" in res.output
    assert res.output.count("local copy") == 1                     # one line, nothing per shard
    embed = _shard_objects(url, ["embed"])                         # what the probe reads
    assert sorted(counted["whole"]) == sorted(embed) and counted["ranges"] == []
    counted["whole"].clear()
    remote = invoke("eval", "--checkpoint", run, "--cache", url, "--out", tmp_path / "e1", "--device", "cpu",
                    "--in-memory", "no", "--json", "--local-cache", folder)
    assert remote.exit_code == 0, remote.output
    assert counted == {"whole": [], "ranges": []}
    assert "local copy of fetched shards" in remote.stderr and json.loads(remote.stdout)["top1"] >= 0
    link = tmp_path / "link"
    link.symlink_to(folder)
    run_cli("eval", "--checkpoint", run, "--cache", local, "--out", tmp_path / "e2", "--device", "cpu",
            "--read-workers", "0", "--json", "--local-cache", link)
    la, lb = np.load(tmp_path / "e1" / "logits.npz"), np.load(tmp_path / "e2" / "logits.npz")
    for k in la.files:
        assert np.array_equal(la[k], lb[k]), k


# ------------------------------------------------------------------------------------------- damage
def test_a_damaged_copy_is_fetched_again(env, local, tmp_path, counted):
    """A byte of a copy flipped on disk, another copy cut short: each is noticed (a chunk's CRC32C, the size),
    deleted and fetched again once, and the values are right. With the bucket's object damaged too, the error
    is the one of a damaged bucket cache."""
    from cachefeat.store import CacheDamaged, local_copy, open_cache
    from cachefeat.store.local_copy import LocalCopy, listing
    from cachefeat.store.remote import parse_url
    url, bucket, prefix = tos._fresh_copy(env, local)
    a = open_cache(local)
    name = _features(a)[-1]
    folder = tmp_path / "copy"
    local_copy.use(folder)
    _same(a, open_cache(url), [name])
    loc = parse_url(url)
    listed = listing(loc, f"{name}/c")
    files = {k: folder / LocalCopy.name(loc, k, *listed[k]) for k in listed}
    flipped, cut = sorted(files)[:2]
    body = bytearray(files[flipped].read_bytes())
    body[64] ^= 0xFF
    files[flipped].write_bytes(bytes(body))
    files[cut].write_bytes(files[cut].read_bytes()[:-10])
    counted["whole"].clear()
    _same(a, open_cache(url), [name])
    assert sorted(counted["whole"]) == sorted([flipped, cut])
    client = env.client()
    for key, path in files.items():
        assert path.read_bytes() == client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read(), key
    damaged = bytearray(client.get_object(Bucket=bucket, Key=f"{prefix}/{flipped}")["Body"].read())
    damaged[64] ^= 0xFF
    client.put_object(Bucket=bucket, Key=f"{prefix}/{flipped}", Body=bytes(damaged))
    shard = int(flipped.split("/c/")[1].split("/")[0])
    rows = np.arange(4 * shard, 4 * shard + 4)
    with pytest.raises(CacheDamaged, match="cachefeat push"):
        open_cache(url).read_stored(name, rows)


# ------------------------------------------------------------------------------------------- the bound
def test_the_bound_is_kept(env, local, tmp_path, counted):
    """DIR never holds more than its bound: copies are deleted, least recently used first, to make room; with
    a bound smaller than any shard object, everything is read straight from the bucket."""
    from cachefeat.store import local_copy, open_cache
    url, _, _ = tos._fresh_copy(env, local)
    a = open_cache(local)
    names = _features(a)
    objects = _shard_objects(url, names)
    bound = 2 * max(objects.values()) + max(objects.values()) // 2
    assert bound < sum(objects.values())
    folder = tmp_path / "copy"
    local_copy.use(folder, bound)
    b = open_cache(url)
    for _ in range(2):
        for name in names:
            for shard in range(3):
                _same(a, b, [name], np.arange(4 * shard, 4 * shard + 4))
                assert _dir_bytes(folder) <= bound
    assert len(counted["whole"]) > len(objects)             # evicted copies were fetched again
    assert counted["ranges"] == []
    counted["whole"].clear()
    small = tmp_path / "small"
    local_copy.use(small, min(objects.values()) - 1)
    _same(a, open_cache(url), names)
    assert counted["whole"] == [] and sorted(set(counted["ranges"])) == sorted(objects)
    assert _copies(small) == []


def test_least_recently_used_copies_go_first(tmp_path):
    """Room for a new copy is made by deleting copies by age of their last use; files that are no copies
    (and folders, links) are counted, never deleted."""
    from cachefeat.store.local_copy import LocalCopy
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(b"x" * 50)
    (folder / "sub").mkdir()
    (folder / ("9" * 64)).symlink_to(tmp_path / "elsewhere")
    copy = LocalCopy(folder, 400)
    names = [c * 64 for c in "abc"]
    for age, name in zip((30, 20, 10), names):       # a used first, then b, then c
        (folder / name).write_bytes(b"y" * 100)
        os.utime(folder / name, (1e9 - age, 1e9 - age))
    assert copy.held_bytes() == 350
    fd = copy.open(names[0], 100)                          # used now: the most recently used
    os.close(fd)
    fd, tmp = copy._reserve("d" * 64, 150)                 # 350 + 150 > 400: the least recently used goes, b
    os.close(fd)
    assert sorted(os.listdir(folder)) == sorted([".lock", "notes.txt", "sub", "9" * 64, names[0], names[2], tmp])
    assert copy.held_bytes() == 400                        # the temporary file counts at its final size
    assert copy._reserve("e" * 64, 500) is None            # more than the bound: read from the bucket


# ------------------------------------------------------------------------------------------- refusals
def test_a_local_cache_that_is_a_link_or_a_file_is_refused(env, local, tmp_path):
    url = f"s3://{env.new_bucket()}/c.zarr"
    run_cli("push", local, url, "-q")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("")
    args = ["train", "--cache", url, "--adapter", "probe", "--epochs", "1", "--device", "cpu", "--out"]
    line = on_contract(invoke(*args, tmp_path / "run", "--local-cache", tmp_path / "link"), (2,), "a link")
    assert "is a symbolic link" in line and str(tmp_path / "link") in line
    line = on_contract(invoke(*args, tmp_path / "run", "--local-cache", tmp_path / "file"), (2,), "a file")
    assert "file" in line
    line = on_contract(invoke(*args, tmp_path / "run", "--local-cache", tmp_path / "real", "--local-cache-size",
                              "lots"), (2,), "a bad size")
    assert "not a size" in line
    assert not (tmp_path / "run").exists() and os.listdir(tmp_path / "real") == []
