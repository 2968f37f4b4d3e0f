"""A pool of decode worker processes that a hung or crashing decoder cannot take down.

Each worker is a separate (spawned) process that runs video.decode_video on one request at a time. The
parent watches every worker: a request that runs past `timeout` seconds (per minute of video, for fps
windows covering more than a minute: `limit`) gets its worker killed and is recorded as a `timeout` failure;
a worker that dies (a segfault in a decoder) is recorded as a `crash`.
Either way a fresh worker takes its place and the pool goes on. A worker dies with its parent, however the
parent dies. Results come back in completion order.
A worker's clock starts when it reports ready (interpreter start-up and imports can take seconds on a
busy machine and are not the decoder's time); the pool's constructor waits for its first workers, so the
pipeline's own time starts with decoders that can decode.

Frames travel through shared memory: each worker has DEPTH slots (shared-memory segments the pool owns)
and writes a result's arrays into the one its request names; the pipe carries only their places. A worker
holds up to DEPTH requests (the one it decodes and the next ones), so it goes on decoding while the
pipeline's thread is busy with a batch and has not yet taken its results; the slots are used in turn, and
the pool copies a result out before it names that slot again. Sending them pickled through the pipe cost
the pipeline's main thread ~0.5 ms per 1.2 MB video (the io benchmark's profile). A slot outlives its
worker: when a worker is killed (timeout) or dies (crash) mid-write, nothing is read from the slot and
its replacement reuses it; the pool unlinks the slots when it closes. A result larger than the slot, or a
machine whose /dev/shm is too small for slots, goes through the pipe as before.

Each worker runs under a memory limit (RLIMIT_DATA: its heap and private mappings; the shared slots are not
counted): `memory_limit` bytes, by default CACHEFEAT_DECODE_MEMORY GiB (8; 0 = none). A decoder that blows up
(a crafted file, a decoder bug) fails its allocation inside that worker: the video is recorded as a `memory`
failure, or as a `crash` if the decoder aborts, and no other process runs short.

Videos from buckets (fetch.py) are fetched into the pool's temporary folder (`cachefeat-decode-*` under
TMPDIR, made by the first fetch), which the pool removes when it closes, with whatever a worker killed
mid-fetch left there.

workers=0 decodes inline in the calling process: no isolation, no timeout and no memory limit, for debugging only.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import resource
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import wait

import numpy as np

from .video import DecodeRequest, DecodeResult, decode_video

_READY = "ready"
_START_TIMEOUT = 300.0   # seconds a new worker may take to import and report ready
SLOT_BYTES = 64 << 20    # per slot: a clip's eight 1080p frames fit (6 MiB each); smaller where /dev/shm is small
DEPTH = 4                # requests (and slots) per worker: a 64-frame batch of 8-frame clips is 8 videos, so a
                         # worker gets about half a batch ahead while the pipeline's thread runs one
_ARRAYS = ("pixels", "small", "decoded")   # the DecodeResult fields that travel through a slot
MEMORY_ENV = "CACHEFEAT_DECODE_MEMORY"
DEFAULT_MEMORY_GIB = 8.0   # a worker decoding 4K video peaks near 1.2 GiB; a 2-core allotment runs one worker
# POSIX shared memory: on Linux, shm_open(name) is this folder's file of that name. The slots are created by
# SharedMemory (a random name, O_CREAT | O_EXCL, mode 0600), so nobody else can own or predict one.
# B108: where Linux keeps POSIX shared memory; slot files are made O_EXCL, 0600
SHM_DIR = "/dev/shm"  # nosec B108


def memory_limit_from_env() -> int | None:
    """The decode workers' memory limit in bytes from CACHEFEAT_DECODE_MEMORY (GiB; 0: no limit)."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    try:
        gib = float(raw) if raw else DEFAULT_MEMORY_GIB
    except ValueError:
        raise ValueError(f"{MEMORY_ENV}={raw!r}: give the decode workers' memory limit in GiB (0: none)") from None
    if not gib >= 0 or gib == float("inf"):
        raise ValueError(f"{MEMORY_ENV}={raw!r}: give the decode workers' memory limit in GiB (0: none)")
    return int(gib * 2**30) or None


