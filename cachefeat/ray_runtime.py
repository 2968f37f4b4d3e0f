"""The Ray runtime that the distributed commands share (extract, train --workers, ablate).

`ray_runtime(address)` is the one door to Ray:
- a runtime that is already initialised in this process (a test's, a notebook's) is used as it is and left
  running (an `address` is then only checked for its form);
- with `address` ("auto", "HOST:PORT" or "ray://HOST:PORT") it connects to a running cluster (`ray start
  --head` on one node, `ray start --address HEAD:6379` on the others) and ships this cachefeat package to
  the workers, so every node runs the driver's code;
- otherwise it starts Ray on this machine, quietly (no dashboard; the workers' logs stay in Ray's session
  folder instead of the terminal), and shuts it down at the end.

`worker_settings()` is what a worker on another node needs to reach buckets as the driver does.

Only the distributed code paths import this module, so a single-process run never loads Ray.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray


def worker_settings() -> dict:
    """What a process on another node (a Ray worker, a Tune trial) needs to reach buckets as this one does: this
    process's AWS_* variables (endpoint, region, credentials, profile) and its local copy of fetched shards
    (store.local_copy: the folder and the bound asked for, each node's own default where none was)."""
    from .store import local_copy
    copy = local_copy.current()
    return {"aws": {k: v for k, v in os.environ.items() if k.startswith("AWS_")},
            "local_copy": None if copy is None else [copy.folder, copy.requested]}


def use_worker_settings(settings: dict | None) -> None:
    """In a worker: the driver's worker_settings(). An AWS_* variable the worker's node sets itself is kept."""
    if not settings:
        return
    for k, v in settings["aws"].items():
        os.environ.setdefault(k, v)
    if settings["local_copy"]:
        from .store import local_copy
        local_copy.use(*settings["local_copy"])


class ClusterError(ValueError):
    """Ray cannot be started or reached as asked (a usage error: the message says what to do)."""


class WorkerError(RuntimeError):
    """A distributed run failed (a worker could not start, or raised); the message names the worker."""


@dataclass(frozen=True)
class RuntimeInfo:
    started_here: bool       # True: this process started a local Ray and will shut it down
    address: str             # the GCS address ("local" for one started here)
    nodes: int
    cpus: float
    gpus: float


# Settings that keep a local Ray quiet: no dashboard, no worker output forwarded to the terminal (errors
# come back as exceptions), only Ray's own errors logged.
_QUIET = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)


@contextmanager
def ray_runtime(address: str | None = None, num_cpus: int | None = None,
                num_gpus: int | None = None) -> Iterator[RuntimeInfo]:
    """Use, connect to, or start a Ray runtime for the duration of the block (see the module docstring)."""
    if address:
        _check_address(address)
    if ray.is_initialized():
        yield _info(False, "existing")
        return
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, runtime_env={"py_modules": [_package_dir()]}, **_QUIET)
        except ConnectionError as e:
            auth = ("; if the cluster uses token authentication (the default of `ray start --head`), set "
                    "RAY_AUTH_MODE=token with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                    if not os.environ.get("RAY_AUTH_MODE") else "")
            raise ClusterError(f"--address {address}: {str(e).splitlines()[0]} (start one with `ray start --head`, "
                               f"or leave --address out to run on this machine{auth})") from None
        started = False
    else:
        # "local": a new runtime even when RAY_ADDRESS or a `ray start` on this machine points elsewhere
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **_QUIET)
        except Exception as e:  # e.g. no room in /tmp for Ray's session folder
            raise WorkerError(f"could not start Ray on this machine: {type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0]}") from None
        started = True
    try:
        yield _info(started, address or "local")
    finally:
        ray.shutdown()  # for a cluster this only disconnects this driver; the cluster keeps running


def _info(started: bool, address: str) -> RuntimeInfo:
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return RuntimeInfo(started, address, nodes, float(res.get("CPU", 0)), float(res.get("GPU", 0)))


def _check_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT address, None for auto; anything else is refused in one line."""
    if address == "auto":
        return None
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected auto or HOST:PORT (the head node's address that "
                           f"`ray start --head` printed, e.g. 10.0.0.1:6379)")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """Fail fast, in one line, on a HOST:PORT where nothing listens (Ray itself retries for minutes)."""
    hp = _check_address(address)
    if hp is None:
        return
    host, port = hp
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"--address {address}: cannot reach a Ray head there ({e.strerror or e}); "
                           f"is `ray start --head` running on {host}?") from None


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


# ------------------------------------------------------------------------------------------- placement
def use_gpus(device: str, runtime: RuntimeInfo) -> bool:
    """Whether workers get one GPU each: --device auto with GPUs in the cluster, or --device cuda."""
    gpus = runtime.gpus
    if device == "cpu":
        return False
    if device == "cuda":
        if gpus < 1:
            raise ClusterError("--device cuda: the Ray cluster has no GPUs (use --device auto or cpu)")
        return True
    if device == "auto":
        return gpus >= 1
    raise ClusterError(f"--device {device}: with several workers each one gets its own GPU from Ray; "
                       f"use --device auto, cuda or cpu")


def worker_resources(gpu: bool) -> dict:
    """Ray resources of one worker actor: a whole GPU, or one CPU slot. Its decode processes are not
    counted by Ray; node_cpu_share() sizes them to the node."""
    return {"num_gpus": 1 if gpu else 0, "num_cpus": 1}


def node_cpu_share(gpu: bool, workers: int) -> int:
    """CPU cores this worker may use on its node: the node's cores split between the workers that can share
    it (one per GPU of the node, or up to `workers` CPU slots). Call it inside an actor."""
    node_id = ray.get_runtime_context().get_node_id()
    res = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, min(cores, int(res.get("CPU", cores)) or cores))
    sharing = int(res.get("GPU", 0)) if gpu else min(workers, cores)
    return max(1, cores // max(1, sharing))


def on_driver_node() -> dict:
    """Scheduling options that keep a small coordinating actor on the driver's node, so losing a worker
    node never takes the coordinator with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                  soft=False)}


def death_reason(err: BaseException) -> str:
    """One short line out of Ray's long text for a worker that is gone, e.g. "it was killed by `ray.kill`"
    or "its worker process has died: Worker unexpectedly exits with a connection error code 2"."""
    text = " ".join(str(err).split())
    because = re.search(r"The actor is dead because (.*?)\.(?: |$)", text)
    detail = re.search(r"exit detail: (.*?)(?:\. Some common causes|\. The actor never ran|$)", text)
    parts = [m.group(1).strip().rstrip(".") for m in (because, detail) if m and m.group(1).strip()]
    if not parts:
        parts = [(text.split(". ")[0] or type(err).__name__).rstrip(".")]
    return ": ".join(parts)[:200]


def error_line(err: BaseException) -> str:
    """The failed task's own exception out of Ray's long text: its last "module.NameError: message" line,
    as "NameError: message" (else the text's last line)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    for line in reversed(lines):
        m = re.match(r"(?:[\w.]+\.)?(\w+(?:Error|Exception|Mismatch|Interrupt)): (.+)", line)
        if m:
            return f"{m.group(1)}: {m.group(2)}"[:300]
    return (lines[-1] if lines else type(err).__name__)[:300]
