"""Where a run's metrics go besides metrics.jsonl: TensorBoard event files and Weights & Biases runs
(`--log tensorboard`, `--log wandb`, `--log tensorboard,wandb`; both optional extras).

    RUN/tensorboard/                 a train run's event files (`tensorboard --logdir RUN/tensorboard`)
    RUN/wandb/offline-run-*/         its W&B run (WANDB_MODE=offline: no account; `wandb sync` later)
    ABL/tensorboard/<trial>/         an ablation's trials, one TensorBoard run each, plus the HParams
    ABL/tensorboard/                 experiment (ablate.write_hparams); W&B runs in ABL/wandb, group = ablation

Logging only reads what the loop already computed; it never touches the model, the optimiser or a random
generator, so a run trains the same with it and without it. A destination that fails mid-run (a removed
folder, a full disk, a dead W&B process) warns once on stderr and is dropped; training goes on.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import LOG_DESTINATIONS, TrainError, log_names

DESTINATIONS = LOG_DESTINATIONS
TB_DIR, WANDB_DIR = "tensorboard", "wandb"
# record key -> TensorBoard tag (also the W&B key): per epoch, step = the epoch number
SCALARS = {"train_loss": "train/loss", "train_top1": "train/top1", "val_loss": "val/loss", "val_top1": "val/top1",
           "val_top5": "val/top5", "val_clip_top1": "val/clip_top1",
           "val_reversal_accuracy": "val/reversal_accuracy", "lr": "train/lr", "clips_per_s": "perf/clips_per_s"}


class TrackingError(TrainError):
    """--log names a destination that is not installed or cannot start (one line, exit status 2)."""


def parse_log(value: str) -> tuple[str, ...]:
    """`none`, `tensorboard`, `wandb` or both comma-separated -> the destinations, in DESTINATIONS order."""
    names = log_names(value)
    bad = sorted(names - set(DESTINATIONS))
    if bad:
        raise TrackingError(f"--log {value}: unknown destination {bad[0]!r} (none, tensorboard, wandb, or "
                            f"tensorboard,wandb)")
    return tuple(d for d in DESTINATIONS if d in names)


def check(value: str) -> tuple[str, ...]:
    """The destinations of `value`, each importable; else one line naming the extra to install."""
    dests = parse_log(value)
    for d in dests:
        try:
            if d == "tensorboard":
                import torch.utils.tensorboard  # noqa: F401 (needs the tensorboard package)
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise TrackingError(f"--log {d} needs the {d} package: pip install 'cachefeat[{d}]'") from None
    return dests


@dataclass(frozen=True)
class Where:
    """Where a run logs: `root` holds tensorboard/ and wandb/; `name` is a trial's run under them (None: the
    run folder itself is the root); `group` the W&B group (the ablation's name)."""
    root: Path
    name: str | None = None
    group: str | None = None

    @property
    def tensorboard(self) -> Path:
        return self.root / TB_DIR / self.name if self.name else self.root / TB_DIR


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread re-raises a write error in its thread (a traceback on stderr) and hands it
    to the next flush, where the Tracker warns once: its own report is silenced, other threads' are not."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    previous = threading.excepthook
    if getattr(previous, "cachefeat_quiet", False):
        return

    def hook(args):
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)
    hook.cachefeat_quiet = True
    threading.excepthook = hook


def _warn(dest: str, e: BaseException) -> None:
    msg = " ".join(str(e).split())[:200]
    print(f"warning: --log {dest} stopped ({type(e).__name__}: {msg}); training goes on, metrics.jsonl has every "
          f"epoch", file=sys.stderr, flush=True)


