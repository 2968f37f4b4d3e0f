"""Stage two's training loop: train an adapter on a cache (or on any FeatureSource), never touching the
backbone.

    open_run(...)    open and check the caches, resolve the adapter against them, build the sources
    train(...)       the training loop: one function, top to bottom
    checkpoints      written atomically (checkpoint.py) after every epoch; `--resume` continues from one

The data order, dropout and mixup draws are functions of (seed, epoch) only, so a resumed run repeats
the uninterrupted one exactly, and a run from an OnlineSource sees the same batches as from the cache.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import adapters
from ..adapters import CacheMismatch, FeatureSpec, Needs
from ..devices import autocast, cpu_threads, resolve_device, resolve_precision  # noqa: F401 (cpu_threads: API)
from ..store import Cache, open_cache
from .checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    check_fits,
    checkpoint_state,
    error_line,
    save_checkpoint,
    write_json_atomic,
    write_metrics,
)
from .config import TrainConfig, TrainDiverged, TrainError, planned_epochs
from .coverage import check_cache_use
from .evaluate import evaluate, to_device
from .reader import CachedSource, FeatureSource
from .tracking import Where, open_tracker


# ------------------------------------------------------------------------------------------- setup
def resolve_adapter(name: str, options: dict, meta: dict):
    """(adapter class, config, needs, spec) for a training cache's metadata; refuses, in one line, a cache
    that cannot provide what the adapter needs."""
    spec = FeatureSpec.from_meta(meta)
    if spec.num_classes < 2:
        raise CacheMismatch("the cache has no class list (extract with --classes or labelled inputs)")
    cls, config, needs = adapters.resolve(name, options, spec)
    check_fits(meta, name, needs, "the training cache")
    return cls, config, needs, spec


def build_adapter(cls, config, spec: FeatureSpec, needs: Needs, cache: Cache, seed: int):
    """Construct the adapter from `seed`, then give it what it needs once: the cache's text embeddings,
    the frozen backbone's weights (rebuilt from the cache metadata, weights hash checked)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config, spec)
    if needs.text:
        model.set_text(torch.from_numpy(np.asarray(cache.read("text/embed"), dtype=np.float32)))
    if needs.backbone_weights:
        from .online import backbone_from_meta
        model.set_backbone(backbone_from_meta(cache.meta, device="cpu"))
    return model


@dataclass
class Run:
    """Everything a training run needs, opened and checked."""
    cfg: TrainConfig
    train_cache: Cache
    val_cache: Cache | None
    spec: FeatureSpec
    needs: Needs
    model: torch.nn.Module
    train_source: FeatureSource
    val_source: FeatureSource | None
    coverage: dict | None = None     # {"train": ..., "val": ...}: what of each cache is used (coverage.coverage)
    epochs: int = 0                  # the epochs this run trains (cfg.epochs, or what `auto` plans for the data)


def open_run(cfg: TrainConfig, cache: str, val_cache: str | None = None, allow_incomplete: bool = False,
             check_device: bool = True) -> Run:
    """Open and check everything a run needs before anything is written: the caches (an unfinished one, or
    one being written, refused unless `allow_incomplete`), the adapter against them, and (`check_device`)
    the device and precision this process would train on."""
    train = open_cache(cache)
    val = open_cache(val_cache) if val_cache else None
    cov = {"train": check_cache_use(train, allow_incomplete)}
    if val is not None:
        cov["val"] = check_cache_use(val, allow_incomplete)
    if check_device:
        resolve_precision(cfg.precision, resolve_device(cfg.device), gpu_auto="bf16")
    if not train.valid().any():
        raise TrainError(f"{cache} has no valid clips (is its extraction finished? see cachefeat info)")
    cls, config, needs, spec = resolve_adapter(cfg.adapter, cfg.adapter_opts, train.meta)
    if val is not None:
        check_fits(val.meta, cfg.adapter, needs, f"the val cache {val_cache}", trained_meta=train.meta, trained=spec)
    model = build_adapter(cls, config, spec, needs, train, cfg.seed)
    src = CachedSource(train, needs, cfg.batch_size, cfg.seed, cfg.in_memory, cfg.read_workers,
                       train_views=cfg.train_views)
    vsrc = (CachedSource(val, needs, cfg.batch_size, cfg.seed, cfg.in_memory, cfg.read_workers)
            if val is not None else None)
    epochs = planned_epochs(cfg.epochs, cfg.min_steps, src.steps(0, train=True))
    return Run(cfg, train, val, spec, needs, model, src, vsrc, cov, epochs)


