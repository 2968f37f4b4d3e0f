"""Long and untrimmed videos (issue 20): --sampling fps:F cuts every video into windows of --frames samples at
F per second of its own timeline, each window a clip row with its timestamps; frame folders are videos;
the npy export gives one (frames, D) array per video."""
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import zarr
from PIL import Image

from cachefeat.extract.decode_pool import DecodePool
from cachefeat.extract.manifest import load_manifest
from cachefeat.extract.preprocess import Preprocessing
from cachefeat.extract.sampling import sample_count, window_count, window_samples
from cachefeat.extract.video import DecodeRequest, DecordReader, PyAVReader, decode_video, probe
from cachefeat.specs import SamplingSpec, SpecError, ViewSpec, parse_sampling, with_windows
from cachefeat.store import Cache, content_fingerprint, open_cache
from cachefeat.store.writer import reset_shards

from conftest import run_cli, tiny_extract_args
from helpers import assert_caches_equal
from media import encode, good_video

PREP = Preprocessing(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
FPS1 = with_windows(parse_sampling("fps:1"), 16, None)


def _frames(n: int, size: int = 32) -> np.ndarray:
    """n distinct frames: a counter in the colours and a line that moves down the picture."""
    i = np.arange(n)
    f = np.zeros((n, size, size, 3), np.uint8)
    f[..., 0] = (i % 256)[:, None, None]
    f[..., 1] = (i // 256 * 12 % 256)[:, None, None]
    f[i, i % size, :, 2] = 255
    return f


@pytest.fixture(scope="module")
def ten_minutes(tmp_path_factory) -> Path:
    """A 10-minute video, 32x32 at 7 frames/s (4,200 frames, ~0.2 MB, encoded in about a second)."""
    return encode(tmp_path_factory.mktemp("long") / "ten.mp4", _frames(600 * 7), fps=7)


def _pts(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.array([f.time for f in c.decode(c.streams.video[0])])


# ------------------------------------------------------------------------------------------- sampling
def test_samples_and_windows():
    assert sample_count(600.0, 1) == 600 and sample_count(599.5, 1) == 600 and sample_count(0.2, 1) == 1
    assert sample_count(float("nan"), 1) == 1 and sample_count(10.0, 0.5) == 5
    assert window_count(600, 16, 16) == 38 and window_count(3, 16, 16) == 1 and window_count(600, 16, 8) == 74
    idx, real = window_samples(36, 2, 600, 16, 16)
    assert idx[0].tolist() == list(range(576, 592)) and real.tolist() == [16, 8]
    assert idx[1].tolist() == list(range(592, 600)) + [599] * 8     # padding repeats the last real sample
    idx, real = window_samples(0, 3, 20, 8, 6)                       # overlapping windows
    assert idx[:, 0].tolist() == [0, 6, 12] and real.tolist() == [8, 8, 8] and window_count(20, 8, 6) == 3


def test_fps_spec_and_window_stride():
    s = parse_sampling("fps:0.5")
    assert s.windowed and s.fps == 0.5 and str(s) == "fps:0.5"
    assert with_windows(s, 16, None).window_stride == 16 and with_windows(s, 16, 4).window_stride == 4
    for bad in ("fps:0", "fps:x", "fps:"):
        with pytest.raises(SpecError):
            parse_sampling(bad)
    with pytest.raises(SpecError, match="--window-stride"):
        with_windows(s, 16, 17)
    with pytest.raises(SpecError, match="fps"):
        with_windows(parse_sampling("uniform"), 16, 4)
    # the metadata of uniform and dense sampling keeps its old keys (and old caches their fingerprint)
    assert SamplingSpec().to_dict() == {"method": "uniform", "stride": None}
    assert with_windows(s, 8, 4, 25.0).to_dict() == {"method": "fps", "stride": None, "fps": 0.5,
                                                       "window_stride": 4, "frame_rate": 25.0}


# ------------------------------------------------------------------------------------------- decoding
def _nearest(pts: np.ndarray, times: np.ndarray) -> np.ndarray:
    j = np.searchsorted(pts, times)
    lo, hi = np.clip(j - 1, 0, len(pts) - 1), np.clip(j, 0, len(pts) - 1)
    return np.where(pts[hi] - times < times - pts[lo], pts[hi], pts[lo])


def test_variable_frame_rate_is_sampled_by_pts(tmp_path):
    """Frames shown for irregular spans: each sample takes the frame nearest its time, read from the pts,
    with PyAV (sequential) and decord (its index) alike."""
    times = np.cumsum(np.r_[0, np.random.default_rng(0).choice([0.04, 0.1, 0.5, 1.3], 59)])
    path = tmp_path / "vfr.mp4"
    frames = _frames(len(times))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.pix_fmt, s.time_base = "yuv420p", Fraction(1, 1000)
        s.codec_context.time_base = Fraction(1, 1000)
        for f, t in zip(frames, times):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = int(round(t * 1000)), Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    pts = _pts(path)
    assert np.allclose(pts, np.round(times, 3))
    grid = np.arange(0, pts[-1], 0.25)
    for reader in (PyAVReader(str(path), count=False), DecordReader(str(path))):
        got = reader.frames_at(grid)
        assert np.allclose(got.time[got.pick], _nearest(pts, grid), atol=1e-4), reader.name
        assert not got.past.any()


def test_sparse_samples_seek_and_match_a_full_decode(ten_minutes):
    """fps:0.05 (a sample every 20 s, more than SEEK_GAP): PyAV seeks to each; the frames are those a decode
    of every frame gives, and past the end of the stream a time has no frame."""
    pts = _pts(ten_minutes)
    grid = np.r_[np.arange(0, 600, 20.0) + 0.3, 600.2]
    got = PyAVReader(str(ten_minutes), count=False).frames_at(grid)
    assert np.allclose(got.time[got.pick][:-1], _nearest(pts, grid[:-1]))
    assert got.past.tolist() == [False] * (len(grid) - 1) + [True]
    with av.open(str(ten_minutes)) as c:
        want = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0]) if f.time in set(got.time)]
    assert np.array_equal(got.frames, np.stack(want))


