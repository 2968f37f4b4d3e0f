"""A cache location in an object store: `s3://bucket/prefix` on Amazon S3 or any S3-compatible server
(MinIO, Cloudflare R2, Ceph, Google Cloud Storage's S3 API), through obstore (Rust's object_store: async,
many requests in flight, what zarr's own `zarr.storage.ObjectStore` uses; docs/object-storage.md says why).

Configuration is the ecosystem's: obstore reads the AWS_* environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for
MinIO/R2/Ceph, AWS_ALLOW_HTTP for a local http endpoint, AWS_SKIP_SIGNATURE for anonymous public buckets);
without keys in the environment, the AWS config and credentials files (AWS_PROFILE) are read through boto3
when it is installed.

The bucket is untrusted input like a local cache: every object read whole has its size checked first
(`get_bounded_async`), keys are plain names (no `.`, `..` or empty segment), and every error of the store is one
line of the CacheError family: the server unreachable (exit status 1), wrong credentials or a missing bucket
(bad input, 2). A missing object is FileNotFoundError, as a missing file is for the local reader.
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path

from ..errors import Failed
from .confine import refusal
from .layout import LOCK_NAME, CacheError, crc32c_of

SCHEME = "s3://"
CRC_ATTR = "cachefeat-crc32c"         # user metadata of every object push writes: the CRC32C of its bytes
MULTIPART_BYTES = 64 << 20            # objects larger than this go up in parts (S3: at most 10,000 parts)
PART_BYTES = 16 << 20
IN_FLIGHT = 16                        # requests at once (objects put, shard files read)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_remote(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def absolute(path) -> str:
    """A cache's location as processes in other folders (Ray workers, Tune trials) must name it: a URL as it
    is, a path made absolute."""
    return path if is_remote(path) else os.path.abspath(os.fspath(path))


class RemoteError(CacheError):
    """An object store that cannot be used as asked (bad input: exit status 2); one line naming the URL."""


class RemoteUnreachable(RemoteError, Failed):
    """The server cannot be reached or keeps failing (exit status 1): nothing was wrong with the input."""


@dataclass(frozen=True)
class Location:
    """`s3://bucket/prefix`: a bucket and the key prefix (no slash at either end) under which a cache lies."""
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def __str__(self) -> str:
        return self.url

    @cached_property
    def store(self):
        """The obstore S3Store of the bucket, scoped to the prefix (keys are relative to it)."""
        try:
            from obstore.store import S3Store
        except ImportError:
            raise RemoteError(f"{self.url}: reading and writing object stores needs obstore: pip install "
                              f"'cachefeat[s3]'") from None
        kwargs = {}
        if not os.environ.get("AWS_ACCESS_KEY_ID") and not _env_true("AWS_SKIP_SIGNATURE"):
            provider = _profile_credentials()
            if provider is not None:
                kwargs["credential_provider"] = provider
        if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            kwargs["region"] = "us-east-1"      # S3's default; MinIO and moto accept any
        try:
            return S3Store(self.bucket, prefix=self.prefix or None, client_options=_client_options(),
                           retry_config=_RETRY, **kwargs)
        except Exception as e:
            raise RemoteError(f"{self.url}: the object store is not configured right ({_first_line(e)})") from None


def parse_url(url: str) -> Location:
    """`s3://bucket[/prefix]` -> Location; RemoteError (exit 2) for anything else."""
    if not is_remote(url):
        raise RemoteError(f"{url}: not an s3:// URL")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise RemoteError(f"{url}: {bucket!r} is not a bucket name (3-63 lower-case letters, digits, dots, hyphens)")
    if prefix and any(part in ("", ".", "..") or not part.isprintable() for part in prefix.split("/")):
        raise RemoteError(f"{url}: the key prefix has an empty, '.' or '..' part")
    require_obstore(url)
    return Location(bucket, prefix)


def require_obstore(url: str) -> None:
    """RemoteError (one line, exit status 2) when obstore, an optional dependency, is not installed."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        raise RemoteError(f"{url}: reading and writing object stores needs obstore: pip install "
                          f"'cachefeat[s3]'") from None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _client_options() -> dict:
    """Timeouts short enough that a dead server is one line in seconds, not minutes of waiting."""
    out = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=120)}
    if _env_true("AWS_ALLOW_HTTP"):
        out["allow_http"] = True
    return out


