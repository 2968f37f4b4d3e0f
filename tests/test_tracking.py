"""`--log tensorboard` / `--log wandb` (issue 32): the event files of a train run read back with TensorBoard's
own EventAccumulator, the HParams entries of a two-trial ablation, a W&B offline run's files, the same
checkpoint bytes with logging and without, a missing extra in one line, a destination failing mid-run."""
import json
import shutil
import subprocess
import sys
import time

import pytest

from cachefeat.train import TrainConfig, open_run, train
from cachefeat.train.checkpoint import CHECKPOINT, WEIGHTS

from conftest import run_cli
from helpers import invoke, on_contract

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import metadata as hp_metadata  # noqa: E402

EPOCHS = 3


def _train(cache, val, out, *extra):
    return run_cli("train", "--cache", cache, "--val-cache", val, "--adapter", "probe", "--epochs", EPOCHS,
                   "--batch-size", "32", "--threads", "1", "--in-memory", "yes", "--out", out, "--quiet", *extra)


def _events(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def runs(stage2_caches, tmp_path_factory):
    """The same probe run twice, with --log tensorboard and without."""
    root = tmp_path_factory.mktemp("tracking")
    _train(stage2_caches["train"], stage2_caches["val"], root / "logged", "--log", "tensorboard")
    _train(stage2_caches["train"], stage2_caches["val"], root / "plain")
    return root


def test_a_train_run_writes_every_epoch_scalar_and_its_config_to_tensorboard(runs, stage2_caches):
    acc = _events(runs / "logged" / "tensorboard")
    history = [json.loads(line) for line in (runs / "logged" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == EPOCHS
    tags = set(acc.Tags()["scalars"])
    for key, tag in {"train_loss": "train/loss", "train_top1": "train/top1", "val_loss": "val/loss",
                     "val_top1": "val/top1", "val_top5": "val/top5", "lr": "train/lr",
                     "clips_per_s": "perf/clips_per_s"}.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag
        assert [e.value for e in events] == pytest.approx([h[key] for h in history], rel=1e-6), tag
    for tag in ("perf/step_seconds", "perf/read_mb_per_s", "perf/data_wait_fraction"):
        assert tag in tags and all(e.value > 0 or tag == "perf/data_wait_fraction" for e in acc.Scalars(tag))
    assert all(0 <= e.value <= 1 for e in acc.Scalars("perf/data_wait_fraction"))

    def text(tag):
        from tensorboard.util import tensor_util
        return tensor_util.make_ndarray(acc.Tensors(tag)[0].tensor_proto).item().decode()
    config = json.loads(text("run/config/text_summary").strip("`\n"))
    assert config["adapter"] == "probe" and config["epochs"] == EPOCHS and config["log"] == "tensorboard"
    fingerprint = json.loads((stage2_caches["train"] / "zarr.json").read_text())["attributes"]["cachefeat"]
    assert fingerprint["fingerprint"] in text("run/cache/text_summary")
    assert fingerprint["model"]["name"] in text("run/backbone/text_summary")
    assert not (runs / "plain" / "tensorboard").exists()


def test_logging_never_changes_the_checkpoint(runs):
    logged = (runs / "logged" / CHECKPOINT / WEIGHTS).read_bytes()
    assert logged == (runs / "plain" / CHECKPOINT / WEIGHTS).read_bytes()
    a, b = (json.loads((runs / r / "summary.json").read_text()) for r in ("logged", "plain"))
    assert a["final"]["val_top1"] == b["final"]["val_top1"] and a["final"]["train_loss"] == b["final"]["train_loss"]


def test_a_missing_extra_is_one_line_naming_it(stage2_caches, tmp_path):
    # the tensorboard package made unimportable, as when the extra is not installed
    code = ("import sys; sys.modules['tensorboard'] = None; from cachefeat.cli import main; sys.argv = ['cachefeat', "
            "*sys.argv[1:]]; main()")
    res = subprocess.run([sys.executable, "-c", code, "train", "--cache", str(stage2_caches["train"]), "--adapter",
                          "probe", "--epochs", "1", "--log", "tensorboard", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "pip install 'cachefeat[tensorboard]'" in err[0]
    assert not (tmp_path / "run").exists()
    bad = invoke("train", "--cache", stage2_caches["train"], "--log", "mlflow", "--out", tmp_path / "run")
    assert "--log" in on_contract(bad, (2,), "--log mlflow")


def test_a_destination_failing_mid_run_warns_once_and_training_goes_on(stage2_caches, tmp_path, capfd):
    out = tmp_path / "run"
    cfg = TrainConfig(adapter="probe", epochs=4, batch_size=32, threads=1, in_memory="yes", log="tensorboard")
    run = open_run(cfg, stage2_caches["train"], stage2_caches["val"])

    def remove_events(record):     # the event folder goes away after the first epoch
        if record["epoch"] == 1:
            shutil.rmtree(out / "tensorboard")
    result = train(run, out, log=lambda s: None, on_epoch=remove_events)
    stderr = capfd.readouterr().err
    err = [line for line in stderr.splitlines() if "--log" in line]
    assert "Traceback" not in stderr and len(err) == 1, stderr
    assert err[0].startswith("warning: --log tensorboard stopped") and "goes on" in err[0], err
    assert len(result.history) == 4 and (out / "summary.json").is_file() and (out / CHECKPOINT / WEIGHTS).is_file()


def test_wandb_offline_run_holds_the_config_and_every_epoch(stage2_caches, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")       # no account, no network: `wandb sync` uploads it later
    out = tmp_path / "run"
    _train(stage2_caches["train"], stage2_caches["val"], out, "--log", "wandb")
    (folder,) = (out / "wandb").glob("offline-run-*")
    records = _finished_wandb_records(next(folder.glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["adapter"] == "probe" and config["epochs"] == EPOCHS and config["log"] == "wandb"
    meta = json.loads((stage2_caches["train"] / "zarr.json").read_text())["attributes"]["cachefeat"]
    assert config["cache_fingerprint"] == meta["fingerprint"] and config["backbone"] == meta["model"]
    assert run.display_name == "run" and run.job_type == "train"
    steps = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in steps] == [1, 2, 3]
    for key, tag in (("train_loss", "train/loss"), ("val_top1", "val/top1"), ("val_top5", "val/top5"),
                     ("lr", "train/lr")):
        assert [s[tag] for s in steps] == pytest.approx([h[key] for h in history]), tag
    assert all(s["perf/step_seconds"] > 0 and s["perf/read_mb_per_s"] > 0 for s in steps)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["best_val_top1"] == pytest.approx(max(h["val_top1"] for h in history))
    assert summary["final/val_top1"] == pytest.approx(history[-1]["val_top1"])


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def _finished_wandb_records(path, timeout: float = 120) -> list:
    """The run file's records once its exit record is there: finish() returns when the run is over, but
    wandb-core (its own process) may still be writing the file out on a busy machine."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_records(path) -> list:
    """The Records of a .wandb file: W&B's transaction log (a 7-byte header, then LevelDB-log records in
    32 KiB blocks, each a wandb Record protobuf), decoded with wandb's own protobuf classes (wandb 0.31 ships
    no Python reader of the file; an offline run writes its config.yaml and summary only when synced)."""
    import struct

    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    raw, part, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                       # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(data):    # the end, or a record being written
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                 # FULL, or the LAST piece of one
            raw.append(part)
            part = b""
    records = []
    for r in raw:
        records.append(wandb_internal_pb2.Record())
        records[-1].ParseFromString(r)
    return records


TWO_TRIALS = """
train-cache: {train}
val-cache: {val}
train: {{epochs: 3, batch-size: 32, threads: 1, adapter: probe}}
grid:
  lr: [0.01, 0.0001]
"""


def test_a_two_trial_ablation_lists_both_trials_in_the_hparams_dashboard(stage2_caches, tmp_path, ray_session):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TWO_TRIALS.format(**stage2_caches))
    out = tmp_path / "abl"
    run_cli("ablate", spec, "--out", out, "--cpus-per-trial", "1", "--log", "tensorboard")
    import csv
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    root = _events(out / "tensorboard")
    exp = hp_metadata.parse_experiment_plugin_data(root.PluginTagToContent("hparams")[hp_metadata.EXPERIMENT_TAG])
    assert {h.name for h in exp.hparam_infos} == {"adapter", "lr"}
    assert {m.name.tag for m in exp.metric_infos} >= {"hparams/val_top1", "hparams/is_best"}
    assert sorted(p.name for p in (out / "tensorboard").iterdir() if p.is_dir()) == sorted(r["trial"] for r in rows)
    for rank, r in enumerate(rows):
        acc = _events(out / "tensorboard" / r["trial"])
        start = hp_metadata.parse_session_start_info_plugin_data(
            acc.PluginTagToContent("hparams")[hp_metadata.SESSION_START_INFO_TAG])
        assert start.hparams["lr"].number_value == pytest.approx(float(r["lr"]))
        assert start.hparams["adapter"].string_value == "probe"
        assert acc.Scalars("hparams/val_top1")[-1].value == pytest.approx(float(r["val_top1"]), abs=1e-4)
        assert acc.Scalars("hparams/is_best")[-1].value == (1.0 if rank == 0 else 0.0)
        assert [e.step for e in acc.Scalars("val/top1")] == [1, 2, 3]   # the trial's own epochs
    assert not (out / "best" / "tensorboard").exists()          # events live beside the trials, not in best/
