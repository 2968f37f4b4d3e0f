"""`cachefeat extract --workers N`: Ray actors writing whole shards give the single-process cache, even when
one of them is killed mid-run. Real Ray (the session's local runtime), real processes, real signals."""
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cachefeat.extract import ExtractSettings
from cachefeat.extract.manifest import load_manifest
from cachefeat.specs import parse_pixels, parse_views

from conftest import REPO, TINY, cli_subprocess, run_cli, tiny_extract_args
from helpers import assert_caches_equal

# 54 videos x 2 views, 2 videos per shard: 27 shards, enough for both workers to hold some at any time
# pixels and int8 included: their creation-time parts (text embeddings, int8 steps) are made by the driver
ARGS = ["--layers", "all", "--tokens", "pooled:2x2", "--frames", "4", "--views", "2x1", "--shard-size", "4",
        "--pixels", "16x2", "--dtype", "int8"]
SETTINGS = ExtractSettings(model=TINY, pretrained="none", layers="all", tokens="pooled:2x2", frames=4,
                           views=parse_views("2x1"), shard_size=4, pixels=parse_pixels("16x2"), dtype="int8")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_medium):
    """The single-process cache (`--workers 1`, no Ray) every distributed run must equal."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_cli(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS))
    return out


def _manifest(synth):
    return load_manifest(synth / "train.txt", "auto", None, synth / "classes.txt", None)


def _extract(synth, out, **kw):
    from cachefeat.extract.distributed import extract_distributed
    lines = []
    stats = extract_distributed(_manifest(synth), out, SETTINGS, workers=2, decode_workers=1, progress=False,
                                log=lines.append, **kw)
    return stats, lines


def test_two_workers_equal_one_worker(tmp_path, synth_medium, reference, ray_session):
    out = tmp_path / "two.zarr"
    stats, _ = _extract(synth_medium, out)
    assert_caches_equal(reference, out)
    assert stats.shards == 27 and stats.clips == 108 and stats.worker_deaths == 0
    assert [w.state for w in stats.workers] == ["finished", "finished"]
    assert sum(w.shards for w in stats.workers) == 27
    assert all(w.shards > 0 for w in stats.workers), [w.shards for w in stats.workers]  # both wrote shards
    assert len({w.pid for w in stats.workers} | {os.getpid()}) == 3    # two processes besides this one
    # run again: nothing to do, and no worker is started for it
    stats, lines = _extract(synth_medium, out)
    assert "already complete (27 shards)" in lines[0] and not stats.workers


def test_killed_worker_shards_are_redone(tmp_path, synth_medium, reference, ray_session):
    """SIGKILL one worker's process while it holds shards: they go back to the queue, the cache is still
    exactly the single-process one."""
    out = tmp_path / "killed.zarr"
    victim = {}

    def monitor(state):
        if victim or state.shards_done < 1:
            return
        for w in state.workers:
            if w.state == "running" and w.held:
                os.kill(w.pid, signal.SIGKILL)
                victim.update(pid=w.pid, id=w.id, held=list(w.held), done_then=state.shards_done)
                return

    # no replacement worker (one actor start less): the survivor must take the victim's shards
    stats, lines = _extract(synth_medium, out, monitor=monitor, max_replacements=0)
    assert victim, "no worker was killed"
    assert victim["done_then"] < 27
    assert stats.worker_deaths == 1 and stats.shards_requeued >= 1 and stats.replacements == 0
    assert any(f"worker {victim['id']} on " in l and "died" in l and "back in the queue" in l for l in lines), lines
    dead = stats.workers[victim["id"]]
    assert dead.state == "dead" and not psutil.pid_exists(victim["pid"])
    assert stats.shards == 27
    assert_caches_equal(reference, out)


def test_cli_starts_ray_quietly_and_stops_it(tmp_path, synth_medium, reference):
    """The CLI path starts its own local Ray (the session's runtime lives in another process), shows one
    progress bar and no Ray logs, and leaves no Ray process behind."""
    out = tmp_path / "cli.zarr"
    args = tiny_extract_args(synth_medium / "train.txt", out, *ARGS, "--workers", "2")
    args.remove("--quiet")
    proc = cli_subprocess(*args)
    ray_pids = set()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            ray_pids |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    output = proc.communicate()[0]
    assert proc.returncode == 0, output
    assert_caches_equal(reference, out)
    # both workers, unless one was still starting when the other had done every shard (a fast machine)
    assert re.search(r"2 workers on 1 node|1 worker on 1 node .*; 1 more not ready before the work was done", output)
    text = [s.strip() for s in output.replace("\r", "\n").splitlines() if s.strip()]
    bars = [s for s in text if "clip/s" in s or "clips/s]" in s or s.startswith("extract:")]
    others = [s for s in text if s not in bars]
    assert bars and all(s.startswith("extract:") for s in bars)          # one bar, redrawn
    others = [l for l in others if not l.startswith("int8: calibrated")]  # the driver's calibration note
    assert others[0].startswith("estimated cache size")                  # the size check before writing
    assert len(others) == 4, others                                      # it, the summary, nothing from Ray
    assert len(ray_pids) >= 3                                            # Ray's own processes were children
    time.sleep(1)
    alive = [p for p in ray_pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline()[:2] for p in alive]


def test_worker_that_cannot_see_the_store_says_why(tmp_path):
    from cachefeat.extract.distributed import WorkerSetupError, open_store_for_worker
    with pytest.raises(WorkerSetupError, match="storage every node mounts at the same path"):
        open_store_for_worker(str(tmp_path / "not-here.zarr"), "abc", "worker 1 on node-b (pid 7)")


def test_bad_cluster_options_are_usage_errors(synth_small):
    from cachefeat.ray_runtime import ClusterError, _check_reachable
    base = tiny_extract_args(synth_small / "val.txt", "/nonexistent/x.zarr")
    res = run_cli(*base, "--workers", "2", "--device", "cuda:1", ok=False)
    assert res.exit_code == 2 and "each worker gets its own GPU" in res.output
    res = run_cli(*base, "--address", "head-node", ok=False)
    assert res.exit_code == 2 and "expected auto or HOST:PORT" in res.output
    with pytest.raises(ClusterError, match="cannot reach a Ray head"):
        _check_reachable("127.0.0.1:1")


def test_one_worker_never_imports_ray(tmp_path, synth_small):
    """--workers 1 (the default) stays a plain process: Ray is not even imported."""
    argv = [str(a) for a in tiny_extract_args(synth_small / "val.txt", tmp_path / "c.zarr", "--frames", "2")]
    code = ("import sys; from cachefeat.cli import cli; "
            f"cli({argv}, standalone_mode=False); assert 'ray' not in sys.modules, 'ray was imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "c.zarr" / "zarr.json").is_file()