_RETRY = {"max_retries": 3, "retry_timeout": timedelta(seconds=20),
          "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2}}


def _profile_credentials():
    """Credentials of the AWS config and credentials files (profiles, SSO, assumed roles), through boto3 when it
    is installed and finds any; None: obstore's own chain (instance and container metadata)."""
    if not (os.environ.get("AWS_PROFILE") or os.path.exists(os.path.expanduser("~/.aws/credentials"))
            or os.path.exists(os.path.expanduser("~/.aws/config"))):
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    session = boto3.Session()
    return Boto3CredentialProvider(session) if session.get_credentials() is not None else None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def remote_error(loc: Location, key: str, e: BaseException) -> Exception:
    """An obstore error as one line of the CacheError family (a missing object: FileNotFoundError)."""
    from obstore import exceptions as ox
    text = str(e)
    where = f"{loc.url}/{key}" if key else loc.url
    if "NoSuchBucket" in text:
        return RemoteError(f"{loc.url}: the bucket {loc.bucket!r} does not exist (check the URL and AWS_ENDPOINT_URL)")
    if isinstance(e, (ox.PermissionDeniedError, ox.UnauthenticatedError)) or any(
            code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden",
                                      "ExpiredToken", "InvalidToken")):
        return RemoteError(f"{where}: access denied: check the credentials (AWS_ACCESS_KEY_ID, "
                           f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket's policy")
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"{where} does not exist")
    if "invalid path" in text.lower() or "illegal character" in text.lower():     # a key such as a/../b
        return refusal(loc.url, f"an object's name is no plain key ({_first_line(Exception(text))[:200]})")
    if isinstance(e, (ox.GenericError, ox.BaseError, OSError, TimeoutError)):
        return RemoteUnreachable(f"{where}: the object store failed ({_short_reason(text)}); check that the server "
                                 f"at {os.environ.get('AWS_ENDPOINT_URL') or 'S3'} is up, then run the same command "
                                 f"again")
    return e


def _short_reason(text: str) -> str:
    for key in ("error sending request", "timed out", "Connection refused", "connection closed", "dns error"):
        if key.lower() in text.lower():
            return key.lower()
    m = re.search(r"status code: (\d{3} [A-Za-z ]+)", text)
    return m.group(1).strip() if m else _first_line(Exception(text))[:120]


class _Loop:
    """This process's one asyncio event loop for object store requests, in a daemon thread of its own, started
    on first use (and again in a forked child, where the parent's thread does not exist). Synchronous code
    hands it coroutines (`submit`, `run_sync`): no loop is made and torn down per call, and a caller can go
    on with the first results (decoding them) while later requests are still in flight."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="cachefeat-s3", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def in_loop_thread(self) -> bool:
        return self._thread is threading.current_thread() and self._pid == os.getpid()

    def stop(self) -> None:
        """At exit: the loop stopped before the interpreter goes (no request left to call back into it)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = None
        if loop is not None and thread is not None and self._pid == os.getpid() and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)


_LOOP = _Loop()
atexit.register(_LOOP.stop)


def submit(coro) -> concurrent.futures.Future:
    """Start a coroutine on the requests' loop (_Loop); its concurrent Future (cancelling it cancels the task)."""
    if _LOOP.in_loop_thread():
        coro.close()
        raise RuntimeError("a blocking object store call from a coroutine of the requests' own loop")
    return asyncio.run_coroutine_threadsafe(coro, _LOOP.get())


def run_sync(coro):
    """Run a coroutine to its end on the requests' loop (_Loop) and return its result, from synchronous code
    in any thread. Interrupted (Ctrl-C), its task is cancelled: no request goes on behind the caller's back."""
    fut = submit(coro)
    try:
        return fut.result()
    except BaseException:
        fut.cancel()
        raise


