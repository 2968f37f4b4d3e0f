"""A local copy of the shard objects read from a bucket (`train` / `eval --local-cache DIR`, or `use(DIR)` from
Python): the first read of a shard object streams the whole object into DIR, and every later read of it (the next
epochs, another run, an eval beside a train) reads that file as a local cache's shard file is read
(store.reader.RemoteShardFile), with the same checks: each chunk's CRC32C and the shard's checksum record.

- Names: a copy is named by the SHA-256 of (endpoint, bucket URL, key, size, ETag) of its object, so an
  object replaced in the bucket (a new push) is a new name and a stale copy is never read; the GET that fetches
  it is conditional on that ETag (If-Match). Objects without an ETag are read from the bucket.
- Writing: streamed in STREAM_BYTES pieces into a temporary file of DIR (`.NAME.SIZE.PID.N.tmp`), renamed to
  its name once it holds the object's bytes. A copy that fails a check is deleted and fetched again, once.
- Size bound: the regular files of DIR (copies, temporary files counted at their final size, anything else
  there) are kept under `max_bytes` by deleting the least recently used copies (each read touches its mtime)
  before a new one is fetched; an object larger than the bound is read from the bucket. The bookkeeping holds
  an flock on DIR/.lock, so processes sharing DIR (a train and an eval) keep one bound; a copy another process
  is reading may be deleted (its open descriptor stays valid).
- Confinement: DIR itself must be a folder (not a link), writable; every file is opened relative to DIR's
  descriptor without following links, and nothing outside DIR is written or deleted.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import stat
import sys
import threading
import time
import weakref
from contextlib import contextmanager

from .layout import CacheError
from .remote import IN_FLIGHT, Location, remote_error, run_sync

STREAM_BYTES = 4 << 20       # a piece of an object on its way to disk: what one download holds in memory
STALE_SECONDS = 600          # a temporary file untouched this long was left by a process that died
DEFAULT_SHARE = 0.8          # the default bound: this share of the free space of DIR plus what DIR holds
LOCK_NAME = ".lock"
_COPY = re.compile(r"[0-9a-f]{64}")
_TEMP = re.compile(r"\.[0-9a-f]{64}\.(\d+)\.\d+\.\d+\.tmp")     # .NAME.SIZE.PID.N.tmp
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC


class LocalCopyError(CacheError):
    """A local-copy folder that cannot be used (exit status 2)."""


class LocalCopy:
    """The local copy in `folder`, at most `max_bytes` (default: DEFAULT_SHARE of the free space of its file
    system plus what it holds already). The folder is made when it does not exist."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int | None = None):
        self.folder = os.path.abspath(os.fspath(folder))
        self.fd = _open_folder(self.folder)
        weakref.finalize(self, os.close, self.fd)
        try:                                      # writable: the lock file is made (or opened) here
            os.close(os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN, 0o644, dir_fd=self.fd))
        except OSError as e:
            why = "is a link" if e.errno == errno.ELOOP else f"cannot be written ({e.strerror})"
            raise LocalCopyError(f"--local-cache {self.folder}: {LOCK_NAME} there {why}; give a folder of its own "
                                 f"that this user can write to") from None
        self.requested = max_bytes                # as asked: None is each node's own default (worker_settings)
        if max_bytes is None:
            st = os.statvfs(self.fd)
            max_bytes = int(DEFAULT_SHARE * (st.f_bavail * st.f_frsize + self.held_bytes()))
        if int(max_bytes) < 1:
            raise LocalCopyError(f"--local-cache-size {max_bytes}: at least one byte")
        self.max_bytes = int(max_bytes)
        self.failed: str | None = None            # a write that failed here: no more copies are made
        self._lock = threading.Lock()             # (the flock excludes other processes; this, other threads)
        self._count = itertools.count()

    def describe(self) -> str:
        from ..fmt import human_bytes
        return (f"local copy of fetched shards: {self.folder}, at most {human_bytes(self.max_bytes)} "
                f"({human_bytes(self.held_bytes())} held now)")

    @staticmethod
    def name(loc: Location, key: str, size: int, e_tag: str) -> str:
        """The copy's file name: one object's version, whatever else shares DIR."""
        what = [os.environ.get("AWS_ENDPOINT_URL", ""), loc.url, key, int(size), e_tag]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    # -- reading
    def get(self, loc: Location, wanted: list[tuple[str, int, str]]) -> list[tuple[int | None, str]]:
        """(descriptor or None, name) of the copy of each (key, size, ETag): the copy in DIR, else the object
        fetched now (several at once); None where it is to be read from the bucket (larger than the bound, no
        room, or changed since it was listed)."""
        names = [self.name(loc, k, n, e) for k, n, e in wanted]
        fds = [self.open(name, n) for name, (_, n, _) in zip(names, wanted)]
        todo = [i for i, fd in enumerate(fds) if fd is None and wanted[i][1] <= self.max_bytes]
        if todo and not self.failed:
            got = run_sync(self._fetch_all(loc, [(*wanted[i], names[i]) for i in todo]))
            for i, fd in zip(todo, got):
                fds[i] = fd
        return list(zip(fds, names))

    def again(self, loc: Location, key: str, size: int, e_tag: str, name: str) -> int | None:
        """A copy that failed a check deleted and fetched once more (its descriptor, or None)."""
        self.discard(name)
        if self.failed or size > self.max_bytes:
            return None
        return run_sync(self._fetch_all(loc, [(key, size, e_tag, name)]))[0]

    def open(self, name: str, size: int) -> int | None:
        """A descriptor of copy `name` when DIR holds it whole (`size` bytes; its mtime touched), else None
        (a file of another size, or a link or other non-file planted there, is deleted)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                self.discard(name)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            os.close(fd)
            self.discard(name)
            return None
        try:
            os.utime(fd)                          # most recently used
        except OSError:
            pass
        return fd

    def discard(self, name: str) -> None:
        """Delete `name` from DIR (a link as a link); what cannot be deleted (a folder) stays, and is never read."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            pass

    def held_bytes(self) -> int:
        """Bytes of DIR's regular files (temporary files at their final size)."""
        return sum(n for _, n, _, _ in self._entries())

    # -- fetching
    async def _fetch_all(self, loc: Location, items: list[tuple[str, int, str, str]]) -> list[int | None]:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(item):
            async with gate:
                return await self._fetch(loc, *item)
        return await asyncio.gather(*(one(item) for item in items))

    async def _fetch(self, loc: Location, key: str, size: int, e_tag: str, name: str) -> int | None:
        """Object `key` streamed into DIR as copy `name`; its descriptor, or None (read it from the bucket)."""
        import obstore
        from obstore.exceptions import NotFoundError, PreconditionError
        reserved = self._reserve(name, size)
        if reserved is None:
            return None
        fd, tmp = reserved
        done = False
        try:
            try:
                res = await obstore.get_async(loc.store, key, options={"if_match": e_tag})
                if int(res.meta["size"]) != size:
                    return None
                written = 0
                async for piece in res.stream(min_chunk_size=STREAM_BYTES):
                    written += len(piece)
                    if written > size:
                        return None
                    if not self._write(fd, piece):
                        return None
            except (PreconditionError, NotFoundError, FileNotFoundError):
                return None                       # changed or deleted since it was listed: the bucket says what
            except Exception as e:
                raise remote_error(loc, key, e) from None
            if written != size:
                return None
            os.close(fd)
            fd = None
            try:
                with self._locked():
                    os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except OSError as e:
                self._cannot_write(e)
                return None
            done = True
        finally:
            if fd is not None:
                os.close(fd)
            if not done:
                self.discard(tmp)
        return self.open(name, size)

    def _write(self, fd: int, piece: bytes) -> bool:
        view = memoryview(piece)
        try:
            while view.nbytes:
                view = view[os.write(fd, view):]
        except OSError as e:
            self._cannot_write(e)
            return False
        return True

    def _cannot_write(self, e: OSError) -> None:
        """No more copies are made (one line says why): what DIR does not hold is read from the bucket."""
        if not self.failed:
            self.failed = e.strerror or str(e)
            print(f"cachefeat: the local copy in {self.folder} cannot be written ({self.failed}): what it does not "
                  f"hold is read from the bucket", file=sys.stderr)

    def _reserve(self, name: str, size: int) -> tuple[int, str] | None:
        """Room for `size` bytes more (least recently used copies deleted), taken by a new temporary file:
        (its descriptor, its name), or None when there is no room even then."""
        with self._locked():
            entries = self._entries()
            total = sum(n for _, n, _, _ in entries)
            if total + size > self.max_bytes:
                for entry, n, _, _ in sorted((e for e in entries if e[3]), key=lambda e: e[2]):
                    self.discard(entry)
                    total -= n
                    if total + size <= self.max_bytes:
                        break
            if total + size > self.max_bytes:
                return None
            tmp = f".{name}.{size}.{os.getpid()}.{next(self._count)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, 0o644, dir_fd=self.fd)
            except OSError as e:
                self._cannot_write(e)
                return None
            return fd, tmp

    def _entries(self) -> list[tuple[str, int, float, bool]]:
        """(name, bytes, mtime, is a copy) of every regular file of DIR; temporary files left by a dead process
        (untouched for STALE_SECONDS) are deleted."""
        out, now = [], time.time()
        with os.scandir(self.fd) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                temp = _TEMP.fullmatch(entry.name)
                if temp and st.st_mtime < now - STALE_SECONDS:
                    self.discard(entry.name)
                    continue
                size = max(st.st_size, int(temp.group(1))) if temp else st.st_size
                out.append((entry.name, size, st.st_mtime, bool(_COPY.fullmatch(entry.name))))
        return out

    @contextmanager
    def _locked(self):
        """This process's threads and other processes sharing DIR, one at a time (an flock of DIR/.lock, opened
        for each hold: a forked child shares no lock with its parent)."""
        with self._lock:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN, 0o644, dir_fd=self.fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)


