"""The training loop: the cache and the frozen backbone run on the fly give the same loss trajectory, a
resumed run repeats the uninterrupted one, mismatched caches are refused in one line, and the pieces
(schedule, mixing, options, config files) do what they say."""
import json

import numpy as np
import pytest
import torch

from cachefeat.train import TrainConfig, cpu_threads, load_checkpoint, lr_at, mix, open_run, train
from cachefeat.train.online import OnlineSource

from conftest import run_cli, tiny_extract_args
from helpers import live_children


@pytest.fixture(scope="module")
def small_caches(synth_small, tmp_path_factory):
    """From synth_small (4 classes, 12 train videos): a training cache of 2 augmented views per video with
    pixels; a CLS-only cache; a cache of the same videos made by another backbone (other random weights)."""
    out = tmp_path_factory.mktemp("small")
    run_cli(*tiny_extract_args(synth_small / "train.txt", out / "aug.zarr", "--layers", "1,2,3", "--tokens", "all",
                               "--frames", "4", "--pixels", "16x2", "--aug-views", "2", "--shard-size", "8"))
    run_cli(*tiny_extract_args(synth_small / "train.txt", out / "cls.zarr", "--frames", "4"))
    run_cli(*tiny_extract_args(synth_small / "train.txt", out / "other.zarr", "--frames", "4", "--seed", "1",
                               "--layers", "1,2,3", "--tokens", "all", "--pixels", "16x2"))
    return out


@pytest.mark.parametrize("adapter,opts", [("evl", {"layers": 2}), ("dist", {"integration_dim": 32, "temporal_dim": 8})])
def test_training_from_the_cache_equals_training_with_the_backbone_on_the_fly(small_caches, adapter, opts):
    """The backbone is frozen, so its outputs never change: for the same seed and data order, an adapter
    trained on cached features follows the same loss trajectory as one fed by decoding the videos and
    running the backbone every step (augmented views, their crops and pixels recomputed from the seeds
    recorded in the cache)."""
    cfg = TrainConfig(adapter=adapter, adapter_opts=opts, epochs=3, batch_size=4, seed=5, warmup_epochs=1)
    cached = open_run(cfg, small_caches / "aug.zarr")
    online = open_run(cfg, small_caches / "aug.zarr")
    online.train_source = OnlineSource(online.train_cache, online.train_source.selection, cfg.batch_size, cfg.seed)
    a = train(cached, None, log=lambda s: None)
    b = train(online, None, log=lambda s: None)
    assert len(a.step_losses) == len(b.step_losses) == 3 * 3     # 12 videos, one view each, 4 per step
    np.testing.assert_allclose(a.step_losses, b.step_losses, rtol=1e-4, atol=1e-5)
    assert np.ptp(a.step_losses) > 0.01     # it did train: the trajectory is not flat
    for (k, x), y in zip(cached.model.state_dict().items(), online.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=k)


def test_streamed_training_through_reader_processes_equals_reading_in_process(small_caches):
    """Streaming the cache through reader processes that read ahead across epochs gives the same batches,
    so the same losses, as reading it in the training process; when train() returns no reader is left."""
    before = live_children()
    losses = {}
    for workers in (0, 2):
        cfg = TrainConfig(adapter="evl", adapter_opts={"layers": 2}, epochs=3, batch_size=4, seed=2, in_memory="no",
                          read_workers=workers, threads=1)
        run = open_run(cfg, small_caches / "aug.zarr", small_caches / "aug.zarr")
        losses[workers] = train(run, None, log=lambda s: None).step_losses
    assert len(losses[2]) == 9
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-6)
    assert live_children() == before


