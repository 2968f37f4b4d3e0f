"""`cachefeat ablate SPEC.yaml`: many adapter trainings side by side on the same caches, with Ray Tune.

A spec (YAML) names the caches, the settings every trial shares, per-adapter settings, and a search space:

    train-cache: k400_train.zarr          # relative paths: from the current directory; or s3://bucket/prefix
    val-cache: k400_val.zarr              # required: trials are ranked by val top-1
    train: {epochs: 30, batch-size: 64}   # settings of `cachefeat train` (its --config keys)
    adapters:                             # used when a trial picks that adapter
      probe: {lr: 0.01}
      temporal: {adapter-opt.dim: 256}    # adapter options as adapter-opt.KEY (or adapter-opts: {KEY: VALUE})
    grid:                                 # every combination is a trial
      adapter: [probe, temporal]
      adapter-opt.depth: [1, 2]
    random:                               # drawn anew for each of --num-samples samples (of the grid)
      lr: {loguniform: [1e-4, 1e-2]}      # also uniform: [a, b], randint: [a, b] (b excluded), choice: [...]
    num-samples: 1                        # optional; --num-samples wins

Each trial is the normal training (`train.open_run` + `train.train`) into OUT/trials/<name>, reporting val
top-1 after every epoch to Tune (so --asha can stop hopeless trials early). The driver prints one line per
finished trial and writes OUT/results.csv, results.md (sorted by val top-1), results.png, and OUT/best (a copy
of the best trial's run folder, usable with `cachefeat eval --checkpoint`).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..store.remote import absolute, is_remote
from ..yamlfile import YamlError, load_yaml
from .config import TrainConfig, TrainError, planned_epochs

TOP_KEYS = ("train-cache", "val-cache", "train", "adapters", "grid", "random", "num-samples")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
OPT = "adapter-opt."
# TrainConfig settings a spec may set (the device is the trial's: from the resources Tune gives it)
# (and where it logs: the ablation's --log)
SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("adapter_opts", "device", "log"))


class AblationError(ValueError):
    """A spec that cannot run as written (one line naming the spec and the key)."""


@dataclass
class AblationSpec:
    path: str
    train_cache: str
    val_cache: str
    train: dict                                          # TrainConfig values (adapter options under adapter_opts)
    adapters: dict = field(default_factory=dict)         # adapter -> settings like `train`
    grid: dict = field(default_factory=dict)             # key -> list of values
    random: dict = field(default_factory=dict)           # key -> (distribution, arguments)
    num_samples: int = 1

    def adapter_names(self) -> list[str]:
        """Every adapter a trial can pick."""
        names = [self.train.get("adapter", TrainConfig.adapter)]
        if "adapter" in self.grid:
            names = list(self.grid["adapter"])
        if "adapter" in self.random:
            names = list(self.random["adapter"][1])
        return list(dict.fromkeys(names))

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) if self.grid else 1

    def max_epochs(self, clips: int | None = None) -> int:
        """The most epochs a trial trains; `epochs: auto` (0) is planned for `clips` training clips per epoch
        with the spec's smallest batch size and largest min_steps (planned_epochs)."""
        def all_values(key):
            values = [self.train.get(key, getattr(TrainConfig, key))] + [s.get(key) for s in self.adapters.values()]
            values += list(self.grid.get(key, []))
            if key in self.random:
                values += list(self.random[key][1])
            return [v for v in values if v is not None]
        values = all_values("epochs")
        if 0 in values:
            steps = math.ceil((clips or 1) / max(1, min(all_values("batch_size"))))
            values.append(planned_epochs(0, max(all_values("min_steps")), steps))
        return int(max(values))


# ------------------------------------------------------------------------------------------- parsing
def _key(raw, where: str) -> str:
    """A setting's name as the spec writes it -> its canonical name: a TrainConfig field, or adapter-opt.KEY."""
    k = str(raw)
    if k.replace("_", "-").startswith(OPT):
        return OPT + k[len(OPT):].replace("-", "_")
    k = k.replace("-", "_")
    if k not in SETTINGS:
        import difflib
        close = difflib.get_close_matches(k, SETTINGS, n=2)
        raise AblationError(f"{where}: unknown setting {raw!r}" + (f" (did you mean {' or '.join(close)}?)" if close
                            else f" (settings: {', '.join(SETTINGS)}, or adapter-opt.KEY for an adapter option)"))
    return k


