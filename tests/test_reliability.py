"""Bad input, hung decoders, crashes, interrupts, concurrent writers and damaged data lose nothing."""
import json
import os
import shutil
import signal
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cachefeat.store import Cache, CacheError, open_cache
from cachefeat.synth import render_video, write_mp4

from conftest import cli_subprocess, run_cli, tiny_extract_args
from helpers import assert_caches_equal
from media import encode, faststart_copy, fifo, good_video, random_bytes, truncated


def _vfr(path: Path) -> Path:
    pts = [0, 40, 120, 130, 300, 310, 320, 500, 520, 700]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, p in enumerate(pts):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = p, Fraction(1, 1000)
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


# name -> (how to make it, expected outcome: None = decoded, else the failure stage)
CORPUS = {
    "good.mp4": None, "zero-bytes.mp4": "open", "cut.mp4": "open", "cut-streaming.mp4": None,
    "random-bytes.mp4": "open", "readme.txt": "open", "three-frames.mp4": None, "one-frame.mp4": None,
    "gray.mp4": None, "ten-bit.mp4": None, "variable-fps.mp4": None, "huge-3840x2160.mp4": None,
    "not-there.mp4": "missing", "good.mp4 (again)": "manifest", "unknown-label.mp4": "manifest",
    "dir with spaces/vidéo ünïcode.mp4": None, "hangs.mp4": "timeout",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    good = good_video(d / "good.mp4", frames=16, size=64)
    (d / "zero-bytes.mp4").write_bytes(b"")
    truncated(good, d / "cut.mp4", 0.5)
    truncated(faststart_copy(good_video(d / "long.mp4", frames=48, size=64), d / "fs.mp4"), d / "cut-streaming.mp4",
              0.5)
    random_bytes(d / "random-bytes.mp4")
    (d / "readme.txt").write_text("not a video\n" * 100)
    write_mp4(d / "three-frames.mp4", render_video(0, 3, 64, rng))
    write_mp4(d / "one-frame.mp4", render_video(1, 1, 64, rng))
    frames = np.stack([np.full((48, 64, 3), 20 * i, np.uint8) for i in range(8)])
    encode(d / "gray.mp4", frames, "libx264", "gray")
    encode(d / "ten-bit.mp4", frames, "libx264", "yuv420p10le")
    _vfr(d / "variable-fps.mp4")
    big = np.zeros((2, 2160, 3840, 3), np.uint8)
    big[:, 1000:1200, 1800:2000] = 255
    encode(d / "huge-3840x2160.mp4", big, "libx264", "yuv420p", options={"preset": "ultrafast"})
    good_video(d / "dir with spaces" / "vidéo ünïcode.mp4", frames=16, size=64)
    good_video(d / "unknown-label.mp4", frames=16, size=64)
    fifo(d / "hangs.mp4")
    lines = []
    for name in CORPUS:
        if name == "good.mp4 (again)":
            lines.append("good.mp4 b")
        elif name == "unknown-label.mp4":
            lines.append(f"{name} zzz")
        else:
            lines.append(f"{name} a")
    (d / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "classes.txt").write_text("a\nb\n")
    out = d / "corpus.zarr"
    res = run_cli(*tiny_extract_args(d / "list.txt", out, "--frames", "8", "--decode-timeout", "3",
                                     "--shard-size", "5"))
    return d, out, res.output


def test_bad_input_corpus_documented_behaviour(corpus):
    d, out, output = corpus
    c = open_cache(out)
    assert c.complete
    names = list(CORPUS)
    failures = {f["video"]: f for f in c.failures()}
    valid = c.valid()
    for i, name in enumerate(names):
        expected = CORPUS[name]
        if expected is None:
            assert valid[i], f"{name} should decode; failed with {failures.get(i)}"
        else:
            assert not valid[i], f"{name} should fail"
            assert failures[i]["stage"] == expected, (name, failures[i])
            assert failures[i]["error"]
    fi = c.read("clips/frame_idx")
    assert fi[names.index("three-frames.mp4")].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]   # padded: frames repeat
    assert fi[names.index("one-frame.mp4")].tolist() == [0] * 8
    cut = names.index("cut-streaming.mp4")
    assert 0 < c.read("videos/num_frames")[cut] < 48 and fi[cut].max() < c.read("videos/num_frames")[cut]
    assert "duplicate of video 0" in failures[names.index("good.mp4 (again)")]["error"]
    assert "'zzz' is not in the class list" in failures[names.index("unknown-label.mp4")]["error"]
    assert "longer than 3 s" in failures[names.index("hangs.mp4")]["error"]
    # huge frames are resized like any other: the bright square is at the centre of the crop
    e = c.read("embed")[names.index("huge-3840x2160.mp4")]
    assert np.all(np.isfinite(e.astype(np.float32))) and np.abs(e).sum() > 0