def test_sparse_samples_with_keyframes_further_apart(tmp_path):
    """One keyframe for 2 minutes: a seek lands where the decoder already was; decoding goes on (it once
    looped, seeking back to the same keyframe) and every sample is the frame a full decode gives."""
    path = encode(tmp_path / "gop.mp4", _frames(480, 32) // 64 * 64, fps=4,
                  options={"x264-params": "keyint=1000:min-keyint=1000:scenecut=0"})
    with av.open(str(path)) as c:
        assert sum(p.is_keyframe for p in c.demux(c.streams.video[0])) == 1
    pts = _pts(path)
    sampling = with_windows(parse_sampling("fps:0.05"), 2, None)
    for windows in ((0, 3), (1, 2), (2, 1)):
        r = decode_video(DecodeRequest(0, str(path), 2, sampling, ViewSpec(), PREP, windows=windows, samples=6,
                                       reader="pyav"))
        assert r.ok, r.error
        k = r.frame_idx.reshape(-1)
        assert np.allclose(r.time.reshape(-1), _nearest(pts, k * 20.0)), windows


def test_windows_of_a_stream_shorter_than_its_header(ten_minutes):
    """A header that promises 620 s of a 600 s stream: the samples past the end are padding, a window left
    without any has no frame and says why."""
    r = decode_video(DecodeRequest(0, str(ten_minutes), 16, FPS1, ViewSpec(), PREP, windows=(37, 2), samples=620))
    assert r.ok, r.error
    assert r.valid_frames.tolist() == [8, 0] and r.window_errors[0] == ""
    assert "before this window" in r.window_errors[1]
    assert r.frame_idx[0].tolist() == list(range(592, 600)) + [599] * 8 and r.time[0, -1] == 599.0
    assert r.pixels.shape == (2, 16, 32, 32, 3) and np.array_equal(r.pixels[0, 7], r.pixels[0, 15])


def test_decode_timeout_scales_with_the_video_a_request_covers():
    pool = DecodePool(0, timeout=60)
    windows = DecodeRequest(0, "x", 16, with_windows(parse_sampling("fps:0.1"), 16, None), ViewSpec(), PREP,
                            windows=(0, 2), samples=100)
    assert windows.media_seconds == 320 and pool.limit(windows) == 320
    assert pool.limit(DecodeRequest(0, "x", 8, SamplingSpec(), ViewSpec(), PREP)) == 60


