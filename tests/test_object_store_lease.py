"""The lease of a push (store/remote.Lease, `cachefeat.lease` at the cache's prefix): a second push to a prefix
being pushed is refused in one line (exit 1), an expired lease is taken over, --break-lease removes one, the
lease is gone after a push that succeeded or failed, readers ignore it, and of two `cachefeat push` processes
started at once exactly one writes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("boto3")

from conftest import run_cli, tiny_extract_args  # noqa: E402
from helpers import invoke, on_contract  # noqa: E402

pytestmark = pytest.mark.timeout(120)
LEASE = "cachefeat.lease"


@pytest.fixture(scope="module")
def local(synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("lease") / "train.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", out, "--shard-size", "4"))
    return out


def _pushed(s3, local) -> tuple[str, str, str]:
    bucket = s3.new_bucket()
    run_cli("push", local, f"s3://{bucket}/c.zarr", "-q")
    return f"s3://{bucket}/c.zarr", bucket, "c.zarr/" + LEASE


def _keys(s3, bucket) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_live_lease_refuses_a_second_push_and_readers_ignore_it(env, local):
    from cachefeat.store import open_cache
    from cachefeat.train.config import TrainError
    from cachefeat.train.coverage import check_cache_use
    url, bucket, key = _pushed(env, local)
    lease = env.plant_lease(bucket, key, 10)
    line = on_contract(invoke("push", local, url, "-q"), (1,), "push over a live lease")
    assert "pid 4242 on elsewhere" in line and f"lease expires {lease['expires']}" in line
    assert "wait" in line and "--break-lease" in line
    assert _keys(env, bucket).count(key) == 1
    c = open_cache(url)                                   # the reader: the lease is no part of the cache
    assert LEASE not in c.objects and c.complete and c.disk_bytes() == open_cache(local).disk_bytes()
    assert c.being_written_by() == {"host": "elsewhere", "pid": 4242, "command": "push", "since": lease["since"],
                                    "expires": lease["expires"]}
    assert "progress   complete" in run_cli("info", url).output
    assert "ok: every chunk reads" in run_cli("verify", url).output
    with pytest.raises(TrainError, match="being written by another cachefeat process .pid 4242 on elsewhere"):
        check_cache_use(c)                                # as a local cache an extraction writes


def test_an_expired_lease_is_taken_over(env, local, tmp_path):
    from cachefeat.store import open_cache
    url, bucket, key = _pushed(env, local)
    env.plant_lease(bucket, key, -1)
    assert open_cache(url).being_written_by() is None    # a killed push's: readers and training go on
    run = tmp_path / "run"
    run_cli("train", "--cache", url, "--adapter", "probe", "--epochs", "1", "--batch-size", "4", "--threads", "1",
            "--device", "cpu", "--out", run)
    assert "uploaded 0 objects" in run_cli("push", local, url, "-q").output
    assert key not in _keys(env, bucket)


def test_break_lease(env, local):
    url, bucket, key = _pushed(env, local)
    env.plant_lease(bucket, key, 10)
    res = invoke("push", local, url, "-q", "--break-lease")
    assert res.exit_code == 0, res.output
    warn = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(warn) == 1 and warn[0].startswith("warning: broke the lease") and "pid 4242 on elsewhere" in warn[0]
    assert key not in _keys(env, bucket)
    assert "--break-lease" in invoke("push", "--help").output


def test_the_lease_is_gone_after_a_push_that_failed(env, local):
    from cachefeat.store import open_cache
    from cachefeat.store.remote import parse_url, push

    class Cut(Exception):
        pass

    def cut(n, total=None):
        if n and total is None:
            raise Cut
    bucket = env.new_bucket()
    with pytest.raises(Cut):
        push(open_cache(local), parse_url(f"s3://{bucket}/c.zarr"), progress=cut)
    keys = _keys(env, bucket)
    assert keys and "c.zarr/" + LEASE not in keys


def test_a_broken_lease_stops_the_push_before_its_commit(env, local):
    """Another push breaks this one's lease while it runs: this push stops before it puts the root document
    back, and leaves the other's lease alone."""
    from cachefeat.store import open_cache
    from cachefeat.store.remote import LeaseLost, parse_url, push
    bucket = env.new_bucket()
    key = "c.zarr/" + LEASE

    def breaker(n, total=None):
        if n and not breaker.done:
            breaker.done = env.plant_lease(bucket, key, 10)
    breaker.done = None
    with pytest.raises(LeaseLost, match="broken while it ran .now held by cachefeat push, pid 4242 on elsewhere"):
        push(open_cache(local), parse_url(f"s3://{bucket}/c.zarr"), progress=breaker)
    keys = _keys(env, bucket)
    assert "c.zarr/zarr.json" not in keys and key in keys
    assert json.loads(env.client().get_object(Bucket=bucket, Key=key)["Body"].read())["pid"] == 4242


