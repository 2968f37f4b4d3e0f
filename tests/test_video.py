import os
import signal
import time

import numpy as np
import open_clip
import pytest
from PIL import Image

from cachefeat.extract.decode_pool import DecodePool
from cachefeat.extract.preprocess import Preprocessing, crops
from cachefeat.extract.video import DecodeRequest, DecordReader, PyAVReader, decode_video
from cachefeat.specs import SamplingSpec, ViewSpec

from media import encode_in_fresh_process, faststart_copy, fifo, good_video, random_bytes, truncated

PREP = Preprocessing(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


VIEWS, SAMPLING = ViewSpec(), SamplingSpec()   # req()'s defaults


def req(path, key=0, frames=8, views=VIEWS, reader="auto", sampling=SAMPLING, prep=PREP):
    return DecodeRequest(key, str(path), frames, sampling, views, prep, reader)


@pytest.mark.parametrize("shape", [(96, 96), (90, 160), (161, 90), (240, 320), (50, 30), (7, 300)])
@pytest.mark.parametrize("size", [224, 32])
def test_crop_matches_open_clip_transform(shape, size):
    """The worker-side PIL preprocessing is open_clip's eval transform, pixel for pixel."""
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    tf = open_clip.image_transform(size, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))
    ref = (tf(Image.fromarray(img)).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    prep = Preprocessing((size, size), (0, 0, 0), (1, 1, 1))
    assert np.array_equal(crops(img, prep, 1)[0], ref)


def test_three_crops_span_the_longer_side():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :10] = 255   # a mark on the left edge
    img[:, -10:] = 128  # and on the right edge
    left, centre, right = crops(img, Preprocessing((100, 100), (0,) * 3, (1,) * 3), 3)
    assert left[:, 0].mean() == 255 and right[:, -1].mean() == 128
    assert np.array_equal(centre, crops(img, Preprocessing((100, 100), (0,) * 3, (1,) * 3), 1)[0])
    tall = crops(img.transpose(1, 0, 2).copy(), Preprocessing((100, 100), (0,) * 3, (1,) * 3), 3)
    assert tall[0][0].mean() == 255 and tall[2][-1].mean() == 128


def test_decode_views_and_frame_indices(tmp_path):
    v = good_video(tmp_path / "v.mp4", frames=16, size=64)
    r = decode_video(req(v, frames=4, views=ViewSpec(2, 3)))
    assert r.ok, r.error
    assert r.pixels.shape == (6, 4, 32, 32, 3) and r.pixels.dtype == np.uint8
    assert r.frame_idx.tolist()[0] == [1, 5, 9, 13] and r.frame_idx.tolist()[3] == [3, 7, 11, 15]
    assert r.num_frames == 16 and r.reader == "decord"


def test_decord_and_pyav_agree(tmp_path):
    v = good_video(tmp_path / "v.mp4", frames=16, size=64)
    idx = np.array([0, 7, 15])
    a, b = DecordReader(str(v)).get(idx), PyAVReader(str(v)).get(idx)
    assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 2
    ra, rb = decode_video(req(v, reader="decord")), decode_video(req(v, reader="pyav"))
    assert rb.reader == "pyav" and np.abs(ra.pixels.astype(int) - rb.pixels).max() <= 2


def test_truncated_streaming_file_falls_back_to_pyav(tmp_path):
    """decord cannot open a truncated faststart mp4; PyAV decodes what is there and sampling uses it."""
    src = good_video(tmp_path / "v.mp4", frames=48, size=64)
    cut = truncated(faststart_copy(src, tmp_path / "fs.mp4"), tmp_path / "cut.mp4", 0.5)
    import decord
    with pytest.raises(decord.DECORDError):
        DecordReader(str(cut))
    r = decode_video(req(cut, frames=8))
    assert r.ok, r.error
    assert r.reader == "pyav" and 0 < r.num_frames < 48
    assert r.frame_idx.max() < r.num_frames


def test_file_decord_misreads_is_decoded_by_pyav(tmp_path):
    """decord 0.6 opens a 48x48 H.264 file but fails to copy its frames (a row-alignment bug)."""
    v = good_video(tmp_path / "v48.mp4", frames=16, size=48)
    try:
        DecordReader(str(v)).get(np.array([0, 15]))
        decord_ok = True
    except Exception:
        decord_ok = False
    r = decode_video(req(v))
    assert r.ok and r.pixels.shape == (1, 8, 32, 32, 3)
    assert r.reader == ("decord" if decord_ok else "pyav")


