"""Caches in an S3-compatible bucket (store/remote.py, store/reader.RemoteCache, `cachefeat push`), against a
real HTTP server: moto's server mode on 127.0.0.1 with request signatures checked (tests/s3server.py), or the
endpoint in CACHEFEAT_S3_TEST_ENDPOINT (docs/object-storage.md). A cache pushed to the bucket reads back bit
for bit, trains and evaluates from its URL, opens in plain zarr through zarr's own ObjectStore, and a second
push uploads nothing. Each fault (wrong credentials, a missing bucket, the server gone, objects corrupted or
deleted behind cachefeat's back) is one line with the contract's exit status."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("boto3")

import s3server  # noqa: E402

from conftest import run_cli, tiny_extract_args  # noqa: E402
from helpers import bits, invoke, on_contract  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def local(synth_small, tmp_path_factory):
    """A tiny-ViT cache with every layer's tokens (so the shard files hold several chunks each): 12 clips in
    3 shards."""
    out = tmp_path_factory.mktemp("objstore") / "train.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", out, "--layers", "all", "--tokens", "all", "--frames", "2",
                               "--shard-size", "4"))
    return out


@pytest.fixture(scope="module")
def pushed(s3, local):
    """`local` pushed once to a bucket of its own: its URL (the tests that read it change nothing there)."""
    url = f"s3://{s3.new_bucket()}/caches/train.zarr"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env().items():
            mp.setenv(k, v)
        res = run_cli("push", local, url, "-q")
    assert "uploaded" in res.output
    return url


def _fresh_copy(s3, local) -> tuple[str, str, str]:
    """`local` pushed to a new bucket (for a test that damages it): (url, bucket, key prefix)."""
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/c.zarr"
    run_cli("push", local, url, "-q")
    return url, bucket, "c.zarr"


def _flip_a_byte(s3, bucket: str, key: str) -> None:
    """Object `key` put back with one byte of its first chunk changed, behind cachefeat's back."""
    client = s3.client()
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[64] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))


