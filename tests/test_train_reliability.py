"""Training when things go wrong (issue 8, items 6 and 7): a diverging loss stops the run in one line and
keeps the last good checkpoint; a training SIGKILLed mid-run resumes to exactly the uninterrupted result;
checkpoints land atomically and a half-written temp file is ignored; bad options and folders are refused in
one line with exit status 2. Also the pictures a run leaves (issue 9, item 4): curves, confusion matrix,
cache overview, all valid PNGs linked from the JSON next to them."""
import json
import math
import os
import signal
import time

import pytest
import torch

from cachefeat.train import load_checkpoint, save_checkpoint

from conftest import cli_subprocess, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_error_line(res, status=2):
    lines = [l for l in res.output.strip().splitlines() if l.startswith("Error:")]
    assert res.exit_code == status and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def _valid_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = matplotlib.image.imread(path)   # decodes the whole image: a truncated file fails here
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def _train_args(cache, *extra):
    return ["train", "--cache", cache, "--adapter", "temporal", "--adapter-opt", "dim=32", "--batch-size", "16",
            "--threads", "1", *extra]


# ------------------------------------------------------------------------------------------- divergence
def test_a_diverging_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(stage2_caches, tmp_path):
    """A learning rate far too high, with a long warm-up so the first epochs are still sane: the loss becomes
    NaN/inf part-way. Training stops at that step (exit 1, one line naming the epoch and step and what to
    try), the checkpoint of the last finished epoch stays as it was, and no summary claims the run ended."""
    out = tmp_path / "run"
    res = run_cli(*_train_args(stage2_caches["train"], "--lr", "300", "--warmup-epochs", "6", "--grad-clip", "0",
                               "--epochs", "6", "--out", out), ok=False)
    line = _one_error_line(res, status=1)
    assert "at epoch" in line and "training stopped" in line and "Lower --lr (now 300)" in line
    failed_epoch = int(line.split("at epoch ")[1].split("/")[0])
    assert failed_epoch >= 2, line     # the setting is chosen so that at least one epoch finished first
    assert f"the checkpoint of epoch {failed_epoch - 1} in {out} is kept" in line
    ck = load_checkpoint(out)
    assert ck["epoch"] == failed_epoch - 1
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == failed_epoch - 1 and all(math.isfinite(h["train_loss"]) for h in history)
    assert not (out / "summary.json").exists()
    # the kept checkpoint is usable: it evaluates
    assert run_cli("eval", "--checkpoint", out, "--cache", stage2_caches["val"], "--json").exit_code == 0


