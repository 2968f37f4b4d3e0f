"""What a trained adapter is: the checkpoint format (data only: no pickle, written atomically, checked when
read, refused in one line), rebuilding the adapter from it, and the one check of whether a cache's features
fit an adapter trained on another cache (train vs val cache, checkpoint vs eval cache).

A checkpoint is a folder (RUN/checkpoint, RUN/checkpoint_best) of three files:
    model.safetensors   every tensor: adapter weights, optimizer state (docs/security.md)
    state.json          everything else, as JSON; a tensor appears there as {"$tensor": KEY} into model.safetensors
    manifest.json       the format and its version, and the size and SHA-256 of the two files above
Reading one parses JSON and safetensors only, so no byte of it can run code; the checkpoints of cachefeat
before this format (one torch.save pickle, RUN/checkpoint.pt) are converted by `cachefeat checkpoint migrate`
(migrate.py), the one place that unpickles."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from dataclasses import asdict
from pathlib import Path

import torch

from .. import adapters
from ..adapters import CacheMismatch, FeatureSpec, Needs
from ..errors import Damaged
from ..store import diff_meta, feature_fingerprint
from .config import TrainError

CHECKPOINT = "checkpoint"
BEST_CHECKPOINT = "checkpoint_best"    # the epoch of the best val top-1 so far, beside the last
CHECKPOINT_FORMAT = "cachefeat-checkpoint"
VERSION = 2                            # 1: the torch.save pickle of cachefeat before 2026-12-06
WEIGHTS, STATE, MANIFEST = "model.safetensors", "state.json", "manifest.json"
LEGACY = {CHECKPOINT: "checkpoint.pt", BEST_CHECKPOINT: "checkpoint_best.pt"}   # where version 1 lived
# bounds on what is read before its checksum is known: a manifest is a few hundred bytes; a state.json is
# JSON, which takes several times its size to parse (a history of a million epochs is ~200 MB)
MAX_MANIFEST_BYTES, MAX_STATE_BYTES = 1 << 16, 1 << 28
# cache metadata a checkpoint keeps: enough to rebuild the adapter, check an eval cache, and run predict
RECORDED_META = ("model", "layers", "tokens", "dtype", "frames", "sampling", "views", "preprocessing",
                 "compute_precision", "classes", "layout", "pixels", "text", "augment", "fingerprint")
# what a checkpoint holds, key -> the types its value may have (int never admits bool); others are refused
_FIELDS = {
    "format": str, "version": int, "adapter": str, "adapter_config": dict, "state_dict": dict,
    "trainable_params": int, "needs": dict, "classes": list, "feature_fingerprint": str, "cache_meta": dict,
    "train_cache": str, "val_cache": (str, type(None)), "train_config": dict, "epoch": int,
    "epochs": (int, type(None)), "history": list, "train_seconds": (int, float), "optimizer": dict, "scaler": dict,
}
_OPTIONAL = ("epochs", "train_seconds")   # checkpoints before `--epochs auto` and timing lack these
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class CheckpointDamaged(TrainError, Damaged):
    """A checkpoint whose files do not match their manifest (exit status 1)."""


class LegacyCheckpoint(TrainError):
    """A checkpoint in the pickle format of cachefeat before 2026-12-06: refused, naming the conversion."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path} is a checkpoint in cachefeat's old pickle format, which is no longer opened "
                         f"(unpickling can run code): convert it once with `cachefeat checkpoint migrate {path} NEW` "
                         f"(it reads only the old format's data types), or `cachefeat checkpoint migrate {path} NEW "
                         f"--trust` for a file you made yourself (that runs the file's code)")


def is_legacy_file(path: Path) -> bool:
    """Does `path` start as a version-1 checkpoint does: its digest header, or torch.save's zip (before digests)?"""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    return head.startswith((b"cachefeat-checkpoint sha256:", b"PK\x03\x04"))


def error_line(e: BaseException) -> str:
    """An exception as a short fragment of one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


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


# ------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:      # platforms where a folder cannot be opened (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(path.parent)


def _remove(p: Path) -> None:
    """Remove a stale PATH.tmp / PATH.old of a checkpoint; a link is removed itself, never followed."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif os.path.lexists(p):
        p.unlink()