# ------------------------------------------------------------------------------------------- extraction
def test_ten_minutes_at_one_frame_per_second(ten_minutes, tmp_path):
    """Must show: a 10-minute video at fps:1 gives 600 frames in windows, each frame's time the pts of the
    frame PyAV decodes there, within half a frame of its sample's time; the dry run announced those
    windows and shards."""
    (tmp_path / "list.txt").write_text(f"{ten_minutes}\n")
    args = tiny_extract_args(tmp_path / "list.txt", tmp_path / "c.zarr", "--sampling", "fps:1", "--frames", "16",
                             "--shard-size", "10")
    dry = run_cli(*args, "--dry-run").output
    run_cli(*args)
    c = open_cache(tmp_path / "c.zarr")
    assert c.windowed and c.meta["schema_version"] == 2 and c.num_clips == 38 and c.layout.num_shards == 4
    m = re.search(r"= (\d+) samples in (\d+) windows of 16 frames, 16 apart = \d+ frames; shards of (\d+) clips "
                  r"\((\d+) shards\)", dry)
    assert m and tuple(map(int, m.groups())) == (600, 38, 10, 4), dry
    assert c.valid().all() and c.read("clips/view").tolist() == list(range(38))
    real = c.read("clips/valid_frames")
    assert real.sum() == 600 and real[-1] == 600 - 37 * 16
    k = np.concatenate([c.read("clips/frame_idx", r)[:n] for r, n in enumerate(real)])
    t = np.concatenate([c.read("clips/time", r)[:n] for r, n in enumerate(real)])
    assert k.tolist() == list(range(600))
    pts = _pts(ten_minutes)
    assert np.isin(t, pts).all()                                 # every time is a frame's pts
    assert np.abs(t - np.arange(600)).max() <= 0.5 / 7           # within half a frame of k / F
    assert c.read("videos/duration")[0] == 600.0 and c.read("videos/num_frames")[0] == 4200
    assert c.counts()["bytes_per_frame_on_disk"] > 0 and c.failures() == []


def test_frame_folder_gives_the_features_of_its_video(tmp_path):
    """Must show: the frames of a video written as PNGs (decoded by PyAV) and read as a frame folder give the
    same features and timestamps as the video (read by PyAV), by fps windows and by uniform sampling."""
    video = good_video(tmp_path / "v.mp4", frames=36, size=48)       # 12 frames/s
    folder = tmp_path / "v_frames"
    folder.mkdir()
    with av.open(str(video)) as c:
        for i, f in enumerate(c.decode(c.streams.video[0])):
            Image.fromarray(f.to_ndarray(format="rgb24")).save(folder / f"img_{i + 1}.png")
    (tmp_path / "list.txt").write_text(f"{video}\n{folder}\n")
    for how in (["--sampling", "fps:5", "--frames", "4", "--window-stride", "3"], ["--frames", "6"]):
        out = tmp_path / f"{how[1]}.zarr"
        run_cli(*tiny_extract_args(tmp_path / "list.txt", out, "--reader", "pyav", "--frame-rate", "12", *how))
        c = open_cache(out)
        assert c.valid().all()
        a, b = c.layout.video_rows(0), c.layout.video_rows(1)
        assert len(a) == len(b) == (5 if c.windowed else 1)
        for name in ("embed", "cls", "clips/time", "clips/frame_idx"):
            x = c.read(name)
            assert np.array_equal(x[a.start:a.stop], x[b.start:b.stop]), (how, name)
        # uniform: frame i at i / 12 s; fps: sample k shows the frame nearest k / 5 s (within half a frame)
        assert np.allclose(c.read("clips/time")[a.start], c.read("clips/frame_idx")[a.start] /
                           (5 if c.windowed else 12), atol=0.5 / 12 if c.windowed else 1e-6)


