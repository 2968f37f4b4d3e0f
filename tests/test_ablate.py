"""`cachefeat ablate SPEC.yaml`: Ray Tune trials of the normal training on the same caches, on the real
local Ray runtime of the test session; the results table, chart and best checkpoint; one-line spec errors;
every shipped ablation spec parses."""
import csv
import json
from pathlib import Path

import pytest

from cachefeat.train.ablate import AblationError, is_ablation_spec, load_spec, parse_spec, search_space, trial_config

from conftest import run_cli

SPECS = sorted(p for p in (Path(__file__).parents[1] / "pipelines").glob("*.yaml") if is_ablation_spec(p))

# 2 adapters x 2 seeds = 4 trials, sized like tests/test_stage2_cli.py (the probe at a higher lr, a small
# temporal transformer), 30 epochs: a few seconds per trial on one core
SPEC = """
train-cache: {train}
val-cache: {val}
train: {{epochs: 30, batch-size: 32, threads: 1}}
adapters:
  probe: {{lr: 1e-2}}
  temporal: {{adapter-opt.dim: 128, adapter-opt.depth: 2}}
grid:
  adapter: [probe, temporal]
  seed: [0, 1]
"""


def test_an_ablation_of_four_trials_ranks_temporal_adapters_above_the_probe(stage2_caches, tmp_path, ray_session):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(**stage2_caches))
    out = tmp_path / "abl"
    res = run_cli("ablate", spec, "--out", out, "--cpus-per-trial", "1")
    lines = res.output.splitlines()
    assert lines[0].startswith(f"ablation {spec}: 4 trials (4 grid points x 1 sample)")
    progress = [l for l in lines if l.startswith("[")]
    assert sorted(l.split("]")[0] for l in progress) == ["[1/4", "[2/4", "[3/4", "[4/4"], res.output
    assert len(lines) == 1 + 4 + 1 and lines[-1].startswith(f"wrote {out}: results.csv")   # Tune itself is quiet
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "done" and r["epochs"] == "30" for r in rows)
    top1 = [float(r["val_top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)
    # the ordering of the training issue: both temporal trials above both probe trials
    assert [r["adapter"] for r in rows] == ["temporal", "temporal", "probe", "probe"], rows
    assert top1[1] >= top1[2] + 0.15
    assert all(int(r["trainable_params"]) > 0 and float(r["peak_memory_bytes"]) > 1e7 and float(r["seconds"]) > 0
               for r in rows)
    assert json.loads(rows[0]["config"])["adapter_opts"] == {"dim": 128, "depth": 2}
    assert {r["seed"] for r in rows} == {"0", "1"}
    md = (out / "results.md").read_text().splitlines()
    table = [l for l in md if l.startswith("| ")]
    assert len(table) == 5 and "val top-1" in table[0] and "peak RSS" in table[0] and rows[0]["trial"] in table[1]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # best/ is the best trial's run folder, with a checkpoint that eval accepts
    assert (out / "best" / "checkpoint").is_dir() and (out / "trials" / rows[0]["trial"] / "train.log").is_file()
    ev = json.loads(run_cli("eval", "--checkpoint", out / "best", "--cache", stage2_caches["val"], "--json").output)
    assert ev["adapter"] == "temporal" and ev["top1"] == pytest.approx(top1[0], abs=1e-4)
    again = run_cli("ablate", spec, "--out", out, ok=False)
    assert again.exit_code == 2 and "already holds an ablation" in again.output


def _error(res) -> str:
    return [l for l in res.output.splitlines() if l.startswith("Error:")][0]


def test_bad_specs_are_refused_in_one_line_naming_the_key(stage2_caches, tmp_path):
    spec = tmp_path / "bad.yaml"
    good = SPEC.format(**stage2_caches)
    cases = {
        good.replace("adapter: [probe, temporal]", "adapter: [probe, tempral]"):
            "grid.adapter: unknown adapter 'tempral'",
        good.replace("seed: [0, 1]", "learning-rate: [0.1]"): "grid: unknown setting 'learning-rate'",
        good.replace("adapter-opt.depth: 2", "adapter-opt.deep: 2"): "adapter temporal has no option 'deep'",
        good + "sampler: tpe\n": "unknown key 'sampler'",
        good.replace(str(stage2_caches["val"]), str(tmp_path / "missing.zarr")): "val-cache: ",
        good.replace("seed: [0, 1]", "adapter-opt.layers: [2]").replace("adapter: [probe, temporal]", "adapter: [evl]"):
            None,   # valid
        good + "random: {lr: {loguniform: [0, 1]}}\n": "random.lr: loguniform needs low < high and low > 0",
    }
    for text, message in cases.items():
        spec.write_text(text)
        res = run_cli("ablate", spec, "--out", tmp_path / "o", "--check", ok=message is None)
        if message is not None:
            assert res.exit_code == 2 and message in _error(res), (message, res.output)
            assert "Traceback" not in res.output


def test_search_space_and_trial_settings():
    spec = parse_spec({"train-cache": "t", "val-cache": "v", "train": {"epochs": 4, "lr": "1e-3"},
                       "adapters": {"temporal": {"adapter-opts": {"dim": 64}, "lr": 3e-3}},
                       "grid": {"adapter": ["probe", "temporal"], "batch-size": [8, 16]},
                       "random": {"weight-decay": {"loguniform": [1e-4, 1e-1]}}, "num-samples": 3})
    assert spec.grid_size() == 4 and spec.num_samples == 3 and spec.train["lr"] == 0.001
    space = search_space(spec)
    assert space["adapter"] == {"grid_search": ["probe", "temporal"]} and "weight_decay" in space
    cfg = trial_config(spec, {"adapter": "temporal", "batch_size": 16, "weight_decay": 0.01})
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.adapter_opts, cfg.epochs) == (3e-3, 16, 0.01, {"dim": 64}, 4)
    assert trial_config(spec, {"adapter": "probe"}).adapter_opts == {}
    with pytest.raises(AblationError, match="adapter probe has no option 'dim'"):
        parse_spec({"train-cache": "t", "val-cache": "v", "grid": {"adapter": ["probe"], "adapter-opt.dim": [1]}})


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_ablation_specs_parse(path):
    spec = load_spec(path)
    assert spec.grid_size() * spec.num_samples >= 2 and spec.val_cache


def test_the_shipped_ablation_specs_are_there():
    names = {p.name for p in SPECS}
    assert {"ablate-demo.yaml", "ablate-adapters.yaml", "ablate-layers.yaml", "ablate-depth-width.yaml",
            "ablate-frames.yaml"} <= names


def test_random_search_with_asha_runs_every_sample(stage2_caches, tmp_path, ray_session):
    """--num-samples draws of the random part, ASHA allowed to stop trials after a grace epoch; each row
    says whether its trial ran every epoch or was stopped, with the epochs it ran."""
    spec = tmp_path / "random.yaml"
    spec.write_text(f"train-cache: {stage2_caches['train']}\nval-cache: {stage2_caches['val']}\n"
                    "train: {adapter: probe, epochs: 4, batch-size: 32, threads: 1}\n"
                    "random: {lr: {loguniform: [1e-4, 1e-1]}, weight-decay: {choice: [0.0, 0.05]}}\n")
    out = tmp_path / "abl"
    res = run_cli("ablate", spec, "--out", out, "--asha", "--num-samples", "4", "--max-concurrent", "2")
    assert "4 trials (1 grid point x 4 samples)" in res.output and "ASHA early stopping" in res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and len({r["lr"] for r in rows}) == 4
    assert all(1e-4 <= float(r["lr"]) <= 1e-1 and float(r["weight_decay"]) in (0.0, 0.05) for r in rows)
    for r in rows:
        ran = int(r["epochs"])
        assert 1 <= ran <= 4 and r["status"] == ("done" if ran == 4
                                                 else f"stopped early (ASHA) after {ran} of 4 epochs")
        # (a stopped trial may finish the epoch it was in before Tune stops it)
        assert len((out / "trials" / r["trial"] / "metrics.jsonl").read_text().splitlines()) >= ran
    assert (out / "best" / "checkpoint").is_dir()


def test_a_failing_trial_is_a_row_with_its_error_and_the_command_exits_1(stage2_caches, tmp_path, ray_session):
    spec = tmp_path / "fail.yaml"
    spec.write_text(f"train-cache: {stage2_caches['train']}\nval-cache: {stage2_caches['val']}\n"
                    "train: {adapter: probe, epochs: 1, threads: 1}\ngrid: {precision: [fp32, fp16]}\n")
    out = tmp_path / "abl"
    res = run_cli("ablate", spec, "--out", out, ok=False)
    assert res.exit_code == 1 and "1 of 2 trials failed" in res.output
    assert "Traceback" not in res.output and any("failed: " in l and "fp16 needs a GPU" in l
                                                 for l in res.output.splitlines())
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows][0] == "done"
    assert rows[1]["status"].startswith("error: DeviceError: --precision fp16 needs a GPU"), rows[1]["status"]
    assert "fp16 needs a GPU" in (out / "trials" / rows[1]["trial"] / "train.log").read_text()
    assert (out / "best" / "checkpoint").is_dir() and (out / "results.md").is_file()
