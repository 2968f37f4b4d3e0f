"""What a trained adapter is: the checkpoint format (written atomically, read back with one-line errors),
rebuilding the adapter from it, and the one check of whether a cache's features fit an adapter trained
on another cache (train vs val cache, checkpoint vs eval cache)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from .. import adapters
from ..adapters import CacheMismatch, FeatureSpec, Needs
from ..errors import Damaged
from ..store import diff_meta, feature_fingerprint
from .config import TrainError

CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"    # the epoch of the best val top-1 so far, beside the last
CHECKPOINT_FORMAT = "cachefeat-checkpoint"
# a checkpoint file is this one-line header, then the torch.save bytes it describes: their length and SHA-256
DIGEST_HEADER = re.compile(rb"cachefeat-checkpoint sha256:([0-9a-f]{64}) bytes:([0-9]{1,15})\n")
_MAGIC = b"cachefeat-checkpoint "
# cache metadata a checkpoint keeps: enough to rebuild the adapter, check an eval cache, and run predict
RECORDED_META = ("model", "layers", "tokens", "dtype", "frames", "sampling", "views", "preprocessing",
                 "compute_precision", "classes", "layout", "pixels", "text", "augment", "fingerprint")



def check_fits(meta: dict, adapter: str, needs: Needs, what: str, trained_meta: dict | None = None,
               trained: FeatureSpec | None = None) -> None:
    """Can `adapter` (reading `needs`) run on the cache with metadata `meta`? It must hold what the adapter
    reads; with `trained_meta` (the cache it was trained on) its features must come from the same backbone
    weights and preprocessing and its labels index the same class list; with `trained` (the feature space it
    was built for) the shapes must match. Raises CacheMismatch naming every problem, in one line."""
    if trained_meta is not None:
        if feature_fingerprint(trained_meta) != feature_fingerprint(meta):
            diffs = diff_meta(trained_meta, meta, ("model", "preprocessing"))
            diffs = [d for d in diffs if not d.startswith(("model.open_clip_version", "model.torch_version"))]
            raise CacheMismatch(f"{what} holds features of another backbone or preprocessing than the training "
                                f"cache ({'; '.join(diffs[:3]) or 'feature fingerprint differs'})")
        a, b = list(trained_meta.get("classes") or []), list(meta.get("classes") or [])
        if a != b:
            raise CacheMismatch(f"{what} has another class list than the training cache ({len(b)} vs {len(a)} "
                                f"classes" + (", same count, different names or order)" if len(a) == len(b) else ")"))
    problems = needs.problems(adapter, meta, trained)
    if problems:
        raise CacheMismatch("; ".join(problems))


def _replace_durably(write, path: Path) -> None:
    """Write `path` whole or not at all: `write(file)` fills PATH.tmp, which is flushed to disk (fsync) and
    renamed over PATH (os.replace is atomic), then the folder entry is synced. A run killed at any point
    leaves the previous PATH intact, plus at worst a stale PATH.tmp that nothing reads (the next write
    replaces it)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:      # platforms where a folder cannot be opened (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointDamaged(TrainError, Damaged):
    """A checkpoint whose bytes do not match their digest (exit status 1)."""


def save_atomic(obj, path: Path) -> None:
    """Write a checkpoint atomically: a header line with the SHA-256 and length of the torch.save bytes that
    follow it, so that load_checkpoint refuses a file of which any byte changed."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    header = f"cachefeat-checkpoint sha256:{hashlib.sha256(payload).hexdigest()} bytes:{len(payload)}\n".encode()
    _replace_durably(lambda f: (f.write(header), f.write(payload)), path)


def _checked_payload(p: Path, data: bytes) -> bytes:
    """The torch.save bytes of a checkpoint file, after checking them against the header's digest. A file
    without the header (written before checkpoints carried a digest) is returned whole, unchecked."""
    if data.startswith(b"PK\x03\x04"):
        return data   # a zip file as torch.save writes it: a checkpoint from before digests
    if not (data.startswith(_MAGIC[:8]) or b" sha256:" in data[:40]):
        raise TrainError(f"{p} is not a readable checkpoint (not a file cachefeat train wrote)")
    damaged = (f"{p} is damaged: {{}}; it cannot be used: restore it from a copy, or train the run again "
               f"(`cachefeat train ... --overwrite`)")
    m = DIGEST_HEADER.match(data)
    if not m:
        raise CheckpointDamaged(damaged.format("its header is unreadable"))
    payload = data[m.end():]
    if len(payload) != int(m.group(2)):
        raise CheckpointDamaged(damaged.format(f"it holds {len(payload):,} bytes where its header says "
                                               f"{int(m.group(2)):,} (cut short or extended)"))
    if hashlib.sha256(payload).hexdigest() != m.group(1).decode():
        raise CheckpointDamaged(damaged.format("its contents do not match their SHA-256 digest"))
    return payload


def write_json_atomic(path: Path, obj) -> None:
    _replace_durably(lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()), path)


def write_metrics(out: Path, history: list[dict]) -> None:
    _replace_durably(lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()),
                     out / "metrics.jsonl")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A run folder or a checkpoint file -> the checkpoint dict (refusing anything else in one line, and a
    checkpoint whose contents do not match their digest with CheckpointDamaged)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise TrainError(f"{path}: no checkpoint there (expected a run folder with {CHECKPOINT}, or the file)")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise TrainError(f"{p} cannot be read: {e.strerror or e}") from None
    payload = _checked_payload(p, data)
    try:
        ck = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"{p} is not a readable checkpoint: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{p} is not a readable checkpoint (not a file cachefeat train wrote)")
    return ck


def adapter_from_checkpoint(ck: dict) -> tuple[torch.nn.Module, FeatureSpec, Needs]:
    """Rebuild a trained adapter (weights, frozen buffers and all) from its checkpoint."""
    spec = FeatureSpec.from_meta(ck["cache_meta"])
    cls, config, needs = adapters.resolve(ck["adapter"], ck["adapter_config"], spec)
    model = cls(config, spec)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, spec, needs



def checkpoint_state(run, model, opt, scaler, epoch: int, history: list[dict], seconds: float) -> dict:
    """Everything a checkpoint holds after `epoch` epochs of `run` (a loop.Run): enough to resume it, to
    rebuild the adapter, to check an eval cache against it, and to run predict."""
    meta = run.train_cache.meta
    return {
        "format": CHECKPOINT_FORMAT, "version": 1,
        "adapter": run.cfg.adapter, "adapter_config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "trainable_params": model.num_trainable(), "needs": asdict(run.needs),
        "classes": run.train_cache.classes, "feature_fingerprint": feature_fingerprint(meta),
        "cache_meta": {k: meta[k] for k in RECORDED_META if k in meta},
        "train_cache": str(run.train_cache.path), "val_cache": str(run.val_cache.path) if run.val_cache else None,
        "train_config": run.cfg.to_dict(), "epoch": epoch, "epochs": run.epochs or run.cfg.epochs,
        "history": history, "train_seconds": seconds,
        "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
    }