def test_npy_export_equals_the_concatenated_windows(tmp_path):
    """Must show: side by side windows concatenate to the export; with overlapping windows each frame comes
    once, from the first window holding it (its features the same in every window holding it)."""
    videos = [good_video(tmp_path / f"v{i}.mp4", frames=n, size=48, seed=i) for i, n in enumerate((40, 17, 64))]
    (tmp_path / "list.txt").write_text("".join(f"{v}\n" for v in videos))
    for stride in (4, 3):
        out = tmp_path / f"s{stride}.zarr"
        run_cli(*tiny_extract_args(tmp_path / "list.txt", out, "--sampling", "fps:6", "--frames", "4",
                                   "--window-stride", str(stride), "--shard-size", "5", "--layers", "last:2",
                                   "--tokens", "pooled:2x2"))
        run_cli("export", out, tmp_path / f"npy{stride}", "--format", "npy")
        c = open_cache(out)
        index = json.loads((tmp_path / f"npy{stride}" / "index.json").read_text())
        for v, entry in enumerate(index["videos"]):
            rows = c.layout.video_rows(v)
            real = c.read("clips/valid_frames")[rows.start:rows.stop]
            k = c.read("clips/frame_idx")[rows.start:rows.stop]
            for name in ("embed", "cls", "tokens/3"):
                x = c.read(name)[rows.start:rows.stop]
                got = np.load(tmp_path / f"npy{stride}" / f"{entry['stem']}_{name.replace('/', '_')}.npy")
                if stride == 4:        # side by side: the windows, each up to its last real frame
                    want = np.concatenate([x[w, :real[w]] for w in range(len(rows))])
                else:                  # overlapping: sample k from the first window holding it
                    first = {}
                    for w in range(len(rows)):
                        for t in range(real[w]):
                            if k[w, t] in first:
                                assert np.allclose(x[w, t], x[first[k[w, t]]], atol=2e-3)
                            first.setdefault(k[w, t], (w, t))
                    want = np.stack([x[first[s]] for s in sorted(first)])
                assert got.shape == want.shape and np.array_equal(got, want), (stride, v, name)
            t = np.load(tmp_path / f"npy{stride}" / f"{entry['stem']}_time.npy")
            assert len(t) == entry["frames"] == sample_count(c.read("videos/duration")[v], 6)
            assert np.all(np.diff(t) > 0)
            assert np.array_equal(np.load(tmp_path / f"npy{stride}" / f"{entry['stem']}_timestamps_ms.npy"),
                                  t * 1000)
            assert float(np.load(tmp_path / f"npy{stride}" / f"{entry['stem']}_fps.npy")) == 6.0
    # HDF5 round trip of a windowed cache: the same arrays, and it verifies
    run_cli("export", out, tmp_path / "c.h5", "--format", "hdf5", "-q")
    run_cli("import", tmp_path / "c.h5", "--out", tmp_path / "back.zarr", "-q")
    assert_caches_equal(out, tmp_path / "back.zarr")
    run_cli("verify", tmp_path / "back.zarr")


def test_resume_writes_every_window_once(tmp_path):
    """Videos cut by shard boundaries: shards extracted again after an interruption (their flags reset,
    their files gone) give the arrays of an uninterrupted run, and those are the features of a run with
    one big shard (cropped on the backbone's device from the decoded frames, --preprocess device)."""
    videos = [good_video(tmp_path / f"v{i}.mp4", frames=n, size=48, seed=i) for i, n in enumerate((50, 30, 70))]
    (tmp_path / "list.txt").write_text("".join(f"{v}\n" for v in videos))
    common = ["--sampling", "fps:4", "--frames", "4", "--window-stride", "2"]
    args = tiny_extract_args(tmp_path / "list.txt", tmp_path / "a.zarr", *common, "--shard-size", "3")
    run_cli(*args)
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "whole.zarr")
    c = open_cache(tmp_path / "a.zarr")
    assert c.layout.clip_counts == (8, 4, 11) and c.layout.num_shards == 8
    assert c.layout.shard_videos_range(1) == range(1, 1)             # rows 3-5: inside video 0
    assert c.layout.shard_videos_range(4) == range(2, 3)             # rows 12-14: video 2 starts there
    reset_shards(Cache(tmp_path / "a.zarr", mode="r+"), [1, 4, 7])
    for name in ("embed", "clips/time", "clips/valid"):
        for s in (1, 4, 7):             # those shards' files: gone
            p = tmp_path / "a.zarr" / name / "c" / str(s)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out = run_cli(*args).output
    assert "resuming, 5 of 8 shards already done" in out
    assert_caches_equal(tmp_path / "a.zarr", tmp_path / "whole.zarr")
    run_cli(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "one.zarr", *common, "--shard-size", "64",
                               "--preprocess", "device"))
    assert_caches_equal(tmp_path / "a.zarr", tmp_path / "one.zarr", features_only=True)
    # per-video entries (a chunk per video) are in their shard's checksum record: one deleted is found and mended
    run_cli("verify", tmp_path / "a.zarr")
    (tmp_path / "a.zarr" / "videos" / "status" / "c" / "2").unlink()        # video 2's: written by shard 4
    res = run_cli("verify", tmp_path / "a.zarr", ok=False)
    assert res.exit_code == 1 and "videos/status" in res.output
    run_cli(*args, "--repair")
    assert_caches_equal(tmp_path / "a.zarr", tmp_path / "whole.zarr")


