"""`cachefeat train --workers N`: Ray Train workers (gloo on CPU), each reading its slice of every global
batch, gradients averaged by DDP, rank 0 writing the single-process run folder; on the real local Ray
runtime of the test session."""
import json

import numpy as np
import torch

from cachefeat.train import load_checkpoint
from cachefeat.train.reader import part_of_batch

from conftest import run_cli

# the probe (no dropout, no mixing) on 180 training clips in batches of 20: each worker's share is 10 clips
# of every batch, so the averaged gradients are the single-process ones and the two runs must agree
ARGS = ["--adapter", "probe", "--epochs", "3", "--batch-size", "20", "--lr", "0.01", "--threads", "1", "--seed", "0"]


def test_part_of_batch_splits_every_batch_between_the_workers():
    rows = np.arange(10, 17)
    parts = [part_of_batch(rows, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == rows.tolist() and [len(p) for p in parts] == [3, 2, 2]
    assert [part_of_batch(np.array([5]), r, 2).tolist() for r in range(2)] == [[5], [5]]   # every worker steps


def test_two_workers_train_like_one_process_and_write_the_same_run_folder(stage2_caches, tmp_path, ray_session):
    train, val = stage2_caches["train"], stage2_caches["val"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", "--cache", train, "--val-cache", val, *ARGS, "--out", one, "--quiet")
    res = run_cli("train", "--cache", train, "--val-cache", val, *ARGS, "--workers", "2", "--out", two)
    lines = res.output.splitlines()
    assert "read by 2 data-parallel workers" in lines[1]
    assert [l.split()[1] for l in lines if l.startswith("epoch")] == ["1/3", "2/3", "3/3"]   # rank 0's lines
    assert lines[-1].startswith(f"wrote {two}: checkpoint/")
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a.keys() == b.keys() and b["epoch"] == 3
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-5), k
    ha, hb = a["history"][-1], b["history"][-1]
    assert abs(ha["train_loss"] - hb["train_loss"]) < 1e-4 and ha["val_top1"] == hb["val_top1"]
    assert json.loads((two / "summary.json").read_text())["workers"] == 2
    # the checkpoint is a usable one: eval and --resume work on it
    ev = json.loads(run_cli("eval", "--checkpoint", two, "--cache", val, "--json").output)
    assert ev["top1"] == hb["val_top1"] and ev["epochs"] == 3
    res = run_cli("train", "--cache", train, "--val-cache", val, *ARGS[:2], "--epochs", "4", *ARGS[4:],
                  "--workers", "2", "--out", two, "--resume", ok=False)
    assert res.exit_code == 2 and "other settings (epochs: 3 vs 4)" in res.output