# ------------------------------------------------------------------------------------------- reading
async def get_bounded_async(loc: Location, key: str, limit: int, refuse=None) -> bytes:
    """The whole object `key`, refused when it holds more than `limit` bytes: its size is known from the
    response's head before its body is read. The refusal is `refuse(size)` (an exception), by default a
    CacheError for a cache's object."""
    import obstore
    try:
        res = await obstore.get_async(loc.store, key)
    except Exception as e:
        raise remote_error(loc, key, e) from None
    size = int(res.meta["size"])
    if size > limit:
        raise (refuse(size) if refuse else
               refusal(loc.url, f"{key} is {size:,} bytes, more than any cache's ({limit:,})"))
    try:
        return bytes(await res.bytes_async())
    except Exception as e:
        raise remote_error(loc, key, e) from None


async def get_tail_async(loc: Location, key: str, nbytes: int) -> tuple[bytes, int]:
    """The last `nbytes` bytes of object `key` (all of it when it is shorter) and its size, in one request (a
    shard file's index); FileNotFoundError when it does not exist."""
    import obstore
    try:
        try:
            res = await obstore.get_async(loc.store, key, options={"range": {"suffix": nbytes}})
        except Exception as e:
            if "partial" not in str(e).lower() and "InvalidRange" not in str(e):
                raise
            # an empty object has no last bytes: some servers answer a suffix range of it with all of it
            # (200, not 206) or 416; its size says which
            res = await obstore.get_async(loc.store, key, options={"head": True})
            if int(res.meta["size"]) > nbytes:
                raise
            return (await get_bounded_async(loc, key, nbytes)), int(res.meta["size"])
        data = bytes(await res.bytes_async())
        if len(data) > nbytes:
            raise refusal(loc.url, f"{key}: {len(data):,} bytes came back for its last {nbytes:,}")
        return data, int(res.meta["size"])
    except CacheError:
        raise
    except Exception as e:
        raise remote_error(loc, key, e) from None


def get_bounded_all(loc: Location, limits: dict[str, int]) -> dict[str, bytes]:
    """key -> the whole object of every key of `limits`, each refused beyond its limit in bytes
    (get_bounded_async), IN_FLIGHT requests at a time."""
    async def fetch():
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(key):
            async with gate:
                return await get_bounded_async(loc, key, limits[key])
        return await asyncio.gather(*(one(k) for k in limits))
    return dict(zip(limits, run_sync(fetch())))


async def gather_tails(loc: Location, keys: list[str], nbytes: int) -> list[tuple[bytes, int] | None]:
    """get_tail of each key, IN_FLIGHT at once; None for an object that does not exist."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(key):
        async with gate:
            try:
                return await get_tail_async(loc, key, nbytes)
            except FileNotFoundError:
                return None
    return await asyncio.gather(*(one(k) for k in keys))


async def get_ranges_async(loc: Location, key: str, starts: list[int], ends: list[int]) -> list:
    """The byte ranges (starts, ends) of object `key`, one buffer each: obstore coalesces ranges that lie less
    than COALESCE apart into one request (as the local reader coalesces preads)."""
    import obstore
    try:
        return await obstore.get_ranges_async(loc.store, key, starts=starts, ends=ends, coalesce=COALESCE)
    except Exception as e:
        raise remote_error(loc, key, e) from None


def get_ranges(loc: Location, requests: list[tuple[str, list[int], list[int]]]) -> list[list]:
    """get_ranges_async of several objects (key, starts, ends) at once, up to IN_FLIGHT objects' requests in
    flight. One list of buffers per request, in order."""
    async def all_of():
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(key, starts, ends):
            async with gate:
                return await get_ranges_async(loc, key, starts, ends)
        return await asyncio.gather(*(one(k, s, e) for k, s, e in requests))
    return run_sync(all_of())


COALESCE = 1 << 16                    # as shard_file.COALESCE_GAP: what one more request costs in bytes, locally


def list_objects(loc: Location, under: str = "", limit: int | None = None) -> dict[str, int]:
    """key (relative to the prefix) -> size of every object under `under`, or of the first `limit` (the listing
    stops there: a caller bounding what it holds asks for one more than it takes); RemoteError for a key that is
    no plain relative name."""
    import obstore
    out = {}
    try:
        for batch in obstore.list(loc.store, prefix=under or None, chunk_size=1000):
            for meta in batch:
                out[meta["path"]] = int(meta["size"])      # relative to the store's prefix already
                if len(out) == limit:
                    return out
    except Exception as e:
        raise remote_error(loc, under, e) from None
    return out


# ------------------------------------------------------------------------------------------- writing
def crc32c_file(path: str) -> int:
    """CRC32C of a local file, read in pieces."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            piece = f.read(8 << 20)
            if not piece:
                return crc
            crc = crc32c_of(piece, crc)


