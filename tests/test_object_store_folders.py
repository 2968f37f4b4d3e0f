"""A folder tree in a bucket (`cachefeat extract s3://BUCKET/PREFIX/`, extract/manifest.py), against moto's S3
server (tests/s3server.py) or CACHEFEAT_S3_TEST_ENDPOINT's: it loads as the same tree on local disk does (videos,
labels, ids, class list; a digest of URLs and sizes), whether named with a trailing slash, by --format folder or
by a name no object has; extract runs from it and resumes; an empty prefix, frame folders, too many objects, a
missing bucket, wrong credentials and a key obstore cannot name are each one line."""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

pytest.importorskip("obstore")
pytest.importorskip("boto3")

from cachefeat.extract import manifest as mf  # noqa: E402
from cachefeat.extract.manifest import ManifestError, load_manifest  # noqa: E402
from cachefeat.store.remote import RemoteError  # noqa: E402

from conftest import run_cli, tiny_extract_args  # noqa: E402
from helpers import invoke, on_contract  # noqa: E402
from media import good_video  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ARGS = ("--frames", "2", "--layers", "all", "--tokens", "all")
# under p/: two classes (one video a level deeper, still archery's), a video at the top (unlabelled), and
# objects that are no video: a text file, and an image at the top (not a frame folder, as on disk)
VIDEOS = ("archery/a1.mp4", "archery/sub/a2.mp4", "jumping/j1.mov", "top.mp4")
OTHERS = ("notes.txt", "cover.jpg")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The tree on local disk."""
    d = tmp_path_factory.mktemp("tree") / "p"
    for i, rel in enumerate(VIDEOS):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        good_video(d / rel, label=i % 2, frames=12, size=48, seed=i)
    for rel in OTHERS:
        (d / rel).write_bytes(b"not a video")
    return d


@pytest.fixture(scope="module")
def bucket(s3, tree) -> str:
    """The tree under p/, and beside it pq/ (a sibling whose name starts with p: not in p/'s tree)."""
    name = s3.new_bucket()
    client = s3.client()
    for p in sorted(tree.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), name, f"p/{p.relative_to(tree).as_posix()}")
    client.upload_file(str(tree / VIDEOS[0]), name, "pq/other.mp4")
    return name


def test_a_bucket_tree_loads_as_the_tree_on_disk(env, bucket, tree):
    """Trailing slash, --format folder, and a name no object has: the videos, labels, ids and classes of the same
    tree on disk, in its order; the source is the URL; the digest is that of `URL<TAB>size` lines."""
    local = load_manifest(tree)
    url = f"s3://{bucket}/p"
    for args in ((f"{url}/",), (url, "folder"), (url,)):
        m = load_manifest(*args)
        assert m.format == "folder" and m.source == args[0] and m.classes == local.classes == ["archery", "jumping"]
        assert [(v.path, v.label, v.video_id, v.problem) for v in m.videos] == [
            (f"{url}/{Path(v.path).relative_to(tree).as_posix()}", v.label, v.video_id, "") for v in local.videos]
    assert [(v.video_id, v.label) for v in m.videos] == [("archery/a1", 0), ("archery/sub/a2", 0),
                                                         ("jumping/j1", 1), ("top", -1)]
    lines = [f"{url}/{rel}\t{(tree / rel).stat().st_size}" for rel in sorted(VIDEOS)]
    assert m.sha256 == hashlib.sha256("\n".join(lines).encode()).hexdigest() != local.sha256


def test_a_changed_tree_has_another_digest(env, s3, bucket, tree):
    """An object replaced by one of another size changes the digest (so a resume sees another input)."""
    client = s3.client()
    prefix = f"changed-{uuid.uuid4().hex[:8]}"
    for rel in VIDEOS[:2]:
        client.upload_file(str(tree / rel), bucket, f"{prefix}/{rel}")
    before = load_manifest(f"s3://{bucket}/{prefix}/").sha256
    client.put_object(Bucket=bucket, Key=f"{prefix}/{VIDEOS[1]}", Body=b"x")
    assert load_manifest(f"s3://{bucket}/{prefix}/").sha256 != before