# ------------------------------------------------------------------------------------------- pieces
def lr_at(step: int, cfg: TrainConfig, warmup: int, total: int) -> float:
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float, on: str = "matrices") -> list[dict]:
    """AdamW's parameter groups. `matrices`: weight decay on weight matrices only, not on biases, norms,
    queries or position embeddings (timm's and DiST's grouping); `all`: on every parameter (EVL's
    `AdamW(model.parameters(), weight_decay=0.05)` in main.py)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if on != "all" and (p.ndim <= 1 or name in skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mix(x: dict[str, torch.Tensor], target: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator):
    """Feature-space mixup or cutmix (picked at random when both are on, as DiST/timm switch with p=0.5).
    Mixup blends whole clips; cutmix replaces a span of frames (all arrays alike, pixels at their K x rate)
    with the same span of the clip mirrored in the batch; targets mix by the share of each clip kept."""
    kinds = [k for k, a in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if a > 0]
    if not kinds or target.shape[0] < 2:
        return x, target
    kind = kinds[int(rng.integers(len(kinds)))]
    lam = float(rng.beta(cfg.mixup if kind == "mixup" else cfg.cutmix, cfg.mixup if kind == "mixup" else cfg.cutmix))
    flip = torch.arange(target.shape[0] - 1, -1, -1, device=target.device)
    if kind == "mixup":
        x = {k: lam * v + (1 - lam) * v[flip] for k, v in x.items()}
    else:
        frames = next((v.shape[1] for k, v in x.items() if k != "pixels"), None) or x["pixels"].shape[1]
        cut = int(round((1 - lam) * frames))
        start = int(rng.integers(0, frames - cut + 1))
        out = {}
        for k, v in x.items():
            f = v.shape[1] // frames   # pixels hold K frames per backbone frame
            v = v.clone()
            v[:, start * f:(start + cut) * f] = v[flip][:, start * f:(start + cut) * f]
            out[k] = v
        x, lam = out, 1 - cut / frames
    return x, lam * target + (1 - lam) * target[flip]


def _diverged(what: str, epoch: int, run: Run, out: Path | None, kept: int, where: str = "") -> TrainDiverged:
    cfg = run.cfg
    kept_msg = (f"the checkpoint of epoch {kept} in {out} is kept" if out is not None and kept
                else "no epoch finished, so there is no checkpoint" if out is not None else "nothing was saved")
    return TrainDiverged(f"{what} at epoch {epoch + 1}/{run.epochs or cfg.epochs}{where}: training stopped; "
                         f"{kept_msg}. "
                         f"Lower --lr (now {cfg.lr:g}), keep --grad-clip on, or use --precision fp32")


def plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    if any(h.get("val_loss") is not None for h in history):
        a.plot(ep, [h.get("val_loss") for h in history], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [h["train_top1"] for h in history], label="train top-1")
    if any(h.get("val_top1") is not None for h in history):
        b.plot(ep, [h.get("val_top1") for h in history], label="val top-1")
        b.plot(ep, [h.get("val_top5") for h in history], label="val top-5", linestyle="--")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.set_ylim(0, 1)
    b.legend()
    from matplotlib.ticker import MaxNLocator
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    history: list[dict]
    step_losses: list[float]
    summary: dict


@dataclass(frozen=True)
class Part:
    """This process's share of a data-parallel run: worker `rank` of `world`. Every worker takes its slice
    of each global batch (the source's `part`) and DDP averages the gradients, so the steps, schedule and
    global batches are those of one process. Only rank 0 validates and writes the run folder."""
    rank: int = 0
    world: int = 1


@dataclass
class Step:
    """What one epoch's steps need and change (the model as trained: DDP-wrapped in a distributed run)."""
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    warmup: int
    total_steps: int
    steps_per_epoch: int


def train_epoch(run: Run, st: Step, epoch: int, part: Part = Part()) -> tuple[dict, list[float]]:
    """One pass over this worker's batches of `epoch`: (sums {loss, correct, seen, lr}, per-step losses).
    Dropout and mixing draws are functions of (seed, epoch) (and the rank, in a distributed run)."""
    cfg, spec = run.cfg, run.spec
    st.net.train()
    torch.manual_seed(cfg.seed * 100_003 + epoch + 7_919 * part.rank)           # dropout draws
    rng = np.random.default_rng([cfg.seed, epoch, 303] + ([part.rank] if part.world > 1 else []))  # mixing
    loss_sum, correct, seen, lr, losses = 0.0, 0, 0, cfg.lr, []
    nbytes, waited, t = 0, 0.0, time.perf_counter()    # what the reader delivered, and the time spent waiting
    for i, batch in enumerate(run.train_source.batches(epoch, train=True)):
        waited += time.perf_counter() - t
        nbytes += sum(v.nbytes for v in batch.values() if hasattr(v, "nbytes"))
        step = epoch * st.steps_per_epoch + i
        lr = lr_at(step, cfg, st.warmup, st.total_steps)
        for group in st.opt.param_groups:
            group["lr"] = lr
        x = to_device(batch, st.device, spec)
        labels = torch.as_tensor(batch["label"], device=st.device)
        target = F.one_hot(labels, spec.num_classes).float()
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / spec.num_classes
        x, target = mix(x, target, cfg, rng)
        with autocast(st.device, st.precision):
            logits = st.net(x)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        if not _finite_everywhere(loss, part, st.device):   # before the step: the weights stay as they were
            raise NonFiniteLoss(loss.item(), i + 1)
        st.opt.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()                      # DDP: gradients averaged over the workers here
        if cfg.grad_clip > 0:
            st.scaler.unscale_(st.opt)
            torch.nn.utils.clip_grad_norm_(st.net.parameters(), cfg.grad_clip)
        st.scaler.step(st.opt)
        st.scaler.update()
        losses.append(loss.item())
        loss_sum += losses[-1] * len(labels)
        correct += int((logits.argmax(dim=-1) == labels).sum())
        seen += len(labels)
        t = time.perf_counter()
    return {"loss": loss_sum, "correct": correct, "seen": seen, "lr": lr, "bytes": nbytes, "waited": waited}, losses


class NonFiniteLoss(Exception):
    def __init__(self, value: float, step: int):
        super().__init__(f"loss {value} at step {step}")
        self.value, self.step = value, step


def _finite_everywhere(loss: torch.Tensor, part: Part, device) -> bool:
    """Is the loss finite on every worker? All of a distributed run's workers must stop at the same step
    (one that stopped alone would leave the others waiting in the gradient all-reduce)."""
    finite = bool(torch.isfinite(loss))
    if part.world == 1:
        return finite
    import torch.distributed as dist
    bad = torch.tensor(0.0 if finite else 1.0, device=device)
    dist.all_reduce(bad)
    return bad.item() == 0


def _all_sum(sums: dict, keys: tuple[str, ...], device) -> dict:
    """Sum `keys` of `sums` over the workers of a distributed run."""
    import torch.distributed as dist
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {**sums, **{k: v for k, v in zip(keys, t.tolist())}}


def train(run: Run, out: str | os.PathLike | None, resume: dict | None = None, log=print, part: Part = Part(),
          on_epoch=None, log_to: Where | None = None) -> TrainResult:
    """Train `run.model` on `run.train_source`, evaluating on `run.val_source` after every epoch. With `out`,
    writes checkpoint/ (every epoch, atomically), metrics.jsonl, summary.json and curves.png there.
    `resume`: a checkpoint of this run to continue from. `part`: this worker's share of a data-parallel run
    (a process group must be initialised; cachefeat.train_distributed does that through Ray Train).
    `on_epoch(record)`: called after every epoch's checkpoint (an ablation reports to Ray Tune there).
    With `cfg.log` (tensorboard, wandb), every epoch also goes there (tracking.py): into `out`, or `log_to`."""
    cfg, model = run.cfg, run.model
    main = part.rank == 0
    out = Path(out) if out is not None and main else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, gpu_auto="bf16")
    model.to(device)
    net = model
    if part.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        run.train_source.part = (part.rank, part.world)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one kernel over all parameters; on a CPU core 11x faster than the per-tensor loop for EVL's
    # 33M parameters (0.037 vs 0.42 s per step), which made the optimiser most of a CPU step
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.weight_decay_on), lr=cfg.lr,
                            betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    steps_per_epoch = run.train_source.steps(0, train=True)
    epochs = run.epochs or cfg.epochs
    st = Step(net, opt, scaler, device, precision, int(round(cfg.warmup_epochs * steps_per_epoch)),
              epochs * steps_per_epoch, steps_per_epoch)
    classes = run.train_cache.classes
    history: list[dict] = []
    step_losses: list[float] = []
    start_epoch, seconds = 0, 0.0
    if resume is not None:
        try:
            model.load_state_dict(resume["state_dict"])
            opt.load_state_dict(resume["optimizer"])
            scaler.load_state_dict(resume["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:   # a checkpoint of another run, or crafted
            raise TrainError(f"--resume: the checkpoint in {out} does not fit this run ({error_line(e)}); "
                             f"--overwrite to start over") from None
        start_epoch, history, seconds = resume["epoch"], list(resume["history"]), resume.get("train_seconds", 0.0)
        log(f"resuming {out} after epoch {start_epoch} of {epochs}")

    tracker = None
    try:
        if main and (out is not None or log_to is not None):
            tracker = open_tracker(cfg.log, log_to or Where(out), run, resumed=resume is not None)
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            try:
                sums, losses = train_epoch(run, st, epoch, part)
            except NonFiniteLoss as e:
                raise _diverged(f"the loss became {e.value}", epoch, run, out, epoch,
                                f", step {e.step}/{steps_per_epoch}") from None
            if part.world > 1:
                sums = _all_sum(sums, ("loss", "correct", "seen", "bytes"), device)
            step_losses += losses
            epoch_seconds = time.perf_counter() - t0
            seconds += epoch_seconds
            seen = sums["seen"]
            record = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(seen, 1),
                      "train_top1": sums["correct"] / max(seen, 1), "lr": sums["lr"],
                      "seconds": round(epoch_seconds, 3),
                      "clips_per_s": round(seen / max(epoch_seconds, 1e-9), 1)}
            if run.val_source is not None and main:
                val = evaluate(model, run.val_source, device, precision, run.spec, classes,
                               view_average=cfg.view_average)
                record.update({"val_loss": val.get("loss"), "val_top1": val["top1"], "val_top5": val["top5"],
                               "val_clip_top1": val["clip_top1"]})
                if "reversal_accuracy" in val:
                    record["val_reversal_accuracy"] = val["reversal_accuracy"]
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad:   # a finite loss with a non-finite update: never checkpoint such weights
                raise _diverged(f"weights became non-finite ({', '.join(bad[:3])})", epoch, run, out, epoch)
            history.append(record)
            if out is not None:
                state = checkpoint_state(run, model, opt, scaler, epoch + 1, history, seconds)
                save_checkpoint(state, out / CHECKPOINT)
                if _best_so_far(history):       # the best val top-1 yet: kept beside the last checkpoint
                    save_checkpoint(state, out / BEST_CHECKPOINT)
                write_metrics(out, history)
            if main:
                log(_epoch_line(record, epochs))   # after the checkpoint: a reported epoch survives a crash
            if tracker is not None:
                tracker.epoch(record, {"step_seconds": epoch_seconds / max(1, steps_per_epoch),
                                       "read_mb_per_s": sums["bytes"] / 1e6 / max(epoch_seconds, 1e-9),
                                       "data_wait_fraction": sums["waited"] / max(epoch_seconds, 1e-9)})
            if on_epoch is not None:
                on_epoch(record)
    except BaseException:
        if tracker is not None:
            tracker.close(None)
        if out is not None and out.is_dir() and not any(out.iterdir()):
            out.rmdir()   # a run that failed before its first checkpoint leaves no empty run folder behind
        raise
    finally:   # streamed sources read ahead into the next epoch: stop their reader processes
        for source in (run.train_source, run.val_source):
            if source is not None:
                source.close()

    summary = make_summary(run, history, seconds, precision, device)
    if part.world > 1:
        summary["workers"] = part.world
    if out is not None:
        # the run folder's files, relative to it: what a reader of summary.json opens next
        summary["files"] = {"checkpoint": CHECKPOINT, "metrics": "metrics.jsonl", "curves_png": "curves.png"}
        if (out / BEST_CHECKPOINT).is_dir():
            summary["files"]["best_checkpoint"] = BEST_CHECKPOINT
        if history:
            plot_curves(out / "curves.png", history)
        write_json_atomic(out / "summary.json", summary)   # last: a run with a summary is complete
    if tracker is not None:
        tracker.close(summary)
    return TrainResult(history, step_losses, summary)


def _best_so_far(history: list[dict]) -> bool:
    """Is the last epoch's val top-1 higher than every earlier epoch's (the first validated epoch is)?"""
    last = history[-1].get("val_top1")
    return last is not None and all(h.get("val_top1") is None or h["val_top1"] < last for h in history[:-1])


def _epoch_line(r: dict, epochs: int) -> str:
    s = f"epoch {r['epoch']:>3}/{epochs}  loss {r['train_loss']:.4f}  train top-1 {100 * r['train_top1']:5.1f}%"
    if r.get("val_top1") is not None:
        s += f"  val loss {r['val_loss']:.4f}  top-1 {100 * r['val_top1']:5.1f}%  top-5 {100 * r['val_top5']:5.1f}%"
    return s + f"  lr {r['lr']:.2e}  {r['seconds']:.1f} s ({r['clips_per_s']:.0f} clips/s)"


def make_summary(run: Run, history: list[dict], seconds: float, precision: str, device) -> dict:
    last = history[-1] if history else {}
    best = max((h for h in history if h.get("val_top1") is not None), key=lambda h: h["val_top1"], default=None)
    return {
        "adapter": run.cfg.adapter, "adapter_config": asdict(run.model.config),
        "trainable_params": run.model.num_trainable(), "reads": run.needs.describe(),
        "train_cache": str(run.train_cache.path), "val_cache": str(run.val_cache.path) if run.val_cache else None,
        "train_clips_per_epoch": len(run.train_source.rows(0, train=True)), "classes": len(run.train_cache.classes),
        "epochs": len(history), "train_seconds": round(seconds, 2), "device": str(device), "precision": precision,
        "in_memory": getattr(getattr(run.train_source, "dataset", None), "in_memory", None),
        "coverage": run.coverage, "final": last, "best_epoch": best["epoch"] if best else None,
        "best_val_top1": best["val_top1"] if best else None, "config": run.cfg.to_dict(),
    }
