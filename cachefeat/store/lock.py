"""One writer per store: an exclusive `flock` on a lock file inside the store, held open for the whole run.

The kernel decides who holds the lock. `flock(LOCK_EX | LOCK_NB)` succeeds for one open file at a time and
is let go when its holder closes the file or dies, however it dies (SIGKILL included). A lock file left by a
dead process is therefore simply one nobody holds: the next writer takes it with the same call that refuses
a second live writer, so two processes taking over a dead writer's lock at the same moment cannot both get
it (no process ids are probed, no stale file is removed before the lock is taken). The holder's host, pid
and start time are written inside the file only for the message a refused writer gets.

A writer that finishes removes the file while it still holds the lock, then closes it. Whoever opened the
old file just before it went may then get the lock on that removed file, so acquire() checks that the file
it locked is still the one at the path, and starts again if not.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
import weakref
from pathlib import Path

from .layout import LOCK_NAME, CacheError

_HELD: weakref.WeakSet[StoreLock] = weakref.WeakSet()
_RETRY_SECONDS = 0.05   # a reader's momentary shared lock (active_holder) must not refuse a writer
_NOTE_BYTES = 4096      # the holder's note is ~80 bytes: no more is read


class StoreLock:
    """One writer per store: an exclusive flock on `<store>/cachefeat.lock`, held until release() (or the
    holder's death); a second acquire() while it is held, from any process, raises CacheError naming the
    holder. Also a context manager."""

    def __init__(self, store: str | os.PathLike):
        self.path = Path(store) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def holder(self) -> dict | None:
        """What the lock file says of its (current or last) holder: host, pid, since; None if unreadable (a
        link, a FIFO, or more than a note: the file may come with a cache from elsewhere)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            h = json.loads(os.read(fd, _NOTE_BYTES).decode())
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if not isinstance(h, dict):
            return None
        return {k: h[k] if type(h[k]) is int else "".join(c for c in str(h[k])[:100] if c.isprintable())
                for k in ("host", "pid", "since") if k in h}    # shown in messages: no escapes, no long text

    def active_holder(self) -> dict | None:
        """The holder's note ({} if not written yet) when another process, or another StoreLock of this one,
        holds the lock now; None when nobody does (no file, or a file nobody holds: a dead writer's)."""
        if self._fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:   # no lock file (or one this user may not read, or a link: it cannot be a writer of ours)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            held = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return (self._note() or {}) if held else None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        store = self.path.parent
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create {store}: {e.strerror or e}; choose another --out") from None
        deadline = time.monotonic() + _RETRY_SECONDS
        while True:
            try:    # never through a link, and never a FIFO (a lock file may come with a cache from elsewhere)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CacheError(f"{self.path} is a symbolic link; cachefeat writes nothing through it: remove "
                                     f"it, or choose another --out") from None
                raise CacheError(f"cannot write in {store} ({e.strerror or e}); choose another --out, or make it "
                                 f"writable") from None
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:     # its holder removed it as we opened it
                os.close(fd)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:   # a hard link: truncating it would reach its twin
                os.close(fd)
                raise CacheError(f"{self.path} is not a plain file of its own (a FIFO, a device, or a hard link); "
                                 f"cachefeat writes nothing through it: remove it, or choose another --out")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                h = self._note() or {}
                raise CacheError(f"{store} is being written by another cachefeat process "
                                 f"(pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')}); "
                                 f"wait for it, or stop it first") from None
            except OSError as e:
                os.close(fd)
                raise CacheError(f"cannot lock {self.path} ({e.strerror or e}): the file system of {store} does "
                                 f"not support file locks; write the cache on a local disk") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)   # we locked a file its last holder had just removed: take the one now at the path
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise CacheError(f"cannot write in {store} ({e.strerror or e}); choose another --out") from None
        self._fd = fd
        _HELD.add(self)

    def _note(self) -> dict | None:
        """The holder's note; a holder that has just taken the lock may not have written it yet."""
        for _ in range(10):
            h = self.holder()
            if h:
                return h
            time.sleep(0.01)
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()   # while still holding the lock (see acquire)
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        # a finalizer must not raise; the explicit release() of __exit__ is where failures are reported
        try:
            self.release()
        except Exception:  # nosec B110
            pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _forget_in_child() -> None:
    """A forked child shares its parent's open lock file: it closes its copy (the parent keeps the lock),
    so the lock lives exactly as long as the process that took it."""
    for lock in list(_HELD):
        lock._close()


os.register_at_fork(after_in_child=_forget_in_child)