def _open_folder(folder: str) -> int:
    """A descriptor of `folder` (made when missing), refused in one line when it is a link or no folder."""
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        pass                                      # (a file or a link there: said below)
    except OSError as e:
        raise LocalCopyError(f"--local-cache {folder}: cannot be made ({e.strerror})") from None
    try:
        st = os.lstat(folder)
    except OSError as e:
        raise LocalCopyError(f"--local-cache {folder}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise LocalCopyError(f"--local-cache {folder} is a symbolic link: give the folder itself (a local copy "
                             f"never follows links)")
    if not stat.S_ISDIR(st.st_mode):
        raise LocalCopyError(f"--local-cache {folder} is not a folder")
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
    except OSError as e:
        raise LocalCopyError(f"--local-cache {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        os.close(fd)
        raise LocalCopyError(f"--local-cache {folder} is not writable by this user")
    return fd


def listing(loc: Location, under: str) -> dict[str, tuple[int, str | None]]:
    """key -> (size, ETag) of every object under `under` (what names the copies)."""
    import obstore
    out = {}
    try:
        for batch in obstore.list(loc.store, prefix=under or None, chunk_size=1000):
            for meta in batch:
                out[meta["path"]] = (int(meta["size"]), meta.get("e_tag"))
    except Exception as e:
        raise remote_error(loc, under, e) from None
    return out


# ------------------------------------------------------------------------------------------- the setting
_current: LocalCopy | None = None


def use(folder: str | os.PathLike, max_bytes: int | None = None) -> LocalCopy:
    """From now on, this process reads the shard objects of bucket caches through a local copy in `folder`, at
    most `max_bytes` (default: DEFAULT_SHARE of its file system's free space plus what it holds). LocalCopyError
    (one line) for a folder that is a link, no folder, or not writable. Caches in folders are not affected."""
    global _current
    _current = LocalCopy(folder, max_bytes)
    return _current


def off() -> None:
    """Read bucket caches from the bucket only again (what DIR holds stays there)."""
    global _current
    _current = None


def current() -> LocalCopy | None:
    return _current