async def put_file_async(loc: Location, key: str, path: str, crc: int) -> None:
    """Upload the local file `path` as object `key` (in parts when it is larger than MULTIPART_BYTES), with its
    CRC32C recorded on the object (what a later push compares to skip it). The server checks the bytes on
    arrival against the SHA-256 the request's signature carries, and an accepted PUT is an object there (S3
    reads after writes consistently): the caller may count the object as written once this returns. (A HEAD
    to see the object afterwards cost a request per object and could only echo back the size and metadata
    the PUT itself sent.)"""
    import obstore
    size = os.path.getsize(path)
    value = base64.b64encode(crc.to_bytes(4, "big")).decode()
    try:
        # a Path, not a file object: obstore then reads the file in its own threads, without the GIL
        await obstore.put_async(loc.store, key, Path(path), attributes={CRC_ATTR: value},
                                use_multipart=size > MULTIPART_BYTES, chunk_size=PART_BYTES, max_concurrency=4)
    except Exception as e:
        raise remote_error(loc, key, e) from None


def delete(loc: Location, keys: list[str]) -> None:
    import obstore
    if not keys:
        return
    try:
        obstore.delete(loc.store, keys)
    except Exception as e:
        raise remote_error(loc, keys[0], e) from None


# ------------------------------------------------------------------------------------------- zarr
MAX_OBJECT = 256 << 20        # an object zarr reads whole (a document or a table chunk); shards are read in ranges


def zarr_store(loc: Location, limit=None):
    """The bucket as a read-only zarr store: zarr's ObjectStore, every object read whole bounded in size
    (`limit(key)`, default MAX_OBJECT) and every error of the store one line (a missing object reads as
    absent, as zarr expects)."""
    from zarr.storage import ObjectStore
    limit = limit or (lambda key: MAX_OBJECT)

    class BucketStore(ObjectStore):
        async def get(self, key, prototype, byte_range=None):
            try:
                if byte_range is None:
                    return prototype.buffer.from_bytes(await get_bounded_async(loc, key, limit(key)))
                return await super().get(key, prototype, byte_range)
            except FileNotFoundError:
                return None
            except CacheError:
                raise
            except Exception as e:
                raise remote_error(loc, key, e) from None

        async def get_partial_values(self, prototype, key_ranges):
            return await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges))

    return BucketStore(loc.store, read_only=True)


# ------------------------------------------------------------------------------------------- lease
LEASE_KEY = "cachefeat.lease"         # at the cache's prefix while a push writes it; no part of the cache
LEASE_SECONDS = 600                   # how long a lease lasts unless renewed: what a killed push blocks
LEASE_RENEW_SECONDS = 60              # how often the push holding it renews it
MAX_LEASE_BYTES = 4096


class LeaseHeld(RemoteError, Failed):
    """Another writer (push or extract) holds the prefix's lease (exit status 1: wait for it, or break the lease
    of a dead one)."""


