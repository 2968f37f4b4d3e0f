"""Which caches stage two may use, and what of them it used: the one check that train, eval, zeroshot and
ablate make before reading a cache (`check_cache_use`), and the counts every report states (`coverage`).

A cache whose extraction has not finished, or that another process is still writing, holds only part of
its videos: a figure computed on it silently describes another data set. It is refused unless the caller
allows it (`--allow-incomplete`, the word export uses), and then every report says how many videos it
covered, how many failed at extraction and how many were never written.
"""
from __future__ import annotations

import numpy as np

from ..store import Cache, CacheDamaged
from .config import TrainError


def coverage(cache: Cache) -> dict:
    """Videos of a cache by state: `videos` (all its rows), `usable` (at least one valid clip), `failed`
    (failed at extraction, in finished shards), `unwritten` (in shards not finished yet), and whether the
    cache is `complete` and `being_written` by another process."""
    done = cache.video_done()
    usable = np.zeros(cache.num_videos, bool)
    usable[cache.clip_video()[cache.valid()]] = True
    return {"videos": cache.num_videos, "usable": int(usable.sum()), "failed": len(cache.failures()),
            "unwritten": int((~done).sum()), "complete": bool(done.all()),
            "being_written": cache.being_written_by() is not None}


def check_cache_use(cache: Cache, allow_incomplete: bool = False) -> dict:
    """Refuse (TrainError, one line) a cache that another process is writing or whose extraction has not
    finished, unless `allow_incomplete` (then only its finished shards are read), and (CacheDamaged) one
    whose finished shards do not hold what their checksum records list. Returns its coverage."""
    problems = cache.record_problems()       # damage that checksums alone do not show
    if problems:
        s, what = next(iter(problems.items()))
        raise CacheDamaged(f"{cache.path}: shard {s} is damaged ({what}"
                           f"{f'; {len(problems) - 1} more shards too' if len(problems) > 1 else ''}); run "
                           f"`cachefeat verify {cache.path}`, then "
                           + ("the same `cachefeat extract` with --repair" if cache.repair == Cache.repair
                              else cache.repair))
    cov = coverage(cache)
    if allow_incomplete:
        return cov
    holder = cache.being_written_by()
    if holder is not None:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
        raise TrainError(f"{cache.path} is being written by another cachefeat process ({who}); wait for it to "
                         f"finish, or pass --allow-incomplete to use the shards finished so far")
    if not cov["complete"]:
        done = cache.shard_done()
        raise TrainError(f"{cache.path} is incomplete: {int(done.sum())} of {len(done)} shards written, "
                         f"{cov['unwritten']} of {cov['videos']} videos not yet extracted; finish it with the same "
                         f"`cachefeat extract` command (it resumes), or pass --allow-incomplete to use the "
                         f"finished shards")
    return cov


def describe(cov: dict, used: int | None = None, what: str = "evaluated") -> str:
    """'60 videos evaluated of 64: 3 failed at extraction, 1 unwritten' (the parts that are not zero)."""
    n = cov["usable"] if used is None else used
    rest = [f"{cov['failed']} failed at extraction" if cov["failed"] else "",
            f"{cov['unwritten']} unwritten" if cov["unwritten"] else ""]
    rest = [r for r in rest if r]
    others = cov["videos"] - n - cov["failed"] - cov["unwritten"]
    if others > 0:
        rest.append(f"{others} unlabelled")
    return f"{n} videos {what} of {cov['videos']}" + (f": {', '.join(rest)}" if rest else "")