def test_failed_windows_and_videos_are_recorded(tmp_path):
    """A missing file fails as a video; the exit status follows --max-failed-fraction as for clips."""
    good = good_video(tmp_path / "v.mp4", frames=30, size=48)
    (tmp_path / "list.txt").write_text(f"{good}\n{tmp_path / 'gone.mp4'}\n")
    res = run_cli(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "c.zarr", "--sampling", "fps:2",
                                     "--frames", "2", "--max-failed-fraction", "0.4"), ok=False)
    assert res.exit_code == 1 and "1 of 2 videos failed" in res.output
    c = open_cache(tmp_path / "c.zarr")
    assert [f["stage"] for f in c.failures()] == ["missing"] and c.layout.clip_counts == (3, 1)
    assert c.valid().tolist() == [True] * 3 + [False]
    assert c.read("clips/error").tolist()[-1].startswith("missing: ")


@pytest.mark.parametrize("extra,says", [(["--views", "3x1"], "--views 1x1"), (["--aug-views", "2"], "--aug-views"),
                                        (["--pixels", "16"], "--pixels"),
                                        (["--window-stride", "9"], "--window-stride")])
def test_fps_refuses_what_it_cannot_combine_with(tmp_path, extra, says):
    good = good_video(tmp_path / "v.mp4", frames=8, size=48)
    (tmp_path / "list.txt").write_text(f"{good}\n")
    res = run_cli(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "c.zarr", "--sampling", "fps:1", *extra,
                                     "--dry-run"), ok=False)
    assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- frame folders
def _frame_folder(path: Path, n: int = 6, ext: str = "jpg") -> Path:
    path.mkdir(parents=True)
    for i, f in enumerate(_frames(n, 48)):
        Image.fromarray(f).save(path / f"frame_{i + 1}.{ext}")
    return path


def test_frame_folders_in_every_manifest_format(tmp_path):
    root = tmp_path / "data"
    _frame_folder(root / "jumping" / "clip_a")
    _frame_folder(root / "running" / "clip_b", ext="png")
    good_video(root / "running" / "clip_c.mp4", frames=8, size=48)
    m = load_manifest(root)
    assert [(Path(v.path).name, m.classes[v.label], v.video_id) for v in m.videos] == [
        ("clip_a", "jumping", "jumping/clip_a"), ("clip_b", "running", "running/clip_b"),
        ("clip_c.mp4", "running", "running/clip_c")]
    (tmp_path / "list.txt").write_text("data/jumping/clip_a\tjumping\ndata/running/clip_b running\n")
    assert [Path(v.path).name for v in load_manifest(tmp_path / "list.txt").videos] == ["clip_a", "clip_b"]
    flat = tmp_path / "flat"
    _frame_folder(flat / "yt1_000001_000011")
    _frame_folder(flat / "42")
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nx,yt1,1,11,train\n")
    (tmp_path / "s.json").write_text('[{"id": "42", "template": "Pushing [something]"}]')
    for manifest in (load_manifest(tmp_path / "k.csv", video_root=flat), load_manifest(tmp_path / "s.json",
                                                                                          video_root=flat)):
        assert Path(manifest.videos[0].path).is_dir() and not manifest.videos[0].problem
    # natural name order: frame_2 before frame_10
    big = _frame_folder(tmp_path / "order", n=12)
    from cachefeat.extract.video import frame_files
    assert [Path(f).stem for f in frame_files(str(big))][:3] == ["frame_1", "frame_2", "frame_3"]
    assert probe(str(big), 4.0).duration == 3.0