def test_info_and_valid_mask_agree(corpus):
    d, out, output = corpus
    c = open_cache(out)
    n_fail = sum(v is not None for v in CORPUS.values())
    info = run_cli("info", out, "--failures").output
    assert f"{int(c.valid().sum())} valid of {len(CORPUS)}" in info
    assert f"{n_fail} videos failed" in info and f"{n_fail} videos failed" in output
    for f in c.failures():
        assert f"[{f['stage']}] {f['path']}" in info
    j = json.loads(run_cli("info", out, "--json", "--failures").output)
    assert j["counts"]["failed_videos"] == n_fail and j["counts"]["valid_clips"] == int(c.valid().sum())


def test_strict_turns_failures_into_an_exit_status(corpus):
    d, out, _ = corpus
    res = run_cli(*tiny_extract_args(d / "list.txt", out, "--frames", "8", "--decode-timeout", "3",
                                     "--shard-size", "5", "--strict"), ok=False)
    assert res.exit_code == 1 and "already complete" in res.output and "videos failed (--strict)" in res.output


# ------------------------------------------------------------------------------------------- crashes
ARGS = ["--layers", "all", "--tokens", "all", "--frames", "4", "--shard-size", "3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def reference(synth_medium, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_cli(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS))
    return out


def _done(store: Path) -> int:
    try:
        return int(Cache(store).shard_done().sum())
    except Exception:
        return 0


def test_sigkill_at_many_points_then_resume(synth_medium, reference, tmp_path):
    """Kill the whole process group: during start-up, and right after several shards landed (the next
    shard may be mid-write); every restart resumes; the final cache equals an uninterrupted one."""
    out = tmp_path / "k.zarr"
    n = open_cache(reference).layout.num_shards
    rng = np.random.default_rng(5)
    targets = sorted(rng.choice(np.arange(1, n - 2), size=3, replace=False).tolist())
    kills = []
    for target in [None, *targets]:
        proc = cli_subprocess(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS))
        if target is None:
            time.sleep(1.0)                      # still importing / building the store
        else:
            deadline = time.monotonic() + 120
            while _done(out) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0, 0.05)))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(_done(out))
    assert any(0 < k < n for k in kills), kills
    run_cli(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS))
    assert_caches_equal(reference, out)


def test_half_written_shard_is_never_taken_as_complete(synth_medium, reference, tmp_path):
    """What a crash mid-write leaves: some of a shard's files new, one cut short, the flag not set."""
    out = tmp_path / "h.zarr"
    shutil.copytree(reference, out)
    shard = 2
    shard_file = out / "tokens" / "3" / "c" / str(shard) / "0" / "0" / "0"
    data = shard_file.read_bytes()
    shard_file.write_bytes(data[: len(data) // 3])
    (out / "progress" / "c" / str(shard)).unlink()       # its flag was never written
    c = open_cache(out)
    assert not c.shard_done()[shard] and not c.valid()[c.layout.shard_rows_range(shard)].any()
    res = run_cli(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS))
    assert f"resuming, {c.layout.num_shards - 1} of {c.layout.num_shards} shards already done" in res.output
    assert_caches_equal(reference, out)


def test_sigint_finishes_the_shard_in_flight_and_says_how_to_resume(synth_medium, reference, tmp_path):
    out = tmp_path / "i.zarr"
    proc = cli_subprocess(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS))
    deadline = time.monotonic() + 120
    while _done(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)       # Ctrl-C reaches the whole foreground process group
    output, _ = proc.communicate(timeout=120)
    n = open_cache(reference).layout.num_shards
    assert proc.returncode == 130, output
    assert "interrupted: finishing the shard in flight" in output
    assert "run the same command again to resume" in output
    assert 2 <= _done(out) < n
    assert not (out / "cachefeat.lock").exists()
    ref, part = open_cache(reference), open_cache(out)
    done_rows = part.done_rows()
    assert np.array_equal(ref.read("tokens/3")[done_rows], part.read("tokens/3")[done_rows])
    run_cli(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS))
    assert_caches_equal(reference, out)