def _value(key: str, value, where: str):
    """A setting's value converted to the type of its TrainConfig default (YAML reads 1e-3 as a string)."""
    if key.startswith(OPT) or key == "adapter":
        return value
    kind = type(getattr(TrainConfig, key))
    if key == "epochs" and isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        if kind is int:
            f = float(value)
            if isinstance(value, bool) or not f.is_integer():
                raise ValueError
            return int(f)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise AblationError(f"{where}: {value!r} is not a valid {kind.__name__}") from None


def _settings(block, where: str) -> dict:
    """A mapping of settings (`train:` or one adapter's) -> {canonical key: value}, adapter options gathered
    under adapter_opts."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise AblationError(f"{where}: expected a mapping of settings")
    out: dict = {}
    opts: dict = {}
    for raw, value in block.items():
        if str(raw).replace("_", "-") == "adapter-opts":
            if not isinstance(value, dict):
                raise AblationError(f"{where}.{raw}: expected a mapping of adapter options")
            opts.update({str(k).replace("-", "_"): v for k, v in value.items()})
            continue
        k = _key(raw, where)
        if k.startswith(OPT):
            opts[k[len(OPT):]] = value
        else:
            out[k] = _value(k, value, f"{where}.{raw}")
    if opts:
        out["adapter_opts"] = opts
    return out


def parse_spec(data, path: str = "<spec>") -> AblationSpec:
    """Check a spec's structure, keys, adapters and adapter options (not its caches: `check_caches`)."""
    from .. import adapters as registry
    from ..adapters.base import AdapterError
    if not isinstance(data, dict):
        raise AblationError(f"{path}: an ablation spec is a mapping (train-cache, val-cache, train, grid, ...)")
    data = {str(k).replace("_", "-"): v for k, v in data.items()}
    for k in data:
        if k not in TOP_KEYS:
            raise AblationError(f"{path}: unknown key {k!r} (keys: {', '.join(TOP_KEYS)})")
    for k in ("train-cache", "val-cache"):
        if not isinstance(data.get(k), str) or not data[k]:
            raise AblationError(f"{path}: {k}: required (the path of a cache written by cachefeat extract)")
    spec = AblationSpec(path, data["train-cache"], data["val-cache"], _settings(data.get("train"), f"{path}: train"))
    for name, block in (data.get("adapters") or {}).items():
        try:
            registry.get(str(name))
        except AdapterError as e:
            raise AblationError(f"{path}: adapters.{name}: {e}") from None
        spec.adapters[str(name)] = _settings(block, f"{path}: adapters.{name}")
    for section in ("grid", "random"):
        block = data.get(section) or {}
        if not isinstance(block, dict):
            raise AblationError(f"{path}: {section}: expected a mapping of setting -> values")
        for raw, values in block.items():
            where = f"{path}: {section}.{raw}"
            k = _key(raw, f"{path}: {section}")
            if section == "grid":
                if not isinstance(values, list) or not values:
                    raise AblationError(f"{where}: expected a non-empty list of values")
                spec.grid[k] = [_value(k, v, where) for v in values]
            else:
                if not (isinstance(values, dict) and len(values) == 1 and next(iter(values)) in DISTRIBUTIONS):
                    raise AblationError(f"{where}: expected one of {{{': [...]}, {'.join(DISTRIBUTIONS)}: [...]}}")
                kind, args = next(iter(values.items()))
                if not isinstance(args, list) or (kind != "choice" and len(args) != 2) or not args:
                    raise AblationError(f"{where}: {kind} takes " + ("a list of values" if kind == "choice"
                                                                      else "[low, high]"))
                if kind == "choice":
                    args = [_value(k, v, where) for v in args]
                else:
                    try:
                        args = [float(a) for a in args]
                    except (TypeError, ValueError):
                        raise AblationError(f"{where}: {kind} bounds must be numbers") from None
                    if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
                        raise AblationError(f"{where}: {kind} needs low < high"
                                            + (" and low > 0" if kind == "loguniform" else ""))
                if k in spec.grid:
                    raise AblationError(f"{where}: {raw} is in the grid too; give it one place")
                if k == "adapter" and kind != "choice":
                    raise AblationError(f"{where}: adapter takes choice: [...]")
                spec.random[k] = (kind, args)
    n = data.get("num-samples", 1)
    if not isinstance(n, int) or n < 1:
        raise AblationError(f"{path}: num-samples: expected a positive integer")
    spec.num_samples = n
    # every adapter a trial can pick exists and accepts every adapter option it can get
    for name in spec.adapter_names():
        try:
            registry.get(name)
        except AdapterError as e:
            where = ("grid.adapter" if "adapter" in spec.grid
                     else "random.adapter" if "adapter" in spec.random else "train.adapter")
            raise AblationError(f"{path}: {where}: {e}") from None
        fixed = {**spec.train.get("adapter_opts", {}), **spec.adapters.get(name, {}).get("adapter_opts", {})}
        searched = {k[len(OPT):]: v for k, v in spec.grid.items() if k.startswith(OPT)}
        searched.update({k[len(OPT):]: a[1] if a[0] == "choice" else [a[1][0]] for k, a in spec.random.items()
                         if k.startswith(OPT)})
        for opts in [fixed] + [{**fixed, k: v} for k, vs in searched.items() for v in vs]:
            try:
                registry.make_config(name, opts)
            except AdapterError as e:
                raise AblationError(f"{path}: {e}") from None
    if spec.grid_size() * spec.num_samples > 10_000:
        raise AblationError(f"{path}: {spec.grid_size() * spec.num_samples} trials; keep it under 10,000")
    return spec