def test_refused_in_one_line(env, s3, bucket, tmp_path, monkeypatch):
    """An empty prefix has no videos; a name with nothing under it does not exist; frame folders, more objects
    than MAX_LISTED (checked while listing), a prefix forced to another format, a missing bucket, wrong
    credentials and a key with an empty part: one line each (through extract: exit status 2)."""
    client = s3.client()

    def refused(url, match, error=ManifestError, **kw):
        with pytest.raises(error, match=match) as e:
            load_manifest(url, **kw)
        assert "\n" not in str(e.value)

    refused(f"s3://{bucket}/nothing/", rf"^s3://{bucket}/nothing/: no videos found$")
    refused(f"s3://{bucket}/nothing", rf"^input s3://{bucket}/nothing does not exist$")
    for key in ("frames/c/v1/000001.jpg", "frames/c/v1/000002.jpg", "frames/c/v2.mp4"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    refused(f"s3://{bucket}/frames/", rf"2 image objects \(such as s3://{bucket}/frames/c/v1/000001.jpg\) make "
                                     rf"frame folders, which are read from local disk only")
    line = on_contract(invoke(*tiny_extract_args(f"s3://{bucket}/frames/", tmp_path / "f.zarr")), (2,), "frames")
    assert line.startswith(f"Error: input s3://{bucket}/frames/: 2 image objects"), line
    assert not (tmp_path / "f.zarr").exists()
    refused(f"s3://{bucket}/p/", r"a prefix is read as a folder tree \(--format folder\), not as a list", fmt="list")
    from cachefeat.store import remote
    n, limits = len(VIDEOS) + len(OTHERS), []
    real = remote.list_objects
    with monkeypatch.context() as m:
        m.setattr(remote, "list_objects", lambda loc, **kw: limits.append(kw["limit"]) or real(loc, **kw))
        m.setattr(mf, "MAX_LISTED", n)
        assert len(load_manifest(f"s3://{bucket}/p/").videos) == len(VIDEOS)        # exactly the bound
        m.setattr(mf, "MAX_LISTED", n - 1)
        refused(f"s3://{bucket}/p/", rf"^input s3://{bucket}/p/: more than {n - 1} objects under it; list its videos")
    assert limits == [n + 1, n]      # the listing stops one past the bound: no more is held
    refused(f"s3://cachefeat-test-missing-{uuid.uuid4().hex[:8]}/p/", "the bucket .* does not exist", RemoteError)
    client.put_object(Bucket=bucket, Key="odd/a//b.mp4", Body=b"x")
    refused(f"s3://{bucket}/odd/", r"an object under it has a name with an empty, '.' or '..' part")
    for k, v in s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret").items():
        monkeypatch.setenv(k, v)
    refused(f"s3://{bucket}/p/", "access denied", RemoteError)


def test_extract_from_a_bucket_tree_resumes(env, s3, tree, tmp_path):
    """`cachefeat extract s3://BUCKET/PREFIX/`: every video extracted, with the URLs, ids, labels and classes of
    the tree on disk; the cache names the URL; the same command again has nothing to do; after a video is added
    under the prefix it refuses to resume (another input), in one line."""
    from cachefeat.store import open_cache
    name = s3.new_bucket()       # a bucket of its own: this test adds an object
    for rel in VIDEOS:
        s3.client().upload_file(str(tree / rel), name, f"p/{rel}")
    url = f"s3://{name}/p/"
    args = tiny_extract_args(url, tmp_path / "c.zarr", *ARGS)
    run_cli(*args)
    cache = open_cache(tmp_path / "c.zarr")
    local = load_manifest(tree)
    assert list(cache.root["videos/path"][...]) == [f"{url}{Path(v.path).relative_to(tree).as_posix()}"
                                                     for v in local.videos]
    assert list(cache.root["videos/id"][...]) == [v.video_id for v in local.videos]
    assert list(cache.root["videos/label"][...]) == [v.label for v in local.videos]
    assert cache.valid().all() and cache.meta["classes"] == ["archery", "jumping"]
    assert cache.meta["source_path"] == url and cache.meta["source"]["sha256"] == load_manifest(url).sha256
    assert "nothing to do" in run_cli(*args).output.lower()
    s3.client().upload_file(str(tree / VIDEOS[0]), name, "p/jumping/j2.mp4")
    line = on_contract(invoke(*args), (2,), "a changed tree")
    assert "was made with other settings (source" in line, line