class Tracker:
    """The destinations of one run. `start` opens them (a failure there is a TrackingError, and what it wrote
    is removed); after that, a destination that fails warns once and is dropped."""

    def __init__(self, dests: tuple[str, ...], where: Where, run):
        self.dests, self.where, self.run = dests, where, run
        self.tb = self.wb = None

    def start(self, resumed: bool = False) -> Tracker:
        cfg, meta = self.run.cfg, self.run.train_cache.meta
        config = {**cfg.to_dict(), "train_cache": str(self.run.train_cache.path),
                  "val_cache": str(self.run.val_cache.path) if self.run.val_cache else None,
                  "cache_fingerprint": meta.get("fingerprint"), "backbone": meta.get("model"),
                  "trainable_params": self.run.model.num_trainable(), "epochs_planned": self.run.epochs}
        made = [p for p in (self.where.tensorboard, self.where.root / WANDB_DIR) if not p.exists()]
        current = "tensorboard"
        try:
            if "tensorboard" in self.dests:
                from torch.utils.tensorboard import SummaryWriter
                _quiet_writer_thread()
                self.tb = SummaryWriter(str(self.where.tensorboard))
                if not resumed:
                    self.tb.add_text("run/config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
                    self.tb.add_text("run/cache", f"fingerprint `{meta.get('fingerprint')}`, train cache "
                                                  f"`{config['train_cache']}`, val cache `{config['val_cache']}`")
                    self.tb.add_text("run/backbone", "```\n" + json.dumps(meta.get("model"), indent=2) + "\n```")
                self.tb.flush()
            if "wandb" in self.dests:
                current = "wandb"
                import wandb
                (self.where.root / WANDB_DIR).mkdir(parents=True, exist_ok=True)
                self.wb = wandb.init(
                    project="cachefeat", name=self.where.name or self.where.root.name, group=self.where.group,
                    job_type="trial" if self.where.group else "train", dir=str(self.where.root), config=config,
                    reinit="create_new", settings=wandb.Settings(console="off", silent=True, save_code=False))
        except Exception as e:
            self.close(None)
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            hint = "; WANDB_MODE=offline logs without an account (wandb sync later)" if current == "wandb" else ""
            raise TrackingError(f"--log {current}: could not start ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}){hint}") from None
        return self

    def _each(self, fn_tb, fn_wb) -> None:
        """Call a destination's writer; one that fails is dropped after a warning."""
        if self.tb is not None:
            try:
                fn_tb(self.tb)
            except Exception as e:
                _warn("tensorboard", e)
                self._drop_tb()
        if self.wb is not None:
            try:
                fn_wb(self.wb)
            except Exception as e:
                _warn("wandb", e)
                self.wb = None

    def _drop_tb(self) -> None:
        tb, self.tb = self.tb, None
        # the writer already failed once and was reported: a second failure while closing it says nothing new
        with contextlib.suppress(Exception):
            tb.close()

    def epoch(self, record: dict, perf: dict) -> None:
        """One epoch's record (metrics.jsonl's) and its timings (step_seconds, read_mb_per_s, data_wait_fraction)."""
        step = int(record["epoch"])
        values = {tag: float(record[k]) for k, tag in SCALARS.items() if record.get(k) is not None}
        values.update({f"perf/{k}": float(v) for k, v in perf.items() if v is not None})

        def tb(w):
            for tag, v in values.items():
                w.add_scalar(tag, v, step)
            w.flush()     # each epoch on disk: the dashboard follows the run, and a failing disk shows here
        self._each(tb, lambda w: w.log({**values, "epoch": step}, step=step))

    def close(self, summary: dict | None) -> None:
        """Finish the run: W&B's summary gets the final and best metrics."""
        if summary is not None and self.wb is not None:
            final = {f"final/{k}": v for k, v in (summary.get("final") or {}).items() if isinstance(v, (int, float))}
            self._each(lambda w: None, lambda w: w.summary.update(
                {**final, "best_epoch": summary.get("best_epoch"), "best_val_top1": summary.get("best_val_top1")}))
        if self.tb is not None:
            try:
                self.tb.close()
            except Exception as e:
                _warn("tensorboard", e)
            self.tb = None
        if self.wb is not None:
            try:
                self.wb.finish()
            except Exception as e:
                _warn("wandb", e)
            self.wb = None


def open_tracker(log: str, where: Where | None, run, resumed: bool = False) -> Tracker | None:
    """The started Tracker of `log` (TrainConfig.log) for a run logging at `where`, or None (nothing asked)."""
    dests = check(log)
    if not dests or where is None:
        return None
    return Tracker(dests, where, run).start(resumed)