# ------------------------------------------------------------------------------------------- killed runs
def test_a_sigkilled_training_resumes_to_the_same_result(stage2_caches, tmp_path):
    """The real thing: `cachefeat train` in its own process, SIGKILLed after its second epoch, then a
    half-written checkpoint.pt.tmp left beside the checkpoint (as a kill during the write leaves one);
    `--resume` continues from the checkpoint, ignores the temp file, and ends with weights and per-epoch
    metrics bit-identical to a run that was never interrupted."""
    epochs = "12"
    args = _train_args(stage2_caches["train"], "--epochs", epochs, "--warmup-epochs", "1")
    cut = tmp_path / "cut"
    proc = cli_subprocess(*args, "--out", cut)
    metrics = cut / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    killed_at = load_checkpoint(cut)["epoch"]
    assert 2 <= killed_at < int(epochs) and not (cut / "summary.json").exists()
    import shutil
    shutil.copytree(cut / "checkpoint", cut / "checkpoint.tmp")      # a write cut short
    whole = (cut / "checkpoint.tmp" / "model.safetensors").read_bytes()
    (cut / "checkpoint.tmp" / "model.safetensors").write_bytes(whole[: len(whole) // 2])

    res = run_cli(*args, "--out", cut, ok=False)      # neither --resume nor --overwrite: refused
    assert "--resume to continue it" in _one_error_line(res)
    res = run_cli(*args, "--out", cut, "--resume")
    assert f"resuming {cut} after epoch {killed_at} of {epochs}" in res.output
    assert f"epoch {killed_at + 1:>3}/{epochs}" in res.output and "epoch   1/" not in res.output
    assert not (cut / "checkpoint.tmp").exists()   # replaced by the next checkpoint, then renamed away

    run_cli(*args, "--out", tmp_path / "straight")
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(cut)
    assert a["epoch"] == b["epoch"] == int(epochs)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k

    def strip(h):
        return {k: v for k, v in h.items() if k not in ("seconds", "clips_per_s")}

    ha = [strip(json.loads(l)) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    hb = [strip(json.loads(l)) for l in metrics.read_text().splitlines()]
    assert ha == hb and len(ha) == int(epochs)


def test_checkpoints_are_replaced_atomically(stage2_caches, tmp_path, monkeypatch):
    """A write that dies at any step (each fsync, rename and removal of the folder swap, in turn) leaves one
    whole checkpoint that loads: the previous one, or the new one once it is renamed in place; the next
    write leaves no checkpoint.tmp or checkpoint.old behind."""
    import shutil
    out = tmp_path / "run"
    run_cli(*_train_args(stage2_caches["train"], "--epochs", "1", "--out", out, "--quiet"))
    ck = load_checkpoint(out)
    newer = {**ck, "epoch": 2}

    class Killed(BaseException):
        pass

    real = {"fsync": os.fsync, "replace": os.replace, "rmtree": shutil.rmtree}
    for k in range(1, 20):
        calls = []

        def step(name, *args, _calls=calls, _k=k, **kw):
            _calls.append(name)
            if len(_calls) == _k:
                raise Killed
            return real[name](*args, **kw)
        for name in real:
            monkeypatch.setattr(os if name != "rmtree" else shutil, name, lambda *a, _n=name, **kw: step(_n, *a, **kw))
        try:
            save_checkpoint(newer, out / "checkpoint")
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        assert load_checkpoint(out)["epoch"] in (1, 2), k
        save_checkpoint(ck, out / "checkpoint")
        assert load_checkpoint(out)["epoch"] == 1
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
        if finished:
            break
    assert finished and k > 5


def test_every_flipped_byte_of_a_checkpoint_is_refused(stage2_caches, tmp_path):
    """Issue 17, in the checkpoint format of issue 28: a flip anywhere in manifest.json, and in ~400 positions
    of each of model.safetensors and state.json (two flips each), and a file cut short, are refused; in the
    two data files with CheckpointDamaged. eval, predict and train --resume exit 1 in one line naming it."""
    from cachefeat.train import TrainError
    from cachefeat.train.checkpoint import CheckpointDamaged
    out = tmp_path / "run"
    run_cli(*_train_args(stage2_caches["train"], "--epochs", "1", "--out", out, "--quiet"))
    ckdir = out / "checkpoint"
    refused = 0
    for name in ("manifest.json", "model.safetensors", "state.json"):
        path = ckdir / name
        whole = path.read_bytes()
        n = len(whole)
        positions = range(n) if name == "manifest.json" else sorted(set(range(0, n, max(1, n // 400)))
                                                                    | set(range(n - 64, n)))
        for i in positions:
            for mask in (0xFF, 0x01):
                flipped = bytearray(whole)
                flipped[i] ^= mask
                path.write_bytes(flipped)
                with pytest.raises(TrainError if name == "manifest.json" else CheckpointDamaged):
                    load_checkpoint(out)
                refused += 1
        for cut in (0, n // 2, n - 2):   # (n - 1 would drop only the final newline of the JSON)
            path.write_bytes(whole[:cut])
            with pytest.raises(TrainError):
                load_checkpoint(out)
        path.write_bytes(whole)
    assert refused > 1000
    weights = ckdir / "model.safetensors"
    whole = weights.read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0x10
    weights.write_bytes(flipped)
    for args in (["eval", "--checkpoint", out, "--cache", stage2_caches["val"]],
                 ["predict", "--checkpoint", out, stage2_caches["data"] / "val" / "x.mp4"],
                 _train_args(stage2_caches["train"], "--epochs", "2", "--out", out, "--resume")):
        line = _one_error_line(run_cli(*args, ok=False), status=1)
        assert f"{ckdir} is damaged: its model.safetensors does not match its SHA-256" in line, line
        assert "train the run again" in line
    weights.write_bytes(whole)
    assert load_checkpoint(out)["epoch"] == 1


def test_a_run_killed_before_its_first_checkpoint_starts_again(stage2_caches, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "model.safetensors").write_bytes(b"partial")
    run_cli(*_train_args(stage2_caches["train"], "--epochs", "1", "--out", out, "--quiet"))
    assert load_checkpoint(out)["epoch"] == 1 and not (out / "checkpoint.tmp").exists()


# ------------------------------------------------------------------------------------------- bad usage
def test_output_folders_that_exist_are_refused_unless_asked(stage2_caches, tmp_path):
    cache = stage2_caches["train"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    for extra in ([], ["--overwrite"], ["--resume"]):
        res = run_cli(*_train_args(cache, "--epochs", "1", "--out", foreign, *extra), ok=False)
        assert "exists and is not a cachefeat run" in _one_error_line(res)
    assert (foreign / "todo.txt").read_text() == "keep me"
    run = tmp_path / "run"
    run_cli(*_train_args(cache, "--epochs", "1", "--out", run, "--quiet"))
    res = run_cli(*_train_args(cache, "--epochs", "1", "--out", run), ok=False)
    assert ("already holds a run (epoch 1 of 1); --resume to continue it, --overwrite to start over"
            in _one_error_line(res))
    res = run_cli(*_train_args(cache, "--epochs", "2", "--out", run, "--overwrite"))
    assert "epoch   1/2" in res.output and load_checkpoint(run)["epoch"] == 2
    # eval: an explicit --out that holds something else is refused; an earlier eval's folder is replaced
    res = run_cli("eval", "--checkpoint", run, "--cache", stage2_caches["val"], "--out", foreign, ok=False)
    assert "exists and is not the output of an earlier cachefeat eval" in _one_error_line(res)
    for _ in range(2):
        run_cli("eval", "--checkpoint", run, "--cache", stage2_caches["val"], "--out", tmp_path / "ev", "--json")


def test_bad_training_values_are_one_line_with_status_2(stage2_caches, tmp_path):
    cache, val = stage2_caches["train"], stage2_caches["val"]
    out = tmp_path / "r"
    res = run_cli("train", "--cache", cache, "--adapter", "temporl", "--out", out, ok=False)
    assert ("unknown adapter 'temporl' (known: probe, temporal, evl, dist, madapter); did you mean temporal?"
            in _one_error_line(res))
    res = run_cli("train", "--cache", cache, "--adapter", "evl", "--adapter-opt", "layer=2", "--out", out, ok=False)
    line = _one_error_line(res)
    assert "adapter evl has no option 'layer' (options: layers," in line and "did you mean layers?" in line
    res = run_cli("train", "--cache", cache, "--adapter-opt", "dim", "--out", out, ok=False)
    assert "expected KEY=VALUE" in _one_error_line(res)
    res = run_cli("train", "--cache", cache, "--adapter", "madapter", "--adapter-opt", "levels=0", "--out", out,
                  ok=False)
    _one_error_line(res)
    # a folder that is not a cachefeat cache, as training cache, val cache and eval cache
    res = run_cli("train", "--cache", stage2_caches["data"], "--out", out, ok=False)
    assert "is not a cachefeat cache" in _one_error_line(res)
    res = run_cli("train", "--cache", cache, "--val-cache", tmp_path, "--out", out, ok=False)
    assert "is not a cachefeat cache" in _one_error_line(res)
    assert not out.exists()
    run_cli(*_train_args(cache, "--epochs", "1", "--out", tmp_path / "ok", "--quiet"))
    res = run_cli("eval", "--checkpoint", tmp_path / "ok", "--cache", stage2_caches["data"], ok=False)
    assert "is not a cachefeat cache" in _one_error_line(res)
    # a checkpoint that is not one, for eval and predict
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for cmd in (["eval", "--cache", val], ["predict", stage2_caches["data"] / "train.txt"]):
        res = run_cli(*cmd, "--checkpoint", junk, ok=False)
        assert "is not a readable checkpoint" in _one_error_line(res)
        res = run_cli(*cmd, "--checkpoint", tmp_path, ok=False)
        assert "no checkpoint there" in _one_error_line(res)


# ------------------------------------------------------------------------------------------- pictures
def test_runs_and_caches_leave_pictures_linked_from_their_json(stage2_caches, tmp_path):
    run = tmp_path / "run"
    run_cli(*_train_args(stage2_caches["train"], "--val-cache", stage2_caches["val"], "--epochs", "2", "--out", run,
                         "--quiet"))
    s = json.loads((run / "summary.json").read_text())
    assert s["files"] == {"checkpoint": "checkpoint", "metrics": "metrics.jsonl", "curves_png": "curves.png",
                          "best_checkpoint": "checkpoint_best"}
    for f in s["files"].values():
        assert (run / f).exists()
    _valid_png(run / s["files"]["curves_png"])

    run_cli("eval", "--checkpoint", run, "--cache", stage2_caches["val"])
    ev = run / "eval-val"
    m = json.loads((ev / "metrics.json").read_text())
    assert m["files"]["confusion_png"] == "confusion.png" and (ev / m["files"]["confusion_csv"]).is_file()
    _valid_png(ev / m["files"]["confusion_png"])
    assert all((ev / f).is_file() for f in m["files"].values())
    assert {"confusion.npz", "logits.npz", "per_class.csv", "metrics.json"} <= set(m["files"].values())

    res = run_cli("info", stage2_caches["val"], "--plot", tmp_path / "val.png", "--json")
    assert json.loads(res.output)["plot"] == str(tmp_path / "val.png")
    _valid_png(tmp_path / "val.png")