def load_spec(path: str | os.PathLike) -> AblationSpec:
    p = Path(path)
    try:
        data = load_yaml(p, str(path))
    except YamlError as e:
        raise AblationError(str(e)) from None
    return parse_spec(data, str(path))


def is_ablation_spec(path: str | os.PathLike) -> bool:
    """Whether a YAML file in pipelines/ is an ablation spec (else a recipe of `cachefeat run`)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" not in data and any(k in data for k in ("grid", "random", "train-cache"))


def check_caches(spec: AblationSpec, allow_incomplete: bool = False) -> None:
    """The caches exist, are finished and not being written (unless `allow_incomplete`), match each other,
    and can feed every adapter a trial can pick (one line if not)."""
    from ..adapters import CacheMismatch, Needs
    from ..store import CacheError, open_cache
    from .checkpoint import check_fits
    from .coverage import check_cache_use
    from .loop import resolve_adapter
    caches = {}
    for key, p in (("train-cache", spec.train_cache), ("val-cache", spec.val_cache)):
        if not is_remote(p) and not Path(p).exists():
            raise AblationError(f"{spec.path}: {key}: {p} does not exist (write it with cachefeat extract, or "
                                f"edit the path in the spec)")
        try:
            caches[key] = open_cache(p)
        except CacheError as e:
            raise AblationError(f"{spec.path}: {key}: {e}") from None
    train, val = caches["train-cache"], caches["val-cache"]
    for key, c in caches.items():
        try:
            check_cache_use(c, allow_incomplete)
        except TrainError as e:
            raise AblationError(f"{spec.path}: {key}: {e}") from None
    try:
        check_fits(val.meta, "", Needs(), f"the val cache {spec.val_cache}", trained_meta=train.meta)
    except CacheMismatch as e:
        raise AblationError(f"{spec.path}: val-cache: {e}") from None
    for name in spec.adapter_names():
        opts = {**spec.train.get("adapter_opts", {}), **spec.adapters.get(name, {}).get("adapter_opts", {})}
        # every combination of the searched adapter options (they can change what is read: layers, ...)
        searched = {k[len(OPT):]: vs for k, vs in spec.grid.items() if k.startswith(OPT)}
        searched.update({k[len(OPT):]: a for k, (kind, a) in spec.random.items()
                         if k.startswith(OPT) and kind == "choice"})
        for combo in itertools.product(*searched.values()):
            _resolve_or_fail(spec, name, {**opts, **dict(zip(searched, combo))}, train.meta, resolve_adapter)


def _resolve_or_fail(spec, name, opts, meta, resolve_adapter):
    from ..adapters import CacheMismatch
    from ..adapters.base import AdapterError
    try:
        resolve_adapter(name, opts, meta)
    except (CacheMismatch, AdapterError) as e:
        raise AblationError(f"{spec.path}: adapter {name}"
                            + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
                            + f" on {spec.train_cache}: {e}") from None


# ------------------------------------------------------------------------------------------- trials
def search_space(spec: AblationSpec) -> dict:
    """Tune's param_space: grid_search for the grid, distributions for the random part."""
    from ray import tune
    space = {k: tune.grid_search(v) for k, v in spec.grid.items()}
    for k, (kind, args) in spec.random.items():
        if kind == "choice":
            space[k] = tune.choice(args)
        elif kind == "randint":
            space[k] = tune.randint(int(args[0]), int(args[1]))
        else:
            space[k] = getattr(tune, kind)(*args)
    return space