def test_an_interrupted_run_resumes_to_the_same_result(small_caches, tmp_path):
    args = ["train", "--cache", small_caches / "aug.zarr", "--adapter", "temporal", "--adapter-opt", "dim=32",
            "--epochs", "4", "--batch-size", "4", "--threads", "1"]
    run_cli(*args, "--out", tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def stop_after_two(line):
        if line.startswith("epoch   2/4"):
            raise Interrupt
    cfg = TrainConfig(adapter="temporal", adapter_opts={"dim": "32"}, epochs=4, batch_size=4)
    (tmp_path / "cut").mkdir()
    with pytest.raises(Interrupt), cpu_threads(1):   # the same thread count: the same float summation order
        train(open_run(cfg, small_caches / "aug.zarr"), tmp_path / "cut", log=stop_after_two)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 2 and not (tmp_path / "cut" / "summary.json").exists()
    res = run_cli(*args, "--out", tmp_path / "cut", ok=False)
    assert res.exit_code == 2 and "--resume to continue it" in res.output
    res = run_cli(*args, "--out", tmp_path / "cut", "--resume")
    assert "resuming" in res.output and "epoch   3/4" in res.output and "epoch   1/4" not in res.output
    a, b = (load_checkpoint(tmp_path / d) for d in ("straight", "cut"))
    assert a["epoch"] == b["epoch"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    la = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb] and len(la) == 4
    # other settings are refused on resume; a finished run has nothing to do
    res = run_cli(*args[:-2], "--lr", "0.01", "--out", tmp_path / "cut", "--resume", ok=False)
    assert res.exit_code == 2 and "other settings (lr: 0.001 vs 0.01)" in res.output
    assert "nothing to do" in run_cli(*args, "--out", tmp_path / "cut", "--resume").output


def _one_error_line(res):
    lines = [l for l in res.output.strip().splitlines() if l.startswith("Error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_mismatched_caches_are_refused_in_one_line(small_caches, stage2_caches, tmp_path):
    # the adapter needs patch tokens, the cache has CLS only
    res = run_cli("train", "--cache", small_caches / "cls.zarr", "--adapter", "evl", "--adapter-opt", "layers=2",
                  "--out", tmp_path / "r1", ok=False)
    assert "evl needs patch tokens, but the cache has CLS tokens only" in _one_error_line(res)
    res = run_cli("train", "--cache", small_caches / "cls.zarr", "--adapter", "dist", "--out", tmp_path / "r2",
                  ok=False)
    line = _one_error_line(res)
    assert "needs patch tokens" in line and "needs the cached pixels" in line
    # train and val caches from different backbones, or with different class lists
    res = run_cli("train", "--cache", small_caches / "aug.zarr", "--val-cache", small_caches / "other.zarr",
                  "--adapter", "probe", "--out", tmp_path / "r3", ok=False)
    assert "another backbone or preprocessing" in _one_error_line(res) and "weights_sha256" in res.output
    res = run_cli("train", "--cache", stage2_caches["train"], "--val-cache", small_caches / "aug.zarr",
                  "--adapter", "probe", "--out", tmp_path / "r4", ok=False)
    assert "another class list" in _one_error_line(res)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()
    # eval: a cache made by another backbone than the training cache
    run_cli("train", "--cache", small_caches / "aug.zarr", "--adapter", "evl", "--adapter-opt", "layers=2",
            "--epochs", "1", "--out", tmp_path / "evl", "--quiet")
    res = run_cli("eval", "--checkpoint", tmp_path / "evl", "--cache", small_caches / "other.zarr", ok=False)
    assert "holds features of another backbone or preprocessing than the training cache" in _one_error_line(res)
    res = run_cli("eval", "--checkpoint", small_caches / "aug.zarr", "--cache", small_caches / "aug.zarr", ok=False)
    assert "no checkpoint there" in _one_error_line(res)
    res = run_cli("train", "--cache", small_caches / "aug.zarr", "--adapter", "evl", "--adapter-opt", "heads=x",
                  "--out", tmp_path / "r5", ok=False)
    assert "heads='x' is not a valid int" in _one_error_line(res)


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, cfg, warmup=10, total=100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_feature_space_mixup_and_cutmix():
    B, T = 4, 8
    x = {"cls": torch.arange(B, dtype=torch.float).view(B, 1, 1, 1).expand(B, T, 2, 3).clone(),
         "pixels": torch.arange(B, dtype=torch.float).view(B, 1, 1, 1, 1).expand(B, 2 * T, 2, 2, 3).clone()}
    target = torch.eye(B)
    rng = np.random.default_rng(0)
    mx, mt = mix(x, target, TrainConfig(mixup=0.8), rng)
    lam = float(mt[0, 0])
    torch.testing.assert_close(mx["cls"][0], lam * x["cls"][0] + (1 - lam) * x["cls"][-1])
    torch.testing.assert_close(mt.sum(1), torch.ones(B))
    cx, ct = mix(x, target, TrainConfig(cutmix=1.0), np.random.default_rng(3))
    from_partner = (cx["cls"][0, :, 0, 0] == 3)                 # frames of clip 0 taken from clip 3
    n = int(from_partner.sum())
    assert 0 < n < T and ct[0, 3] == pytest.approx(n / T) and ct[0, 0] == pytest.approx(1 - n / T)
    idx = torch.nonzero(from_partner).flatten()
    assert torch.equal(idx, torch.arange(idx[0], idx[0] + n))   # one contiguous span of frames
    pix = (cx["pixels"][0, :, 0, 0, 0] == 3)                    # the same span at the pixels' 2x frame rate
    assert torch.equal(pix, from_partner.repeat_interleave(2))
    same_x, same_t = mix(x, target, TrainConfig(), rng)
    assert same_x is x and same_t is target


def test_every_train_setting_is_an_option_with_its_default():
    """`cachefeat train` with no options trains with TrainConfig's defaults, and every setting can be set."""
    from cachefeat.cli import cli
    options = {p.name: p.default for p in cli.commands["train"].params}
    assert {k: options.get(k) for k in TrainConfig.defaults()} == TrainConfig.defaults()


def test_config_file_settings_yield_to_the_command_line(stage2_caches, tmp_path):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("adapter: probe\nepochs: 3\nlr: 0.05\nadapter-opts: {dropout: 0.2}\n")
    run_cli("train", "--cache", stage2_caches["train"], "--config", cfg, "--epochs", "2", "--in-memory", "no",
            "--read-workers", "2", "--out", tmp_path / "run", "--quiet")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["adapter"] == "probe" and s["epochs"] == 2 and s["config"]["lr"] == 0.05
    assert s["adapter_config"] == {"dropout": 0.2} and s["in_memory"] is False
    cfg.write_text("epochs: 3\nlearning_rate: 0.1\n")
    res = run_cli("train", "--cache", stage2_caches["train"], "--config", cfg, "--out", tmp_path / "r2", ok=False)
    assert "unknown setting 'learning_rate'" in _one_error_line(res)


def test_epochs_auto_plans_enough_steps_for_small_sets(stage2_caches, tmp_path):
    """--epochs auto (the default): at least 30 epochs and at least --min-steps optimiser steps; an explicit
    --epochs N trains N. 180 clips in batches of 64 are 3 steps per epoch."""
    from cachefeat.train.config import planned_epochs
    assert planned_epochs(0, 1000, 6) == 167 and planned_epochs(0, 1000, 938) == 30
    assert planned_epochs(12, 1000, 6) == 12
    assert planned_epochs(0, 10**9, 1) == 1000                    # capped
    res = run_cli("train", "--cache", stage2_caches["train"], "--adapter", "probe", "--batch-size", "64",
                  "--min-steps", "93", "--out", tmp_path / "auto")
    assert "epochs auto: 31 epochs of 3 steps (93 steps; at least 30 epochs and 93 steps)" in res.output
    s = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert s["epochs"] == 31 and s["config"]["epochs"] == 0
    again = run_cli("train", "--cache", stage2_caches["train"], "--adapter", "probe", "--batch-size", "64",
                    "--min-steps", "93", "--out", tmp_path / "auto", "--resume")
    assert "already trained for 31 epochs" in again.output
    res = run_cli("train", "--cache", stage2_caches["train"], "--epochs", "0", "--out", tmp_path / "x", ok=False)
    assert res.exit_code == 2 and "not at least 1 (or auto)" in res.output


def test_view_selection_and_averaging_and_decay_groups():
    """--train-views first:K / cycle pick from each video's views as documented; --view-average prob
    averages softmax probabilities (EVL's protocol); --weight-decay-on all decays every parameter."""
    from cachefeat.train.evaluate import video_logits
    from cachefeat.train.loop import param_groups
    from cachefeat.train.reader import select_rows
    videos = np.repeat(np.arange(3), 4)                           # 3 videos x 4 views, rows grouped by video
    valid, labels = np.ones(12, bool), np.zeros(12, np.int64)
    for epoch in range(6):
        assert (select_rows(valid, videos, labels, 0, epoch, "first:2") % 4 < 2).all()
        assert (select_rows(valid, videos, labels, 0, epoch, "cycle") % 4 == epoch % 4).all()
    assert len({tuple(select_rows(valid, videos, labels, 0, e, "one") % 4) for e in range(8)}) > 1
    logits = np.array([[4.0, 0.0], [0.0, 1.0]], np.float32)      # two views of one video
    _, lg, _ = video_logits(logits, np.array([0, 0]), np.array([0, 0]), "logit")
    _, pr, _ = video_logits(logits, np.array([0, 0]), np.array([0, 0]), "prob")
    p = torch.softmax(torch.from_numpy(logits), 1).mean(0).numpy()
    assert np.allclose(lg[0], [2.0, 0.5]) and np.allclose(np.exp(pr[0]), p)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3
    decay, no_decay = param_groups(model, 0.05, "all")
    assert len(decay["params"]) == 4 and not no_decay["params"]
