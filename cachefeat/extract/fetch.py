"""Videos in an object store: a manifest line may name `s3://bucket/key`; the decode worker that decodes it
fetches it (docs/object-storage.md, "Videos in a bucket").

The object's size and ETag come from a HEAD request: at most MAX_VIDEO_BYTES, and no more than the folder
has free, or it is refused unread. Its bytes then come in ranged GETs of PART_BYTES (each conditional on the
ETag), each streamed in pieces of CHUNK_BYTES into a temporary file (the decode pool's folder, FETCH_DIR, which
the pool removes when it closes: a worker killed mid-fetch leaves nothing behind; else the system's temporary
folder), decoded there by the local readers, and removed however the decode ends. A worker's memory holds one
piece at a time, never the video; its disk, one video.

A request that fails in a way that may pass (the server unreachable, a connection cut mid-body) is tried again
from where the file ends, FETCH_ATTEMPTS times in a row at most, FETCH_BACKOFF seconds apart and doubling, on
top of obstore's own retries (store/remote.py: 3 per request); then, as a broken file is, the video is recorded
as a failure: stage `missing` for an object that does not exist, `fetch` for everything else (access denied, a
missing bucket, the server gone, too large). The store is made in the process that fetches (obstore's client
does not survive a fork), once per process, bucket and AWS_* settings.

fps sampling plans from every video's duration before extracting: the driver reads a bucket video's header
through ObjectFile, a few ranged GETs of BLOCK_BYTES (its start, and its end where the container keeps its
index there); the whole object only for a container whose headers state no duration (its packets are then
read, as for a local file), a block at a time.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import time
from collections import OrderedDict
from contextlib import contextmanager

CHUNK_BYTES = 4 << 20          # bytes per piece of a streamed object: what a worker holds of it at once
PART_BYTES = 64 << 20          # bytes per ranged GET: each request short (the client's timeout covers a whole
                               # request, store/remote.py), and a cut-off fetch resumes at the part it was in
MAX_VIDEO_BYTES = 64 << 30     # a video object larger than this is refused unread (a 2-hour 4K film: ~50 GB)
BLOCK_BYTES = 64 << 10         # one ranged GET of a video's header (ObjectFile): PyAV reads 32 KiB at a time and
                               # a container's index is at its start or its end, so a probe reads a few blocks
KEEP_BLOCKS = 8                # blocks an ObjectFile holds at once
FETCH_ATTEMPTS = 3
FETCH_BACKOFF = 0.5            # seconds before the second attempt, doubled before each next one
FETCH_DIR: str | None = None   # set in decode workers (decode_pool.py): the pool's own temporary folder (its
                               # name; made by the first fetch)

_STORES: dict[tuple, object] = {}    # (pid, bucket, AWS_* settings) -> Location made in this process
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")


class FetchError(Exception):
    """A video that cannot be fetched: `stage` (missing or fetch) and a one-line message, as video.DecodeError
    (which decode_video makes of it)."""
    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage, self.message = stage, message


def _location(bucket: str):
    """The bucket's Location made in this process (its store is then made here too, never inherited), again
    when the AWS_* settings changed."""
    from ..store.remote import Location
    key = (os.getpid(), bucket, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if key not in _STORES:
        _STORES[key] = Location(bucket, "")
    return _STORES[key]


@contextmanager
def fetched(url: str):
    """The local path of object `url`, fetched into a temporary file removed on leaving; FetchError (stage
    `missing` or `fetch`, one line) when it cannot be fetched."""
    loc, key = _object(url)
    m = _SUFFIX.fullmatch(os.path.splitext(key)[1])
    folder = _pool_folder()
    fd, path = tempfile.mkstemp(prefix="cachefeat-fetch-", suffix=m.group().lower() if m else "", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            _fetch_into(url, loc, key, f, os.path.dirname(path))
        yield path
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _object(url: str):
    """(the bucket's Location made in this process, the object's key) of `url`; FetchError when it names none."""
    from ..store.remote import RemoteError, parse_url
    try:
        loc = parse_url(url)
    except RemoteError as e:
        raise FetchError("fetch", str(e)) from None
    if not loc.prefix:
        raise FetchError("fetch", f"{url}: names a bucket, not a video in it")
    return _location(loc.bucket), loc.prefix


class ObjectFile(io.RawIOBase):
    """Object `url` as a read-only, seekable file, read in ranged GETs of BLOCK_BYTES (each conditional on the
    ETag its HEAD gave), the last KEEP_BLOCKS kept: what fps sampling's probe opens a video's header through
    (video.probe), without fetching the video. Requests are tried again as fetched()'s are; FetchError (one
    line, stage `missing` or `fetch`) when the object cannot be read or changes meanwhile."""

    def __init__(self, url: str):
        super().__init__()
        import obstore
        self.url = url
        self.loc, self.key = _object(url)
        meta = self._request(lambda: obstore.head(self.loc.store, self.key))
        self.size, self.e_tag = int(meta["size"]), meta.get("e_tag")
        _check_size(url, self.size)
        self.pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"seek to {base + offset}: before the start")
        self.pos = base + offset
        return self.pos

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        index, offset = divmod(self.pos, BLOCK_BYTES)
        block = self._block(index)
        n = min(len(buf), len(block) - offset)
        memoryview(buf).cast("B")[:n] = block[offset:offset + n]
        self.pos += n
        return n

    def _block(self, index: int) -> bytes:
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return self._blocks[index]
        import obstore
        start = index * BLOCK_BYTES
        end = min(self.size, start + BLOCK_BYTES)
        options = {"range": (start, end), **({"if_match": self.e_tag} if self.e_tag else {})}

        def get():
            data = bytes(obstore.get(self.loc.store, self.key, options=options).bytes())
            if len(data) != end - start:
                raise _Short(f"{len(data):,} of {end - start:,} bytes arrived")
            return data
        self._blocks[index] = self._request(get)
        if len(self._blocks) > KEEP_BLOCKS:
            self._blocks.popitem(last=False)
        return self._blocks[index]

    def _request(self, fn):
        from obstore.exceptions import PreconditionError
        failed = 0
        while True:
            try:
                return fn()
            except FetchError:
                raise
            except _Short as e:
                last = str(e)
            except PreconditionError:
                raise FetchError("fetch", f"{self.url}: the object changed while its header was read") from None
            except Exception as e:
                last = _retryable(self.url, self.loc, self.key, e)
            failed += 1
            _give_up_after(self.url, failed, last)


def _pool_folder() -> str | None:
    """FETCH_DIR, made on the first fetch (a pool that decodes only local files makes no folder); None (the
    system's temporary folder) when it is not a folder of this user's."""
    if not FETCH_DIR:
        return None
    try:
        os.mkdir(FETCH_DIR, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(FETCH_DIR)
    return FETCH_DIR if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() else None


def _fetch_into(url: str, loc, key: str, f, folder: str) -> None:
    """Write the object into the open file `f`: its size and ETag from a HEAD request, then ranged GETs of
    PART_BYTES, each streamed in pieces and conditional on that ETag (an object replaced meanwhile is fetched
    again from its start). A request that fails in a way that may pass (the server unreachable, the body cut
    short) is tried again from where the file ends, FETCH_ATTEMPTS times in a row at most."""
    import obstore
    from obstore.exceptions import PreconditionError
    size, e_tag, pos = None, None, 0
    failed, last = 0, ""
    while size is None or pos < size:
        try:
            if size is None:
                meta = obstore.head(loc.store, key)
                size, e_tag = int(meta["size"]), meta.get("e_tag")
                _check_size(url, size, folder)
                continue
            n = min(PART_BYTES, size - pos)
            options = {"range": (pos, pos + n)}
            if e_tag:
                options["if_match"] = e_tag
            _stream_range(url, obstore.get(loc.store, key, options=options), f, n)
            pos += n
            failed = 0
            continue
        except FetchError:
            raise
        except _Short as e:
            last = str(e)
        except PreconditionError:            # the object was replaced while it was fetched: from its start
            size, pos, last = None, 0, "the object changed while it was fetched"
        except Exception as e:
            last = _retryable(url, loc, key, e)
        failed += 1
        _give_up_after(url, failed, last)
        f.seek(pos)
        f.truncate()
    f.flush()


def _retryable(url: str, loc, key: str, e: Exception) -> str:
    """The reason to try a failed request again (the server unreachable or failing); FetchError for a failure
    that would only repeat (stage `missing` for no such object; access denied, no such bucket, a bad key)."""
    from ..store.remote import RemoteUnreachable, remote_error
    err = remote_error(loc, key, e)
    if isinstance(err, FileNotFoundError):
        raise FetchError("missing", f"no such object: {url}") from None
    if not isinstance(err, RemoteUnreachable):
        raise FetchError("fetch", _one_line(err)) from None
    return _reason(str(e))


def _give_up_after(url: str, failed: int, last: str) -> None:
    """FetchError once `failed` attempts in a row have failed; else wait before the next (doubling)."""
    if failed >= FETCH_ATTEMPTS:
        where = os.environ.get("AWS_ENDPOINT_URL") or "S3"
        raise FetchError("fetch", f"{url}: the object store failed ({last}) on {FETCH_ATTEMPTS} attempts; is "
                                  f"the server at {where} up?")
    time.sleep(FETCH_BACKOFF * 2 ** (failed - 1))


class _Short(Exception):
    """A body that ended before the bytes asked for (a connection cut mid-transfer): tried again."""


def _check_size(url: str, size: int, folder: str | None = None) -> None:
    """FetchError for an object larger than a video may be, or (with `folder`) than `folder` has free."""
    if size > MAX_VIDEO_BYTES:
        raise FetchError("fetch", f"{url} is {size:,} bytes, more than a video may be ({MAX_VIDEO_BYTES:,})")
    if folder is None:
        return
    free = shutil.disk_usage(folder).free
    if size > free:
        raise FetchError("fetch", f"{url} is {size:,} bytes and {folder} has {free:,} free (set TMPDIR to a "
                                  f"folder with room)")


def _stream_range(url: str, res, f, n: int) -> None:
    """The `n` bytes of one ranged GET into `f`, CHUNK_BYTES at a time."""
    got = 0
    for piece in res.stream(min_chunk_size=CHUNK_BYTES):
        got += len(piece)
        if got > n:
            raise FetchError("fetch", f"{url}: the server sent more than the {n:,} bytes asked for")
        f.write(piece)
    if got < n:
        raise _Short(f"{got:,} of {n:,} bytes arrived")


def _reason(text: str) -> str:
    from ..store.remote import _short_reason
    return _short_reason(text)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