def trial_config(spec: AblationSpec, params: dict) -> TrainConfig:
    """The TrainConfig of the trial with these searched values: train < adapters.<name> < searched."""
    adapter = params.get("adapter", spec.train.get("adapter", TrainConfig.adapter))
    values = {k: v for k, v in spec.train.items() if k != "adapter_opts"}
    opts = dict(spec.train.get("adapter_opts", {}))
    per = spec.adapters.get(adapter, {})
    values.update({k: v for k, v in per.items() if k != "adapter_opts"})
    opts.update(per.get("adapter_opts", {}))
    for k, v in params.items():
        if k.startswith(OPT):
            opts[k[len(OPT):]] = v
        else:
            values[k] = _value(k, v, f"{spec.path}: {k}")
    values["adapter"] = adapter
    return TrainConfig(adapter_opts=opts, **values)


def trial_name(index: int, params: dict) -> str:
    """A folder name saying what the trial varies, e.g. 003-adapter=temporal,depth=2,lr=0.00123."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    parts = [f"{k[len(OPT):] if k.startswith(OPT) else k}={fmt(v)}" for k, v in params.items()]
    name = f"{index:03d}" + ("-" + ",".join(parts) if parts else "")
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", name)[:120]


def _trial_index(trial_id: str) -> int:
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def peak_memory() -> tuple[int, str]:
    """(bytes, what): the most GPU memory torch allocated on a GPU, else this process's peak RSS."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "GPU"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "RSS"


def _run_trial(params: dict, spec: AblationSpec, out: str, cpus: float, gpus: float,
               allow_incomplete: bool = False, track: str = "none", bucket: dict | None = None) -> None:
    """One Tune trial: the normal training into OUT/trials/<name>, val top-1 reported after every epoch.
    `bucket`: the driver's store.remote.worker_settings(), for caches in a bucket."""
    from ray import tune

    from ..ray_runtime import use_worker_settings
    from .loop import cpu_threads, open_run, train
    from .tracking import Where
    t0 = time.perf_counter()
    use_worker_settings(bucket)
    ctx = tune.get_context()
    name = trial_name(_trial_index(ctx.get_trial_id()), params)
    cfg = trial_config(spec, params)
    cfg = dataclasses.replace(cfg, device="cpu" if gpus == 0 else "cuda",
                              threads=cfg.threads or max(1, int(cpus)), log=track)
    run_dir = Path(out) / "trials" / name
    if run_dir.exists():            # a trial restarted by Tune starts over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "trial.json").write_text(json.dumps({"name": name, "params": params, "config": cfg.to_dict()},
                                                   indent=2, default=str) + "\n")
    with open(run_dir / "train.log", "a") as logf:
        def log(line):
            logf.write(line + "\n")
            logf.flush()
        try:
            run = open_run(cfg, spec.train_cache, spec.val_cache, allow_incomplete)
            params_n = run.model.num_trainable()
            log(f"adapter {cfg.adapter}: {params_n:,} trainable parameters; {run.model.summary}")

            def on_epoch(rec):
                mem, kind = peak_memory()
                tune.report({"val_top1": rec.get("val_top1"), "val_top5": rec.get("val_top5"),
                             "val_reversal_accuracy": rec.get("val_reversal_accuracy"), "train_loss": rec["train_loss"],
                             "epoch": rec["epoch"], "epochs": run.epochs, "params": params_n, "name": name,
                             "seconds": round(time.perf_counter() - t0, 2), "peak_memory": mem, "memory_kind": kind})
            with cpu_threads(cfg.threads):
                # TensorBoard: OUT/tensorboard/<name>, beside the other trials (best/ copies no event files)
                train(run, run_dir, log=log, on_epoch=on_epoch, log_to=Where(Path(out), name, Path(out).name))
        except Exception:
            import traceback
            log(traceback.format_exc())
            raise


