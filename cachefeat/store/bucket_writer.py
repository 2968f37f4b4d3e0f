"""Extracting into a bucket: `cachefeat extract ... --out s3://BUCKET/PREFIX`.

The usual writer (writer.py) writes the cache into a local staging folder; the bucket receives it shard by
shard. When the cache is made, its documents and creation tables go up (the root zarr.json last). After each
shard is written, its objects go up, each with its CRC32C recorded and checked on arrival (remote.put_file_async):
the shard's data and per-shard tables first, then its checksum record, its progress flag last, so the bucket
never flags a shard whose objects are not all there. The shard's files are then deleted from the staging
folder: the local disk holds a shard or two, never the cache. Until every flag is set the bucket cache reads as
one being written, as a local one does (`info` shows the shards done and the writer's lease; `train` refuses
it).

The bucket is the record of the run. The staging folder is made again from it at every start, here or on
another machine: the documents, tables, records and flags (no feature data), then checked as any cache is
when opened. The writer then resumes with the shards the bucket has not flagged; a different set of settings
is refused as for a local cache. The prefix's lease (remote.Lease, `command: extract`) keeps a second writer
out for the whole run. Ray workers each stage in a folder of their own node and upload the shards they write,
so no node needs to see another's disk; the driver makes the cache and holds the lease.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .confine import real_root, remove_inside
from .layout import (
    ATTR,
    CLIP_TABLES,
    RECORD,
    SHARD_VIDEO_TABLES,
    STORE_ENTRIES,
    ZARR_PARTIAL,
    CacheError,
)
from .remote import (
    IN_FLIGHT,
    LEASE_KEY,
    MAX_OBJECT,
    Lease,
    Location,
    RemoteError,
    _put_all,
    cache_objects,
    delete,
    get_bounded_all,
    get_bounded_async,
    is_remote,
    list_objects,
    parse_url,
    run_sync,
)
from .validate import MAX_ARRAY_DOC, MAX_ROOT_DOC

STAGING_ENV = "CACHEFEAT_STAGING"      # where staging folders go when --staging is not given (else the temp folder)
PER_SHARD = ("progress/", f"{RECORD}/", *(f"{n}/" for n in SHARD_VIDEO_TABLES))   # besides the row arrays


@dataclass(frozen=True)
class BucketOut:
    """Where `extract` writes when --out is an s3:// URL: the URL, the folder its staging copies go in (default
    CACHEFEAT_STAGING, else the system's temp folder) and whether to break a lease left by a dead writer."""
    url: str
    staging: str | None = None
    break_lease: bool = False

    @property
    def location(self) -> Location:
        return parse_url(self.url)

    def staging_dir(self, who: str) -> Path:
        """The staging folder of this process (`who`: driver, or a Ray worker's name) for this URL."""
        base = Path(self.staging or os.environ.get(STAGING_ENV) or tempfile.gettempdir())
        if not base.is_dir():
            raise CacheError(f"--staging {base}: no such folder (the staging copy of {self.url} goes there)")
        tag = hashlib.sha256(self.location.url.encode()).hexdigest()[:16]
        return base / f"cachefeat-staging-{tag}-{who}.zarr"


def bucket_out(out) -> BucketOut | None:
    """`out` as a BucketOut when it names a bucket, else None (a local folder)."""
    if isinstance(out, BucketOut):
        return out
    return BucketOut(str(out)) if is_remote(out) else None


# ------------------------------------------------------------------------------------------- staging
def clear_staging(path: Path) -> None:
    """Remove a staging folder of an earlier run (only a folder holding what a cache holds: anything else there
    is refused, never deleted)."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise CacheError(f"{path} is in the way of the staging folder (a link or a file): remove it, or give "
                         f"another --staging")
    root = real_root(path)
    entries = os.listdir(root)
    if any(e not in STORE_ENTRIES and not ZARR_PARTIAL.fullmatch(e) for e in entries):
        raise CacheError(f"{path} holds files that are no part of a cache: remove it, or give another --staging")
    for e in entries:
        remove_inside(root, os.path.join(root, e))
    os.rmdir(root)


def _plain(url: str, key: str) -> list[str]:
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RemoteError(f"{url}: an object is named {key!r}; no cache of cachefeat's holds such a name")
    return parts


def _per_shard(array: str) -> bool:
    """An array each shard fills its own chunk of (besides the shard files): per-clip results, per-video results,
    records and flags."""
    return f"{array}/".startswith(PER_SHARD) or (array.startswith("clips/") and array not in CLIP_TABLES)


def _sharded(doc: dict) -> bool:
    """An array whose chunks are shard files (the feature and pixel arrays): never pulled into staging."""
    codecs = doc.get("codecs") if isinstance(doc, dict) else None
    return isinstance(codecs, list) and any(isinstance(c, dict) and c.get("name") == "sharding_indexed"
                                            for c in codecs)


def bucket_state(loc: Location) -> tuple[dict[str, int], dict[str, dict]]:
    """The prefix's objects (key -> size, the lease left out) and its zarr.json documents (folder -> JSON)."""
    objects = list_objects(loc)
    objects.pop(LEASE_KEY, None)
    doc_keys = [k for k in objects if k.split("/")[-1] == "zarr.json"]
    for k in doc_keys:
        _plain(loc.url, k)
    blobs = get_bounded_all(loc, {k: MAX_ROOT_DOC if k == "zarr.json" else MAX_ARRAY_DOC for k in doc_keys})
    docs = {}
    for key, blob in blobs.items():
        try:
            docs[key[: -len("zarr.json")].rstrip("/")] = json.loads(blob)
        except ValueError:
            raise RemoteError(f"{loc.url}/{key} is not JSON: not a cache cachefeat wrote") from None
    return objects, docs


