"""Stage two's settings: every training setting with its default in plain sight (TrainConfig), read from
the command line (the CLI takes its defaults from here) or from a YAML/JSON file."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class TrainError(Exception):
    """A run that cannot start or continue as asked (one line)."""


class TrainDiverged(RuntimeError):
    """The loss (or the weights) became NaN or infinite: training stopped, the last good checkpoint is kept.
    A failed run rather than bad usage: the CLI exits with status 1."""


AUTO_MIN_EPOCHS = 30      # --epochs auto: at least this many epochs ...
AUTO_MAX_EPOCHS = 1000    # ... and at most this many, however few clips


def planned_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """The epochs a run trains. An explicit `epochs` (>= 1) is taken as given. `epochs=0` ("auto", the
    default) trains at least AUTO_MIN_EPOCHS epochs and at least `min_steps` optimiser steps, so a small data
    set gets more passes instead of stopping after a few hundred steps, while a large one is unaffected:
    192 clips in batches of 32 (6 steps per epoch) train 167 epochs with min_steps 1000, Kinetics-400
    (240k clips, 938 steps of 256) trains 30."""
    if epochs >= 1:
        return epochs
    need = math.ceil(min_steps / max(1, steps_per_epoch))
    return int(min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, need)))


@dataclass
class TrainConfig:
    adapter: str = "temporal"
    adapter_opts: dict = field(default_factory=dict)
    epochs: int = 0                  # 0 = auto: at least 30 epochs and at least min_steps steps (planned_epochs)
    min_steps: int = 1000            # with epochs auto: the fewest optimiser steps a run takes
    batch_size: int = 32
    lr: float = 1e-3                 # peak learning rate (AdamW)
    weight_decay: float = 0.05       # on weight_decay_on's parameters
    weight_decay_on: str = "matrices"  # matrices: not biases, norms, queries, position embeddings; all (as EVL)
    warmup_epochs: float = 2.0       # linear warm-up, then cosine decay to min_lr
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0               # Beta(a, a) mixup of features; 0 = off (DiST: 0.8)
    cutmix: float = 0.0              # Beta(a, a) cut of a span of frames; 0 = off (DiST: 1.0)
    grad_clip: float = 1.0           # max gradient norm; 0 = off
    train_views: str = "one"         # one view per video per epoch, all views, cycle, or first:K (reader.py)
    view_average: str = "logit"      # validation: average each video's views' logits, or their probabilities (prob)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # auto: bf16 (or fp16) autocast on GPU, fp32 on CPU
    in_memory: str = "auto"
    read_workers: int = 2            # streaming reader processes (when the cache is not held in RAM)
    threads: int = 0                 # CPU threads for the adapter; 0 = torch's default
    log: str = "none"                # also log to tensorboard, wandb or tensorboard,wandb (tracking.py)

    # settings that change the result: a resumed run must keep them
    RESULT_KEYS = ("adapter", "adapter_opts", "epochs", "min_steps", "batch_size", "lr", "weight_decay",
                   "weight_decay_on", "warmup_epochs",
                   "min_lr", "label_smoothing", "mixup", "cutmix", "grad_clip", "train_views", "seed")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        """name -> default of every scalar setting (adapter_opts aside)."""
        return {f.name: f.default for f in fields(cls) if f.name != "adapter_opts"}


def _train_views_ok(v: str) -> bool:
    v = str(v).strip().lower()
    return v in ("one", "all", "cycle") or (v.startswith("first:") and v[6:].isdigit() and int(v[6:]) >= 1)


# the values a config file may give (the CLI's options check the same)
_ALLOWED = {
    "epochs": (lambda v: v >= 0, "at least 1, or auto"), "batch_size": (lambda v: v >= 1, "at least 1"),
    "min_steps": (lambda v: v >= 0, "at least 0"),
    "lr": (lambda v: v > 0, "above 0"), "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    **{k: (lambda v: v >= 0, "at least 0") for k in ("weight_decay", "warmup_epochs", "min_lr", "mixup", "cutmix",
                                                      "grad_clip", "read_workers", "threads")},
    "train_views": (_train_views_ok, "one, all, cycle or first:K"), "view_average": ["logit", "prob"],
    "weight_decay_on": ["matrices", "all"],
    "in_memory": ["auto", "yes", "no"], "precision": ["auto", "fp32", "bf16", "fp16"],
    "log": (lambda v: _log_ok(v), "none, tensorboard, wandb or tensorboard,wandb"),
}


LOG_DESTINATIONS = ("tensorboard", "wandb")     # where tracking.py can send a run's metrics


def log_names(value: str) -> set[str]:
    """The destinations `value` names (`none`, or a comma list), lower-cased; unknown ones included."""
    return {v.strip().lower() for v in str(value).split(",") if v.strip()} - {"none"}


def _log_ok(v: str) -> bool:
    return log_names(v) <= set(LOG_DESTINATIONS)


def read_config_file(path: str | Path) -> dict:
    """The settings of a YAML or JSON file (keys named like TrainConfig's fields, dashes allowed, plus
    `adapter_opts: {key: value}`), each converted to its field's type; one-line TrainError otherwise."""
    from ..yamlfile import YamlError, load_yaml
    try:
        data = load_yaml(path, f"--config {path}")   # YAML is a superset of JSON
    except YamlError as e:
        raise TrainError(str(e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainError(f"--config {path} must hold a mapping of settings")
    defaults = TrainConfig.defaults()
    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k == "adapter_opts":
            if not isinstance(value, dict):
                raise TrainError(f"--config {path}: adapter_opts must be a mapping")
        elif k not in defaults:
            raise TrainError(f"--config {path}: unknown setting {key!r} (settings: {', '.join(sorted(defaults))}, "
                             f"adapter_opts)")
        else:
            kind = type(defaults[k])
            try:
                value = 0 if k == "epochs" and str(value).strip().lower() == "auto" else kind(value)
            except (TypeError, ValueError, OverflowError):
                raise TrainError(f"--config {path}: {key}={value!r} is not a valid {kind.__name__}") from None
            allowed = _ALLOWED.get(k)
            if allowed is not None and not (value in allowed if isinstance(allowed, list) else allowed[0](value)):
                raise TrainError(f"--config {path}: {key}={value!r}: "
                                 f"{'one of ' + ', '.join(allowed) if isinstance(allowed, list) else allowed[1]}")
        out[k] = value
    return out
