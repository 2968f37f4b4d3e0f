"""The store lock with real processes: a lock left by a dead writer is taken over by exactly one of many
processes trying at the same moment; a writer's release racing with newcomers never lets two hold it; the
lock lives exactly as long as the process that took it (forked children do not keep it); export sees a
writer in another process."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from cachefeat.store import CacheError, StoreLock

CTX = mp.get_context("fork")
CONTENDERS = 4


def _contend(store, barrier, results, done, release_first=False):
    """One process trying to take the lock at the barrier. The winner keeps it until the test has every
    answer, then dies holding it (os._exit: no release, no clean-up), leaving a lock file nobody holds."""
    lock = StoreLock(store)
    try:
        barrier.wait()
        lock.acquire()
        won = True
    except BaseException as e:     # any answer but the expected refusal fails the test (and never hangs it)
        refused = isinstance(e, CacheError) and "being written by another cachefeat process" in str(e)
        won = False if refused else f"{type(e).__name__}: {e}"
    results.put((os.getpid(), won))
    if won is True:
        done.wait(60)
    os._exit(0)


def _holder(store, barrier, done):
    """A live holder that releases its lock (removing the file) right at the barrier."""
    lock = StoreLock(store)
    lock.acquire()
    barrier.wait()
    lock.release()
    done.wait(60)
    os._exit(0)


def _hold_forever(store):
    lock = StoreLock(store)
    lock.acquire()
    time.sleep(60)


def _trial(store, release_race: bool) -> list[int]:
    barrier = CTX.Barrier(CONTENDERS + release_race, timeout=60)
    results, done = CTX.SimpleQueue(), CTX.Event()
    procs = [CTX.Process(target=_contend, args=(store, barrier, results, done)) for _ in range(CONTENDERS)]
    if release_race:
        procs.append(CTX.Process(target=_holder, args=(store, barrier, done)))
    for p in procs:
        p.start()
    answers = [results.get() for _ in range(CONTENDERS)]
    done.set()
    errors = [won for _, won in answers if isinstance(won, str)]
    assert not errors, errors
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [pid for pid, won in answers if won is True]


def test_100_concurrent_takeovers_of_a_dead_writers_lock_have_exactly_one_winner(tmp_path):
    store = tmp_path / "c.zarr"
    # a writer that died holding the lock (SIGKILL): its file stays, naming it, and nobody holds it
    dead = CTX.Process(target=_hold_forever, args=(store,))
    dead.start()
    deadline = time.monotonic() + 30
    while StoreLock(store).active_holder() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert StoreLock(store).active_holder()["pid"] == dead.pid
    os.kill(dead.pid, signal.SIGKILL)
    dead.join()
    assert (store / "cachefeat.lock").exists() and StoreLock(store).active_holder() is None

    winners = []
    for _ in range(100):
        won = _trial(store, release_race=False)
        winners.append(len(won))
        if len(won) == 1:   # the winner died holding it: the next trial takes over its lock in turn
            assert json.loads((store / "cachefeat.lock").read_text())["pid"] == won[0]
            assert StoreLock(store).active_holder() is None
    assert winners == [1] * 100, f"trials without exactly one winner: {sum(w != 1 for w in winners)}"


def test_a_release_racing_with_newcomers_never_lets_two_hold_the_lock(tmp_path):
    """The holder removes the lock file while others open it: whoever locked the removed file must start
    again, so at most one newcomer wins (none if all tried before the release)."""
    store = tmp_path / "c.zarr"
    counts = [len(_trial(store, release_race=True)) for _ in range(50)]
    assert max(counts) == 1, counts
    StoreLock(store).acquire()  # and the lock is free again afterwards (its last holder died)


def test_the_lock_is_the_takers_alone_forked_children_and_other_objects_do_not_share_it(tmp_path):
    store = tmp_path / "c.zarr"
    lock = StoreLock(store)
    lock.acquire()
    with pytest.raises(CacheError, match=rf"pid {os.getpid()} on "):
        StoreLock(store).acquire()         # a second lock object, even in the same process
    assert StoreLock(store).active_holder()["pid"] == os.getpid()
    child = CTX.Process(target=lambda: time.sleep(60))   # a forked child closes its copy of the lock file
    child.start()
    try:
        lock.release()
        assert not (store / "cachefeat.lock").exists()
        other = StoreLock(store)
        other.acquire()                    # the child does not keep the lock alive
        other.release()
    finally:
        child.kill()
        child.join()


def test_a_writer_in_another_process_is_seen_and_its_death_frees_the_lock(tmp_path):
    store = tmp_path / "c.zarr"
    code = ("import sys, time; from cachefeat.store import StoreLock; lock = StoreLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        h = StoreLock(store).active_holder()
        assert h["pid"] == p.pid and h["host"]
        with pytest.raises(CacheError, match=rf"being written by another cachefeat process \(pid {p.pid} on "):
            StoreLock(store).acquire()
    finally:
        p.kill()
        p.wait()
    assert StoreLock(store).active_holder() is None
    with StoreLock(store) as lock:
        assert lock.held and StoreLock(store).active_holder()["pid"] == os.getpid()
    assert not (store / "cachefeat.lock").exists()