@dataclass
class Row:
    name: str
    params: dict
    config: dict
    trainable_params: int | None
    val_top1: float | None
    val_top5: float | None
    reversal: float | None
    epochs_done: int
    epochs: int
    seconds: float | None
    peak_memory: int | None
    memory_kind: str
    status: str


def _status(err, epochs_done: int, epochs: int, asha: bool) -> str:
    if err is not None:
        from ..ray_runtime import error_line
        cause = getattr(err, "cause", None)       # Ray's task error carries the trial's own exception
        if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray"):
            return f"error: {type(cause).__name__}: {' '.join(str(cause).split())}"[:200]
        return f"error: {error_line(err)}"[:200]
    if epochs_done < epochs:
        return (f"stopped early (ASHA) after {epochs_done} of {epochs} epochs" if asha else
                f"interrupted after {epochs_done} of {epochs} epochs")
    return "done"


def rows_from(grid, spec: AblationSpec, asha: bool = False) -> list[Row]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items()}
        name = m.get("name") or trial_name(_trial_index(Path(r.path).name if r.path else ""), params)
        cfg = trial_config(spec, params)
        epochs = int(m.get("epochs") or cfg.epochs)
        rows.append(Row(name, params, cfg.to_dict(), m.get("params"), m.get("val_top1"), m.get("val_top5"),
                        m.get("val_reversal_accuracy"), int(m.get("epoch") or 0), epochs, m.get("seconds"),
                        m.get("peak_memory"), m.get("memory_kind", "RSS"),
                        _status(r.error, int(m.get("epoch") or 0), epochs, asha)))
    rows.sort(key=lambda w: (w.val_top1 is None, -(w.val_top1 or 0), -(w.val_top5 or 0), w.trainable_params or 0))
    return rows


# ------------------------------------------------------------------------------------------- driver
def _progress_callback(total: int, log):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per finished trial (the driver's only output while Tune runs)."""

        def __init__(self):
            self.done = 0

        def _line(self, trial, failed: bool):
            self.done += 1
            m = trial.last_result or {}
            name = m.get("name") or trial_name(_trial_index(trial.trial_id), dict(trial.config))
            if failed:
                err = trial.error_file and Path(trial.error_file).read_text().strip().splitlines()[-1:] or ["?"]
                log(f"[{self.done}/{total}] {name}: failed: {err[0][:200]}")
                return
            top1, top5 = m.get("val_top1"), m.get("val_top5")
            ep, eps = m.get("epoch", 0), m.get("epochs", 0)
            log(f"[{self.done}/{total}] {name}: val top-1 {100 * (top1 or 0):.1f}%, top-5 {100 * (top5 or 0):.1f}%, "
                f"{ep} epochs{'' if ep >= eps else f' (of {eps}: stopped by ASHA)'}, {m.get('seconds', 0):.1f} s")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, True)

    return Progress()


def prepare_out_dir(out: str | Path, spec_path: str | Path, overwrite: bool = False) -> Path:
    """The ablation's folder, ready for a run: an earlier ablation there is refused, or its results removed
    with `overwrite`; the spec is copied in beside the results."""
    out_dir = Path(out)
    if (out_dir / "results.csv").exists() or (out_dir / "trials").exists():
        if not overwrite:
            raise AblationError(f"{out_dir} already holds an ablation; --overwrite to replace it, or another --out")
        for name in ("trials", "best", ".tune", "results.csv", "results.md", "results.png", "tensorboard", "wandb"):
            p = out_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.yaml").write_text(Path(spec_path).read_text())
    return out_dir