def _limit_memory(limit: int | None) -> None:
    """RLIMIT_DATA of this (worker) process: malloc and mmap past it fail, in this process only."""
    if not limit:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _open_slot(name: str):
    """Map a slot the pool created: its own file only (no link followed, a regular file of this user)."""
    import mmap
    if "/" in name.lstrip("/") or name.strip("/") in ("", ".", ".."):
        raise ValueError(f"not a shared-memory slot name: {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name.lstrip("/")), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"shared-memory slot {name} is not a private file of this user")
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _InSlot:
    """Where an array of a result lies in its worker's slot."""
    offset: int
    shape: tuple
    dtype: str


def _to_slot(res: DecodeResult, buf) -> None:
    """Write the result's arrays into the slot, leaving their places in the result; arrays that do not fit
    stay in the result (and go through the pipe)."""
    offset = 0
    for name in _ARRAYS:
        a = getattr(res, name)
        if a is None or offset + a.nbytes > len(buf):
            continue
        np.ndarray(a.shape, a.dtype, buffer=buf, offset=offset)[...] = a
        setattr(res, name, _InSlot(offset, a.shape, a.dtype.str))
        offset += -(-a.nbytes // 64) * 64


def _from_slot(res: DecodeResult, buf) -> DecodeResult:
    for name in _ARRAYS:
        a = getattr(res, name)
        if isinstance(a, _InSlot):
            setattr(res, name, np.ndarray(a.shape, a.dtype, buffer=buf, offset=a.offset).copy())
    return res


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


def _worker_main(conn, parent: int | None = None, slot_names: tuple[str, ...] = (),
                 memory_limit: int | None = None, fetch_dir: str | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    if fetch_dir:
        from . import fetch
        fetch.FETCH_DIR = fetch_dir              # videos from buckets are fetched into the pool's folder
    # Workers never handle Ctrl-C themselves: the parent decides when the run stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # mapped by hand: SharedMemory would register them with the resource tracker again
    slots = [_open_slot(name) for name in slot_names]
    _limit_memory(memory_limit)
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
        req, slot = req                              # the request and the slot its result goes to
        t0 = time.perf_counter()
        res = decode_video(req)
        res.seconds = time.perf_counter() - t0
        if slots:
            _to_slot(res, slots[slot])
        try:
            conn.send(res)
        except (BrokenPipeError, OSError):
            return


def _slot_bytes(workers: int) -> int:
    """The slot size: SLOT_BYTES, less where /dev/shm is small (a container's default is 64 MiB); 0 (no
    slots, frames through the pipe) when a quarter of its free space cannot give each worker 8 MiB."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    size = min(SLOT_BYTES, st.f_bavail * st.f_frsize // 4 // max(workers, 1))
    return size if size >= 8 << 20 else 0


class _Worker:
    def __init__(self, ctx, slots: list[shared_memory.SharedMemory], memory_limit: int | None = None,
                 fetch_dir: str | None = None):
        self.conn, child = ctx.Pipe()
        self.slots = slots
        self.proc = ctx.Process(target=_worker_main, daemon=True, name="cachefeat-decode",
                                args=(child, os.getpid(), tuple(s.name for s in slots), memory_limit, fetch_dir))
        self.proc.start()
        child.close()
        self.sent: deque[DecodeRequest] = deque()    # in order: the first it decodes (its clock: `started`),
        self.turn = 0                                # the others wait in its pipe; the slot the next one gets
        self.started = 0.0
        self.ready = False

    @property
    def request(self) -> DecodeRequest | None:
        """The request it decodes now."""
        return self.sent[0] if self.sent else None

    def send(self, req: DecodeRequest) -> None:
        self.conn.send((req, self.turn))
        if not self.sent:
            self.started = time.monotonic()          # restarted by take_ready if it is not ready yet
        self.sent.append(req)
        self.turn = (self.turn + 1) % DEPTH

    def result_slot(self):
        """The slot of the request it decodes now (sent len(sent) requests ago)."""
        return self.slots[(self.turn - len(self.sent)) % DEPTH]

    def done(self) -> None:
        """Its current request's result was taken: the next one (if sent) is now the one it decodes."""
        self.sent.popleft()
        self.started = time.monotonic()

    def take_ready(self) -> None:
        """Consume the worker's ready message; a request sent meanwhile starts its clock now. Anything else
        first is a broken worker: killed, and an OSError, which the pool handles as the worker's death."""
        msg = self.conn.recv()
        if msg != _READY:
            self.proc.kill()
            self.proc.join(timeout=5)
            raise OSError(f"decode worker {self.proc.pid} sent {type(msg).__name__} before reporting ready; killed")
        self.ready = True
        self.started = time.monotonic()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class DecodePool:
    def __init__(self, workers: int = 2, timeout: float = 60.0, start_method: str = "spawn",
                 memory_limit: int | None = None):
        self.timeout = float(timeout)
        # bytes per worker; None: CACHEFEAT_DECODE_MEMORY (DEFAULT_MEMORY_GIB unset); 0: no limit
        self.memory_limit = memory_limit_from_env() if memory_limit is None else (memory_limit or None)
        self._queue: deque[DecodeRequest] = deque()
        self._ready: deque[DecodeResult] = deque()
        self._ctx = mp.get_context(start_method)
        size = _slot_bytes(DEPTH * workers)
        self._slots = [[shared_memory.SharedMemory(create=True, size=size) for _ in range(DEPTH)]
                       for _ in range(workers)] if size else [[] for _ in range(workers)]
        self._workers = []
        self.restarts = 0
        # the workers' temporary files (videos fetched from buckets): a folder of an unguessable name, made by
        # the first fetch (fetch.py), removed with the pool, also with what a worker killed mid-fetch left there
        self.fetch_dir = (os.path.join(tempfile.gettempdir(), f"cachefeat-decode-{secrets.token_hex(8)}")
                          if workers > 0 else None)
        try:
            self._workers += [_Worker(self._ctx, self._slots[i], self.memory_limit, self.fetch_dir)
                              for i in range(max(0, workers))]
            self._wait_ready(self._workers)
        except BaseException:    # no worker and no slot outlives a pool that could not start
            self.close()
            raise

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

    def limit(self, req: DecodeRequest) -> float:
        """Seconds a request may take: the timeout, per minute of video for a request that covers more than
        a minute (fps windows; see DecodeRequest.media_seconds)."""
        return self.timeout * max(1.0, req.media_seconds / 60.0)

    # -- feeding
    def submit(self, req: DecodeRequest) -> None:
        self._queue.append(req)
        self._dispatch()

    @property
    def in_flight(self) -> int:
        """Requests submitted whose result has not been returned by get()."""
        busy = sum(len(w.sent) for w in self._workers)
        return len(self._queue) + busy + len(self._ready)

    def _dispatch(self) -> None:
        """Queued requests to the least loaded workers, up to DEPTH each (one while a worker starts). A send
        that finds its worker dead replaces it; the passes are bounded, so workers that die at once are not
        retried forever here (get() dispatches again)."""
        for _ in range(len(self._workers) * (DEPTH + 1)):
            takers = [w for w in self._workers if len(w.sent) < (DEPTH if w.ready else 1)]
            if not self._queue or not takers:
                return
            w = min(takers, key=lambda w: len(w.sent))
            req = self._queue.popleft()
            try:
                w.send(req)
            except (BrokenPipeError, OSError):  # it died: retry this request elsewhere
                self._queue.appendleft(req)
                if w.request is not None:       # ... and record the one it was decoding
                    self._fail(w, "crash", "the decoder process died")
                else:
                    self._replace(w)

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
            next_kill = min(w.started + (self.limit(w.request) if w.ready else _START_TIMEOUT) for w in busy)
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
                        # out of its slot before that slot is named again (DEPTH requests on)
                        self._ready.append(_from_slot(res, w.result_slot().buf) if w.slots else res)
                        w.done()
                        continue
                    except (EOFError, OSError):
                        pass  # died mid-send: treated as a crash below
                if w.conn in ready or w.proc.sentinel in ready:
                    if w.request is not None and not w.proc.is_alive():
                        self._fail(w, "crash", f"the decoder process died ({self._death(w.proc.exitcode)})")
                elif w.request is not None and w.ready and time.monotonic() - w.started > self.limit(w.request):
                    self._fail(w, "timeout", f"decoding took longer than {self.limit(w.request):g} s and was killed")
                elif w.request is not None and not w.ready and time.monotonic() - w.started > _START_TIMEOUT:
                    self._fail(w, "crash", f"the decoder process did not start within {_START_TIMEOUT:g} s")
            self._dispatch()
            if deadline is not None and time.monotonic() >= deadline and not self._ready:
                return None
        return self._ready.popleft()

    def _death(self, code: int | None) -> str:
        if code is None or code >= 0:
            return f"exit code {code}"
        try:
            why = f"signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            why = f"signal {-code}"
        if self.memory_limit and -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            # a C++ decoder whose allocation fails under RLIMIT_DATA aborts (std::bad_alloc)
            why += f"; it may have run out of its {self.memory_limit / 2**30:.3g} GiB memory limit ({MEMORY_ENV})"
        return why

    def _fail(self, w: _Worker, stage: str, message: str) -> None:
        req = w.sent.popleft()
        self._ready.append(DecodeResult(req.key, stage=stage, error=message,
                                        seconds=time.monotonic() - w.started))
        self._queue.extendleft(reversed(w.sent))   # never started: another worker (or the replacement) decodes them
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        i = self._workers.index(w)
        # the slots are the pool's: the replacement reuses them
        self._workers[i] = _Worker(self._ctx, w.slots, self.memory_limit, self.fetch_dir)
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
        for slots in self._slots:
            for slot in slots:
                slot.close()
                slot.unlink()
        self._slots = []
        if self.fetch_dir:
            shutil.rmtree(self.fetch_dir, ignore_errors=True)
            self.fetch_dir = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]


def default_workers() -> int:
    """One decode process per core this process may run on (its CPU affinity, e.g. a Slurm or container
    allotment), less one for the pipeline's own thread. No upper cap: on a GPU node decoding is usually
    what bounds stage one (a Kinetics clip decodes at ~60-80 sampled frames/s per core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores - 1)
