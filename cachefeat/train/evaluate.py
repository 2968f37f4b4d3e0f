"""Evaluation: the multi-view test protocol on a cache (every view of a video averaged, then top-1/top-5 per
video: their logits, or with `view_average="prob"` their softmax probabilities as EVL's evaluation does),
per-class accuracy, the confusion matrix (sparse, so its size follows the videos, not the square of the
classes), per-video logits, and the report files of the `eval` command.

When the class list is the synthetic data set's (cachefeat.synth), `reversal_accuracy` is also reported:
how often the true class scores above its time-reversed partner (0.5 = blind to the order of frames).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import autocast
from .checkpoint import run_folder
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
def clip_logits(model, source, device: torch.device, precision: str, spec, progress=None) -> tuple[np.ndarray, dict]:
    """Logits of every valid clip of the source (eval order) and their label/video/view/row. `progress(n)`
    is called with the clips of each batch done."""
    model.eval()
    # filled in place: concatenating per-batch pieces would hold the (clips, classes) logits twice
    logits = np.empty((len(source.rows(0, train=False)), spec.num_classes), np.float32)
    tables, n = {"label": [], "video": [], "view": [], "row": []}, 0
    for batch in source.batches(0, train=False):
        with autocast(device, precision):
            out = model(to_device(batch, device, spec))
        b = len(out)
        logits[n:n + b] = out.float().cpu().numpy()
        n += b
        for k in tables:
            tables[k].append(np.array(batch[k]))     # a copy: a view would keep the whole batch buffer alive
        if progress is not None:
            progress(b)
    if not n:
        return logits[:0], {k: np.zeros(0, np.int64) for k in tables}
    return logits[:n], {k: np.concatenate(v) for k, v in tables.items()}


VIEW_AVERAGES = ("logit", "prob")


def video_logits(logits: np.ndarray, videos: np.ndarray, labels: np.ndarray, view_average: str = "logit",
                 block: int = 4096):
    """Average each video's views: (video ids, (V, C) scores, (V,) labels). `logit`: the mean of the views'
    logits; `prob`: the log of the mean of their softmax probabilities (EVL's test protocol, `main.py`
    evaluate(): logits.softmax(-1).mean(0)), a log-probability, so the loss and the ranking read it like
    logits. One (V, C) float32 array; softmax in blocks of `block` clips: no (clips, C) temporary, since at
    Kinetics scale (videos x 400 classes) those set eval's peak."""
    if view_average not in VIEW_AVERAGES:
        raise ValueError(f"view_average {view_average!r}: expected one of {', '.join(VIEW_AVERAGES)}")
    ids, inv = np.unique(videos, return_inverse=True)
    lab = np.full(len(ids), -1, np.int64)
    lab[inv] = labels
    if len(ids) == len(videos) and np.array_equal(inv, np.arange(len(videos))):
        return ids, logits, lab                          # one view per video, in order: nothing to average
    sums = np.zeros((len(ids), logits.shape[1]), np.float32)
    if view_average == "logit":
        np.add.at(sums, inv, logits)
    else:
        for i in range(0, len(logits), block):
            z = logits[i:i + block].astype(np.float32)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            np.add.at(sums, inv[i:i + block], z / z.sum(axis=1, keepdims=True))
    sums /= np.bincount(inv, minlength=len(ids)).astype(np.float32)[:, None]
    if view_average == "prob":
        np.log(np.maximum(sums, np.finfo(np.float32).tiny), out=sums)
    return ids, sums, lab


