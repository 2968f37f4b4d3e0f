import re
from pathlib import Path

import decord
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cachefeat.extract.backbone import register_model_configs, weights_digest
from cachefeat.store import open_cache

from conftest import TINY, run_cli, tiny_extract_args
from media import encode, good_video, random_bytes, truncated


def _reference_model(seed=0):
    """The tiny model built the way a user would build it with open_clip, from the same seed."""
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=None)
    return model.eval(), preprocess


def _reference_features(model, preprocess, path, frame_idx, layers):
    vr = decord.VideoReader(str(path), num_threads=1)
    frames = vr.get_batch([int(i) for i in frame_idx]).asnumpy()
    x = torch.stack([preprocess(Image.fromarray(f)) for f in frames])
    with torch.inference_mode():
        out = model.visual.forward_intermediates(x, indices=layers, output_fmt="NLC", output_extra_tokens=True,
                                                 intermediates_only=True)
        embed = model.encode_image(x)
    cls = torch.stack([p[:, 0] for p in out["image_intermediates_prefix"]], 1)
    patches = torch.stack(out["image_intermediates"], 1)
    return cls.numpy(), patches.numpy(), embed.numpy()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_values_equal_open_clip(tmp_path, synth_small, dtype, tol):
    """Every tapped layer's CLS and patch tokens, and the final embedding, are what open_clip computes
    for the frames the cache says it used (float16: within float16 rounding)."""
    out = tmp_path / "c.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", out, "--layers", "all", "--tokens", "all",
                               "--frames", "4", "--dtype", dtype, "--views", "2x1"))
    cache = open_cache(out)
    model, preprocess = _reference_model()
    assert cache.meta["model"]["weights_sha256"] == weights_digest(model.visual)
    paths = cache.read("videos/path")
    layers = cache.layers
    assert layers == [0, 1, 2, 3]
    for row in (0, 3, cache.num_clips - 1):
        video = cache.read("clips/video", row)
        cls, patches, embed = _reference_features(model, preprocess, paths[video], cache.read("clips/frame_idx", row),
                                                  layers)
        scale = max(1.0, float(np.abs(patches).max()))
        np.testing.assert_allclose(cache.read("cls", row).astype(np.float32), cls, atol=tol * scale, rtol=tol)
        np.testing.assert_allclose(cache.read("embed", row).astype(np.float32), embed, atol=tol * scale, rtol=tol)
        for li, layer in enumerate(layers):
            np.testing.assert_allclose(cache.read(f"tokens/{layer}", row).astype(np.float32), patches[:, li],
                                       atol=tol * scale, rtol=tol)


