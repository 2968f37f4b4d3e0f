"""Videos in a bucket (extract/fetch.py, manifest URLs, `--video-root s3://...`), against moto's S3 server
(tests/s3server.py) or CACHEFEAT_S3_TEST_ENDPOINT's. A manifest of `s3://` URLs extracts the features that the
same files extract from local disk, bit for bit; a missing object and a corrupt one are failures with one-line
reasons naming their URLs; loading a manifest sends no request; a server gone, before the fetch or in the
middle of an object's body, makes its videos failures (after the retries) and nothing else; the temporary
files are gone afterwards."""
from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("boto3")

import s3server  # noqa: E402

from cachefeat.synth import write_mp4  # noqa: E402

from conftest import run_cli, tiny_extract_args  # noqa: E402
from helpers import invoke, on_contract  # noqa: E402
from media import good_video, random_bytes  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ARGS = ("--frames", "2", "--layers", "all", "--tokens", "all")
STEMS = ("abc_000001_000011", "def_000002_000012", "ghi_000003_000013")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("bucket_videos")
    return [good_video(d / f"{STEMS[i]}.mp4", label=i % 2, frames=12, size=48, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def bucket(s3, videos, tmp_path_factory) -> str:
    """A bucket holding the videos under videos/ and k400/ (Kinetics names) and a corrupt object."""
    name = s3.new_bucket()
    client = s3.client()
    for v in videos:
        client.upload_file(str(v), name, f"videos/{v.name}")
        client.upload_file(str(v), name, f"k400/{v.name}")
    broken = random_bytes(tmp_path_factory.mktemp("broken") / "broken.mp4", 20000)
    client.upload_file(str(broken), name, "videos/broken.mp4")
    return name


@pytest.fixture(scope="module")
def local_cache(videos, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("local_videos")
    (d / "list.txt").write_text("".join(f"{v}\t{i % 2}\n" for i, v in enumerate(videos)))
    run_cli(*tiny_extract_args(d / "list.txt", d / "c.zarr", *ARGS))
    return d / "c.zarr"


def _same_features(local: Path, other: Path, rows: list[int], other_rows: list[int]) -> None:
    from cachefeat.store import open_cache
    a, b = open_cache(local), open_cache(other)
    names = list(a.layout.feature_arrays())
    assert names and names == list(b.layout.feature_arrays())
    for name in names:
        x, y = a.read_stored(name, np.array(rows)), b.read_stored(name, np.array(other_rows))
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{name} differs"


def _failures(cache: Path) -> dict[str, tuple[str, str]]:
    from cachefeat.store import open_cache
    return {f["path"]: (f["stage"], f["error"]) for f in open_cache(cache).failures()}


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """TMPDIR of this test's own (the decode workers' temporary folders go there), empty to start with."""
    import tempfile
    t = tmp_path / "tmp"
    t.mkdir()
    monkeypatch.setenv("TMPDIR", str(t))
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


def test_bucket_videos_extract_as_local_files(env, bucket, videos, local_cache, tmp_path, tmpdir_env):
    """Three videos by URL, a corrupt object and a missing one: the three extract bit for bit as from local
    files (videos/path records the URLs), the other two are failures naming their URLs, no file is left."""
    from cachefeat.store import open_cache
    urls = [f"s3://{bucket}/videos/{v.name}" for v in videos]
    broken, missing = f"s3://{bucket}/videos/broken.mp4", f"s3://{bucket}/videos/nothing-here.mp4"
    lines = [f"{u}\t{i % 2}" for i, u in enumerate(urls)] + [f"{broken}\t0", f"{missing} 1"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "s3.zarr"
    res = run_cli(*tiny_extract_args(tmp_path / "list.txt", out, *ARGS, "--decode-workers", "2"))
    assert "2 videos failed" in res.output
    cache = open_cache(out)
    assert list(cache.root["videos/path"][...]) == urls + [broken, missing]
    assert cache.valid().tolist() == [True] * 3 + [False] * 2
    _same_features(local_cache, out, [0, 1, 2], [0, 1, 2])
    fails = _failures(out)
    assert set(fails) == {broken, missing}
    assert fails[missing] == ("missing", f"no such object: {missing}")
    stage, error = fails[broken]
    assert stage == "open" and "\n" not in error and "cachefeat-fetch-" not in error, fails[broken]
    assert list(tmpdir_env.iterdir()) == []        # every fetched file and the pool's folder removed


def test_kinetics_csv_under_a_bucket_root(env, bucket, videos, local_cache, tmp_path, tmpdir_env):
    """--video-root s3://BUCKET/PREFIX: each CSV row's file is the flat name under the prefix; a row whose object
    is not there is a `missing` failure."""
    from cachefeat.store import open_cache
    rows = ["label,youtube_id,time_start,time_end,split"]
    rows += [f"{'ab'[i % 2]},{s[:3]},{i + 1},{i + 11},train" for i, s in enumerate(STEMS)]
    rows.append("a,zzz,5,15,train")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "k.zarr"
    root = f"s3://{bucket}/k400/"
    run_cli(*tiny_extract_args(tmp_path / "train.csv", out, *ARGS, "--video-root", root))
    cache = open_cache(out)
    expected = [f"s3://{bucket}/k400/{s}.mp4" for s in (*STEMS, "zzz_000005_000015")]
    assert list(cache.root["videos/path"][...]) == expected
    assert cache.valid().tolist() == [True, True, True, False]
    _same_features(local_cache, out, [0, 1, 2], [0, 1, 2])
    assert _failures(out) == {expected[3]: ("missing", f"no such object: {expected[3]}")}
    assert list(tmpdir_env.iterdir()) == []


def test_manifests_in_the_bucket(env, s3, bucket, videos, local_cache, tmp_path, tmpdir_env):
    """A list and a Kinetics CSV that are objects in the bucket: their relative paths and names are joined to
    their own folder there; the features are the local files'; the cache names the manifest's URL and the same
    command resumes it. A missing manifest, one too large or a prefix given as a list (a prefix is a folder tree:
    test_object_store_folders.py): one line, exit 2."""
    from cachefeat.extract import manifest as mf
    from cachefeat.store import open_cache
    client = s3.client()
    lines = "".join(f"{v.name}\t{i % 2}\n" for i, v in enumerate(videos))
    client.put_object(Bucket=bucket, Key="videos/list.txt", Body=lines.encode())
    rows = ["label,youtube_id,time_start,time_end,split"]
    rows += [f"{'ab'[i % 2]},{st[:3]},{i + 1},{i + 11},train" for i, st in enumerate(STEMS)]
    client.put_object(Bucket=bucket, Key="k400/train.csv", Body=("\n".join(rows) + "\n").encode())
    for src, folder in ((f"s3://{bucket}/videos/list.txt", "videos"), (f"s3://{bucket}/k400/train.csv", "k400")):
        out = tmp_path / f"{folder}.zarr"
        args = tiny_extract_args(src, out, *ARGS)
        run_cli(*args)
        cache = open_cache(out)
        assert list(cache.root["videos/path"][...]) == [f"s3://{bucket}/{folder}/{v.name}" for v in videos]
        assert cache.valid().all() and cache.meta["source_path"] == src, cache.meta["source_path"]
        _same_features(local_cache, out, [0, 1, 2], [0, 1, 2])
        assert "nothing to do" in run_cli(*args).output.lower()
    assert [p for p in tmpdir_env.iterdir() if p.name.startswith("cachefeat")] == []
    missing = f"s3://{bucket}/videos/none.txt"
    line = on_contract(invoke(*tiny_extract_args(missing, tmp_path / "m.zarr")), (2,), "a missing manifest")
    assert line == f"Error: input {missing} does not exist", line
    line = on_contract(invoke(*tiny_extract_args(f"s3://{bucket}/videos/", tmp_path / "f.zarr", "--format", "list")),
                       (2,), "a prefix as a list")
    assert "a prefix is read as a folder tree (--format folder), not as a list manifest" in line, line
    mf_max = mf.MAX_TEXT
    try:
        mf.MAX_TEXT = 10
        with pytest.raises(mf.ManifestError, match=r"list.txt: \d+ bytes, more than a manifest holds"):
            mf.load_manifest(f"s3://{bucket}/videos/list.txt")
    finally:
        mf.MAX_TEXT = mf_max


def test_ray_workers_fetch_bucket_videos(env, bucket, videos, local_cache, tmp_path, ray_session):
    """A Ray worker decodes the URLs as URLs (not made absolute paths): the same features."""
    from cachefeat.extract import ExtractSettings
    from cachefeat.extract.distributed import extract_distributed
    from cachefeat.extract.manifest import load_manifest

    from conftest import TINY
    (tmp_path / "list.txt").write_text("".join(f"s3://{bucket}/videos/{v.name}\t{i % 2}\n"
                                               for i, v in enumerate(videos)))
    settings = ExtractSettings(model=TINY, pretrained="none", layers="all", tokens="all", frames=2, shard_size=3)
    stats = extract_distributed(load_manifest(tmp_path / "list.txt"), tmp_path / "c.zarr", settings, workers=1,
                                decode_workers=1, batch_size=1, progress=False, log=lambda line: None)
    assert stats.clips == 3 and not stats.failed_videos
    _same_features(local_cache, tmp_path / "c.zarr", [0, 1, 2], [0, 1, 2])


def test_loading_a_manifest_sends_no_request(tmp_path, monkeypatch):
    """A manifest of URLs loads with the endpoint unreachable (no request per video, none at all); URLs that
    are no object's name are per-video problems; a bad --video-root bucket is one line."""
    from cachefeat.extract.manifest import ManifestError, load_manifest
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")          # nothing listens there
    lines = [f"s3://some-bucket/v/{i:05d}.mp4 {i % 3}" for i in range(5000)]
    lines += ["s3://Bad_Bucket/x.mp4 0", "s3://some-bucket/a/../b.mp4 0", "s3://some-bucket 1",
              "s3://some-bucket/v/00000.mp4 0"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    m = load_manifest(tmp_path / "list.txt")
    assert len(m.videos) == 5004 and not any(v.problem for v in m.videos[:5000])
    assert m.videos[7].path == "s3://some-bucket/v/00007.mp4" and m.videos[7].video_id == "s3://some-bucket/v/00007"
    assert "is not a bucket name" in m.videos[5000].problem
    assert "'..'" in m.videos[5001].problem
    assert m.videos[5002].problem == "s3://some-bucket names a bucket, not a video in it"
    assert m.videos[5003].problem == "duplicate of video 0 (same file listed twice)"
    (tmp_path / "rel.txt").write_text("a/x.mp4 0\ny.mp4 1\n")
    rel = load_manifest(tmp_path / "rel.txt", video_root="s3://some-bucket/root/")
    assert [v.path for v in rel.videos] == ["s3://some-bucket/root/a/x.mp4", "s3://some-bucket/root/y.mp4"]
    with pytest.raises(ManifestError, match="--video-root s3://NO/x: 'NO' is not a bucket name"):
        load_manifest(tmp_path / "rel.txt", video_root="s3://NO/x")


def test_fps_sampling_of_bucket_videos(env, bucket, videos, tmp_path, tmpdir_env):
    """--sampling fps plans from each video's header, read from the bucket: the same windows, timeline and
    features as from the local files; a corrupt object fails at its probe (stage open), a missing one is
    `missing`."""
    from cachefeat.store import open_cache
    fps = ("--sampling", "fps:8", "--frames", "4", "--tokens", "cls")
    (tmp_path / "local.txt").write_text("".join(f"{v}\t{i % 2}\n" for i, v in enumerate(videos)))
    run_cli(*tiny_extract_args(tmp_path / "local.txt", tmp_path / "local.zarr", *fps))
    broken, missing = f"s3://{bucket}/videos/broken.mp4", f"s3://{bucket}/videos/nothing-here.mp4"
    urls = [f"s3://{bucket}/videos/{v.name}" for v in videos]
    (tmp_path / "s3.txt").write_text("".join(f"{u}\t{i % 2}\n" for i, u in enumerate(urls + [broken, missing])))
    res = run_cli(*tiny_extract_args(tmp_path / "s3.txt", tmp_path / "s3.zarr", *fps))
    assert "2 videos failed" in res.output
    a, b = open_cache(tmp_path / "local.zarr"), open_cache(tmp_path / "s3.zarr")
    n = a.num_clips
    assert n > len(videos) and b.num_clips == n + 2     # several windows per video, a row per failed one
    for name in ("videos/start", "videos/duration", "videos/num_clips"):
        assert np.array_equal(a.root[name][...], b.root[name][...][:len(videos)]), name
    _same_features(tmp_path / "local.zarr", tmp_path / "s3.zarr", list(range(n)), list(range(n)))
    fails = _failures(tmp_path / "s3.zarr")
    assert fails[missing][0] == "missing" and fails[broken][0] == "open", fails
    assert [p for p in tmpdir_env.iterdir() if p.name.startswith("cachefeat")] == []    # (not torch's, wandb's)


def test_a_probe_reads_the_header_not_the_video(env, s3, tmp_path, monkeypatch):
    """ObjectFile reads what it is asked in ranged GETs of BLOCK_BYTES (any offset, the last block short); a
    probe through it gives the local file's timeline in a few GETs of a video many blocks long."""
    from cachefeat.extract import fetch, video
    monkeypatch.setattr(fetch, "_STORES", {})
    name = s3.new_bucket()
    path = tmp_path / "long.mp4"       # noise: frames that do not compress, so the file is many blocks long
    write_mp4(path, np.random.default_rng(5).integers(0, 256, (96, 128, 128, 3), dtype=np.uint8))
    body = path.read_bytes()
    s3.client().upload_file(str(path), name, "long.mp4")
    url = f"s3://{name}/long.mp4"
    block = fetch.BLOCK_BYTES
    assert len(body) > 12 * block
    f = io.BufferedReader(fetch.ObjectFile(url), 1024)    # (a raw read returns at most the rest of a block)
    rng = np.random.default_rng(0)
    for start in [0, block - 1, block, len(body) - 10, *rng.integers(0, len(body), 5).tolist()]:
        f.seek(start)
        assert f.read(block + 100) == body[start:start + block + 100], start
    f.seek(-3, 2)
    assert f.read() == body[-3:] and f.read(10) == b""
    calls = []
    real = fetch.ObjectFile._block
    monkeypatch.setattr(fetch.ObjectFile, "_block", lambda self, i: calls.append(i) or real(self, i))
    assert video.probe(url) == video.probe(str(path))
    # its first block and its last (the moov atom PyAV's muxer writes at the end)
    assert sorted(set(calls)) == [0, (len(body) - 1) // block], (sorted(set(calls)), len(body) // block)
    with pytest.raises(video.DecodeError, match="no such object"):
        video.probe(f"s3://{name}/none.mp4")


def test_server_gone_fails_its_videos_only(videos, local_cache, tmp_path, monkeypatch, tmpdir_env):
    """A server of this test's own, stopped before the extraction: the bucket's videos fail (stage `fetch`,
    after the retries, one line each); the local videos of the same manifest extract as ever."""
    pytest.importorskip("moto")
    server = s3server.start_moto()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        name = server.new_bucket()
        for v in videos[1:]:
            server.client().upload_file(str(v), name, v.name)
    finally:
        server.stop()
    urls = [f"s3://{name}/{v.name}" for v in videos[1:]]
    (tmp_path / "list.txt").write_text(f"{videos[0]}\t0\n{urls[0]}\t1\n{urls[1]}\t0\n")
    out = tmp_path / "c.zarr"
    res = run_cli(*tiny_extract_args(tmp_path / "list.txt", out, *ARGS, "--decode-workers", "2"))
    assert "2 videos failed" in res.output
    _same_features(local_cache, out, [0], [0])
    fails = _failures(out)
    assert set(fails) == set(urls)
    for url, (stage, error) in fails.items():
        assert stage == "fetch" and error.startswith(f"{url}: the object store failed (") and "3 attempts" in error
        assert "\n" not in error
    assert list(tmpdir_env.iterdir()) == []


def test_no_video_fetched_is_one_line(s3, bucket, tmp_path, monkeypatch):
    """Wrong credentials: every video fails to fetch (access denied, no retries) and extract exits 1 in one
    line that says to check the bucket's settings, not the paths."""
    for k, v in s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret").items():
        monkeypatch.setenv(k, v)
    (tmp_path / "list.txt").write_text(f"s3://{bucket}/videos/{STEMS[0]}.mp4 0\n")
    line = on_contract(invoke(*tiny_extract_args(tmp_path / "list.txt", tmp_path / "c.zarr", "--frames", "2")), (1,),
                       "no video fetched")
    assert "1 of 1 videos failed to fetch" in line and "access denied" in line and "AWS_*" in line


class _CutOff(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint whose object is 1 MB, of which each GET sends 1 KB before closing the connection."""
    gets = 0
    HEADERS = (("ETag", '"x"'), ("Last-Modified", "Mon, 01 Dec 2025 00:00:00 GMT"), ("Content-Type", "video/mp4"))

    def do_HEAD(self):     # noqa: N802 (http.server's name)
        self.send_response(200)
        for k, v in (("Content-Length", "1000000"), *self.HEADERS):
            self.send_header(k, v)
        self.end_headers()

    def do_GET(self):      # noqa: N802
        type(self).gets += 1
        self.send_response(206)
        for k, v in (("Content-Length", "1000000"), ("Content-Range", "bytes 0-999999/1000000"), *self.HEADERS):
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(b"\0" * 1000)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_connection_cut_mid_body(tmp_path, monkeypatch, tmpdir_env):
    """The server stops in the middle of an object's body: the fetch is tried FETCH_ATTEMPTS times, then the
    video is a `fetch` failure in one line; its temporary file is removed."""
    from cachefeat.extract import fetch
    from cachefeat.extract.preprocess import Preprocessing
    from cachefeat.extract.video import DecodeRequest, decode_video
    from cachefeat.specs import SamplingSpec, ViewSpec
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutOff)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}", "AWS_ALLOW_HTTP": "true",
                     "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(fetch, "FETCH_BACKOFF", 0.01)
        monkeypatch.setattr(fetch, "_STORES", {})
        url = "s3://some-bucket/cut.mp4"
        res = decode_video(DecodeRequest(0, url, 2, SamplingSpec(), ViewSpec(),
                                         Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3)))
    finally:
        server.shutdown()
    assert res.stage == "fetch", (res.stage, res.error)
    assert res.error.startswith(f"{url}: the object store failed (") and "3 attempts" in res.error
    assert "\n" not in res.error
    assert _CutOff.gets >= fetch.FETCH_ATTEMPTS
    assert list(tmpdir_env.iterdir()) == []


def test_fetched_in_ranges_and_bounded(env, bucket, monkeypatch, tmpdir_env):
    """An object comes in ranged GETs (here of 3,000 bytes: the last one shorter) into a temporary file with its
    extension, removed on leaving; one larger than MAX_VIDEO_BYTES is refused unread."""
    from cachefeat.extract import fetch
    monkeypatch.setattr(fetch, "PART_BYTES", 3000)
    monkeypatch.setattr(fetch, "_STORES", {})
    url = f"s3://{bucket}/videos/broken.mp4"
    body = env.client().get_object(Bucket=bucket, Key="videos/broken.mp4")["Body"].read()
    with fetch.fetched(url) as path:
        assert path.endswith(".mp4") and Path(path).parent == tmpdir_env
        assert Path(path).read_bytes() == body and len(body) == 20000
    assert list(tmpdir_env.iterdir()) == []
    monkeypatch.setattr(fetch, "MAX_VIDEO_BYTES", 1000)
    with pytest.raises(fetch.FetchError, match=r"is 20,000 bytes, more than a video may be \(1,000\)"):
        with fetch.fetched(url):
            pass
    assert list(tmpdir_env.iterdir()) == []