def test_fps_sampling_of_frame_folders_needs_their_rate(tmp_path):
    _frame_folder(tmp_path / "f")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'f'}\n")
    args = tiny_extract_args(tmp_path / "list.txt", tmp_path / "c.zarr", "--sampling", "fps:2", "--frames", "2")
    res = run_cli(*args, "--dry-run", ok=False)
    assert res.exit_code == 2 and "--frame-rate" in res.output
    run_cli(*args, "--frame-rate", "4")
    c = open_cache(tmp_path / "c.zarr")
    assert c.valid().all() and c.read("clips/time").tolist() == [[0.0, 0.5], [1.0, 1.0]]   # 6 frames at 4/s
    assert c.read("clips/valid_frames").tolist() == [2, 1]


# ------------------------------------------------------------------------------------------- timestamps
def test_clip_caches_store_timestamps_and_old_caches_still_open_and_resume(tmp_path, synth_small):
    """Uniform sampling also records each frame's time (the pts of the frame used); a cache made before
    clips/time existed opens, trains and resumes as it was made."""
    args = tiny_extract_args(synth_small / "val.txt", tmp_path / "c.zarr", "--frames", "4", "--shard-size", "2")
    run_cli(*args)
    c = open_cache(tmp_path / "c.zarr")
    row = 1
    path = c.read("videos/path")[c.read("clips/video")[row]]
    # read by decord, whose timestamps are single precision
    assert np.allclose(c.read("clips/time")[row], _pts(path)[c.read("clips/frame_idx")[row]], rtol=0, atol=1e-5)
    # make it a cache of a version before: no clips/time, no `time` in its layout (and, older still, no
    # checksum records, whose slots the layout decides)
    shutil.rmtree(tmp_path / "c.zarr" / "clips" / "time")
    shutil.rmtree(tmp_path / "c.zarr" / "shard_checksums")
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    meta = dict(root.attrs["cachefeat"])
    meta["layout"] = {k: v for k, v in meta["layout"].items() if k != "time"}
    del meta["table_checksums"]
    meta["fingerprint"] = content_fingerprint(meta)
    root.attrs["cachefeat"] = meta
    reset_shards(Cache(tmp_path / "c.zarr", mode="r+"), [1])
    old = open_cache(tmp_path / "c.zarr")
    assert "clips/time" not in old.array_names() and not old.complete
    assert "resuming, 1 of 2 shards already done" in run_cli(*args).output
    old = open_cache(tmp_path / "c.zarr")
    assert old.complete and not (tmp_path / "c.zarr" / "clips" / "time").exists()
    run_cli("verify", tmp_path / "c.zarr")
    run_cli("train", "--cache", tmp_path / "c.zarr", "--out", tmp_path / "run", "--epochs", "1", "--quiet")


def test_two_ray_workers_write_the_windows_of_one_process(tmp_path, ray_session):
    """Windowed shards (videos cut across them) written by two Ray workers: the single-process cache."""
    from cachefeat.extract import ExtractSettings
    from cachefeat.extract.distributed import extract_distributed
    videos = [good_video(tmp_path / f"v{i}.mp4", frames=n, size=48, seed=i) for i, n in enumerate((50, 30, 70))]
    (tmp_path / "list.txt").write_text("".join(f"{v}\n" for v in videos))
    common = ["--sampling", "fps:4", "--frames", "4", "--window-stride", "2", "--shard-size", "3"]
    run_cli(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "one.zarr", *common))
    from conftest import TINY
    settings = ExtractSettings(model=TINY, pretrained="none", frames=4, shard_size=3,
                               sampling=with_windows(parse_sampling("fps:4"), 4, 2))
    stats = extract_distributed(load_manifest(tmp_path / "list.txt"), tmp_path / "two.zarr", settings, workers=2,
                                decode_workers=1, progress=False, log=lambda *a: None)
    assert stats.shards == 8 and stats.clips == 23 and stats.frames == sum(
        open_cache(tmp_path / "one.zarr").read("clips/valid_frames"))
    assert_caches_equal(tmp_path / "one.zarr", tmp_path / "two.zarr")