def test_pooled_tokens_are_the_pooled_grid(tmp_path, synth_small):
    out = tmp_path / "p.zarr"
    run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--layers", "last:2", "--tokens", "pooled:2x2",
                               "--frames", "3", "--dtype", "float32"))
    cache = open_cache(out)
    model, preprocess = _reference_model()
    video = cache.read("clips/video", 0)
    _, patches, _ = _reference_features(model, preprocess, cache.read("videos/path")[video],
                                        cache.read("clips/frame_idx", 0), [2, 3])
    grid = torch.from_numpy(patches[:, 1]).reshape(3, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.adaptive_avg_pool2d(grid, (2, 2)).permute(0, 2, 3, 1).reshape(3, 4, -1).numpy()
    np.testing.assert_allclose(cache.read("tokens/3", 0), ref, atol=1e-5)
    assert cache.read("cls").shape == (cache.num_clips, 3, 2, 64)


# SIGKILL part-way and resume: tests/test_reliability.py::test_sigkill_at_many_points_then_resume


def test_corrupt_files_are_recorded_and_good_clips_kept(tmp_path, synth_small):
    good = [l.split()[0] for l in (synth_small / "train.txt").read_text().splitlines()]
    random_bytes(tmp_path / "garbage.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    truncated(good_video(tmp_path / "src.mp4", size=64), tmp_path / "cut.mp4", 0.4)
    lines = [f"{synth_small / g} 0" for g in good]
    lines.insert(2, f"{tmp_path / 'garbage.mp4'} 1")
    lines.insert(5, f"{tmp_path / 'empty.mp4'} 1")
    lines.insert(7, f"{tmp_path / 'cut.mp4'} 2")
    lines.append(f"{tmp_path / 'not-there.mp4'} 3")
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "c.zarr"
    res = run_cli(*tiny_extract_args(manifest, out, "--frames", "4", "--shard-size", "4"))
    assert "4 videos failed" in res.output
    cache = open_cache(out)
    assert cache.complete
    fails = {Path(f["path"]).name: f for f in cache.failures()}
    assert set(fails) == {"garbage.mp4", "empty.mp4", "cut.mp4", "not-there.mp4"}
    assert fails["not-there.mp4"]["stage"] == "missing" and fails["empty.mp4"]["stage"] == "open"
    assert "Invalid data" in fails["garbage.mp4"]["error"] or "Error reading" in fails["garbage.mp4"]["error"]
    valid = cache.valid()
    paths = cache.read("videos/path")[cache.clip_video()]
    assert valid.sum() == len(good)
    assert {Path(p).name for p in paths[valid]} == {Path(g).name for g in good} or len(set(paths[valid])) == len(good)
    assert np.all(np.abs(cache.read("embed")[valid]).sum(axis=(1, 2)) > 0)
    assert np.all(cache.read("embed")[~valid] == 0)
    # --strict turns failures into a non-zero exit, after writing everything
    res = run_cli(*tiny_extract_args(manifest, out, "--frames", "4", "--shard-size", "4", "--strict"), ok=False)
    assert res.exit_code == 1 and "4 videos failed" in res.output
    info = run_cli("info", out, "--failures").output
    assert "4 videos failed" in info and "[missing]" in info


def test_resume_refuses_other_settings_and_overwrite_restarts(tmp_path, synth_small):
    out = tmp_path / "c.zarr"
    run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "4"))
    res = run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "6"), ok=False)
    assert res.exit_code == 2 and "frames: 4 vs 6" in res.output and "--overwrite" in res.output
    res = run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "4"))
    assert "already complete" in res.output
    run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "6", "--overwrite"))
    assert open_cache(out).frames == 6


def test_refuses_to_overwrite_what_is_not_a_cache(tmp_path, synth_small):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    res = run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--overwrite"), ok=False)
    assert res.exit_code == 2 and "not a cachefeat cache" in res.output
    assert (out / "thesis.tex").exists()


def test_dry_run_sizes(synth_small):
    out = run_cli("extract", synth_small / "train.txt", "--out", "/nonexistent/x.zarr", "--model", "ViT-L/14",
                  "--layers", "last:4", "--tokens", "all", "--frames", "8", "--dry-run").output
    # ViT-L/14: 4 layers x 256 patch tokens x 1024 x 2 bytes = 2 MiB per frame, as the reference notes compute
    assert "ViT-L-14 (24 blocks, width 1024, patch grid 16x16)" in out
    assert re.search(r"\| tokens/<layer> x4 +\| 2.00 MiB", out)
    assert "12 videos x 1 views = 12 clips x 8 frames = 96 frames" in out
    assert not Path("/nonexistent/x.zarr").exists()


def test_views_rows_and_three_crops(tmp_path, synth_small):
    out = tmp_path / "v.zarr"
    run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "2", "--views", "2x3"))
    c = open_cache(out)
    assert c.num_clips == 4 * 6
    assert c.clip_view().tolist()[:7] == [0, 1, 2, 3, 4, 5, 0]
    assert c.clip_video().tolist()[:7] == [0, 0, 0, 0, 0, 0, 1]
    fi = c.read("clips/frame_idx")
    assert np.array_equal(fi[0], fi[2]) and not np.array_equal(fi[0], fi[3])  # spatial crops share frames
    # a wide video: the three crops see different parts of it
    rng = np.random.default_rng(0)
    wide = encode(tmp_path / "wide.mp4", rng.integers(0, 256, (6, 64, 160, 3), dtype=np.uint8))
    (tmp_path / "wide.txt").write_text(f"{wide} 0\n")
    run_cli(*tiny_extract_args(tmp_path / "wide.txt", tmp_path / "w.zarr", "--frames", "2", "--views", "1x3"))
    e = open_cache(tmp_path / "w.zarr").read("embed").astype(np.float32)
    assert not np.allclose(e[0], e[1]) and not np.allclose(e[1], e[2])
