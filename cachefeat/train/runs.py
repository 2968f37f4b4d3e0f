"""Run folders: what `train` does with an existing --out (resume it, replace it, or refuse), and `compare`
reading finished runs side by side. The CLI and Python callers share this policy."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import Damaged
from ..store import Cache
from .checkpoint import CHECKPOINT, LEGACY, find_checkpoint, load_checkpoint
from .config import TrainConfig, TrainError


@dataclass
class RunFolder:
    """A run folder checked against the settings of a new run. Nothing is deleted until `start()`, so a run
    refused for another reason (a bad option, a cache that does not fit) leaves the old run intact."""
    path: Path
    cfg: TrainConfig
    resume_from: dict | None     # the checkpoint to continue from; None: start fresh
    replace: bool                # the folder holds an earlier run (or one killed before its first checkpoint)

    @property
    def finished(self) -> bool:
        """A resumed run that has already trained for all its epochs."""
        return self.resume_from is not None and self.resume_from["epoch"] >= planned(self.resume_from)

    def check_cache(self, train_cache: Cache) -> None:
        """A resumed run must train on the cache it started on."""
        if self.resume_from is not None and \
                self.resume_from["cache_meta"].get("fingerprint") != train_cache.meta.get("fingerprint"):
            raise TrainError(f"--resume: {train_cache.path} is not the cache {self.path} was trained on "
                             f"({self.resume_from['train_cache']})")

    def start(self) -> None:
        """Clear an earlier run being replaced, then make sure the folder exists."""
        if self.replace:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)


def planned(ck: dict) -> int:
    """The epochs a checkpoint's run trains (checkpoints before `--epochs auto` hold only the setting)."""
    return int(ck.get("epochs") or ck["train_config"]["epochs"])


def open_run_folder(out: str | Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Decide what a new run does with `out`: continue its run (`resume`, with the same result-changing
    settings), replace it (`overwrite`), or refuse in one line (TrainError); a folder that is not a
    cachefeat run is never replaced."""
    path = Path(out)
    # a run folder holds its checkpoint, or one of the old format (which load_checkpoint refuses, naming migrate)
    is_run = path.is_dir() and (find_checkpoint(path) is not None or (path / LEGACY[CHECKPOINT]).is_file())
    if is_run and not overwrite:
        ck = load_checkpoint(path)
        if not resume:
            raise TrainError(f"{out} already holds a run (epoch {ck['epoch']} of {planned(ck)}); "
                             f"--resume to continue it, --overwrite to start over, or another --out")
        old = ck["train_config"]
        diffs = [f"{k}: {old.get(k)!r} vs {getattr(cfg, k)!r}" for k in TrainConfig.RESULT_KEYS
                 if old.get(k) != getattr(cfg, k)]
        if diffs:
            raise TrainError(f"--resume: {out} was trained with other settings ({'; '.join(diffs[:4])}); "
                             f"use the same settings, or --overwrite")
        return RunFolder(path, cfg, ck, replace=False)
    if path.exists() and any(path.iterdir()):
        if not is_run and any(p.suffix != ".tmp" for p in path.iterdir()):
            raise TrainError(f"{out} exists and is not a cachefeat run; choose another --out")
        return RunFolder(path, cfg, None, replace=True)
    return RunFolder(path, cfg, None, replace=False)


def compare_runs(runs: list[str | Path]) -> list[dict]:
    """One row per finished run: adapter, trainable parameters, epochs, training time, and top-1/top-5 (and
    the synthetic set's reversal accuracy) of its latest `cachefeat eval`, else of its last validation."""
    rows = []
    for run in runs:
        d = Path(run)
        if not (d / "summary.json").is_file():
            raise TrainError(f"{run} has no summary.json (not a finished cachefeat train run)")
        s = _read_json(d / "summary.json")
        evals = sorted(d.glob("eval-*/metrics.json"), key=lambda p: p.stat().st_mtime)
        if evals:
            m = _read_json(evals[-1])
            source = f"eval on {Path(m['cache']).name}"
        else:
            f = s.get("final") or {}
            m = {"top1": f.get("val_top1"), "top5": f.get("val_top5"),
                 "reversal_accuracy": f.get("val_reversal_accuracy")}
            source = "last validation" if m["top1"] is not None else "-"
        rows.append({"run": str(run), "adapter": s["adapter"], "trainable_params": s["trainable_params"],
                     "epochs": s["epochs"], "train_seconds": s["train_seconds"], "top1": m.get("top1"),
                     "top5": m.get("top5"), "reversal_accuracy": m.get("reversal_accuracy"), "measured_by": source})
    return rows


def _read_json(path: Path) -> dict:
    """A run's JSON file, or one line saying it is damaged."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDamaged(f"{path} is not readable JSON ({type(e).__name__}); the run folder is damaged: "
                         f"evaluate or train it again") from None
    if not isinstance(data, dict):
        raise RunDamaged(f"{path} does not hold a JSON object; the run folder is damaged: evaluate or train it "
                         f"again")
    return data


class RunDamaged(Damaged, TrainError):
    """A run folder's file that cannot be read (exit status 1)."""
