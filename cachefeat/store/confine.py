"""Files inside the store only. A cache may come from elsewhere, and cachefeat never writes a link, a FIFO or a
device into one, so every file it opens, writes or deletes in a store goes through here (shard files
directly, zarr through `ConfinedStore`): a link or a special file planted in a cache is refused, never
followed, and nothing is written or deleted outside the store's folder.

- Reading: a file is opened without following a link at its last component (O_NOFOLLOW) and without
  blocking (a FIFO would wait forever), must be a regular file, and once open must lie under the store's
  real root (a link among its folders would put it elsewhere). Two system calls more than a plain open:
  what the shard file reader pays per shard file it reads (the training hot path), never per chunk.
- Writing and deleting: no folder between the store's root and the file may be a link; a link itself is
  deleted as a link (`shutil.rmtree` does not follow the links inside a tree either).

A hard link cannot be told from a file: reading one reads it, but every write replaces a file by renaming
a new one over it, and the lock file (written in place) must have one link only (lock.py).
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import stat
from pathlib import Path

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer.core import default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.storage import LocalStore

from .layout import UnsafeStore

_PROC_FD = os.path.isdir("/proc/self/fd")     # Linux: where an open descriptor really points


def real_root(path: str | os.PathLike) -> str:
    """The store's folder with every link resolved (a cache the user reaches through a link of their own is
    read where it is); files are checked to lie under it."""
    return os.path.realpath(path)


def _under(where: str, root: str) -> bool:
    return where == root or where.startswith(root.rstrip(os.sep) + os.sep)


def _name(root: str, path) -> str:
    """`path` as the message names it: relative to the store."""
    rel = os.path.relpath(os.path.abspath(path), root)
    return rel if not rel.startswith("..") else str(path)


def open_inside(root: str, path: str | os.PathLike, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file `path` under the store's real `root`, never through a link.
    FileNotFoundError (and the other OSErrors of a plain open) when it cannot be opened; UnsafeStore for
    a link, a file that is not regular, or one outside the store."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refusal(root, f"{_name(root, path)} is a symbolic link (cachefeat never writes links)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refusal(root, f"{_name(root, path)} is not a regular file")
        where = os.readlink(f"/proc/self/fd/{fd}") if _PROC_FD else os.path.realpath(path)
        if not _under(where, root):
            raise refusal(root, f"{_name(root, path)} lies outside the cache (a folder on its way is a link to "
                                f"{os.path.dirname(where)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_inside(root: str, path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a file under `root` (open_inside), refused in one line when it holds more than `limit`:
    its size is checked before anything is read."""
    fd = open_inside(root, path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise refusal(root, f"{_name(root, path)} is {size:,} bytes, more than any cache's ({limit:,})")
        parts, left = [], size
        while left > 0:
            part = os.read(fd, left)
            if not part:
                break
            parts.append(part)
            left -= len(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def read_json(root: str, path: str | os.PathLike, limit: int) -> dict:
    """A zarr.json document under `root`: at most `limit` bytes of UTF-8 JSON holding an object."""
    raw = read_inside(root, path, limit)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise refusal(root, f"{_name(root, path)} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise refusal(root, f"{_name(root, path)} holds a JSON {type(doc).__name__}, not an object")
    return doc


def check_folders(root: str, folder: str | os.PathLike) -> None:
    """Refuse to write or delete under `folder` when it is not under `root`, or when one of the folders from
    `root` down to it is a link or not a folder (those that do not exist yet are made by the writer)."""
    rel = os.path.relpath(os.path.abspath(folder), root)
    if rel == ".":
        return
    if rel.startswith(".."):
        raise refusal(root, f"{folder} is not inside the cache")
    p = root
    for part in Path(rel).parts:
        p = os.path.join(p, part)
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
            raise refusal(root, f"{_name(root, p)} is {what}, and cachefeat writes nothing through it")


def remove_inside(root: str, path: str | os.PathLike) -> None:
    """Delete a file, a link (the link, not what it points to) or a folder tree under `root`."""
    check_folders(root, os.path.dirname(os.path.abspath(path)))
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)           # removes the links inside a tree, never what they point to
    else:
        os.unlink(path)


def refusal(store, what: str) -> UnsafeStore:
    """The one message of a store refused: which store, what is wrong, what to do."""
    return UnsafeStore(f"{store}: not a cache cachefeat wrote: {what}; get the cache again from a source you trust, "
                       f"or extract it yourself")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200]}" if s else type(e).__name__


def _read_range(root: str, path: Path, byte_range) -> bytes:
    fd = open_inside(root, path)
    try:
        size = os.fstat(fd).st_size
        if byte_range is None:
            start, stop = 0, size
        elif isinstance(byte_range, RangeByteRequest):
            start, stop = byte_range.start, min(byte_range.end, size)
        elif isinstance(byte_range, OffsetByteRequest):
            start, stop = byte_range.offset, size
        elif isinstance(byte_range, SuffixByteRequest):
            start, stop = max(0, size - byte_range.suffix), size
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        start = min(start, size)
        out, pos = [], start
        while pos < stop:            # at most the file's size, whatever was asked
            part = os.pread(fd, stop - pos, pos)
            if not part:
                break
            out.append(part)
            pos += len(part)
        return b"".join(out)
    finally:
        os.close(fd)


class ConfinedStore(LocalStore):
    """zarr's LocalStore, with every read going through open_inside and every write and delete checked with
    check_folders: how cachefeat opens every store with zarr (open_group below)."""

    def __init__(self, root, *, read_only: bool = False) -> None:
        super().__init__(Path(real_root(root)), read_only=read_only)
        self._real = str(self.root)

    def _get_confined(self, key: str, prototype, byte_range):
        prototype = prototype or default_buffer_prototype()
        try:
            return prototype.buffer.from_bytes(_read_range(self._real, self.root / key, byte_range))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def get_sync(self, key, *, prototype=None, byte_range=None):
        self._ensure_open_sync()
        return self._get_confined(key, prototype, byte_range)

    async def get(self, key, prototype=None, byte_range=None):
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(self._get_confined, key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        args = [(self._get_confined, key, prototype, byte_range) for key, byte_range in key_ranges]
        return await concurrent_map(args, asyncio.to_thread, limit=None)

    def set_sync(self, key, value) -> None:
        check_folders(self._real, (self.root / key).parent)
        super().set_sync(key, value)

    async def _set(self, key, value, exclusive: bool = False) -> None:
        check_folders(self._real, (self.root / key).parent)
        await super()._set(key, value, exclusive=exclusive)

    def delete_sync(self, key) -> None:
        self._check_writable()
        remove_inside(self._real, self.root / key)

    async def delete(self, key) -> None:
        self._check_writable()
        await asyncio.to_thread(remove_inside, self._real, self.root / key)

    async def delete_dir(self, prefix) -> None:
        self._check_writable()
        remove_inside(self._real, self.root / prefix)

    async def move(self, dest_root) -> None:
        raise NotImplementedError("a cache is never moved through zarr")

    async def clear(self) -> None:
        raise NotImplementedError("a cache is never cleared through zarr (writer.remove_store)")


def open_group(path: str | os.PathLike, mode: str):
    """The store's root group, every file of it confined (ConfinedStore)."""
    import zarr
    return zarr.open_group(store=ConfinedStore(path, read_only=mode == "r"), mode=mode, zarr_format=3)
