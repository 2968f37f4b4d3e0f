"""Evaluation: the multi-view test protocol on a cache (logits of every view of a video averaged, then
top-1/top-5 per video), per-class accuracy, the confusion matrix (CSV and PNG), and the `eval` command's
run over a trained checkpoint.

When the class list is the synthetic data set's (cachefeat.synth), `reversal_accuracy` is also reported:
how often the true class scores above its time-reversed partner (0.5 = blind to the order of frames).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import autocast
from .config import TrainError


def to_device(batch: dict, device: torch.device, spec) -> dict[str, torch.Tensor]:
    """numpy batch -> float tensors on the device (float16 caches travel as float16 and widen there);
    pixels are scaled to [0, 1] and normalised with the model's mean/std."""
    out = {}
    for k in ("embed", "cls", "tokens"):
        if k in batch:
            out[k] = torch.as_tensor(batch[k]).to(device, non_blocking=True).float()
    if "pixels" in batch:
        p = torch.as_tensor(batch["pixels"]).to(device, non_blocking=True).float().div_(255)
        mean = torch.tensor(spec.mean, device=device).view(1, 1, 1, 1, 3)
        std = torch.tensor(spec.std, device=device).view(1, 1, 1, 1, 3)
        out["pixels"] = (p - mean) / std
    return out


@torch.no_grad()
def clip_logits(model, source, device: torch.device, precision: str, spec) -> tuple[np.ndarray, dict]:
    """Logits of every valid clip of the source (eval order) and their label/video/view/row."""
    model.eval()
    logits, tables = [], {"label": [], "video": [], "view": [], "row": []}
    for batch in source.batches(0, train=False):
        with autocast(device, precision):
            out = model(to_device(batch, device, spec))
        logits.append(out.float().cpu().numpy())
        for k in tables:
            tables[k].append(np.asarray(batch[k]))
    if not logits:
        return np.zeros((0, spec.num_classes), np.float32), {k: np.zeros(0, np.int64) for k in tables}
    return np.concatenate(logits), {k: np.concatenate(v) for k, v in tables.items()}


def video_logits(logits: np.ndarray, videos: np.ndarray, labels: np.ndarray):
    """Average the logits of each video's views: (video ids, (V, C) logits, (V,) labels)."""
    ids, inv = np.unique(videos, return_inverse=True)
    sums = np.zeros((len(ids), logits.shape[1]), np.float64)
    np.add.at(sums, inv, logits)
    counts = np.bincount(inv, minlength=len(ids))[:, None]
    lab = np.full(len(ids), -1, np.int64)
    lab[inv] = labels
    return ids, (sums / counts).astype(np.float32), lab


def metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1/top-5 (fractions), loss, per-class accuracy and the confusion matrix of per-video logits."""
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    C = len(classes)
    n = len(labels)
    if n == 0:
        return {"videos": 0, "top1": None, "top5": None}
    order = np.argsort(-logits, axis=1)
    top1 = float((order[:, 0] == labels).mean())
    k = min(5, C)
    top5 = float((order[:, :k] == labels[:, None]).any(axis=1).mean())
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item())
    conf = np.zeros((C, C), np.int64)
    np.add.at(conf, (labels, order[:, 0]), 1)
    per_class = {classes[c]: (float(conf[c, c] / conf[c].sum()) if conf[c].sum() else None) for c in range(C)}
    out = {"videos": n, "top1": top1, "top5": top5, "loss": loss, "per_class": per_class,
           "confusion": conf.tolist()}
    rev = reversal_accuracy(logits, labels, classes)
    if rev is not None:
        out["reversal_accuracy"] = rev
    return out


def reversal_accuracy(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> float | None:
    """For the synthetic data set: how often the true class outscores its time reversal (chance 0.5)."""
    from ..synth import class_names, reversal_partner
    try:
        if list(classes) != class_names(len(classes)):
            return None
    except ValueError:
        return None
    partner = np.array([reversal_partner(int(c)) for c in labels])
    rows = np.arange(len(labels))
    return float((logits[rows, labels] > logits[rows, partner]).mean())


def evaluate(model, source, device: torch.device, precision: str, spec, classes: list[str]) -> dict:
    """The multi-view protocol over every valid clip of a source."""
    logits, t = clip_logits(model, source, device, precision, spec)
    clip_top1 = float((logits.argmax(1) == t["label"])[t["label"] >= 0].mean()) if len(logits) else None
    _, vlogits, vlabels = video_logits(logits, t["video"], t["label"])
    out = metrics(vlogits, vlabels, classes)
    out["clips"] = int(len(logits))
    out["clip_top1"] = clip_top1
    return out


# ------------------------------------------------------------------------------------------- reports
def write_confusion(out_dir: Path, conf: list[list[int]], classes: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, conf):
            w.writerow([name, *row])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    C = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * C + 2), max(3.5, 0.5 * C + 1.5)))
    m = np.asarray(conf, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if C <= 30:
        ax.set_xticks(range(C), classes, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(C), classes, fontsize=7)
        for i in range(C):
            for j in range(C):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (rows normalised)")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=120)
    plt.close(fig)


def write_per_class(out_dir: Path, per_class: dict, conf: list[list[int]]) -> None:
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "videos", "accuracy"])
        for (name, acc), row in zip(per_class.items(), conf):
            w.writerow([name, sum(row), "" if acc is None else f"{acc:.4f}"])


def report_dir(checkpoint: str | Path, cache: str | Path, out: str | Path | None = None) -> Path:
    """Where `eval` writes its report: `out`, else RUN/eval-<cache name>. An earlier eval's folder is
    replaced (its figures are a function of checkpoint and cache); anything else is refused."""
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    out_dir = Path(out) if out else run_dir / f"eval-{Path(cache).name.removesuffix('.zarr')}"
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "metrics.json").is_file()):
        raise TrainError(f"--out {out_dir} exists and is not the output of an earlier cachefeat eval; "
                         f"choose another --out")
    return out_dir


def write_report(out_dir: Path, result: dict, classes: list[str]) -> None:
    """metrics.json (with `files`: the report's other files, relative to out_dir), and with a confusion
    matrix: per_class.csv, confusion.csv and confusion.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if result.get("confusion") is not None:
        write_confusion(out_dir, result["confusion"], classes)
        write_per_class(out_dir, result["per_class"], result["confusion"])
        result = {**result, "files": {"per_class": "per_class.csv", "confusion_csv": "confusion.csv",
                                      "confusion_png": "confusion.png"}}
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out_dir / "metrics.json")
