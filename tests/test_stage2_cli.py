"""Every adapter trained and evaluated from the command line on the synthetic temporal data set (held-out
split, random-weight tiny ViT): each temporal adapter clearly beats the frame-averaging probe, which sits
near chance between classes that are each other's time reversal; predict recognises trained videos."""
import json

import pytest

from cachefeat.synth import reversal_partner

from conftest import run_cli

# Settings sized for the tiny ViT (width 64) and ~2-3 s per adapter; `cachefeat adapters` lists the defaults.
ADAPTERS = {
    "probe": ["--epochs", "30", "--lr", "0.01"],
    "temporal": ["--adapter-opt", "dim=128", "--adapter-opt", "depth=2", "--epochs", "60"],
    "evl": ["--adapter-opt", "layers=3", "--epochs", "20"],
    "dist": ["--adapter-opt", "integration_dim=64", "--adapter-opt", "temporal_dim=32",
             "--adapter-opt", "pool_blocks=1", "--epochs", "20"],
    "madapter": ["--adapter-opt", "dim=128", "--adapter-opt", "levels=2", "--epochs", "60"],
}


@pytest.fixture(scope="module")
def trained(stage2_caches, tmp_path_factory):
    """Each adapter trained with `cachefeat train` and evaluated with `cachefeat eval --json`."""
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for name, opts in ADAPTERS.items():
        run = runs / name
        res = run_cli("train", "--cache", stage2_caches["train"], "--val-cache", stage2_caches["val"],
                      "--adapter", name, *opts, "--threads", "1", "--seed", "0", "--out", run)
        ev = run_cli("eval", "--checkpoint", run, "--cache", stage2_caches["val"], "--json", "--threads", "1")
        out[name] = {"dir": run, "train_output": res.output, "eval": json.loads(ev.output)}
    return out


def test_every_adapter_trains_and_evaluates_from_the_cli(trained, stage2_caches):
    for name, r in trained.items():
        run, ev = r["dir"], r["eval"]
        first = r["train_output"].splitlines()[0]
        summary = json.loads((run / "summary.json").read_text())
        assert first.startswith(f"adapter {name}: {summary['trainable_params']:,} trainable parameters")
        epochs = int(ADAPTERS[name][ADAPTERS[name].index("--epochs") + 1])
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)) and summary["epochs"] == epochs
        assert {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"} <= metrics[-1].keys()
        assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG" and (run / "checkpoint" / "manifest.json").is_file()
        # eval: the 3 views of each of the 60 val videos averaged, fractions, per class, confusion matrix
        assert ev["videos"] == 60 and ev["clips"] == 180 and ev["views"] == 3
        assert 0 <= ev["top1"] <= ev["top5"] <= 1 and ev["trainable_params"] == summary["trainable_params"]
        assert len(ev["per_class"]) == 6 and "reversal_accuracy" in ev
        assert ev["top1"] == pytest.approx(metrics[-1]["val_top1"])     # the same protocol as in training
        report = run / "eval-val"
        conf = (report / "confusion.csv").read_text().splitlines()
        assert len(conf) == 7 and sum(int(v) for line in conf[1:] for v in line.split(",")[1:]) == 60
        assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((report / "metrics.json").read_text())["top1"] == ev["top1"]


def test_temporal_adapters_clearly_beat_the_frame_averaging_probe(trained):
    """Held-out videos, random-weight backbone: the probe cannot tell a class from its time reversal
    (about 50%); every temporal adapter can, and is far more accurate overall (chance: 1/6)."""
    probe = trained["probe"]["eval"]
    assert 0.3 <= probe["reversal_accuracy"] <= 0.62
    assert probe["top1"] <= 0.35
    for name in ("temporal", "evl", "dist", "madapter"):
        ev = trained[name]["eval"]
        assert ev["top1"] >= probe["top1"] + 0.25, (name, ev["top1"], probe["top1"])
        assert ev["reversal_accuracy"] >= max(0.62, probe["reversal_accuracy"] + 0.15), (name, ev["reversal_accuracy"])


def test_predict_recognises_videos_the_model_was_trained_on(trained, stage2_caches):
    data = stage2_caches["data"]
    lines = (data / "train.txt").read_text().split("\n")
    picks = {}
    for line in lines:
        if line:
            path, label = line.rsplit(" ", 1)
            picks.setdefault(int(label), data / path)
    videos = [picks[c] for c in sorted(picks)]                  # one training video of each class
    res = run_cli("predict", "--checkpoint", trained["evl"]["dir"], *videos, "--json")
    out = json.loads(res.output)
    classes = json.loads((trained["evl"]["dir"] / "eval-val" / "metrics.json").read_text())["per_class"]
    names = list(classes)
    for label, r in enumerate(out):
        assert r["video"] == str(videos[label]) and r["views"] == 1 and len(r["top"]) == 5
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert r["top"][0]["class"] == names[label], (label, r["top"][:2])
        assert r["top"][0]["index"] != reversal_partner(label)
    text = run_cli("predict", "--checkpoint", trained["evl"]["dir"], videos[0], "--top", "2").output.splitlines()
    assert text[0] == str(videos[0]) and text[1].split()[:3] == ["1.", *names[0].split()] and len(text) == 3
    res = run_cli("predict", "--checkpoint", trained["evl"]["dir"], videos[0], data / "missing.mp4", ok=False)
    assert res.exit_code == 1 and "failed: missing" in res.output and "1 of 2 videos could not be read" in res.output


def test_compare_tabulates_the_runs(trained):
    dirs = [trained[n]["dir"] for n in ADAPTERS]
    res = run_cli("compare", *dirs)
    lines = res.output.splitlines()
    assert lines[0].split("|")[1].strip() == "run" and "reversal pairs" in lines[0]
    assert len(lines) == 2 + len(dirs) + 1
    rows = json.loads(run_cli("compare", *dirs, "--json").output)
    assert [r["adapter"] for r in rows] == list(ADAPTERS)
    assert all(r["measured_by"] == "eval on val.zarr" for r in rows)
    assert rows[0]["top1"] == trained["probe"]["eval"]["top1"]


def test_compare_names_a_damaged_run_file_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{not json")
    res = run_cli("compare", run, ok=False)
    assert res.exit_code == 1 and "summary.json is not readable JSON" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