@pytest.mark.parametrize("kind,stage", [("empty", "open"), ("garbage", "open"), ("text", "open"),
                                        ("missing", "missing"), ("cut_plain", "open")])
def test_bad_files_are_failures_not_exceptions(tmp_path, kind, stage):
    p = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        random_bytes(p)
    elif kind == "text":
        p.write_text("this is not a video\n" * 50)
    elif kind == "cut_plain":  # moov at the end: nothing can be read
        truncated(good_video(tmp_path / "src.mp4"), p, 0.5)
    r = decode_video(req(p))
    assert not r.ok and r.stage == stage and r.error
    assert r.pixels is None


def test_odd_formats_decode(tmp_path):
    frames = np.stack([np.full((40, 56, 3), 10 * i, np.uint8) for i in range(10)])
    files = [encode_in_fresh_process(tmp_path / name, frames, codec, fmt) for name, codec, fmt in
             [("gray.mp4", "libx264", "gray"), ("10bit.mp4", "libx264", "yuv420p10le"),
              ("mjpeg.avi", "mjpeg", "yuvj420p"), ("vp9.webm", "libvpx-vp9", "yuv420p")]]
    for f in files:
        r = decode_video(req(f, frames=4))
        assert r.ok, (f.name, r.error)
        assert r.pixels.shape == (1, 4, 32, 32, 3)


def test_pool_kills_a_hung_decoder_and_goes_on(tmp_path):
    good = good_video(tmp_path / "good.mp4")
    hang = fifo(tmp_path / "hang.mp4")
    # a short timeout: the replacement worker's start-up (seconds on a busy machine) must not count
    # against the next video's decode, which only the worker's own ready message starts the clock of
    with DecodePool(workers=1, timeout=1.0) as pool:
        pool.submit(req(hang, key=1))
        pool.submit(req(good, key=2))
        t0 = time.monotonic()
        results = {r.key: r for r in (pool.get(timeout=30), pool.get(timeout=30))}
        assert time.monotonic() - t0 < 20
        assert pool.restarts == 1
    assert results[1].stage == "timeout" and "1 s" in results[1].error
    assert results[2].ok, results[2].error


def test_pool_records_a_decoder_that_dies(tmp_path):
    hang = fifo(tmp_path / "hang.mp4")
    good = good_video(tmp_path / "good.mp4")
    with DecodePool(workers=1, timeout=60) as pool:
        pool.submit(req(hang, key=1))
        time.sleep(1.0)
        os.kill(pool.pids[0], signal.SIGKILL)  # as a segfault or the OOM killer would
        r = pool.get(timeout=30)
        assert r.key == 1 and r.stage == "crash" and "signal 9" in r.error
        pool.submit(req(good, key=2))
        assert pool.get(timeout=30).ok
        assert pool.restarts == 1


def test_a_worker_killed_while_holding_its_slot_leaves_nothing_behind(tmp_path):
    """Frames travel through each worker's shared-memory slots. A worker SIGKILLed in the middle of a
    request (decoding, or writing its result into the slot) yields a crash for that video; its
    replacement reuses the slot, the next results equal a decode in this process, and closing the pool
    removes every slot from /dev/shm."""
    big = good_video(tmp_path / "big.mp4", frames=64, size=256)
    good = good_video(tmp_path / "good.mp4")
    with DecodePool(workers=1, timeout=60) as pool:
        slots = [s.name for worker_slots in pool._slots for s in worker_slots]
        assert slots and all(n in os.listdir("/dev/shm") for n in slots)
        for k in range(12):                                # keep the worker busy, then kill it mid-way
            pool.submit(req(big, key=k, frames=64))
        time.sleep(0.5)
        os.kill(pool.pids[0], signal.SIGKILL)
        results = [pool.get(timeout=60) for _ in range(12)]
        assert any(r.stage == "crash" for r in results) and pool.restarts == 1
        for r in results:
            assert r.ok or r.stage == "crash"
        assert [s.name for worker_slots in pool._slots for s in worker_slots] == slots      # reclaimed, not replaced
        pool.submit(req(good, key=9, frames=4))
        r = pool.get(timeout=30)
        assert r.ok and np.array_equal(r.pixels, decode_video(req(good, key=9, frames=4)).pixels)
    assert not set(slots) & set(os.listdir("/dev/shm"))       # (other processes may have segments of their own)