class LeaseLost(RemoteUnreachable):
    """The lease this writer held was broken or taken over while it ran (exit status 1)."""


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expiry(holder: dict) -> float | None:
    try:
        return datetime.strptime(holder["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _lease_is_live(holder: dict) -> bool:
    """A lease is live until its expiry; one whose expiry cannot be read never expires (--break-lease ends it)."""
    end = _expiry(holder)
    return end is None or end > time.time()


def read_lease(loc: Location) -> tuple[dict, str | None] | None:
    """The lease at `loc` (its JSON, {} when it is no JSON object cachefeat wrote) and its ETag; None when there
    is none."""
    import obstore
    try:
        res = obstore.get(loc.store, LEASE_KEY)
        if res.meta["size"] > MAX_LEASE_BYTES:
            return {}, res.meta.get("e_tag")
        data, e_tag = bytes(res.bytes()), res.meta.get("e_tag")
    except Exception as e:
        err = remote_error(loc, LEASE_KEY, e)
        if isinstance(err, FileNotFoundError):
            return None
        raise err from None
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    return (holder if isinstance(holder, dict) else {}), e_tag


def lease_holder(loc: Location) -> dict | None:
    """The holder of the live lease at `loc` ({command, host, pid, since, expires}, as the local lock's holder
    has {host, pid, since}), or None when no writer holds it."""
    got = read_lease(loc)
    if got is None or not _lease_is_live(got[0]):
        return None
    h = got[0]
    return {"command": h.get("command", "push"), "host": h.get("host", "?"), "pid": h.get("pid", "?"),
            "since": h.get("since", "?"), "expires": h.get("expires", "never")}


def _who(holder: dict) -> str:
    return (f"cachefeat {holder.get('command', 'push')}, pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}, lease expires {holder.get('expires', 'never')}")


class Lease:
    """The lease object of a writer at its prefix (`cachefeat.lease`, JSON {command, host, pid, since, expires,
    token}; command: push or extract), created only where none is (a conditional PUT, If-None-Match: *), renewed
    every LEASE_RENEW_SECONDS by a thread of its own and only while it is still this writer's (a PUT conditional
    on the ETag it last wrote, If-Match), deleted by release(). A writer killed outright leaves it until it
    expires."""

    def __init__(self, loc: Location, holder: dict, e_tag: str | None):
        self.loc, self.holder, self.e_tag = loc, holder, e_tag
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="cachefeat-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, loc: Location, break_lease: bool = False, warn=None, command: str = "push") -> Lease:
        """The prefix's lease for this process's `command`. A live lease of another writer: LeaseHeld (one line
        naming it).
        An expired one is taken over (replaced only while it is the one read: If-Match on its ETag);
        `break_lease` removes any lease first, saying so through `warn`."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError
        if break_lease:
            got = read_lease(loc)
            if got is not None:
                _delete_lease(loc)
                if warn:
                    warn(f"broke the lease of {loc.url} ({_who(got[0])}): if that writer is still running, stop "
                         f"it; both wrote to the prefix")
        now = time.time()
        holder = {"command": command, "host": socket.gethostname(), "pid": os.getpid(), "since": _utc(now),
                  "expires": _utc(now + LEASE_SECONDS), "token": secrets.token_hex(16)}
        for _ in range(5):
            got = None
            try:
                res = obstore.put(loc.store, LEASE_KEY, json.dumps(holder).encode(), mode="create")
                return cls(loc, holder, res["e_tag"])
            except AlreadyExistsError:
                got = read_lease(loc)
            except Exception as e:
                raise remote_error(loc, LEASE_KEY, e) from None
            if got is None:
                continue                              # released since: create it again
            theirs, e_tag = got
            if _lease_is_live(theirs):
                raise LeaseHeld(f"{loc.url} is being written by another {_who(theirs)}: wait for it to finish, or "
                                f"if that process is dead, run this {command} again with --break-lease")
            try:                                       # expired: replace that very lease, no other
                res = obstore.put(loc.store, LEASE_KEY, json.dumps(holder).encode(), mode={"e_tag": e_tag})
                return cls(loc, holder, res["e_tag"])
            except (PreconditionError, FileNotFoundError):
                continue                              # taken over or released meanwhile: look again
            except Exception as e:
                raise remote_error(loc, LEASE_KEY, e) from None
        raise LeaseHeld(f"{loc.url}: the lease of the prefix keeps changing (other writers at once): wait for "
                        f"them to finish, then run this {command} again")

    def renew(self) -> None:
        """Extend the lease by LEASE_SECONDS from now, only if it is still this push's; LeaseLost if it is not."""
        import obstore
        from obstore.exceptions import PreconditionError
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            holder = dict(self.holder, expires=_utc(time.time() + LEASE_SECONDS))
            try:
                res = obstore.put(self.loc.store, LEASE_KEY, json.dumps(holder).encode(), mode={"e_tag": self.e_tag})
            except (PreconditionError, FileNotFoundError):
                got = read_lease(self.loc)
                command = self.holder["command"]
                self.lost = (f"{self.loc.url}: this {command}'s lease was broken while it ran"
                             + (f" (now held by {_who(got[0])})" if got else "")
                             + f": the objects at the prefix may be a mix of two writers; once no other runs, "
                               f"run this {command} again")
                raise LeaseLost(self.lost) from None
            except Exception as e:
                raise remote_error(self.loc, LEASE_KEY, e) from None
            self.holder, self.e_tag = holder, res["e_tag"]

    def check(self) -> None:
        """LeaseLost when the renewing thread found the lease no longer this push's."""
        if self.lost:
            raise LeaseLost(self.lost)

    def _keep(self) -> None:
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            try:
                self.renew()
            except LeaseLost:
                return
            # B112: the server unreachable for a while: the push's own requests fail and say so; try again later
            except Exception:  # nosec B112
                continue

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still this push's (re-read: its token)."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self.lost:
                return
            got = read_lease(self.loc)
            if got is not None and got[0].get("token") == self.holder["token"]:
                _delete_lease(self.loc, got[1])


def _delete_lease(loc: Location, e_tag: str | None = None) -> None:
    """Delete the lease; with `e_tag`, only that version of it: S3's conditional DELETE (If-Match), so a lease
    another writer took over between the read and the delete stays. obstore's delete takes no condition, so
    the condition goes through boto3 when it is installed (without it, or on a server that ignores If-Match on
    DELETE, the delete is unconditional)."""
    s3 = boto3_client() if e_tag else None
    try:
        if s3 is None:
            import obstore
            obstore.delete(loc.store, LEASE_KEY)
        else:
            s3.delete_object(Bucket=loc.bucket, Key=f"{loc.prefix}/{LEASE_KEY}" if loc.prefix else LEASE_KEY,
                             IfMatch=e_tag)
    except Exception as e:
        if s3 is not None and "PreconditionFailed" in str(e):
            return                                  # no longer ours: another writer's lease, left alone
        err = remote_error(loc, LEASE_KEY, e)
        if not isinstance(err, FileNotFoundError):
            raise err from None


def boto3_client():
    """A boto3 S3 client with this process's AWS_* settings, for what obstore cannot do (a conditional DELETE,
    listing multipart uploads); None when boto3 is not installed."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,   # timeouts as obstore's
                        config=Config(connect_timeout=5, read_timeout=120, retries={"max_attempts": 3}))


# ------------------------------------------------------------------------------------------- push
COMMIT_LAST = ("shard_checksums/", "progress/")   # the record of finished shards: after every data object


def push(local, loc: Location, progress=None, break_lease: bool = False, warn=None) -> dict:
    """Upload the finished local cache `local` (a store.Cache) to `loc`: every file as one object with its
    CRC32C recorded and checked on arrival; the data first, then the shard records and progress flags, the root
    zarr.json last, so a half-pushed cache never opens as complete (without its root document it is no cache
    at all). Objects already there with the file's size and CRC32C are skipped (a re-run uploads only what is
    missing or differs); objects of the cache that the local cache does not hold are deleted. A prefix holding
    objects that are no part of a Zarr store's arrays is refused. `progress(n, total=None)`: objects done.
    While it runs the prefix holds this push's lease (Lease): another push to it is refused (LeaseHeld) until
    this one ends, or until the lease expires when this one is killed; `break_lease` removes any lease first
    (`warn(line)` says so). Returns {uploaded, skipped, deleted, bytes}."""
    files = _cache_files(local)
    lease = Lease.acquire(loc, break_lease, warn)
    try:
        out = _push(files, loc, lease, progress)
    except BaseException:
        try:
            lease.release()
        # B110: the push's own error says what failed; a lease left behind expires
        except Exception:  # nosec B110
            pass
        raise
    lease.release()
    return out


def _push(files: dict[str, str], loc: Location, lease: Lease, progress) -> dict:
    remote = list_objects(loc)
    remote.pop(LEASE_KEY, None)              # this push's own lease: no part of the cache
    # what a store at this prefix may hold: the local cache's folders, and those of the arrays and groups there
    ours = {k.split("/", 1)[0] for k in files} | {k.split("/", 1)[0] for k in remote if k.endswith("zarr.json")}
    foreign = sorted(k for k in remote if k not in files and k.split("/", 1)[0] not in ours)
    if foreign:
        raise RemoteError(f"{loc.url} holds objects that are no part of a cache (such as {foreign[0]!r}): push to a "
                          f"prefix of its own")
    if progress:
        progress(0, total=len(files))
    # an object of the file's size may be the file: its CRC32C says (the others' are taken as they go up)
    sized = {k: crc32c_file(p) for k, p in files.items() if remote.get(k) == os.path.getsize(p)}
    same = run_sync(_unchanged(loc, sized))
    todo = [k for k in files if k not in same]
    stale = sorted(k for k in remote if k not in files)
    if (todo or stale) and "zarr.json" in remote and "zarr.json" not in todo:
        todo.append("zarr.json")             # taken down first, put back last: never complete while mixed
    if "zarr.json" in todo and "zarr.json" in remote:
        delete(loc, ["zarr.json"])
    data = [k for k in todo if k != "zarr.json" and not k.startswith(COMMIT_LAST)]
    record = [k for k in todo if k.startswith(COMMIT_LAST[0])]
    flags = [k for k in todo if k.startswith(COMMIT_LAST[1])]
    done_bytes = 0

    def tick(key):
        nonlocal done_bytes
        done_bytes += os.path.getsize(files[key])
        if progress:
            progress(1)
    if progress:
        progress(len(files) - len(todo))
    for batch in (data, None, record, flags, ["zarr.json"] if "zarr.json" in todo else []):
        lease.check()                         # (renewed by its thread meanwhile)
        if batch is None:                     # the data are all there: what the local cache no longer holds goes
            delete(loc, stale)
            continue
        if batch == ["zarr.json"]:
            lease.renew()                     # still this push's, right before the commit
        run_sync(_put_all(loc, [(k, files[k]) for k in batch], tick))
    return {"uploaded": len(todo), "skipped": len(files) - len(todo), "deleted": len(stale), "bytes": done_bytes}


def _cache_files(local) -> dict[str, str]:
    """key -> path of every file of the local cache (its links refused by Cache.disk_bytes, which walks it
    first); temporary files of a killed writer and the lock file are not the cache."""
    local.disk_bytes()
    if local.being_written_by() is not None:
        raise CacheError(f"{local.path} is being written by an extraction: push it once that has finished")
    return cache_objects(local.real)


def cache_objects(root: str) -> dict[str, str]:
    """key -> path of every file under a local cache's folder `root` that goes to its bucket: not the lock file,
    a lease, nor the temporary files of a writer (`*.tmp`, zarr's `*.partial`)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith((".tmp", ".partial")) or name in (LOCK_NAME, LEASE_KEY):
                continue
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root).replace(os.sep, "/")] = path
    return out


async def _unchanged(loc: Location, candidates: dict[str, int]) -> set[str]:
    """The keys among `candidates` (key -> CRC32C; the sizes already match) whose object has that CRC32C."""
    import obstore
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(key, crc):
        async with gate:
            try:
                res = await obstore.get_async(loc.store, key, options={"head": True})
            except FileNotFoundError:
                return None
            except Exception as e:
                raise remote_error(loc, key, e) from None
            value = res.attributes.get(CRC_ATTR)
            return key if value == base64.b64encode(crc.to_bytes(4, "big")).decode() else None
    found = await asyncio.gather(*(one(k, c) for k, c in candidates.items()))
    return {k for k in found if k is not None}


async def _put_all(loc: Location, items: list[tuple[str, str]], tick) -> None:
    """Put each (key, local file) of `items`, IN_FLIGHT at once, each file's CRC32C taken in a thread just
    before its upload (overlapping the others' transfers, not all files' read before the first request);
    `tick(key)` after each."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(key, path):
        async with gate:
            await put_file_async(loc, key, path, await asyncio.to_thread(crc32c_file, path))
            tick(key)
    await asyncio.gather(*(one(*item) for item in items))