def test_the_lease_is_renewed_while_held(env, monkeypatch):
    import time

    from cachefeat.store import remote
    monkeypatch.setattr(remote, "LEASE_RENEW_SECONDS", 0.3)
    loc = remote.parse_url(f"s3://{env.new_bucket()}/c.zarr")
    lease = remote.Lease.acquire(loc)
    first = remote.read_lease(loc)[0]
    assert first["pid"] == lease.holder["pid"] and len(first["token"]) == 32
    time.sleep(1.5)
    now = remote.read_lease(loc)[0]
    assert now["token"] == first["token"] and now["expires"] > first["expires"]
    lease.release()
    assert remote.read_lease(loc) is None


def test_release_leaves_a_lease_taken_over_after_its_check(env, monkeypatch):
    """release() re-reads the lease (still this writer's token) and then deletes it on the condition of that
    read's ETag (If-Match): another writer's lease, written in between, stays."""
    from cachefeat.store import remote
    bucket = env.new_bucket()
    loc = remote.parse_url(f"s3://{bucket}/c.zarr")
    lease = remote.Lease.acquire(loc)
    ours = remote.read_lease(loc)
    real = remote.read_lease

    def read_then_taken_over(where):
        got = real(where)
        env.plant_lease(bucket, "c.zarr/" + LEASE, 10)      # the take-over, just after the check
        return got
    monkeypatch.setattr(remote, "read_lease", read_then_taken_over)
    lease.release()
    monkeypatch.setattr(remote, "read_lease", real)
    left = remote.read_lease(loc)
    assert left is not None and left[0]["host"] == "elsewhere" and left[1] != ours[1]


def test_two_pushes_at_once(env, local, tmp_path):
    """Two `cachefeat push` processes started together on one prefix: one pushes, the other exits 1 with the
    lease's line; the cache then reads back bit for bit. Each stays 2 s in its push once it holds the lease, so
    the processes' start-up times cannot let one finish before the other begins."""
    from cachefeat.store import open_cache
    url = f"s3://{env.new_bucket()}/c.zarr"
    code = ("import sys, time; import cachefeat.store.remote as r; inner = r._push\n"
            "def slow(*a):\n    time.sleep(2)\n    return inner(*a)\n"
            "r._push = slow; from cachefeat.cli import main; sys.argv = ['cachefeat', *sys.argv[1:]]; main()")
    procs = [subprocess.Popen([sys.executable, "-c", code, "push", str(local), url, "-q"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=90), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in outs) == [0, 1], outs
    rc, _, err = next(o for o in outs if o[0] == 1)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "being written by another cachefeat push" in lines[0] and "--break-lease" in lines[0]
    a, b = open_cache(local), open_cache(url)
    assert b.complete and b.being_written_by() is None
    for name in a.array_names():
        x, y = a.read_stored(name), b.read_stored(name)
        if x.dtype.kind == "f":
            x, y = x.view(f"u{x.dtype.itemsize}"), y.view(f"u{y.dtype.itemsize}")
        elif x.dtype.kind in "TUO":
            x, y = np.array(x.tolist(), dtype=object), np.array(y.tolist(), dtype=object)
        assert np.array_equal(x, y), name
