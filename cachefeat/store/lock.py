"""One writer per store: an exclusive lock file inside the store naming its holder (host, pid)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .layout import LOCK_NAME, CacheError


class StoreLock:
    """One writer per store: an exclusive lock file inside the store naming its holder (host, pid).
    A lock left by a dead process on this host is taken over; a live holder makes acquire() fail."""

    def __init__(self, store: str | os.PathLike):
        self.path = Path(store) / LOCK_NAME
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def active_holder(self) -> dict | None:
        """The holder if a live process (or one on another host) holds the lock, else None. A lock file
        that cannot be parsed yet is being written by its holder, so it counts as held."""
        if not self.path.exists():
            return None
        h = self.holder()
        if h is None:
            return {} if self.path.exists() else None
        return None if self._stale(h) else h

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is None and self._age() < 5.0:  # its writer may not have filled it in yet
                    time.sleep(0.5)
                    continue
                if h is None or self._stale(h):
                    self._remove_stale()
                    continue
                raise CacheError(f"{self.path.parent} is being written by another cachefeat process "
                                 f"(pid {h.get('pid')} on {h.get('host')}, since {h.get('since')}); "
                                 f"wait for it, or stop it first") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise CacheError(f"could not take the lock {self.path}")

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    @staticmethod
    def _stale(h: dict) -> bool:
        if h.get("host") != socket.gethostname():
            return False  # cannot see another machine's processes: assume alive
        pid = int(h.get("pid", -1))
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _is_zombie(pid)

    def _remove_stale(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