def replace_folder(path: Path, files: dict[str, bytes]) -> None:
    """Replace the checkpoint folder `path` whole or not at all. The files are written into PATH.tmp and
    fsynced; then PATH (if any) is renamed to PATH.old, PATH.tmp to PATH, and PATH.old removed. A run killed
    at any point leaves one whole checkpoint: PATH, or (killed between the two renames) PATH.old, which
    find_checkpoint reads while PATH is missing. The next write removes a stale PATH.tmp or PATH.old."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    _remove(tmp)
    tmp.mkdir()
    for name, data in files.items():
        with open(os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.lexists(path):
        _remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _remove(old)


def _encode(v, key: str, tensors: dict):
    """`v` as JSON, its tensors moved into `tensors` under their key path and referenced as {"$tensor": key};
    a tuple is {"$tuple": [...]}, a dict with keys JSON cannot keep (ints: the optimizer's) {"$items": [[k, v]]}."""
    def sub(k):
        return f"{key}/{k}" if key else str(k)
    if isinstance(v, torch.Tensor):
        name = key if key not in tensors else f"{key}#{len(tensors)}"
        tensors[name] = v.detach().cpu().clone(memory_format=torch.contiguous_format)   # owns its memory
        return {"$tensor": name}
    if isinstance(v, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in v):
            return {k: _encode(x, sub(k), tensors) for k, x in v.items()}
        if not all(k is None or isinstance(k, (str, int, float)) for k in v):
            raise TrainError(f"a checkpoint holds data only: {key or 'it'} has a key of type "
                             f"{type(next(k for k in v if not isinstance(k, (str, int, float)))).__name__}")
        return {"$items": [[k, _encode(x, sub(k), tensors)] for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        items = [_encode(x, sub(i), tensors) for i, x in enumerate(v)]
        return {"$tuple": items} if isinstance(v, tuple) else items
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TrainError(f"a checkpoint holds data only: {key or 'it'} is a {type(v).__module__}.{type(v).__qualname__}")


def checkpoint_files(ck: dict) -> dict[str, bytes]:
    """The three files of checkpoint `ck` (a dict as checkpoint_state makes), refusing what is not data."""
    from safetensors.torch import save
    problem = _problem(ck)
    if problem:
        raise TrainError(f"not a checkpoint: {problem}")
    tensors: dict[str, torch.Tensor] = {}
    state = (json.dumps(_encode(ck, "", tensors), indent=1) + "\n").encode()
    weights = save(tensors)
    manifest = {"format": CHECKPOINT_FORMAT, "version": VERSION,
                "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in ((WEIGHTS, weights), (STATE, state))}}
    return {WEIGHTS: weights, STATE: state, MANIFEST: (json.dumps(manifest, indent=1) + "\n").encode()}


def save_checkpoint(ck: dict, path: str | os.PathLike) -> None:
    """Write checkpoint `ck` as the folder `path`, atomically: the previous checkpoint there stays whole until
    the new one is complete on disk."""
    replace_folder(Path(path), checkpoint_files(ck))


def write_json_atomic(path: Path, obj) -> None:
    _replace_durably(lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()), path)


def write_metrics(out: Path, history: list[dict]) -> None:
    _replace_durably(lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()),
                     out / "metrics.jsonl")


# ------------------------------------------------------------------------------------------- reading
def find_checkpoint(run: Path, name: str = CHECKPOINT) -> Path | None:
    """The checkpoint folder `name` of run folder `run`, or its .old (a run killed between the two renames
    of a checkpoint write), or None. A link there is refused: a checkpoint is the run folder's own."""
    for p in (run / name, run / f"{name}.old"):
        if p.is_symlink():
            raise TrainError(f"{p} is a link: a run's checkpoint must be a folder inside it (links are not followed)")
        if p.is_dir():
            return p
    return None


def _locate(path: str | os.PathLike) -> Path:
    """The checkpoint folder that `path` (a run folder, or a checkpoint folder) names."""
    p = Path(path)
    if p.is_dir() and not os.path.lexists(p / MANIFEST):
        found = find_checkpoint(p)
        if found is not None:
            return found
        if (p / LEGACY[CHECKPOINT]).is_file():
            raise LegacyCheckpoint(p / LEGACY[CHECKPOINT])
        raise TrainError(f"{path}: no checkpoint there (expected a run folder with {CHECKPOINT}/, or the "
                         f"checkpoint folder itself)")
    if p.is_dir():
        return p
    if p.is_file():
        if is_legacy_file(p):
            raise LegacyCheckpoint(p)
        raise TrainError(f"{p} is not a readable checkpoint (not one cachefeat train wrote: a checkpoint is a "
                         f"folder holding {MANIFEST})")
    raise TrainError(f"{path}: no checkpoint there (expected a run folder with {CHECKPOINT}/, or the checkpoint "
                     f"folder itself)")


def _damaged(folder: Path, why: str) -> CheckpointDamaged:
    return CheckpointDamaged(f"{folder} is damaged: {why}; it cannot be used: restore it from a copy, or train "
                             f"the run again (`cachefeat train ... --overwrite`)")


def _read_in(dfd: int, folder: Path, name: str, size: int | None, limit: int | None) -> bytes:
    """File `name` of the checkpoint folder open as `dfd`: a regular file (a link is not followed), of `size`
    bytes (the manifest's, checked before anything is read) and at most `limit`."""
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=dfd)
    except FileNotFoundError:
        raise _damaged(folder, f"its {name} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TrainError(f"{folder / name} is a link: a checkpoint's files must be its own (links are not "
                             f"followed)") from None
        raise TrainError(f"{folder / name} cannot be read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TrainError(f"{folder / name} is not a regular file")
        if size is not None and st.st_size != size:
            raise _damaged(folder, f"its {name} holds {st.st_size:,} bytes where {MANIFEST} says {size:,} "
                                   f"(cut short, extended or replaced)")
        if limit is not None and st.st_size > limit:
            raise TrainError(f"{folder / name} is not a readable checkpoint file: {st.st_size:,} bytes, more than "
                             f"a checkpoint's {name} can be ({limit:,})")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(st.st_size + 1)
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise _damaged(folder, f"its {name} changed while it was read")
    return data


def _manifest(folder: Path, raw: bytes) -> dict:
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError):
        m = None
    if isinstance(m, dict) and m.get("format") == CHECKPOINT_FORMAT and type(m.get("version")) is int \
            and m["version"] > VERSION:
        raise TrainError(f"{folder} was written by a newer cachefeat (checkpoint format {m['version']}; this one "
                         f"reads {VERSION}): upgrade cachefeat")
    files = m.get("files") if isinstance(m, dict) else None
    if not (isinstance(m, dict) and m.get("format") == CHECKPOINT_FORMAT and m.get("version") == VERSION
            and isinstance(files, dict) and set(files) == {WEIGHTS, STATE}
            and all(isinstance(e, dict) and type(e.get("bytes")) is int and e["bytes"] >= 0
                    and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
                    and set(e["sha256"]) <= set("0123456789abcdef") for e in files.values())):
        raise _damaged(folder, f"its {MANIFEST} is not a cachefeat checkpoint manifest")
    return m


def _decode(v, tensors: dict):
    """The inverse of _encode; anything it would not have written is refused (ValueError)."""
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if not any(k.startswith("$") for k in v):
        return {k: _decode(x, tensors) for k, x in v.items()}
    if len(v) != 1:
        raise ValueError(f"an entry it does not write ({json.dumps(v)[:80]})")
    (tag, x), = v.items()
    if tag == "$tensor" and isinstance(x, str) and x in tensors:
        return tensors[x]
    if tag == "$tuple" and isinstance(x, list):
        return tuple(_decode(i, tensors) for i in x)
    if tag == "$items" and isinstance(x, list) and all(
            isinstance(p, list) and len(p) == 2 and (p[0] is None or isinstance(p[0], (str, int, float)))
            for p in x):
        return {p[0]: _decode(p[1], tensors) for p in x}
    raise ValueError(f"an entry it does not write ({json.dumps(v)[:80]})")


def _is(v, types) -> bool:
    """isinstance, except that a bool is no int (JSON's true is not an epoch count)."""
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(v, types) and (bool in types or not isinstance(v, bool))


def _problem(ck) -> str | None:
    """What makes `ck` not a checkpoint dict cachefeat uses, or None: the fields and types every reader of a
    checkpoint relies on (so that a crafted one is refused here, in one line, not deep inside)."""
    if not isinstance(ck, dict):
        return "not a JSON object"
    if ck.get("format") != CHECKPOINT_FORMAT:
        return f"format {ck.get('format')!r}, not {CHECKPOINT_FORMAT!r}"
    for k, types in _FIELDS.items():
        if k not in ck:
            if k not in _OPTIONAL:
                return f"it lacks {k!r}"
        elif not _is(ck[k], types):
            return f"{k!r} is a {type(ck[k]).__name__}"
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in ck["state_dict"].items()):
        return "'state_dict' holds something other than named tensors"
    if not all(isinstance(c, str) for c in ck["classes"]) or not all(isinstance(h, dict) for h in ck["history"]):
        return "'classes' or 'history' holds entries of the wrong type"
    if ck["epoch"] < 0 or not (_is(ck.get("epochs"), int) or _is(ck["train_config"].get("epochs"), int)):
        return "its epochs are not counts"
    groups, state = ck["optimizer"].get("param_groups"), ck["optimizer"].get("state")
    if not (isinstance(groups, list) and isinstance(state, dict) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(_is(i, int) for i in g["params"])
            for g in groups)):
        return "'optimizer' is not an optimizer's state"
    return None


