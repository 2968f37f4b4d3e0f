"""What the cache holds beyond tokens: pixels, class-name text embeddings, augmented views, int8."""
import json

import decord
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cachefeat.extract.backbone import register_model_configs
from cachefeat.extract.sampling import pixel_indices
from cachefeat.store import open_cache

from conftest import TINY, run_cli, tiny_extract_args
from helpers import assert_caches_equal


def _model():
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=None)
    return model.eval(), preprocess


def test_pixel_indices_align_with_backbone_frames():
    idx = np.array([2, 6, 10, 14])
    assert pixel_indices(idx, 16, 2).tolist() == [2, 4, 6, 8, 10, 12, 14, 16 - 1]
    assert pixel_indices(idx, 16, 1).tolist() == [2, 6, 10, 14]
    assert pixel_indices(np.array([0, 1, 1]), 2, 2).tolist() == [0, 0, 1, 1, 1, 1]  # short videos repeat


def test_pixels_are_the_model_crops_resized(tmp_path, synth_small):
    """Cached pixels equal open_clip's own preprocessed frames (un-normalised) resized to SIZE, within uint8
    rounding, at twice the backbone's frames, aligned with them."""
    out = tmp_path / "px.zarr"
    run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "4", "--pixels", "16x2", "--views", "2x1"))
    c = open_cache(out)
    assert c.pixels.size == 16 and c.pixels.factor == 2
    px, pidx, fidx = c.read("pixels"), c.read("clips/pixel_frame_idx"), c.read("clips/frame_idx")
    assert px.shape == (c.num_clips, 8, 16, 16, 3) and px.dtype == np.uint8
    assert np.array_equal(pidx[:, ::2], fidx)  # pixel frame 2t is backbone frame t
    _, preprocess = _model()
    mean = torch.tensor(c.meta["preprocessing"]["mean"]).view(3, 1, 1)
    std = torch.tensor(c.meta["preprocessing"]["std"]).view(3, 1, 1)
    for row in (0, c.num_clips - 1):
        path = c.read("videos/path")[c.read("clips/video", row)]
        frames = decord.VideoReader(str(path), num_threads=1).get_batch([int(i) for i in pidx[row]]).asnumpy()
        x = torch.stack([preprocess(Image.fromarray(f)) * std + mean for f in frames])   # back to [0, 1]
        ref = F.interpolate(x * 255, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        ref = ref.permute(0, 2, 3, 1).numpy()
        assert np.abs(px[row].astype(np.float32) - ref).max() <= 2.0
        assert np.abs(px[row].astype(np.float32) - ref).mean() <= 0.5


def test_text_embeddings_equal_encode_text(tmp_path, synth_small):
    out = tmp_path / "t.zarr"
    run_cli(*tiny_extract_args(synth_small / "val.txt", out, "--frames", "2", "--text-template", "a video of {}."))
    c = open_cache(out)
    assert c.text["prompts"][1] == "a video of moving left."
    model, _ = _model()
    tok = open_clip.get_tokenizer(TINY)
    with torch.inference_mode():
        ref = model.encode_text(tok(c.text["prompts"])).numpy()
    np.testing.assert_allclose(c.text_embeddings(), ref, atol=1e-5)
    # the zero-shot baseline from the cache equals open_clip's own zero-shot on the same frames
    zs = json.loads(run_cli("zeroshot", "--cache", out, "--json").output)
    emb = torch.from_numpy(c.read("embed").astype(np.float32))
    pred = (F.normalize(emb, dim=-1).mean(1) @ F.normalize(torch.from_numpy(ref), dim=-1).T).argmax(1).numpy()
    assert zs["top1"] == pytest.approx(float(np.mean(pred == c.labels())))
    assert zs["videos"] == 4 and zs["classes"] == 4
    run_cli(*tiny_extract_args(synth_small / "val.txt", tmp_path / "nt.zarr", "--frames", "2", "--no-text"))
    res = run_cli("zeroshot", "--cache", tmp_path / "nt.zarr", ok=False)
    assert res.exit_code == 2 and "no class-name text embeddings" in res.output


def test_augmented_views_differ_and_reproduce(tmp_path, synth_small):
    args = ["--frames", "4", "--aug-views", "3", "--color-jitter", "0.4,0.4,0.2,0.1", "--pixels", "16",
            "--aug-seed", "7"]
    a, b, other = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "o.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", a, *args))
    run_cli(*tiny_extract_args(synth_small / "train.txt", b, *args, "--shard-size", "3"))
    c = open_cache(a)
    assert c.augment["views"] == 3 and c.num_clips == 3 * c.num_videos
    params = [json.loads(p) for p in c.read("clips/aug")]
    assert all(set(p) == {"crop", "flip", "jitter"} for p in params)
    e = c.read("embed").astype(np.float32)
    assert not np.allclose(e[0], e[1]) and not np.allclose(e[1], e[2])   # views of one video differ
    assert len({json.dumps(p["crop"]) for p in params[:3]}) == 3
    # same seed: the same views, whatever the sharding
    assert_caches_equal(a, b, features_only=True)
    assert np.array_equal(c.read("clips/aug"), open_cache(b).read("clips/aug"))
    assert np.array_equal(c.read("pixels"), open_cache(b).read("pixels"))
    run_cli(*tiny_extract_args(synth_small / "train.txt", other, *args[:-1], "8"))
    assert not np.array_equal(c.read("clips/aug"), open_cache(other).read("clips/aug"))
    # --no-flip: Something-Something's left/right classes
    nf = tmp_path / "nf.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", nf, "--frames", "2", "--aug-views", "4", "--no-flip"))
    assert not any(json.loads(p)["flip"] for p in open_cache(nf).read("clips/aug"))
    res = run_cli(*tiny_extract_args(synth_small / "train.txt", tmp_path / "x.zarr", "--aug-views", "2",
                                     "--views", "3x1"), ok=False)
    assert res.exit_code == 2 and "cannot be combined with --views" in res.output


