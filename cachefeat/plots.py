"""Pictures of a cache (matplotlib, no display needed): what it holds per class, and what failed."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .store import Cache

MAX_NAMED_CLASSES = 50      # above: classes sorted by count instead of one named bar each
LABELLED_FEWEST = 12


def cache_overview(cache: Cache, path: str | Path) -> Path:
    """A PNG with valid and failed videos per class (above MAX_NAMED_CLASSES classes: sorted, the classes
    with the fewest valid videos named, in a figure whose size does not grow), and failures by stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = cache.read("videos/label")
    valid = np.zeros(cache.num_videos, bool)
    valid[cache.clip_video()[cache.valid()]] = True
    failures = cache.failures()
    failed = np.zeros(len(labels), bool)
    failed[[f["video"] for f in failures]] = True
    names = cache.classes or sorted({str(l) for l in labels})
    n = len(names)
    ok_counts = np.bincount(labels[valid & (labels >= 0)], minlength=n)[:n]
    bad_counts = np.bincount(labels[failed & (labels >= 0)], minlength=n)[:n]
    stages = Counter(f["stage"] for f in failures)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.35 * n + 5) if n <= MAX_NAMED_CLASSES else 14, 4.5),
                             gridspec_kw={"width_ratios": [3, 1]})
    title = f"{Path(str(cache.path)).name}: {int(valid.sum())} valid, {len(failures)} failed videos"
    if n <= MAX_NAMED_CLASSES:      # one named bar per class
        x = np.arange(n)
        axes[0].bar(x, ok_counts, label="valid", color="#4C72B0")
        axes[0].bar(x, bad_counts, bottom=ok_counts, label="failed", color="#DD8452")
        axes[0].set_xticks(x, names, rotation=60 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=8)
        axes[0].set_title(f"{title} per class")
    else:                           # classes sorted by valid videos; the fewest named: a figure of fixed size
        order = np.lexsort((-bad_counts, ok_counts))
        x = np.arange(n)
        axes[0].fill_between(x, ok_counts[order], step="mid", color="#4C72B0", alpha=0.8, label="valid")
        axes[0].fill_between(x, ok_counts[order], ok_counts[order] + bad_counts[order], step="mid", color="#DD8452",
                             alpha=0.8, label="failed")
        for i, c in enumerate(order[:LABELLED_FEWEST]):
            axes[0].annotate(f"{names[c][:28]} ({ok_counts[c]})", (i, ok_counts[c]), xytext=(8, 8 + 10 * i),
                             textcoords="offset points", fontsize=7,
                             arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"})
        axes[0].set_xlabel(f"{n} classes, sorted by valid videos (the {LABELLED_FEWEST} fewest named; "
                           f"{int((ok_counts == 0).sum())} have none)")
        axes[0].set_title(f"{title} per class")
    axes[0].set_ylabel("videos")
    axes[0].legend()
    if stages:
        axes[1].barh(list(stages), list(stages.values()), color="#DD8452")
        axes[1].set_title("failures by stage")
    else:
        axes[1].text(0.5, 0.5, "no failures", ha="center", va="center")
        axes[1].set_axis_off()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