def is_unfinished_creation(objects: dict[str, int], docs: dict[str, dict]) -> bool:
    """What an extraction killed while it uploaded a new cache's documents and tables leaves: no root document,
    and nothing but documents and chunks of arrays that are no shard files (a push cut off leaves data)."""
    if "" in docs:
        return False
    for key in objects:
        if key.split("/")[-1] == "zarr.json":
            continue
        array = key.split("/c/", 1)[0] if "/c/" in key else None
        if array is None or array not in docs or _sharded(docs[array]):
            return False
    return True


def pull(loc: Location, objects: dict[str, int], docs: dict[str, dict], staging: Path,
         shard_state: bool = True) -> None:
    """Write into the (new) folder `staging` the bucket cache's documents and every chunk of its arrays that are
    no shard files: with `shard_state`, also the per-shard tables, records and flags (what the writer resumes
    from); without, only what the cache held when it was made (a Ray worker's staging). Each object is read
    whole, bounded in size, and lands inside `staging` only."""
    keep = []
    for key in objects:
        array = key.split("/c/", 1)[0] if "/c/" in key else None
        if array is not None and (array not in docs or _sharded(docs[array])):
            continue
        if array is not None and not shard_state and _per_shard(array):
            continue
        keep.append(key)
    staging.mkdir()
    real = os.path.realpath(staging)

    async def fetch_all():
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(key):
            async with gate:
                blob = await get_bounded_async(loc, key, MAX_OBJECT)
            where = os.path.join(real, *_plain(loc.url, key))
            os.makedirs(os.path.dirname(where), exist_ok=True)
            with open(where, "xb") as f:          # (a key twice, or one through a link: refused)
                f.write(blob)
        await asyncio.gather(*(one(k) for k in keep))
    try:
        run_sync(fetch_all())
    except FileNotFoundError as e:
        raise RemoteError(f"{loc.url}: {e}; the cache changed while it was read (another writer? --break-lease "
                          f"was used?)") from None
    except (OSError, ValueError) as e:
        raise RemoteError(f"{loc.url}: its keys do not form a tree of folders and files ({e})") from None


def upload_created(cache, loc: Location, log) -> None:
    """Upload a new cache's files (documents, creation tables; no shard is written yet), the root zarr.json
    last: until it is there the prefix holds no cache."""
    files = cache_objects(cache.real)
    body = [(k, p) for k, p in files.items() if k != "zarr.json"]
    run_sync(_put_all(loc, body, lambda key: None))
    root = os.path.join(cache.real, "zarr.json")
    run_sync(_put_all(loc, [("zarr.json", root)], lambda key: None))
    log(f"{loc.url}: created ({len(files)} objects); each shard goes up as it is written")


