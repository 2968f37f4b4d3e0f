"""`cachefeat extract --out s3://...` (store/bucket_writer.py) against a real S3 server (moto's, on 127.0.0.1, or
CACHEFEAT_S3_TEST_ENDPOINT): the bucket cache equals the one written to a local folder, bit for bit, from one
process and from Ray workers that share no folder; a real process killed with SIGKILL mid-run resumes from
the bucket alone, in a new staging folder, with its killed multipart uploads aborted; a second writer and other
settings are refused in one line."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("boto3")

from conftest import cli_subprocess, run_cli, tiny_extract_args  # noqa: E402
from helpers import invoke, on_contract  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ARGS = ("--layers", "all", "--tokens", "all", "--frames", "2", "--batch-size", "1")   # batch 1: slow enough to kill


def _same(a_path, b_url):
    from cachefeat.store import open_cache
    a, b = open_cache(a_path), open_cache(b_url)
    assert b.complete
    assert {k: v for k, v in b.meta.items() if k != "created"} == {k: v for k, v in a.meta.items() if k != "created"}
    for name in a.array_names():
        x, y = a.read_stored(name), b.read_stored(name)
        if x.dtype.kind in "TUO":
            assert x.tolist() == y.tolist(), name
        else:
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"{name} differs"
    assert b.record_problems(features=True) == {}


@pytest.fixture(scope="module")
def local(synth_small, tmp_path_factory):
    """The cache written to a local folder that every bucket extraction must equal: 12 clips in 6 shards."""
    out = tmp_path_factory.mktemp("bucket-extract") / "local.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", out, *ARGS, "--shard-size", "2"))
    return out


def test_extract_into_a_bucket_equals_a_local_cache(env, synth_small, local, tmp_path):
    url = f"s3://{env.new_bucket()}/k/train.zarr"
    staging = tmp_path / "staging"
    staging.mkdir()
    res = run_cli(*tiny_extract_args(synth_small / "train.txt", url, *ARGS, "--shard-size", "2",
                                     "--staging", staging))
    assert f"{url}: created" in res.output and f"{url}: 12 valid clips of 12" in res.output
    _same(local, url)
    assert list(staging.iterdir()) == []                      # the staging copy is gone
    res = run_cli(*tiny_extract_args(synth_small / "train.txt", url, *ARGS, "--shard-size", "2"))
    assert f"{url}: already complete (6 shards); nothing to do" in res.output
    # other settings: refused in one line naming the URL, nothing changed
    res = invoke(*tiny_extract_args(synth_small / "train.txt", url, *ARGS, "--shard-size", "2", "--frames", "3"))
    assert f"{url} was made with other settings" in on_contract(res, (2,), "other settings")
    _same(local, url)
    # plain zarr reads what the extraction wrote
    import zarr
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    from cachefeat.store import open_cache
    bucket, prefix = url[len("s3://"):].split("/", 1)
    store = S3Store(bucket, prefix=prefix, endpoint=env.endpoint, access_key_id=env.key,
                    secret_access_key=env.secret, region=env.region, client_options={"allow_http": True})
    root = zarr.open_group(store=ObjectStore(store, read_only=True), mode="r")
    assert np.array_equal(root["cls"][:], open_cache(local).read_stored("cls"))


def test_a_killed_extraction_resumes_from_the_bucket(env, synth_small, local, tmp_path):
    """SIGKILL the real command once the bucket flags two shards; its lease, a half-done multipart upload and
    its staging folder are left behind. Run again (another staging folder: as on another machine) with
    --break-lease: it resumes with the shards the bucket lacks and the cache equals the local one."""
    client = env.client()
    bucket = env.new_bucket()
    url = f"s3://{bucket}/train.zarr"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    proc = cli_subprocess(*tiny_extract_args(synth_small / "train.txt", url, *ARGS, "--shard-size", "2",
                                             "--staging", first))
    deadline = time.monotonic() + 120
    flags = []
    while len(flags) < 2 and proc.poll() is None and time.monotonic() < deadline:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="train.zarr/progress/c/").get("Contents", [])
        flags = [o["Key"] for o in listed]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(flags) < 6, f"killed too late ({len(flags)} flags): {proc.stdout.read()[-400:]}"
    from cachefeat.store import open_cache
    partial = open_cache(url)
    done = int(partial.shard_done().sum())
    assert 2 <= done < 6 and partial.being_written_by()["command"] == "extract"
    assert "being written by extract" in run_cli("info", url).output
    # a second writer is refused while the lease lives
    res = invoke(*tiny_extract_args(synth_small / "train.txt", url, *ARGS, "--shard-size", "2"))
    assert "being written by another cachefeat extract" in on_contract(res, (1,), "a second writer")
    upload = client.create_multipart_upload(Bucket=bucket, Key="train.zarr/cls/c/5/0")["UploadId"]
    client.upload_part(Bucket=bucket, Key="train.zarr/cls/c/5/0", UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    res = run_cli(*tiny_extract_args(synth_small / "train.txt", url, *ARGS, "--shard-size", "2",
                                     "--staging", second, "--break-lease"))
    assert f"resuming, {done} of 6 shards already done" in res.output and "warning: broke the lease" in res.output
    assert "aborted 1 unfinished upload" in res.output
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    _same(local, url)
    assert open_cache(url).being_written_by() is None          # the lease went with the run
    assert list(second.iterdir()) == []


def test_a_prefix_holding_something_else_is_refused(env, synth_small, tmp_path):
    client = env.client()
    bucket = env.new_bucket()
    client.put_object(Bucket=bucket, Key="p/cls/c/0/0", Body=b"data of a push cut off")
    res = invoke(*tiny_extract_args(synth_small / "train.txt", f"s3://{bucket}/p", *ARGS))
    assert "holds objects but no cache's root document" in on_contract(res, (2,), "a foreign prefix")
    assert client.get_object(Bucket=bucket, Key="p/cls/c/0/0")["Body"].read() == b"data of a push cut off"


def test_ray_workers_write_their_shards_to_the_bucket(env, synth_small, local, tmp_path, ray_session):
    """Two Ray workers, each staging in a folder of its own (no folder is shared): the same cache."""
    from cachefeat.extract import ExtractSettings
    from cachefeat.extract.distributed import extract_distributed
    from cachefeat.extract.manifest import load_manifest
    from cachefeat.store.bucket_writer import BucketOut

    from conftest import TINY
    url = f"s3://{env.new_bucket()}/ray.zarr"
    settings = ExtractSettings(model=TINY, pretrained="none", layers="all", tokens="all", frames=2, shard_size=2)
    manifest = load_manifest(synth_small / "train.txt", "auto", None, synth_small / "classes.txt", None)
    stats = extract_distributed(manifest, BucketOut(url, str(tmp_path)), settings, workers=2, decode_workers=1,
                                batch_size=1, progress=False, log=lambda line: None)
    assert stats.shards == 6 and stats.clips == 12
    _same(local, url)
    assert list(tmp_path.iterdir()) == []


def test_the_server_stopping_mid_run_is_one_line(synth_small, tmp_path, monkeypatch):
    """A server of this test's own, stopped once the bucket flags a shard: the real command exits 1 with one
    line saying to run it again, no traceback, and its staging folder is gone."""
    pytest.importorskip("moto")
    import s3server
    server = s3server.start_moto()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        bucket = server.new_bucket()
        proc = cli_subprocess(*tiny_extract_args(synth_small / "train.txt", f"s3://{bucket}/c.zarr", *ARGS,
                                                 "--shard-size", "2", "--staging", tmp_path))
        client, deadline = server.client(), time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if client.list_objects_v2(Bucket=bucket, Prefix="c.zarr/progress/c/").get("KeyCount", 0):
                break
            time.sleep(0.05)
    finally:
        server.stop()
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "run the same command again" in lines[-1], out
    assert list(tmp_path.iterdir()) == []