@dataclass
class Confusion:
    """The confusion matrix of per-video predictions, stored sparsely: only its non-zero cells (true class,
    predicted class, videos), so its size grows with the videos, never with classes squared."""
    true: np.ndarray
    pred: np.ndarray
    count: np.ndarray
    num_classes: int

    @classmethod
    def of(cls, labels: np.ndarray, preds: np.ndarray, num_classes: int) -> Confusion:
        cells, count = np.unique(labels.astype(np.int64) * num_classes + preds, return_counts=True)
        return cls(cells // num_classes, cells % num_classes, count.astype(np.int64), num_classes)

    def totals(self) -> np.ndarray:
        """(C,) videos of each true class."""
        return np.bincount(self.true, weights=self.count, minlength=self.num_classes).astype(np.int64)

    def correct(self) -> np.ndarray:
        """(C,) videos of each class predicted right."""
        d = self.true == self.pred
        return np.bincount(self.true[d], weights=self.count[d], minlength=self.num_classes).astype(np.int64)

    def dense(self) -> np.ndarray:
        """(C, C) int64 rows = true class, columns = predicted (C^2 x 8 bytes: for small class counts)."""
        m = np.zeros((self.num_classes, self.num_classes), np.int64)
        m[self.true, self.pred] = self.count
        return m

    def most_confused(self, k: int = 20) -> list[tuple[int, int, int]]:
        """The k off-diagonal cells with the most videos: (true, predicted, videos), most first."""
        off = np.flatnonzero(self.true != self.pred)
        order = off[np.lexsort((self.pred[off], self.true[off], -self.count[off]))][:k]
        return [(int(self.true[i]), int(self.pred[i]), int(self.count[i])) for i in order]


def top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """(N,) bool: the label is among the k highest logits (no full sort; `block` rows at a time, so the
    temporaries stay small whatever N x C)."""
    k = min(k, logits.shape[1])
    if k >= logits.shape[1]:
        return np.ones(len(labels), bool)
    out = np.empty(len(labels), bool)
    for i in range(0, len(labels), block):
        top = np.argpartition(-logits[i:i + block], k - 1, axis=1)[:, :k]
        out[i:i + block] = (top == labels[i:i + block, None]).any(axis=1)
    return out


def metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1/top-5 (fractions), loss, per-class accuracy (None for a class without videos), the most
    confused class pairs and the confusion matrix (a Confusion, sparse) of per-video logits."""
    keep = labels >= 0
    if not keep.all():                                   # a copy only when some videos are unlabelled
        logits, labels = logits[keep], labels[keep]
    C = len(classes)
    n = len(labels)
    if n == 0:
        return {"videos": 0, "top1": None, "top5": None}
    pred = logits.argmax(axis=1)
    top1 = float((pred == labels).mean())
    top5 = float(top_k_hits(logits, labels, 5).mean())
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item())
    conf = Confusion.of(labels, pred, C)
    totals, correct = conf.totals(), conf.correct()
    per_class = {classes[c]: (float(correct[c] / totals[c]) if totals[c] else None) for c in range(C)}
    confused = [{"true": classes[t], "predicted": classes[p], "videos": v,
                 "share_of_true": round(v / int(totals[t]), 4)} for t, p, v in conf.most_confused(MOST_CONFUSED)]
    out = {"videos": n, "top1": top1, "top5": top5, "loss": loss, "per_class": per_class,
           "most_confused": confused, "confusion": conf}
    rev = reversal_accuracy(logits, labels, classes)
    if rev is not None:
        out["reversal_accuracy"] = rev
    return out


def reversal_accuracy(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> float | None:
    """For the synthetic data set: how often the true class outscores its time reversal (chance 0.5)."""
    from ..synth import family_of, reversal_partner
    if family_of(classes) is None:
        return None
    partner = np.array([reversal_partner(int(c)) for c in labels])
    rows = np.arange(len(labels))
    return float((logits[rows, labels] > logits[rows, partner]).mean())


def evaluate(model, source, device: torch.device, precision: str, spec, classes: list[str], progress=None,
             keep_logits: bool = False, view_average: str = "logit") -> dict:
    """The multi-view protocol over every valid clip of a source, the views of a video averaged as
    `view_average` says (video_logits). With `keep_logits`, the result's `logits` holds the arrays of
    logits.npz (per clip and per video; see write_logits)."""
    logits, t = clip_logits(model, source, device, precision, spec, progress)
    labelled = t["label"] >= 0
    clip_top1 = float((logits.argmax(1) == t["label"])[labelled].mean()) if labelled.any() else None
    vids, vlogits, vlabels = video_logits(logits, t["video"], t["label"], view_average)
    out = metrics(vlogits, vlabels, classes)
    out["clips"] = int(len(logits))
    out["clip_top1"] = clip_top1
    out["view_average"] = view_average
    if keep_logits:
        out["logits"] = {"video": vids, "label": vlabels, "video_logits": vlogits, "clip_video": t["video"],
                         "clip_view": t["view"], "clip_logits": logits.astype(np.float16)}
    return out


# ------------------------------------------------------------------------------------------- reports
CELL_REPORT_MAX_CLASSES = 50    # up to this many classes: confusion.csv and the confusion.png heat map
MOST_CONFUSED = 20              # pairs listed in metrics.json and drawn in per_class.png


def json_safe(obj):
    """`obj` with NaN and infinities as None and NumPy scalars as Python numbers: what json.dumps(...,
    allow_nan=False) accepts (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def metrics_json(result: dict) -> dict:
    """The JSON part of an evaluation result: everything but the arrays (confusion, logits)."""
    return json_safe({k: v for k, v in result.items() if k not in ("confusion", "logits")})


def write_confusion_cells(out_dir: Path, conf: Confusion, classes: list[str]) -> None:
    """confusion.csv and confusion.png, one cell per (true, predicted) pair: for a few classes only."""
    m = conf.dense()
    with open(out_dir / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, m.tolist()):
            w.writerow([name, *row])
    plt = _pyplot()
    C = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * C + 2), max(3.5, 0.5 * C + 1.5)))
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if C <= 30:
        ax.set_xticks(range(C), classes, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(C), classes, fontsize=7)
        for i, j in zip(conf.true, conf.pred):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (rows normalised)")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=120)
    plt.close(fig)