# ------------------------------------------------------------------------------------------- shards
def shard_keys(cache, shard: int) -> tuple[list[str], list[str]]:
    """The keys of the objects shard `shard` writes (writer.write_shard): (its data: every row array's block and
    the blocks of the per-video tables it fills, [its record, its flag])."""
    layout = cache.layout

    def key(name: str, index: int) -> str:
        arr = cache.root[name]
        return f"{name}/{arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))}"
    data = [key(name, shard) for name in layout.row_arrays()]
    vids = layout.shard_videos_range(shard)
    if vids.stop > vids.start:
        for name in SHARD_VIDEO_TABLES:
            chunk = layout.video_chunk(name)
            data += [key(name, b) for b in range(vids.start // chunk, -(-vids.stop // chunk))]
    commit = ([key(RECORD, shard)] if cache.has_records else []) + [key("progress", shard)]
    return data, commit


def upload_shard(cache, loc: Location, shard: int) -> int:
    """Put shard `shard`'s objects in the bucket, its flag last, then delete its shard files from the staging
    folder; returns the bytes uploaded. A chunk zarr did not store (all fill values) is deleted in the bucket,
    where an earlier, killed attempt at the shard may have left one."""
    data, commit = shard_keys(cache, shard)
    local = {k: os.path.join(cache.real, *k.split("/")) for k in data + commit}
    there = [k for k in data if os.path.isfile(local[k])]
    run_sync(_put_all(loc, [(k, local[k]) for k in there], lambda key: None))
    delete(loc, [k for k in data if k not in there])
    for k in commit:                        # the record, then the flag: each only once all before it is there
        run_sync(_put_all(loc, [(k, local[k])], lambda key: None))
    nbytes = sum(os.path.getsize(local[k]) for k in there + commit)
    for name in cache.layout.row_arrays():
        f = cache.shard_file(name)
        if f is not None and os.path.isfile(f.path(shard)):
            os.unlink(f.path(shard))       # in the bucket now: the staging folder keeps only small files
    return nbytes


def abort_unfinished_uploads(loc: Location, log) -> None:
    """Abort the multipart uploads a killed run left under the prefix (their parts are billed until aborted).
    obstore cannot list them; boto3 can, when it is installed (it reads the same AWS_* variables)."""
    from .remote import boto3_client, remote_error
    s3 = boto3_client()
    if s3 is None:
        log(f"{loc.url}: boto3 is not installed, so parts of uploads a killed run left are not aborted (a bucket "
            f"lifecycle rule, AbortIncompleteMultipartUpload, removes them)")
        return
    under = f"{loc.prefix}/" if loc.prefix else ""
    try:
        pages = s3.get_paginator("list_multipart_uploads").paginate(Bucket=loc.bucket, Prefix=under)
        left = [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]
        for k, upload in left:
            s3.abort_multipart_upload(Bucket=loc.bucket, Key=k, UploadId=upload)
    except Exception as e:
        raise remote_error(loc, under, e) from None
    if left:
        log(f"{loc.url}: aborted {len(left)} unfinished upload{'s' * (len(left) != 1)} of a killed run")


# ------------------------------------------------------------------------------------------- a run
class BucketRun:
    """One writer's hold on a bucket prefix for writer.open_for_writing: the lease, and the staging folder made
    from what the bucket holds (`path`, to be opened for writing as a local cache); `created(cache)` uploads a
    new cache's files, `shard_done(cache, shard)` each shard, `close()` removes the staging folder and releases
    the lease."""

    def __init__(self, out: BucketOut, overwrite: bool, repair: bool, log):
        if repair:
            raise CacheError(f"--repair mends a local cache; for {out.url}, `cachefeat verify` names the damaged "
                             f"clips: extract again with --overwrite, or push a sound local copy")
        self.out, self.location, self._log = out, out.location, log
        loc = self.location
        self.lease = Lease.acquire(loc, out.break_lease, warn=lambda line: log(f"warning: {line}"), command="extract")
        self.path = None
        try:
            self.path = out.staging_dir("driver")
            clear_staging(self.path)
            objects, docs = bucket_state(loc)
            if objects and "" not in docs and not is_unfinished_creation(objects, docs):
                raise CacheError(f"{loc.url} holds objects but no cache's root document (a `cachefeat push` that "
                                 f"did not finish, or no cache at all): extract to a prefix of its own, or finish "
                                 f"that push")
            if "" in docs and ATTR not in (docs[""].get("attributes") or {}):
                raise CacheError(f"{loc.url} holds a Zarr store cachefeat did not write: extract to a prefix of its "
                                 f"own")
            if overwrite or "" not in docs:      # a new cache (an unfinished creation's objects go first)
                delete(loc, sorted(objects))
                objects = {}
            abort_unfinished_uploads(loc, log)
            if objects:
                pull(loc, objects, docs, self.path)
        except BaseException:
            self.close(failed=True)
            raise
        self.new = not objects

    def say(self, line) -> None:
        """A line of the local writer, naming the URL the user gave instead of the staging folder."""
        self._log(self.named(str(line)))

    def named(self, text: str) -> str:
        return text.replace(str(self.path), self.location.url)

    def created(self, cache) -> None:
        if self.new:
            upload_created(cache, self.location, self._log)

    def shard_done(self, cache, shard: int) -> None:
        """Upload the shard just written (called by the writer thread, before it writes the next shard)."""
        self.lease.check()
        upload_shard(cache, self.location, shard)

    def view(self):
        """The cache as the bucket holds it now (what the bucket has flagged is what is done)."""
        from .reader import RemoteCache
        return RemoteCache(self.location.url)

    def close(self, failed: bool = False) -> None:
        """Remove the staging folder, release the lease. When the run `failed` (the server gone, say), a lease
        that cannot be released is left to expire: the run's own error is the one to report."""
        try:
            if self.path is not None and os.path.lexists(self.path):
                clear_staging(self.path)
        finally:
            try:
                self.lease.release()
            except Exception:
                if not failed:
                    raise
