"""A pool of decode worker processes that a hung or crashing decoder cannot take down.

Each worker is a separate (spawned) process that runs video.decode_video on one request at a time. The
parent watches every worker: a request that runs past `timeout` seconds gets its worker killed and is
recorded as a `timeout` failure; a worker that dies (a segfault in a decoder) is recorded as a `crash`.
Either way a fresh worker takes its place and the pool goes on. A worker dies with its parent, however the
parent dies. Results come back in completion order.
A worker's clock starts when it reports ready (interpreter start-up and imports can take seconds on a
busy machine and are not the decoder's time); the pool's constructor waits for its first workers, so the
pipeline's own time starts with decoders that can decode.

workers=0 decodes inline in the calling process: no isolation and no timeout, for debugging only.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import wait

from .video import DecodeRequest, DecodeResult, decode_video

_READY = "ready"
_START_TIMEOUT = 300.0   # seconds a new worker may take to import and report ready


def _die_with_parent(parent: int) -> None:
    """A decode worker must not outlive the process it decodes for (a SIGKILLed extract would otherwise
    leave a worker stuck in a decoder behind). On Linux the kernel kills it when its parent dies
    (PR_SET_PDEATHSIG); everywhere, a thread also checks for a new parent every second (for a decoder that
    does not hold the GIL while it hangs, and for platforms without prctl)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="cachefeat-parent-watch", daemon=True).start()


def _worker_main(conn, parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    # Workers never handle Ctrl-C themselves: the parent decides when the run stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conn.send(_READY)
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        t0 = time.perf_counter()
        res = decode_video(req)
        res.seconds = time.perf_counter() - t0
        try:
            conn.send(res)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, os.getpid()), daemon=True, name="cachefeat-decode")
        self.proc.start()
        child.close()
        self.request: DecodeRequest | None = None
        self.started = 0.0
        self.ready = False

    def take_ready(self) -> None:
        """Consume the worker's ready message; a request sent meanwhile starts its clock now."""
        assert self.conn.recv() == _READY
        self.ready = True
        self.started = time.monotonic()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class DecodePool:
    def __init__(self, workers: int = 2, timeout: float = 60.0, start_method: str = "spawn"):
        self.timeout = float(timeout)
        self._queue: deque[DecodeRequest] = deque()
        self._ready: deque[DecodeResult] = deque()
        self._ctx = mp.get_context(start_method)
        self._workers = [_Worker(self._ctx) for _ in range(max(0, workers))]
        self.restarts = 0
        self._wait_ready(self._workers)

    def _wait_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        waiting = list(workers)
        while waiting:
            left = deadline - time.monotonic()
            ready = set(wait([w.conn for w in waiting] + [w.proc.sentinel for w in waiting], timeout=max(left, 0)))
            for w in list(waiting):
                if w.conn in ready:
                    try:
                        w.take_ready()
                        waiting.remove(w)
                        continue
                    except (EOFError, OSError):
                        pass
                if w.conn in ready or w.proc.sentinel in ready:
                    raise RuntimeError(f"a decode worker process died while starting (exit code {w.proc.exitcode})")
            if waiting and time.monotonic() >= deadline:
                raise RuntimeError(f"{len(waiting)} decode worker processes did not start within {_START_TIMEOUT:g} s")

    # -- feeding
    def submit(self, req: DecodeRequest) -> None:
        self._queue.append(req)
        self._dispatch()

    @property
    def in_flight(self) -> int:
        """Requests submitted whose result has not been returned by get()."""
        busy = sum(w.request is not None for w in self._workers)
        return len(self._queue) + busy + len(self._ready)

    def _dispatch(self) -> None:
        for w in self._workers:
            if w.request is None and self._queue:
                req = self._queue.popleft()
                try:
                    w.conn.send(req)
                except (BrokenPipeError, OSError):  # died while idle: replace it and retry the request
                    self._queue.appendleft(req)
                    self._replace(w)
                    continue
                w.request, w.started = req, time.monotonic()   # restarted by take_ready if not ready yet

    # -- collecting
    def get(self, timeout: float | None = None) -> DecodeResult | None:
        """The next finished result, or None if none finished within `timeout` seconds (None = wait)."""
        if not self._workers:
            if self._ready:
                return self._ready.popleft()
            return decode_video(self._queue.popleft()) if self._queue else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            busy = [w for w in self._workers if w.request is not None]
            if not busy:
                return None
            now = time.monotonic()
            # a replacement worker still starting has no clock yet: only its start-up limit applies
            next_kill = min(w.started + (self.timeout if w.ready else _START_TIMEOUT) for w in busy)
            wait_for = next_kill - now
            if deadline is not None:
                wait_for = min(wait_for, deadline - now)
            handles = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            ready = set(wait(handles, timeout=max(wait_for, 0.0)))
            for w in busy:
                if w.conn in ready and not w.ready:
                    try:
                        w.take_ready()
                        continue
                    except (EOFError, OSError):
                        pass  # died while starting: a crash, below
                if w.conn in ready:
                    try:
                        res = w.conn.recv()
                        w.request = None
                        self._ready.append(res)
                        continue
                    except (EOFError, OSError):
                        pass  # died mid-send: treated as a crash below
                if w.conn in ready or w.proc.sentinel in ready:
                    if w.request is not None and not w.proc.is_alive():
                        code = w.proc.exitcode
                        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                        self._fail(w, "crash", f"the decoder process died ({why})")
                elif w.request is not None and w.ready and time.monotonic() - w.started > self.timeout:
                    self._fail(w, "timeout", f"decoding took longer than {self.timeout:g} s and was killed")
                elif w.request is not None and not w.ready and time.monotonic() - w.started > _START_TIMEOUT:
                    self._fail(w, "crash", f"the decoder process did not start within {_START_TIMEOUT:g} s")
            self._dispatch()
            if deadline is not None and time.monotonic() >= deadline and not self._ready:
                return None
        return self._ready.popleft()

    def _fail(self, w: _Worker, stage: str, message: str) -> None:
        req = w.request
        self._ready.append(DecodeResult(req.key, stage=stage, error=message,
                                        seconds=time.monotonic() - w.started))
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        i = self._workers.index(w)
        self._workers[i] = _Worker(self._ctx)
        self.restarts += 1

    # -- lifetime
    def close(self) -> None:
        for w in self._workers:
            try:
                if w.request is None:
                    w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self._workers:
            if w.request is not None:
                w.kill()
            else:
                w.proc.join(timeout=2)
                w.kill()
        self._workers = []

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))