def plot_class_summary(path: Path, conf: Confusion, classes: list[str], label_worst: int = 25) -> None:
    """A figure of fixed size for any number of classes: per-class accuracy sorted (the worst classes
    named), and the most-confused (true -> predicted) pairs."""
    plt = _pyplot()
    totals, correct = conf.totals(), conf.correct()
    seen = np.flatnonzero(totals)
    acc = correct[seen] / totals[seen]
    order = seen[np.argsort(acc, kind="stable")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 7), gridspec_kw={"width_ratios": [1, 1]})
    sorted_acc = 100 * correct[order] / totals[order]
    a.plot(np.arange(len(order)), sorted_acc, color="#4C72B0", lw=1.5)
    a.fill_between(np.arange(len(order)), sorted_acc, color="#4C72B0", alpha=0.2)
    for i, c in enumerate(order[:label_worst]):
        a.annotate(classes[c][:28], (i, sorted_acc[i]), xytext=(6, 3 + 11 * i), textcoords="offset points",
                   fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"})
    a.set_xlabel(f"classes with videos, sorted by accuracy ({len(order)} of {len(classes)})")
    a.set_ylabel("per-class top-1 (%)")
    a.set_ylim(0, 105)
    a.set_title(f"per-class accuracy; the {min(label_worst, len(order))} lowest named")
    pairs = conf.most_confused(MOST_CONFUSED)[::-1]
    if pairs:
        y = np.arange(len(pairs))
        share = [100 * v / totals[t] for t, _, v in pairs]
        b.barh(y, share, color="#DD8452")
        b.set_yticks(y, [f"{classes[t][:24]} -> {classes[p][:24]} ({v})" for t, p, v in pairs], fontsize=7)
        b.set_xlabel("% of the true class's videos predicted as the other")
        b.set_title(f"the {len(pairs)} most-confused pairs (true -> predicted (videos))")
    else:
        b.text(0.5, 0.5, "no confusions", ha="center", va="center")
        b.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_per_class(out_dir: Path, per_class: dict, conf: Confusion) -> None:
    totals = conf.totals()
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "videos", "accuracy"])
        for (name, acc), n in zip(per_class.items(), totals.tolist()):
            w.writerow([name, n, "" if acc is None else f"{acc:.4f}"])