def test_interrupted_creation_is_redone(synth_small, tmp_path):
    import zarr
    out = tmp_path / "c.zarr"
    g = zarr.open_group(str(out), mode="w")
    g.attrs["cachefeat_creating"] = True
    g.create_array("embed", shape=(3,), dtype="f2")
    (out / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("{")   # killed writing the metadata
    run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "2"))
    assert open_cache(out).complete
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".partial") == []
    first = tmp_path / "first.zarr"                 # killed before its first zarr.json was whole
    first.mkdir()
    (first / "zarr.fedcba9876543210fedcba9876543210.partial").write_text("")
    run_cli(*tiny_extract_args(synth_small / "val.txt", first, "--frames", "2"))
    assert open_cache(first).complete


# ------------------------------------------------------------------------------------------- one writer
def test_second_writer_is_refused_and_a_stale_lock_taken_over(synth_small, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    fifo(d / "hang.mp4")                        # keeps the first writer busy for its whole decode timeout
    (d / "list.txt").write_text("hang.mp4 0\n" + "".join(f"{synth_small / l.split()[0]} 1\n"
                                                        for l in (synth_small / "val.txt").read_text().splitlines()))
    out = tmp_path / "c.zarr"
    first = cli_subprocess(*tiny_extract_args(d / "list.txt", out, "--frames", "2", "--decode-timeout", "120"))
    deadline = time.monotonic() + 120
    while not (out / "zarr.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = json.loads((out / "cachefeat.lock").read_text())
    assert holder["pid"] == first.pid
    res = run_cli(*tiny_extract_args(d / "list.txt", out, "--frames", "2"), ok=False)
    assert res.exit_code == 2
    assert f"being written by another cachefeat process (pid {first.pid} on {holder['host']}" in res.output
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / "cachefeat.lock").exists()    # stale: its process is gone
    res = run_cli(*tiny_extract_args(d / "list.txt", out, "--frames", "2", "--decode-timeout", "1"))
    c = open_cache(out)
    assert c.complete and c.failures()[0]["stage"] == "timeout"
    assert not (out / "cachefeat.lock").exists()


# ------------------------------------------------------------------------------------------- damaged data
def test_corrupted_chunk_is_detected_reported_and_repaired(synth_medium, reference, tmp_path):
    out = tmp_path / "d.zarr"
    shutil.copytree(reference, out)
    c = open_cache(out)
    rows = c.layout.shard_rows_range(1)
    shard_file = out / "tokens" / "2" / "c" / "1" / "0" / "0" / "0"
    b = bytearray(shard_file.read_bytes())
    b[200] ^= 0xFF                               # one flipped byte, in the shard's first clip
    shard_file.write_bytes(bytes(b))
    with pytest.raises(CacheError, match=rf"array tokens/2, clips {rows.start}: cannot be read .*checksum"):
        open_cache(out).read("tokens/2")
    res = run_cli("verify", out, ok=False)
    assert res.exit_code == 1
    assert f"damaged: tokens/2 rows {rows.start}" in res.output
    rep = json.loads(run_cli("verify", out, "--json", ok=False).output)
    assert rep["shards_to_reextract"] == [1] and rep["clips_to_reextract"] == list(rows)
    res = run_cli(*tiny_extract_args(synth_medium / "train.txt", out, *ARGS, "--repair"))
    assert "repair: 1 damaged shards (3 clips) will be extracted again" in res.output
    assert run_cli("verify", out).exit_code == 0
    assert_caches_equal(reference, out)