def run_ablation(spec: AblationSpec, out: str, gpus_per_trial: float | None = None, cpus_per_trial: float = 1,
                 max_concurrent: int = 0, asha: bool = False, num_samples: int | None = None,
                 address: str | None = None, log=print, allow_incomplete: bool = False,
                 track: str = "none") -> list[Row]:
    """Run every trial of `spec` with Ray Tune and write the results into `out` (see the module docstring).
    `allow_incomplete`: the trials train on the finished shards of unfinished caches. `track`: where the
    trials also log (TrainConfig.log); with tensorboard, the HParams experiment too (write_hparams)."""
    from ..ray_runtime import ClusterError, ray_runtime, worker_settings
    # no CSV/JSON/TensorBoard files of Tune's per trial (--log tensorboard writes ours)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"   # the classic reporter: verbose=0 prints nothing
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1e9")
    from ray import tune
    for name in ("ray.tune", "ray.train", "ray.air"):     # a failed trial is one line of ours, with its
        logging.getLogger(name).setLevel(logging.CRITICAL)  # traceback in the trial's train.log
    # the trials run in other working directories (and, on a cluster, other machines)
    spec = dataclasses.replace(spec, train_cache=absolute(spec.train_cache), val_cache=absolute(spec.val_cache))
    bucket = worker_settings() if any(is_remote(c) for c in (spec.train_cache, spec.val_cache)) else None
    n = num_samples or spec.num_samples
    total = spec.grid_size() * n
    outp = Path(out).resolve()
    with ray_runtime(address) as rt:
        if gpus_per_trial is None:
            gpus_per_trial = 0.25 if rt.gpus >= 1 else 0.0
        if gpus_per_trial > 0 and rt.gpus < gpus_per_trial:
            raise ClusterError(f"--gpus-per-trial {gpus_per_trial:g}: the Ray cluster has no GPUs (use 0)")
        if rt.cpus < cpus_per_trial:
            raise ClusterError(f"--cpus-per-trial {cpus_per_trial:g}: the Ray cluster has {rt.cpus:g} CPUs")
        slots = int(rt.cpus // cpus_per_trial) if gpus_per_trial == 0 else int(min(rt.cpus // cpus_per_trial,
                                                                                     rt.gpus // gpus_per_trial))
        log(f"ablation {spec.path}: {total} trials ({spec.grid_size()} grid point{'s' * (spec.grid_size() != 1)} "
            f"x {n} sample{'s' * (n != 1)}) on "
            f"{spec.train_cache}, {cpus_per_trial:g} CPU" + (f" + {gpus_per_trial:g} GPU" if gpus_per_trial else "")
            + f" per trial, up to {min(slots, max_concurrent or slots, total)} at a time"
            + (", ASHA early stopping" if asha else "") + f"; runs in {out}/trials")
        trainable = tune.with_resources(
            tune.with_parameters(_run_trial, spec=spec, out=str(outp), cpus=cpus_per_trial, gpus=gpus_per_trial,
                                 allow_incomplete=allow_incomplete, track=track, bucket=bucket),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        scheduler = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler
            max_t = spec.max_epochs(_train_clips(spec))
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=max(1, max_t // 4),
                                      reduction_factor=2)
        tuner = tune.Tuner(
            trainable, param_space=search_space(spec),
            tune_config=tune.TuneConfig(metric="val_top1", mode="max", num_samples=n, scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent or None, reuse_actors=False,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name="tune", storage_path=str(outp / ".tune"), verbose=0,
                                      callbacks=[_progress_callback(total, log)],
                                      failure_config=tune.FailureConfig(max_failures=0)))
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
    rows = rows_from(grid, spec, asha)
    write_results(outp, rows, spec, wall)
    from .tracking import parse_log
    if "tensorboard" in parse_log(track):
        write_hparams(outp, rows)
    return rows


def _train_clips(spec: AblationSpec) -> int:
    """Training clips per epoch of the spec's train cache (one view per video; all views with
    train_views: all), for planning `epochs: auto`."""
    from ..store import open_cache
    cache = open_cache(spec.train_cache)
    valid = cache.valid()
    if spec.train.get("train_views") == "all":
        return int(valid.sum())
    return len(set(cache.clip_video()[valid].tolist()))


# ------------------------------------------------------------------------------------------- results
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _mem(v) -> str:
    from ..fmt import human_bytes
    return "-" if v is None else human_bytes(v)


def varied_keys(rows: list[Row]) -> list[str]:
    """The searched keys, then the settings that differ between trials without being searched (per-adapter
    settings such as the lr), then `adapter_opts` when the options differ."""
    keys = list(dict.fromkeys(k for r in rows for k in r.params if k not in ("adapter", "epochs")))
    for k in (rows[0].config if rows else {}):
        if (k not in keys and k not in ("adapter", "epochs")
                and len({json.dumps(r.config.get(k), sort_keys=True) for r in rows}) > 1):
            keys.append(k)
    return keys


def _get(r: Row, k: str):
    if k in r.params:
        return r.params[k]
    if k == "adapter_opts":
        return ", ".join(f"{a}={b}" for a, b in r.config[k].items()) or "-"
    return r.config.get(k)


def write_results(out: Path, rows: list[Row], spec: AblationSpec, wall: float) -> None:
    """results.csv, results.md, results.png, best/ (a copy of the best trial's run folder)."""
    keys = varied_keys(rows)
    show = [k[len(OPT):] if k.startswith(OPT) else "options" if k == "adapter_opts" else k for k in keys]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "adapter", *show, "trainable_params", "val_top1", "val_top5",
                    "val_reversal_accuracy", "epochs", "seconds", "peak_memory_bytes", "memory", "status", "config"])
        for i, r in enumerate(rows, 1):
            w.writerow([i, r.name, r.config["adapter"], *[_get(r, k) for k in keys], r.trainable_params or "",
                        "" if r.val_top1 is None else f"{r.val_top1:.4f}",
                        "" if r.val_top5 is None else f"{r.val_top5:.4f}",
                        "" if r.reversal is None else f"{r.reversal:.4f}", r.epochs_done, r.seconds or "",
                        r.peak_memory or "", f"peak {r.memory_kind}", r.status, json.dumps(r.config, sort_keys=True)])
    mem_head = "peak GPU memory" if any(r.memory_kind == "GPU" for r in rows) else "peak RSS"
    rev = any(r.reversal is not None for r in rows)     # a synthetic set of time-reversed class pairs
    head = ["#", "trial", "adapter", *show, "params", "val top-1", "val top-5", *(["reversal pairs"] if rev else []),
            "epochs", "time", mem_head, "status"]
    lines = [f"# Ablation: {spec.path}", "",
             f"Train cache `{spec.train_cache}`, val cache `{spec.val_cache}`; {len(rows)} trials in {wall:.0f} s "
             f"wall time; sorted by val top-1 (per video, the views averaged) after the last epoch run.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.name, r.config["adapter"], *[_cell(_get(r, k)) for k in keys],
                 "-" if r.trainable_params is None else f"{r.trainable_params:,}", _pct(r.val_top1), _pct(r.val_top5),
                 *([_pct(r.reversal)] if rev else []), f"{r.epochs_done}/{r.epochs}",
                 "-" if r.seconds is None else f"{r.seconds:.1f} s",
                 _mem(r.peak_memory), r.status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    shared = {k: v for k, v in (rows[0].config if rows else {}).items()
              if k not in keys and k not in ("adapter", "adapter_opts", "device", "threads")
              and all(r.config.get(k) == v for r in rows)}
    lines += ["", "Settings of every trial: " + ", ".join(f"{k}={v}" for k, v in shared.items())
              + " (the trials' device and threads follow --gpus-per-trial and --cpus-per-trial)."]
    if rev:
        lines.append("Reversal pairs: how often the true class outscores its time-reversed partner (50% = blind "
                     "to frame order).")
    lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    plot_results(out / "results.png", rows)
    best = best_row(out, rows)
    if (out / "best").exists():
        shutil.rmtree(out / "best")
    if best is not None:
        shutil.copytree(out / "trials" / best.name, out / "best")


def best_row(out: Path, rows: list[Row]) -> Row | None:
    """The ablation's best trial: the highest val top-1 (rows are ranked) with a checkpoint."""
    from .checkpoint import CHECKPOINT
    return next((r for r in rows if r.val_top1 is not None and (out / "trials" / r.name / CHECKPOINT).is_dir()),
                None)


HPARAM_METRICS = ("hparams/val_top1", "hparams/val_top5", "hparams/trainable_params", "hparams/is_best")


def write_hparams(out: Path, rows: list[Row]) -> None:
    """TensorBoard's HParams dashboard for the ablation: the experiment (every varied setting, the metrics)
    in OUT/tensorboard, and in each trial's run OUT/tensorboard/<trial> its settings, its final metrics and
    whether it is the best trial (hparams/is_best 1), so the dashboard lists, sorts and filters the trials."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    from .tracking import TB_DIR
    keys = varied_keys(rows)
    names = ["adapter"] + [k[len(OPT):] if k.startswith(OPT) else "options" if k == "adapter_opts" else k
                           for k in keys]

    def settings(r: Row) -> dict:
        values = [r.config["adapter"]] + [_get(r, k) for k in keys]
        return {n: v if isinstance(v, (bool, int, float, str)) else str(v)
                for n, v in zip(names, values) if v is not None}
    best = best_row(out, rows)
    every = [settings(r) for r in rows]
    union = {n: next(s[n] for s in every if n in s) for n in names if any(n in s for s in every)}
    # the values each text or flag setting takes (numbers get the dashboard's range filter instead)
    discrete = {n: sorted({s[n] for s in every if n in s}) for n, v in union.items()
                if isinstance(v, (str, bool)) and all(type(s.get(n, v)) is type(v) for s in every)}
    metrics = dict.fromkeys(HPARAM_METRICS, 0.0)
    exp, _, _ = hparams(union, metrics, discrete)
    with SummaryWriter(str(out / TB_DIR)) as w:
        w.file_writer.add_summary(exp)
        if best is not None:
            w.add_text("ablation/best", f"{best.name}: val top-1 {_pct(best.val_top1)}, top-5 {_pct(best.val_top5)}")
    for r, values in zip(rows, every):
        _, start, _ = hparams(values, metrics)
        status = Status.Value("STATUS_SUCCESS" if r.status == "done" else "STATUS_FAILURE" if
                              r.status.startswith("error") else "STATUS_ABORTED")
        end = HParamsPluginData(session_end_info=SessionEndInfo(status=status, end_time_secs=time.time()),
                                version=metadata.PLUGIN_DATA_VERSION)
        end = Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                   content=end.SerializeToString())))])
        with SummaryWriter(str(out / TB_DIR / r.name)) as w:
            w.file_writer.add_summary(start)
            for tag, v in zip(HPARAM_METRICS, (r.val_top1, r.val_top5, r.trainable_params,
                                                float(best is not None and r.name == best.name))):
                if v is not None:
                    w.add_scalar(tag, float(v), r.epochs_done)
            w.file_writer.add_summary(end)


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def plot_results(path: Path, rows: list[Row]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in rows if r.val_top1 is not None][::-1]       # best at the top
    fig, ax = plt.subplots(figsize=(8, 0.4 * max(len(shown), 2) + 1.2))
    adapters_seen = list(dict.fromkeys(r.config["adapter"] for r in rows))
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(adapters_seen)}
    y = range(len(shown))
    ax.barh(y, [100 * (r.val_top5 or 0) for r in shown], color=[colours[r.config["adapter"]] for r in shown], alpha=0.3,
            label="top-5")
    ax.barh(y, [100 * r.val_top1 for r in shown], color=[colours[r.config["adapter"]] for r in shown], label="top-1")
    for i, r in enumerate(shown):
        ax.text(100 * r.val_top1 + 0.5, i, f"{100 * r.val_top1:.1f}", va="center", fontsize=8)
    ax.set_yticks(list(y), [r.name for r in shown], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("val accuracy (%): top-1 solid, top-5 light")
    ax.set_title("ablation: val top-1 per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