def write_confusion_npz(path: Path, conf: Confusion, classes: list[str]) -> None:
    """The whole confusion matrix, sparse: rows true[i], columns pred[i] hold count[i] videos (every other
    cell is 0); `classes` names the indices. Dense: m = np.zeros((C, C)); m[true, pred] = count."""
    _savez(path, true=conf.true, pred=conf.pred, count=conf.count, classes=np.asarray(classes, dtype=str))


def write_logits(path: Path, logits: dict, video_ids: np.ndarray | None = None) -> None:
    """logits.npz: per video (`video`: its index in the cache, `video_id`, `label`, `video_logits` (V, C)
    float32, the views averaged) and per clip (`clip_video`, `clip_view`, `clip_logits` (clips, C)
    float16): what ensembling and later analysis need."""
    arrays = dict(logits)
    if video_ids is not None:
        arrays["video_id"] = np.asarray(video_ids, dtype=str)
    _savez(path, **arrays)


def _savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def report_dir(checkpoint: str | Path, cache: str | Path, out: str | Path | None = None) -> Path:
    """Where `eval` writes its report: `out`, else RUN/eval-<cache name>. An earlier eval's folder is
    replaced (its figures are a function of checkpoint and cache); anything else is refused."""
    run_dir = run_folder(checkpoint)
    out_dir = Path(out) if out else run_dir / f"eval-{Path(cache).name.removesuffix('.zarr')}"
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "metrics.json").is_file()):
        raise TrainError(f"--out {out_dir} exists and is not the output of an earlier cachefeat eval; "
                         f"choose another --out")
    return out_dir


REPORT_FILES = ("metrics.json", "confusion.npz", "logits.npz", "per_class.csv", "per_class.png", "confusion.csv",
                "confusion.png")


def write_report(out_dir: Path, result: dict, classes: list[str], video_ids: np.ndarray | None = None) -> dict:
    """metrics.json first (so the figures are never lost to a failure after them), then confusion.npz (the
    whole matrix, sparse), logits.npz (when the result kept them), per_class.csv, and the figures: up to
    CELL_REPORT_MAX_CLASSES classes confusion.csv and confusion.png (one cell per pair), above it
    per_class.png (sorted per-class accuracy and the most-confused pairs, its size independent of the
    class count); then metrics.json again with `files`, the report's files relative to out_dir. Files of
    an earlier report that this one does not write are removed. Returns `files`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = metrics_json(result)
    _write_json(out_dir / "metrics.json", doc)
    files = {"metrics": "metrics.json"}
    conf = result.get("confusion")
    if result.get("logits") is not None:
        write_logits(out_dir / "logits.npz", result["logits"], video_ids)
        files["logits"] = "logits.npz"
    if conf is not None:
        write_confusion_npz(out_dir / "confusion.npz", conf, classes)
        write_per_class(out_dir, result["per_class"], conf)
        files.update(confusion="confusion.npz", per_class="per_class.csv")
        if len(classes) <= CELL_REPORT_MAX_CLASSES:
            write_confusion_cells(out_dir, conf, classes)
            files.update(confusion_csv="confusion.csv", confusion_png="confusion.png")
        else:
            plot_class_summary(out_dir / "per_class.png", conf, classes)
            files["per_class_png"] = "per_class.png"
    for name in set(REPORT_FILES) - set(files.values()):
        (out_dir / name).unlink(missing_ok=True)
    _write_json(out_dir / "metrics.json", {**doc, "files": files})
    return files
