"""Hostile videos (issue 28, point 7): random bytes, a cut file, headers that claim 100000x100000 pixels or 10^9
frames, zero frames, a decoder that hangs, one that dies and one that runs out of memory each end up on the
extraction's failed list with a reason naming the problem, in bounded time (the decode timeout) and bounded
memory (the decode workers' RLIMIT_DATA), and the run completes with the good video in the cache."""
from __future__ import annotations

import os
import resource
import struct
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from cachefeat.extract.decode_pool import DEFAULT_MEMORY_GIB, MEMORY_ENV, DecodePool
from cachefeat.extract.preprocess import Preprocessing
from cachefeat.extract.video import MAX_FRAMES, DecodeError, DecodeRequest, decode_video, probe
from cachefeat.specs import SamplingSpec, ViewSpec
from cachefeat.store import open_cache

from conftest import run_cli, tiny_extract_args
from helpers import make_sentinel, tree_state
from media import encode, fifo, good_video, random_bytes, truncated


def req(path, frames: int = 8, reader: str = "auto") -> DecodeRequest:
    prep = Preprocessing(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return DecodeRequest(0, str(path), frames, SamplingSpec(), ViewSpec(), prep, reader)


def _y4m(path, width: int, height: int, frames: int = 0) -> Path:
    """A YUV4MPEG2 file: a text header FFmpeg's demuxer believes, then raw 4:2:0 frames."""
    head = f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\n".encode()
    frame = b"FRAME\n" + bytes(width * height * 3 // 2)
    Path(path).write_bytes(head + frame * frames + (b"FRAME\n" + bytes(4096) if not frames else b""))
    return Path(path)


def _patched(src, dst, box: bytes, offset: int, fmt: str, *values) -> Path:
    """A copy of `src` with `values` packed `offset` bytes past the first `box` tag (a header field)."""
    b = bytearray(Path(src).read_bytes())
    struct.pack_into(fmt, b, b.index(box) + offset, *values)
    Path(dst).write_bytes(bytes(b))
    return Path(dst)


# A decode past the worker's memory limit fails where the allocation fails: a Python or PyAV allocation
# gives a `memory` failure; decord's C++ (std::bad_alloc) aborts its worker, a `crash` that says the limit
OVER_LIMIT = (("memory", "more memory than a decode worker may use (1 GiB, CACHEFEAT_DECODE_MEMORY)"),
              ("crash", "SIGABRT; it may have run out of its 1 GiB memory limit (CACHEFEAT_DECODE_MEMORY)"))

# name -> (stage, words its reason must hold), or OVER_LIMIT; stage None: decoded
EXPECTED = {
    "good.mp4": (None, ""),
    "random-bytes.mp4": ("open", "Invalid data"),
    "cut-in-half.mp4": ("open", "Invalid data"),
    "claims-100000x100000.y4m": ("open", "pyav"),       # FFmpeg's own size check refuses it before anyone reads
    "claims-16000x16000.y4m": ("header", "16000x16000 pixels"),
    "decodes-to-100000x16.y4m": ("header", "100000x16 pixels"),
    # decord (tried first) allocates for the claimed frames: past the worker's 1 GiB, only that worker dies
    "claims-1e9-frames.mp4": OVER_LIMIT,
    "zero-frames.mp4": ("empty", "no frames"),
    "needs-1.6-GiB.mp4": OVER_LIMIT,
    "hangs": ("timeout", "longer than 3 s"),
    "crashes": ("crash", "signal 9"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    d, pipes = root / "videos", root / "pipes"
    d.mkdir()
    pipes.mkdir()
    good = good_video(d / "good.mp4", frames=16, size=48)
    random_bytes(d / "random-bytes.mp4")
    truncated(good, d / "cut-in-half.mp4", 0.5)
    _y4m(d / "claims-100000x100000.y4m", 100000, 100000)
    _y4m(d / "claims-16000x16000.y4m", 16000, 16000)            # inside FFmpeg's limit: 384 MB a frame
    _y4m(d / "decodes-to-100000x16.y4m", 100000, 16, frames=1)  # a real frame of that size
    # the first stts entry (sample count, duration): 10^9 samples of 1024 ticks, a year of video
    _patched(good, d / "claims-1e9-frames.mp4", b"stts", 12, ">I", 10**9)
    zero = _patched(good, d / "zero-frames.mp4", b"stsz", 12, ">I", 0)   # no sample in the index ...
    _patched(zero, zero, b"stts", 8, ">I", 0)                             # ... nor in the timing table
    # a real 4K video whose 32 frames (25 MB each) need more than the 1 GiB the workers get below
    encode(d / "needs-1.6-GiB.mp4", np.zeros((32, 2160, 3840, 3), np.uint8), options={"preset": "ultrafast"})
    hang, crash = fifo(pipes / "hangs"), fifo(pipes / "crashes")
    names = list(EXPECTED)
    where = {"hangs": hang, "crashes": crash}
    lines = [f"{where.get(n, n)} {i % 2}" for i, n in enumerate(names)]
    lines.insert(0, lines.pop(names.index("crashes")))   # first: the worker that takes it is the one killed
    names.insert(0, names.pop(names.index("crashes")))
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    return root, d, crash, names


def _outcomes(name: str):
    return OVER_LIMIT if EXPECTED[name] is OVER_LIMIT else (EXPECTED[name],)


def _kill_worker_reading(path: Path, killed: list) -> None:
    """Wait until a decode worker has opened the FIFO (a non-blocking writer's open succeeds only then),
    then SIGKILL it, as the OOM killer or a segfault would end it."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:          # ENXIO: no reader yet
            time.sleep(0.05)
            continue
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]
        for p in workers:
            p.kill()
        killed.extend(p.pid for p in workers)
        os.close(fd)
        return


def test_hostile_videos_end_on_the_failed_list_and_the_run_completes(hostile, tmp_path, monkeypatch):
    root, d, crash, names = hostile
    sentinel = make_sentinel(tmp_path)
    before = tree_state(d), tree_state(sentinel)
    monkeypatch.setenv(MEMORY_ENV, "1")          # GiB per decode worker
    killed: list[int] = []
    killer = threading.Thread(target=_kill_worker_reading, args=(crash, killed), daemon=True)
    killer.start()
    out = tmp_path / "out" / "c.zarr"
    res = run_cli(*tiny_extract_args(d / "list.txt", out, "--frames", "32", "--decode-timeout", "3"))
    killer.join(timeout=10)
    assert len(killed) == 1, killed               # one decode worker (--decode-workers 1) was on the FIFO
    c = open_cache(out)
    assert c.complete
    valid, failures = c.valid(), {f["video"]: f for f in c.failures()}
    for i, name in enumerate(names):
        if EXPECTED[name][0] is None:
            assert valid[i], f"{name} should decode: {failures.get(i)}"
            continue
        assert not valid[i] and i in failures, f"{name} should be on the failed list"
        f = failures[i]
        assert any(f["stage"] == stage and words in f["error"] for stage, words in _outcomes(name)), (name, f)
    assert f"{len(names) - 1} videos failed" in res.output
    # nothing was written next to the videos or anywhere else outside --out
    assert (tree_state(d), tree_state(sentinel)) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.zarr"]


def test_decode_workers_run_under_the_memory_limit(tmp_path, monkeypatch):
    """The limit is the worker's own RLIMIT_DATA (the parent's is untouched): what it cannot allocate fails
    that video as `memory`, and the same worker goes on with the next one."""
    good = good_video(tmp_path / "good.mp4", frames=16, size=48)
    big = encode(tmp_path / "4k.mp4", np.zeros((32, 2160, 3840, 3), np.uint8), options={"preset": "ultrafast"})
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    with DecodePool(1, 60) as pool:
        assert psutil.Process(pool.pids[0]).rlimit(resource.RLIMIT_DATA) == (int(DEFAULT_MEMORY_GIB * 2**30),) * 2
    parent = resource.getrlimit(resource.RLIMIT_DATA)
    with DecodePool(1, 60, memory_limit=1 << 30) as pool:
        pid = pool.pids[0]
        assert psutil.Process(pid).rlimit(resource.RLIMIT_DATA) == (1 << 30, 1 << 30)
        pool.submit(req(big, frames=32))
        over = pool.get()
        assert any(over.stage == stage and words in over.error for stage, words in OVER_LIMIT), over.error
        pool.submit(req(good, frames=8))
        r = pool.get()
        assert r.ok and r.pixels.shape == (1, 8, 32, 32, 3)
        crashed = over.stage == "crash"       # then a new worker, under the same limit, took its place
        assert pool.restarts == crashed and (pool.pids != [pid]) == crashed
        assert psutil.Process(pool.pids[0]).rlimit(resource.RLIMIT_DATA) == (1 << 30, 1 << 30)
    assert resource.getrlimit(resource.RLIMIT_DATA) == parent
    monkeypatch.setenv(MEMORY_ENV, "0")           # no limit
    with DecodePool(1, 60) as pool:
        assert psutil.Process(pool.pids[0]).rlimit(resource.RLIMIT_DATA)[0] == resource.RLIM_INFINITY
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="CACHEFEAT_DECODE_MEMORY='lots': give the decode workers' memory limit"):
        DecodePool(1, 60)


def test_a_header_that_lies_is_refused_before_anything_is_allocated_for_it(tmp_path):
    """The fps plan probes each video's duration: a header claiming 10^9 frames (an AVI's frame counts, 2.6
    years at 12 fps) is refused there and at decoding, never turned into that many windows or frames."""
    src = encode(tmp_path / "m.avi", np.zeros((4, 32, 32, 3), np.uint8), "mjpeg", "yuvj420p")
    lying = _patched(src, tmp_path / "lying.avi", b"avih", 8 + 16, "<I", 10**9)   # dwTotalFrames
    _patched(lying, lying, b"strh", 8 + 32, "<I", 10**9)                            # the stream's dwLength
    with pytest.raises(DecodeError, match=f"claims 1000000000 frames; cachefeat decodes at most {MAX_FRAMES}"):
        probe(str(lying))
    res = decode_video(req(lying, reader="pyav"))
    assert res.stage == "header" and "1000000000 frames" in res.error
    # decord counts the frames it indexes, ignoring the claim: its 4 real frames decode, nothing more
    res = decode_video(req(lying, reader="decord"))
    assert res.ok and res.num_frames == 4
    # an fps extraction plans one window for it (not 10^9 / 12 seconds' worth), and records the refusal
    good_video(tmp_path / "good.mp4", frames=24, size=48)
    (tmp_path / "list.txt").write_text("lying.avi 0\ngood.mp4 1\n")
    run_cli(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "c.zarr", "--sampling", "fps:4", "--frames", "2"))
    c = open_cache(tmp_path / "c.zarr")
    [f] = c.failures()
    assert f["video"] == 0 and f["stage"] == "header" and "claims 1000000000 frames" in f["error"], f
    assert c.layout.clip_video().tolist().count(0) == 1 and c.valid()[c.layout.clip_video() == 1].all()