def test_int8_is_within_half_a_step_of_float32(tmp_path, synth_small):
    args = ["--frames", "4", "--tokens", "all", "--layers", "1,3"]
    f32, i8 = tmp_path / "f32.zarr", tmp_path / "i8.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", f32, *args, "--dtype", "float32"))
    run_cli(*tiny_extract_args(synth_small / "train.txt", i8, *args, "--dtype", "int8"))
    a, q = open_cache(f32), open_cache(i8)
    assert q.root["cls"].dtype == np.int8 and q.root["tokens/3"].dtype == np.int8
    for name in ("embed", "cls", "tokens/1", "tokens/3"):
        x, y = a.read(name), q.read(name)
        assert y.dtype == np.float16 and x.shape == y.shape
        step = q.quant_step(name)
        err = np.abs(x - y.astype(np.float32))
        # half a quantization step, plus float16 rounding of the dequantized value
        bound = step / 2 + np.abs(x) * 2 ** -10 + 1e-6
        assert np.all(err <= bound), name
    # read_cls of a layer subset dequantizes with that layer's steps
    np.testing.assert_array_equal(q.read_cls(layers=[3]), q.read("cls")[:, :, 1:2])
    raw = a.feature_bytes_raw()
    assert q.feature_bytes_raw() * 2 <= raw  # int8 stores a quarter of float32
    info = run_cli("info", i8).output
    assert "int8, dequantized on read" in info


def test_dry_run_counts_pixels_and_text(synth_small):
    out = run_cli("extract", synth_small / "train.txt", "--out", "x.zarr", "--model", "ViT-B/16", "--tokens", "cls",
                  "--pixels", "112x2", "--frames", "8", "--dry-run").output
    # 112 x 112 x 3 bytes x 2 pixel frames per backbone frame = 73.5 KiB
    assert "| pixels" in out and "73.50 KiB" in out
    assert "text/embed (4 classes)" in out
