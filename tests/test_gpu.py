"""What only a GPU can show: extraction under fp16/bf16 autocast computes the fp32 features within
reduced-precision error, the GPU crop and the page-locked copies change nothing, stage two's batches reach
the GPU unchanged (from pageable and page-locked memory, on a side stream), and stage two trains under
fp16 and bf16 autocast to a checkpoint a CPU can use. Skipped on machines without CUDA (CI has none); run
on a GPU machine with `pytest tests/test_gpu.py` (`make gpu-check` runs it first)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cachefeat import open_cache
from cachefeat.train import TrainConfig, load_adapter, open_run
from cachefeat.train.evaluate import to_device

from conftest import run_cli, tiny_extract_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_extraction_matches_fp32_on_cpu(synth_small, tmp_path, precision):
    common = ["--layers", "all", "--tokens", "all", "--frames", "4", "--model", "ViT-B/32", "--no-text"]
    cpu, gpu = tmp_path / "cpu.zarr", tmp_path / "gpu.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", cpu, *common, "--device", "cpu"))
    run_cli(*tiny_extract_args(synth_small / "train.txt", gpu, *common, "--device", "cuda", "--precision", precision))
    a, b = open_cache(cpu), open_cache(gpu)
    assert b.meta["compute_precision"] == precision
    tol = 2e-2 if precision == "fp16" else 6e-2   # relative to the features' scale; bf16 has 8 bits of mantissa
    for name in ["embed", "cls", f"tokens/{a.layers[-1]}"]:
        x, y = a.read(name).astype(np.float32), b.read(name).astype(np.float32)
        rel = np.abs(x - y).mean() / np.abs(x).mean()
        assert rel < tol, f"{name}: mean relative difference {rel:.4f} under {precision}"


def test_gpu_training_with_mixed_precision_gives_a_checkpoint_the_cpu_can_use(stage2_caches, tmp_path):
    run = tmp_path / "run"
    run_cli("train", "--cache", stage2_caches["train"], "--val-cache", stage2_caches["val"], "--adapter", "temporal",
            "--epochs", "3", "--batch-size", "32", "--device", "cuda", "--out", run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] in ("bf16", "fp16") and np.isfinite(summary["final"]["train_loss"])

    def top1(device):
        out = run_cli("eval", "--checkpoint", run, "--cache", stage2_caches["val"], "--device", device, "--json").output
        return json.loads(out[out.index("{"):])["top1"]

    assert abs(top1("cuda") - top1("cpu")) <= 0.05   # reduced-precision logits may flip a near-tie


def test_gpu_crops_and_asynchronous_copies_change_nothing(synth_small, tmp_path):
    """On a GPU, test views cropped on the device (--preprocess device) and features copied to page-locked
    rows on a side stream give the same cache as PIL crops in the workers, int8 and pixels included."""
    common = ["--layers", "all", "--tokens", "all", "--frames", "4", "--views", "2x3", "--pixels", "16x2",
              "--device", "cuda", "--shard-size", "6"]
    for dtype in ("float16", "int8"):
        caches = {}
        for how in ("workers", "device"):
            caches[how] = tmp_path / f"{dtype}-{how}.zarr"
            run_cli(*tiny_extract_args(synth_small / "train.txt", caches[how], *common, "--dtype", dtype,
                                       "--preprocess", how))
        a, b = open_cache(caches["workers"]), open_cache(caches["device"])
        for name in a.layout.row_arrays():
            assert np.array_equal(a.read(name), b.read(name)), (dtype, name)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_training_under_amp_gives_a_checkpoint_that_evaluates_on_cpu(stage2_caches, tmp_path, precision):
    """Training under each autocast precision (fp16 with its gradient scaler) stays finite, and the checkpoint
    read back through the public loader on the CPU holds CPU weights whose logits agree with the same
    adapter's on the GPU (fp32 logits both sides; TF32 matmuls, if enabled, are the only difference)."""
    run = tmp_path / f"run-{precision}"
    run_cli("train", "--cache", stage2_caches["train"], "--adapter", "evl", "--adapter-opt", "layers=2",
            "--adapter-opt", "tca=false", "--epochs", "2", "--batch-size", "16", "--device", "cuda",
            "--precision", precision, "--out", run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == precision and np.isfinite(summary["final"]["train_loss"])
    cpu, gpu = load_adapter(run, device="cpu"), load_adapter(run, device="cuda")
    assert all(p.device.type == "cpu" for p in cpu.model.parameters())
    ds = cpu.dataset(stage2_caches["val"], in_memory="yes")
    batch = ds.gather(ds.rows[:16])
    with torch.no_grad():
        a, b = cpu.logits(batch).float(), gpu.logits(batch).float().cpu()
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= 1e-2 * max(1.0, float(a.abs().max()))


def test_gpu_reader_batches_reach_the_gpu_unchanged_from_pageable_and_page_locked_memory(stage2_caches):
    """Stage two's batches copied to the GPU as training does (to_device: non-blocking from pageable arrays)
    and from page-locked copies on a side stream are bit-for-bit the CPU's tensors."""
    r = open_run(TrainConfig(adapter="evl", adapter_opts={"layers": 2, "tca": False}, epochs=1, batch_size=16,
                             device="cuda", in_memory="yes"), str(stage2_caches["train"]))
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    checked = 0
    for batch in r.train_source.batches(0, train=True):
        want = to_device(batch, torch.device("cpu"), r.spec)
        plain = to_device(batch, dev, r.spec)
        pinned = {k: torch.as_tensor(v).pin_memory() for k, v in batch.items() if k in ("cls", "tokens", "pixels")}
        assert all(t.is_pinned() for t in pinned.values())
        with torch.cuda.stream(stream):
            side = to_device(pinned, dev, r.spec)
        torch.cuda.current_stream().wait_stream(stream)
        for k, v in want.items():
            assert plain[k].device.type == "cuda" and side[k].device.type == "cuda"
            assert torch.equal(plain[k].cpu(), v), k
            assert torch.equal(side[k].cpu(), v), k
        checked += 1
    assert checked >= 2