def read_checkpoint(folder: Path) -> dict:
    """The checkpoint dict of checkpoint folder `folder`. Sizes are checked against the manifest before a
    file is read and the SHA-256 digests before it is parsed; parsing is JSON and safetensors only."""
    from safetensors.torch import load
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise TrainError(f"{folder} cannot be read: {e.strerror or e}") from None
    try:
        manifest = _manifest(folder, _read_in(dfd, folder, MANIFEST, None, MAX_MANIFEST_BYTES))
        data = {}
        for name in (WEIGHTS, STATE):
            entry = manifest["files"][name]
            data[name] = _read_in(dfd, folder, name, entry["bytes"], MAX_STATE_BYTES if name == STATE else None)
            if hashlib.sha256(data[name]).hexdigest() != entry["sha256"]:
                raise _damaged(folder, f"its {name} does not match its SHA-256 in {MANIFEST}")
    finally:
        os.close(dfd)
    # safetensors.torch.load parses the bytes just checked (load_file would open the file again: another file by
    # then, or a link); it checks the header's offsets and shapes against the bytes before it builds a tensor
    try:
        tensors = load(data[WEIGHTS])
    except Exception as e:   # safetensors' own error types, for any malformed header or offset
        raise TrainError(f"{folder} is not a readable checkpoint: its {WEIGHTS} is not a safetensors file "
                         f"({error_line(e)})") from None
    try:
        ck = _decode(json.loads(data[STATE]), tensors)
    except (ValueError, RecursionError) as e:
        raise TrainError(f"{folder} is not a readable checkpoint: its {STATE} is not what cachefeat writes "
                         f"({error_line(e)})") from None
    problem = _problem(ck)
    if problem:
        raise TrainError(f"{folder} is not a readable checkpoint: its {STATE}: {problem}")
    return ck


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A run folder or a checkpoint folder -> the checkpoint dict, refusing anything else in one line: a
    checkpoint whose files do not match their manifest with CheckpointDamaged (exit status 1), a version-1
    pickle with LegacyCheckpoint (naming `cachefeat checkpoint migrate`), anything else with TrainError."""
    return read_checkpoint(_locate(path))


def run_folder(path: str | os.PathLike) -> Path:
    """The run folder of `path`, a run folder or one of its checkpoints (where eval writes its report)."""
    p = Path(path)
    return p.parent if p.is_file() or (p.is_dir() and os.path.lexists(p / MANIFEST)) else p


# ------------------------------------------------------------------------------------------- the adapter
def adapter_from_checkpoint(ck: dict) -> tuple[torch.nn.Module, FeatureSpec, Needs]:
    """Rebuild a trained adapter (weights, frozen buffers and all) from its checkpoint. The adapter is built
    first on the meta device (no memory), so that a config claiming huge sizes is refused, in one line, when
    its shapes disagree with the checkpoint's tensors, before anything is allocated for it."""
    weights = sum(t.numel() for t in ck["state_dict"].values())
    # a genuine size option (a width, a depth, a kernel) never exceeds the weights it makes: one that does would
    # build that many modules before any shape could be compared
    big = [k for k, v in ck["adapter_config"].items() if _is(v, int) and abs(v) > max(weights, 1024)]
    if big:
        raise TrainError(f"the checkpoint's adapter config is not one cachefeat train writes: {big[0]}="
                         f"{ck['adapter_config'][big[0]]} exceeds the {weights:,} weights it holds")
    try:
        spec = FeatureSpec.from_meta(ck["cache_meta"])
        cls, config, needs = adapters.resolve(ck["adapter"], ck["adapter_config"], spec)
        with torch.device("meta"):
            shapes = {k: tuple(t.shape) for k, t in cls(config, spec).state_dict().items()}
        held = {k: tuple(t.shape) for k, t in ck["state_dict"].items()}
        if shapes != held:
            wrong = sorted(set(shapes) ^ set(held)) or [k for k in shapes if shapes[k] != held[k]]
            raise TrainError(f"the checkpoint's weights do not fit its adapter {ck['adapter']} "
                             f"({len(wrong)} tensors missing, extra or of another shape, e.g. {wrong[0]})")
        model = cls(config, spec)
        model.load_state_dict(ck["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise TrainError(f"the checkpoint's adapter cannot be rebuilt from it ({error_line(e)})") from None
    model.eval()
    return model, spec, needs


def checkpoint_state(run, model, opt, scaler, epoch: int, history: list[dict], seconds: float) -> dict:
    """Everything a checkpoint holds after `epoch` epochs of `run` (a loop.Run): enough to resume it, to
    rebuild the adapter, to check an eval cache against it, and to run predict."""
    meta = run.train_cache.meta
    return {
        "format": CHECKPOINT_FORMAT, "version": VERSION,
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
