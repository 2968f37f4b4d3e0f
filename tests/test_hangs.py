"""Hangs and leftovers (issue 17): predict decodes with extract's worker pool and timeout, so a video that
never finishes decoding (a FIFO nobody writes) fails after --decode-timeout instead of hanging forever; and
decode workers die with their parent, so a SIGKILLed extract leaves no worker stuck in a decoder behind."""
from __future__ import annotations

import json
import os
import signal
import time

import psutil

from conftest import cli_subprocess, run_cli, tiny_extract_args
from media import fifo


def _alive(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_predict_on_a_fifo_fails_after_the_decode_timeout(synth_small, tmp_path):
    cache, run = tmp_path / "c.zarr", tmp_path / "run"
    run_cli(*tiny_extract_args(synth_small / "train.txt", cache, "--frames", "2"))
    run_cli("train", "--cache", cache, "--adapter", "probe", "--epochs", "1", "--batch-size", "4", "--threads", "1",
            "--out", run, "--quiet")
    good = synth_small / (synth_small / "val.txt").read_text().split()[0]
    hang = fifo(tmp_path / "hang.mp4")
    t0 = time.monotonic()
    proc = cli_subprocess("predict", "--checkpoint", run, hang, good, "--decode-timeout", "3", "--json")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.monotonic() - t0 < 100, output
    results = json.loads(output[output.index("["):output.rindex("]") + 1])
    assert results[0]["video"] == str(hang) and results[0]["error"].startswith("timeout: decoding took longer than 3 s")
    assert results[1]["video"] == str(good) and len(results[1]["top"]) == 4
    assert output.strip().splitlines()[-1] == "Error: 1 of 2 videos could not be read"


def test_sigkill_of_extract_leaves_no_decode_worker_behind(synth_small, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    fifo(d / "hang1.mp4")
    fifo(d / "hang2.mp4")                       # both decode workers stuck in a decoder
    (d / "list.txt").write_text("hang1.mp4 0\nhang2.mp4 1\n")
    out = tmp_path / "c.zarr"
    args = tiny_extract_args(d / "list.txt", out, "--frames", "2", "--decode-timeout", "300")
    args[args.index("--decode-workers") + 1] = "2"
    proc = cli_subprocess(*args)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        workers = {c.pid for c in parent.children(recursive=True) if "cachefeat-decode" in " ".join(c.cmdline())
                   or "multiprocessing" in " ".join(c.cmdline())}
        if (out / "zarr.json").exists() and len(workers) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None and len(workers) >= 2, (workers, proc.poll())
    time.sleep(2)                               # the workers are now blocked opening their FIFOs
    os.kill(proc.pid, signal.SIGKILL)           # the parent alone, as an OOM killer or `kill -9 PID` would
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(workers), f"decode workers outlived their parent: {_alive(workers)}"
    # and the next run takes over the dead writer's lock and finishes: the FIFOs fail on the timeout, and an
    # extraction whose every video failed exits 1
    res = run_cli(*tiny_extract_args(d / "list.txt", out, "--frames", "2", "--decode-timeout", "1"), ok=False)
    assert res.exit_code == 1 and "no valid clips: 2 of 2 videos failed" in res.output, res.output