# ------------------------------------------------------------------------------------------- reading
def test_bucket_cache_reads_back_bit_for_bit(env, local, pushed):
    from cachefeat.store import open_cache
    from cachefeat.store.reader import RemoteCache, RemoteShardFile
    a, b = open_cache(local), open_cache(pushed)
    assert isinstance(b, RemoteCache) and b.complete and b.num_clips == a.num_clips == 12
    assert b.meta == a.meta
    assert b.array_names() == a.array_names()
    features = list(a.layout.feature_arrays())
    assert isinstance(b.shard_file(features[0]), RemoteShardFile)      # the fast reader, not zarr's
    for name in a.array_names():
        x, y = a.read_stored(name), b.read_stored(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(bits(x), bits(y)), f"{name} differs"
    rows = np.array([11, 0, 5, 5, 7, 2])              # across shards, out of order, a repeat
    for name in features:
        assert np.array_equal(bits(a.read_stored(name, rows)), bits(b.read_stored(name, rows))), name
        assert np.array_equal(bits(a.read_stored(name, 9)), bits(b.read_stored(name, 9))), name
    assert b.disk_bytes() == a.disk_bytes()
    assert b.record_problems(features=True) == {}


def test_streamed_batches_match_the_local_cache(env, local, pushed):
    """Streaming from the bucket (one buffer per shard, the next ones read ahead by a thread, every array's
    requests at once) serves the batches the local cache serves, in the same order; stopping early is clean."""
    from cachefeat.adapters.base import Needs
    from cachefeat.store import open_cache
    from cachefeat.train.reader import CachedSource
    a, b = open_cache(local), open_cache(pushed)
    sel = Needs(embed=True, cls_layers=tuple(a.layers), token_layers=tuple(a.layers[-2:]))

    def epoch(cache, **kw):
        src = CachedSource(cache, sel, batch_size=3, seed=1, in_memory="no", workers=0, buffer_shards=1, **kw)
        return list(src.batches(2, train=True))
    x, y = epoch(a), epoch(b, prefetch=2)
    assert len(x) == len(y) == 6                     # 12 clips: 3 buffers of 4, each a batch of 3 and one of 1
    for p, q in zip(x, y):
        assert p.keys() == q.keys() and np.array_equal(p["row"], q["row"])
        for k in ("embed", "cls", "tokens"):
            assert np.array_equal(bits(p[k]), bits(q[k])), k
    src = CachedSource(b, sel, batch_size=3, in_memory="no", workers=0, buffer_shards=1)
    stream = src.batches(0, train=True)
    assert len(next(stream)["row"]) == 3
    stream.close()                                   # the reads not started are cancelled, none is left


def test_plain_zarr_opens_the_bucket_cache(env, local, pushed):
    """zarr itself, through its ObjectStore over an obstore S3Store, reads the values cachefeat wrote."""
    import zarr
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    from cachefeat.store import open_cache
    bucket, prefix = pushed[len("s3://"):].split("/", 1)
    store = S3Store(bucket, prefix=prefix, endpoint=env.endpoint, access_key_id=env.key,
                    secret_access_key=env.secret, region=env.region,
                    client_options={"allow_http": env.endpoint.startswith("http://")})
    root = zarr.open_group(store=ObjectStore(store, read_only=True), mode="r", zarr_format=3)
    a = open_cache(local)
    assert root.attrs["cachefeat"]["fingerprint"] == a.meta["fingerprint"]
    for name in a.array_names():
        x, y = a.root[name][...], root[name][...]
        assert np.array_equal(bits(x), bits(y)), name


def test_second_push_uploads_nothing(env, local, pushed):
    res = run_cli("push", local, pushed, "-q")
    n = sum(1 for p in local.rglob("*") if p.is_file())
    assert f"uploaded 0 objects (0 B), skipped {n} unchanged, deleted 0" in res.output


def test_a_prefix_named_like_an_array(env, local):
    """Keys are relative to the URL's prefix, whatever it is called: here `cls`, the name of an array too."""
    from cachefeat.store import open_cache
    url = f"s3://{env.new_bucket()}/cls"
    run_cli("push", local, url, "-q")
    assert "uploaded 0 objects" in run_cli("push", local, url, "-q").output
    a, b = open_cache(local), open_cache(url)
    assert np.array_equal(bits(a.read("cls")), bits(b.read("cls")))


def test_a_push_cut_off_resumes(env, local):
    """A push stopped after 10 objects (as by Ctrl-C or a killed process): what is in the bucket is no complete
    cache (its root document goes last), and the same push again uploads only what is not there yet."""
    import re

    from cachefeat.store import open_cache
    from cachefeat.store.remote import parse_url, push

    class Cut(Exception):
        pass

    def cut_after_ten(n, total=None):
        cut_after_ten.done += n
        if cut_after_ten.done >= 10:
            raise Cut
    cut_after_ten.done = 0
    url = f"s3://{env.new_bucket()}/c.zarr"
    with pytest.raises(Cut):
        push(open_cache(local), parse_url(url), progress=cut_after_ten)
    line = on_contract(invoke("info", url), (2,), "info of a push cut off")
    assert "root zarr.json is missing" in line
    res = run_cli("push", local, url, "-q")
    uploaded, skipped = map(int, re.search(r"uploaded (\d+) objects .*skipped (\d+) unchanged", res.output).groups())
    assert skipped >= 10 and uploaded + skipped == sum(1 for p in local.rglob("*") if p.is_file())
    assert "ok: every chunk reads" in run_cli("verify", url).output


def test_push_deletes_what_the_cache_no_longer_holds(env, local):
    url, bucket, prefix = _fresh_copy(env, local)
    env.client().put_object(Bucket=bucket, Key=f"{prefix}/cls/c/99/0/0/0", Body=b"left over")
    res = run_cli("push", local, url, "-q")
    assert "deleted 1 the cache no longer holds" in res.output
    keys = [o["Key"] for o in env.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert f"{prefix}/cls/c/99/0/0/0" not in keys and f"{prefix}/zarr.json" in keys


def test_push_refuses_a_prefix_holding_other_objects(env, local):
    bucket = env.new_bucket()
    env.client().put_object(Bucket=bucket, Key="mine/notes.txt", Body=b"not a cache")
    line = on_contract(invoke("push", local, f"s3://{bucket}/mine"), (2,), "push over other objects")
    assert "no part of a cache" in line
    keys = [o["Key"] for o in env.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["mine/notes.txt"]


def test_info_and_verify_from_the_bucket(env, pushed, tmp_path):
    res = run_cli("info", pushed, "--plot", tmp_path / "overview.png")
    assert (tmp_path / "overview.png").stat().st_size > 0
    assert f"cache      {pushed}" in res.output and "progress   complete" in res.output
    assert "12 valid of 12" in res.output
    info = json.loads(run_cli("info", pushed, "--json").output)
    assert info["counts"]["shards_done"] == 3
    res = run_cli("verify", pushed)
    assert "ok: every chunk reads" in res.output


def test_train_and_eval_from_the_bucket(env, local, pushed, tmp_path):
    """A short run streams its cache from the bucket (--in-memory no: shard by shard, as a cache larger than
    RAM is read); eval from the bucket gives the same logits as from the local copy."""
    run = tmp_path / "run"
    res = run_cli("train", "--cache", pushed, "--val-cache", pushed, "--adapter", "probe", "--epochs", "2",
                  "--batch-size", "4", "--threads", "1", "--in-memory", "no", "--read-workers", "1",
                  "--device", "cpu", "--out", run)
    assert "streamed by this process" in res.output and "val top-1" in res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_cache"] == pushed
    remote = json.loads(run_cli("eval", "--checkpoint", run, "--cache", pushed, "--out", tmp_path / "e1",
                                "--device", "cpu", "--in-memory", "no", "--read-workers", "2", "--json").output)
    here = json.loads(run_cli("eval", "--checkpoint", run, "--cache", local, "--out", tmp_path / "e2",
                              "--device", "cpu", "--read-workers", "0", "--json").output)
    assert remote["top1"] == here["top1"] and remote["top5"] == here["top5"]
    la, lb = np.load(tmp_path / "e1" / "logits.npz"), np.load(tmp_path / "e2" / "logits.npz")
    for k in la.files:
        assert np.array_equal(la[k], lb[k]), k


# ------------------------------------------------------------------------------------------- faults
def test_wrong_secret_key(env, pushed, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for cmd in (["info", pushed], ["verify", pushed]):
        line = on_contract(invoke(*cmd), (2,), f"{cmd[0]} with a wrong secret")
        assert "access denied" in line and "AWS_SECRET_ACCESS_KEY" in line


def test_missing_bucket(env, local):
    url = f"s3://cachefeat-none-{env.new_bucket()[-12:]}/c.zarr"
    for cmd in (["info", url], ["push", local, url]):
        line = on_contract(invoke(*cmd), (2,), f"{cmd[0]} of a missing bucket")
        assert "does not exist" in line


def test_nothing_at_the_prefix(env, pushed):
    url = pushed.rsplit("/", 1)[0] + "/other.zarr"
    line = on_contract(invoke("info", url), (2,), "no cache at the prefix")
    assert "cachefeat push" in line


def test_server_stopped_before_a_read(local, tmp_path, monkeypatch):
    """A server of this test's own, stopped after the cache was opened and before its features are read:
    the read fails in one line (exit 1: run it again), and verify does not call the cache damaged."""
    pytest.importorskip("moto")
    from cachefeat.store import open_cache
    from cachefeat.store.remote import RemoteUnreachable
    server = s3server.start_moto()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        url = f"s3://{server.new_bucket()}/c.zarr"
        run_cli("push", local, url, "-q")
        cache = open_cache(url)
    finally:
        server.stop()
    with pytest.raises(RemoteUnreachable, match="run the same command again"):
        cache.read("cls", np.arange(4))
    for cmd in (["info", url], ["verify", url], ["push", local, url]):
        line = on_contract(invoke(*cmd), (1,), f"{cmd[0]} with the server stopped")
        assert "run the same command again" in line and "damaged" not in line


def test_corrupted_object_is_reported_and_pushed_again(env, local, tmp_path):
    """Different bytes put in a shard object behind cachefeat's back: verify exits 1 naming the damaged clips
    and the repair; training refuses the cache in one line; pushing again from the sound local copy mends it."""
    url, bucket, prefix = _fresh_copy(env, local)
    key = f"{prefix}/tokens/3/c/1/0/0/0"
    _flip_a_byte(env, bucket, key)
    res = invoke("verify", url)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "damaged: tokens/3 rows" in res.output and "cachefeat push" in res.output
    report = json.loads(invoke("verify", url, "--json").output)
    assert report["clips_to_reextract"] == [4, 5, 6, 7]
    from cachefeat.store import CacheDamaged, open_cache
    with pytest.raises(CacheDamaged, match="cachefeat push"):
        open_cache(url).read("tokens/3", np.arange(4, 8))
    res = run_cli("push", local, url, "-q")
    assert "uploaded 2 objects" in res.output        # the shard object and the root document put back last
    assert "ok: every chunk reads" in run_cli("verify", url).output


def test_a_failed_read_leaves_no_request_behind(env, local, monkeypatch):
    """The first shard of a read damaged: the read stops there with CacheDamaged, and the requests of the shards
    it never reached are cancelled, not left running on the requests' loop behind the caller's back."""
    import asyncio

    from cachefeat.store import CacheDamaged, open_cache, reader, remote
    url, bucket, prefix = _fresh_copy(env, local)
    key = f"{prefix}/tokens/3/c/0/0/0/0"
    _flip_a_byte(env, bucket, key)
    started, ranges = [], reader.get_ranges_async

    async def slow_after_the_first(loc, key, starts, ends):
        started.append(key)
        if not key.startswith("tokens/3/c/0/"):
            await asyncio.sleep(30)              # still in flight when shard 0 fails
        return await ranges(loc, key, starts, ends)
    monkeypatch.setattr(reader, "get_ranges_async", slow_after_the_first)
    cache = open_cache(url)
    with pytest.raises(CacheDamaged, match="cachefeat push"):
        cache.read("tokens/3", np.arange(12))
    assert len(started) == 3

    async def running():
        await asyncio.sleep(0.05)                # (a cancelled task needs a turn of the loop to end)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert remote.run_sync(running()) == []
    with pytest.raises(RuntimeError, match="own loop"):
        async def nested():
            return remote.run_sync(asyncio.sleep(0))
        remote.run_sync(nested())


def test_deleted_objects(env, local, tmp_path):
    """A shard object deleted: verify names its clips (exit 1), train refuses in one line (exit 1) naming the
    repair; the root document deleted: the URL is no complete cache (exit 2)."""
    url, bucket, prefix = _fresh_copy(env, local)
    client = env.client()
    client.delete_object(Bucket=bucket, Key=f"{prefix}/cls/c/2/0/0/0")
    res = invoke("verify", url)
    assert res.exit_code == 1 and "damaged: cls rows 8-11" in res.output and "cachefeat push" in res.output
    client.delete_object(Bucket=bucket, Key=f"{prefix}/embed/c/2/0/0")        # what the probe reads
    line = on_contract(invoke("train", "--cache", url, "--adapter", "probe", "--epochs", "1", "--threads", "1",
                              "--device", "cpu", "--out", tmp_path / "run", "--quiet"), (1,), "train, object gone")
    assert "embed" in line and "8" in line and "cachefeat push" in line
    client.delete_object(Bucket=bucket, Key=f"{prefix}/zarr.json")       # as a push cut off before its end
    line = on_contract(invoke("info", url), (2,), "info, root document gone")
    assert "root zarr.json is missing" in line and "run it again" in line
    res = run_cli("push", local, url, "-q")
    assert "uploaded 3 objects" in res.output                                # the two shards, the root last
    assert "ok: every chunk reads" in run_cli("verify", url).output


def test_a_bucket_is_untrusted_input(env, local):
    """Objects no cachefeat push writes: a key with a `..` part, an array document too large to be one (its
    size is checked before its body is read). Each is refused in one line (exit 2)."""
    url, bucket, prefix = _fresh_copy(env, local)
    client = env.client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/cls/../x", Body=b"1")
    line = on_contract(invoke("info", url), (2,), "a key with ..")
    assert "not a cache cachefeat wrote" in line
    client.delete_object(Bucket=bucket, Key=f"{prefix}/cls/../x")
    from cachefeat.store.validate import MAX_ARRAY_DOC
    client.put_object(Bucket=bucket, Key=f"{prefix}/cls/zarr.json", Body=b" " * (MAX_ARRAY_DOC + 1))
    line = on_contract(invoke("info", url), (2,), "an array document too large")
    assert "not a cache cachefeat wrote" in line and "bytes, more than" in line


def test_without_obstore(local, tmp_path):
    """obstore is an optional extra: without it, one line naming it (exit 2)."""
    code = ("import sys; sys.modules['obstore'] = None; from cachefeat.cli import main; "
            "sys.argv = ['cachefeat', *sys.argv[1:]]; main()")
    for args in (["info", "s3://bucket-x/c.zarr"], ["push", str(local), "s3://bucket-x/c.zarr"]):
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        err = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(err) == 1, p.stderr
        assert "pip install 'cachefeat[s3]'" in err[0]


def test_bad_urls(env, local):
    for url in ("s3://UPPER/x", "s3://b/../x", "s3://ab/x"):
        on_contract(invoke("info", url), (2,), f"info {url}")
        on_contract(invoke("push", local, url), (2,), f"push {url}")
