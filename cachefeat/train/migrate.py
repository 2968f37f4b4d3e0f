"""Converting a checkpoint of cachefeat before 2026-12-06 (format version 1: one torch.save pickle behind a
digest header, RUN/checkpoint.pt) to the data-only format of checkpoint.py. This is the one place in
cachefeat that unpickles, and only as `cachefeat checkpoint migrate` asks:

- without --trust: the pickle's imports are listed (pickletools reads opcodes, it runs nothing) and must be
  exactly those version 1 held: tensors, their storages, OrderedDict. Then PyTorch's restricted unpickler,
  torch.load(weights_only=True), reads it with those types allowed. Anything else is refused, naming --trust;
- with --trust: a full unpickle, which runs whatever code the file holds; it says so on stderr first.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickletools  # nosec B403
import re
import zipfile
from pathlib import Path

import torch

from .checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    LEGACY,
    VERSION,
    CheckpointDamaged,
    checkpoint_files,
    error_line,
    replace_folder,
)
from .config import TrainError

# a version-1 file: this one-line header, then the torch.save bytes it describes (their SHA-256 and length)
DIGEST_HEADER = re.compile(rb"cachefeat-checkpoint sha256:([0-9a-f]{64}) bytes:([0-9]{1,15})\n")
_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
# what the pickle of a version-1 checkpoint imports: a dict of plain values, tensors and OrderedDict state dicts
V1_IMPORTS = frozenset({("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")}
                       | {("torch", f"{s}Storage") for s in _STORAGES})
V1_TYPES = [collections.OrderedDict, torch._utils._rebuild_tensor_v2,
            *(getattr(torch, f"{s}Storage") for s in _STORAGES)]
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _payload(p: Path, data: bytes) -> bytes:
    """The torch.save bytes of a version-1 file, checked against its header's digest (files from before
    digests, a bare torch.save zip, are returned whole)."""
    if data.startswith(b"PK\x03\x04"):
        return data
    damaged = (f"{p} is damaged: {{}}; it cannot be migrated: restore it from a copy, or train the run again "
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


def foreign_imports(payload: bytes) -> list[str]:
    """What the pickle in torch.save bytes imports beyond V1_IMPORTS (or why it cannot be told), read from its
    opcodes without running any. [] for a genuine version-1 checkpoint."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            entries = [i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(entries) != 1 or entries[0].compress_type != zipfile.ZIP_STORED:
                return ["not one uncompressed data.pkl"]
            pkl = z.read(entries[0])
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return [f"not a torch.save archive ({type(e).__name__})"]
    found, pushed, memo = set(), [], {}
    try:
        for op, arg, _ in pickletools.genops(pkl):
            name = op.name
            if name in _STRING_OPS:
                pushed.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(int(arg)))
            elif name == "GLOBAL":
                found.add(tuple(arg.split(" ", 1)))
            elif name == "STACK_GLOBAL":
                mod, attr = pushed[-2:] if len(pushed) >= 2 else (None, None)
                found.add((mod, attr) if isinstance(mod, str) and isinstance(attr, str) else ("?", name))
            elif name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                found.add(("?", name))
            else:
                pushed.append(None)
    except Exception as e:   # pickletools' own errors for malformed opcodes
        return [f"an unreadable pickle ({type(e).__name__})"]
    return sorted(f"{m}.{a}" for m, a in found - V1_IMPORTS)


def read_v1(path: Path, trust: bool, warn) -> dict:
    """The checkpoint dict of the version-1 file `path`: through the restricted unpickler with V1_TYPES only,
    or (`trust`) a full unpickle after `warn(...)` says that it runs the file's code."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrainError(f"{path} cannot be read: {e.strerror or e}") from None
    if not data.startswith((b"cachefeat-checkpoint sha256:", b"PK\x03\x04")):
        raise TrainError(f"{path} is not a checkpoint of cachefeat's old format (no digest header, not a torch.save "
                         f"file)")
    payload = _payload(path, data)
    needs_trust = (f"{path} holds more than the data of a cachefeat checkpoint ({{}}): migrate reads it only with "
                   f"--trust, and --trust runs the file's code (use it only for a file you made yourself)")
    if trust:
        warn(f"cachefeat checkpoint migrate: --trust: unpickling {path} in full, which runs any code it holds")
        try:
            # B614: --trust, the user's explicit choice, said on stderr
            ck = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)  # nosec B614
        except Exception as e:
            raise TrainError(f"{path} is not a readable checkpoint: {error_line(e)}") from None
    else:
        foreign = foreign_imports(payload)
        if foreign:
            raise TrainError(needs_trust.format(", ".join(foreign[:3])))
        try:
            with torch.serialization.safe_globals(V1_TYPES):
                ck = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as e:   # the restricted unpickler refused it (UnpicklingError and kin)
            raise TrainError(needs_trust.format(f"PyTorch's restricted unpickler refused it: {type(e).__name__}")) \
                from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a checkpoint cachefeat train wrote (it unpickles to something else)")
    return {**ck, "version": VERSION}


def migrate(old: str | os.PathLike, new: str | os.PathLike, trust: bool = False,
            warn=print) -> list[tuple[Path, Path, dict]]:
    """Convert the version-1 checkpoint file `old` (or both of a run folder's: checkpoint.pt and
    checkpoint_best.pt) into run folder `new` (NEW/checkpoint, NEW/checkpoint_best). Every file is read and
    checked before anything is written; an existing checkpoint in `new` is refused, never replaced.
    Returns (source, written folder, checkpoint) for each."""
    old, new = Path(old), Path(new)
    if old.is_dir():
        sources = {name: old / LEGACY[name] for name in (CHECKPOINT, BEST_CHECKPOINT) if (old / LEGACY[name]).is_file()}
        if not sources:
            raise TrainError(f"{old}: no checkpoint of the old format there (expected {LEGACY[CHECKPOINT]})")
    elif old.is_file():
        sources = {CHECKPOINT: old}
    else:
        raise TrainError(f"{old}: no such file")
    if new.exists() and not new.is_dir():
        raise TrainError(f"{new} is a file: NEW is the run folder to write the checkpoint into")
    for name in sources:
        if os.path.lexists(new / name):
            raise TrainError(f"{new / name} exists: migrate never replaces a checkpoint; choose another NEW")
    done = []
    for name, src in sources.items():
        ck = read_v1(src, trust, warn)
        done.append((src, new / name, ck, checkpoint_files(ck)))
    new.mkdir(parents=True, exist_ok=True)
    for _, dst, _, files in done:
        replace_folder(dst, files)
    return [(src, dst, ck) for src, dst, ck, _ in done]
