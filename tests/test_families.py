"""Every backbone family, each through a tiny random-weight member registered with the libraries' own
mechanisms (cachefeat/extract/tiny.py, model_configs/): the cache extracted from real video files equals the
model's own `forward_intermediates` on the same preprocessed frames (built, preprocessed and run here with
open_clip's or timm's own code, not cachefeat's), within float16 storage error; temporal, evl, madapter and
dist train on every family's cache; what a family cannot do is refused in one line."""
import json

import av
import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from cachefeat.extract import resample
from cachefeat.extract.backbone import (
    CLASS_TOKEN,
    MEAN_PATCH,
    BackboneError,
    load_backbone,
    model_geometry,
    register_model_configs,
    resolve_model_name,
    weights_digest,
)
from cachefeat.extract.preprocess import Preprocessing, crops
from cachefeat.specs import TokenSpec
from cachefeat.store import open_cache
from cachefeat.train import TrainConfig, open_run, train

from conftest import TINY, run_cli
from media import encode

# family -> (model, what cls holds, register tokens, rotary q/k, text tower)
FAMILIES = {
    "open_clip ViT": (TINY, CLASS_TOKEN, 0, None, True),
    "SigLIP2": ("cachefeat-tiny-SigL2", MEAN_PATCH, 0, None, True),
    "EVA02": ("cachefeat-tiny-EVA02", CLASS_TOKEN, 0, "interleaved", True),
    "PE-Core": ("cachefeat-tiny-PE-Core", CLASS_TOKEN, 0, "interleaved", True),
    "DINOv2 registers": ("timm:cachefeat_tiny_dinov2_reg4", CLASS_TOKEN, 4, None, False),
    "timm ViT": ("timm:cachefeat_tiny_vit", CLASS_TOKEN, 0, None, False),
}
LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def videos(synth_small, tmp_path_factory):
    """synth_small's 12 training videos (64x64 H.264) and one 80x48 H.264 video (a non-square frame: the
    shorter side is resized, the longer one cropped), as a `path label` list."""
    out = tmp_path_factory.mktemp("family_videos")
    frames = np.random.default_rng(3).integers(0, 256, (12, 48, 80, 3), dtype=np.uint8)
    frames[:, :, :40] //= 2                                    # some structure across the frame
    wide = encode(out / "wide.mp4", frames)
    lines = (synth_small / "train.txt").read_text().splitlines()
    root = synth_small
    rows = [f"{root / line.rsplit(' ', 1)[0]} {line.rsplit(' ', 1)[1]}" for line in lines if line.strip()]
    (out / "train.txt").write_text("\n".join(rows + [f"{wide} 0"]) + "\n")
    (out / "classes.txt").write_text((synth_small / "classes.txt").read_text())
    return out


@pytest.fixture(scope="module")
def family_caches(videos, tmp_path_factory) -> dict:
    """One cache per family: every layer with all patch tokens, 4 frames, 16 px pixels at twice the frames
    (for dist), float16."""
    out = tmp_path_factory.mktemp("family_caches")
    caches = {}
    for family, (model, *_) in FAMILIES.items():
        path = out / f"{family.replace(' ', '_')}.zarr"
        run_cli("extract", videos / "train.txt", "--out", path, "--model", model, "--pretrained", "none", "--quiet",
                "--decode-workers", "1", "--layers", "all", "--tokens", "all", "--frames", "4", "--pixels", "16x2",
                "--shard-size", "16")
        caches[family] = path
    return caches


def _reference_model(model: str):
    """The model and its eval transform, built the way a user would with open_clip or timm (same seed)."""
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model.startswith("timm:"):
            net = timm.create_model(resolve_model_name(model)[len("timm:"):], num_classes=0)
            return net.eval(), create_transform(**resolve_data_config(model=net)), net
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
        return clip.eval(), preprocess, clip.visual


def _decode(path, frame_idx) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return [frames[int(i)] for i in frame_idx]


def _own_forward(model: str, net, x: torch.Tensor, cls_kind: str):
    """The model's own forward_intermediates (and pooled output): cls (per cls_kind), patches, embed."""
    with torch.inference_mode():
        if model.startswith("timm:"):
            final, inter = net.forward_intermediates(x, indices=LAYERS, return_prefix_tokens=True, norm=False,
                                                     output_fmt="NLC")
            patches, prefix = [t for t, _ in inter], [p for _, p in inter]
            embed = net.forward_head(final, pre_logits=True)
        else:
            has_prefix = getattr(getattr(net.visual, "trunk", None), "num_prefix_tokens", 1) > 0
            out = net.visual.forward_intermediates(x, indices=LAYERS, output_fmt="NLC",
                                                   output_extra_tokens=has_prefix)
            patches, prefix = out["image_intermediates"], out.get("image_intermediates_prefix")
            embed = net.encode_image(x)
    cls = [p[:, 0] for p in prefix] if cls_kind == CLASS_TOKEN else [t.mean(dim=1) for t in patches]
    return torch.stack(cls, 1).numpy(), torch.stack(patches, 1).numpy(), embed.numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cache_equals_the_models_own_forward_intermediates(family, family_caches):
    """Rows of a square and of the non-square video: cls (of every layer), patch tokens (registers never among
    them) and the final embedding equal what the model computes itself on frames decoded and preprocessed by
    its own library's transform, within float16 rounding (relative 2**-11; 5% and 1e-5 more for float32
    differences between batchings). Measured: at most 0.997 of 2**-11 |ref| + 1e-6 on every family."""
    model, cls_kind, registers, rope, text = FAMILIES[family]
    cache = open_cache(family_caches[family])
    m = cache.meta["model"]
    assert (m["cls"], m["register_tokens"], m["rope"], m["text_tower"]) == (cls_kind, registers, rope, text)
    assert cache.layers == LAYERS and cache.read("tokens/0").shape[2:] == (16, 64)   # the 4x4 grid, width 64
    assert bool(cache.text) == text
    net, transform, tower = _reference_model(model)
    assert m["weights_sha256"] == weights_digest(tower)
    paths, worst = cache.read("videos/path"), 0.0
    for row in (0, cache.num_clips - 1):                     # a 64x64 video and the 80x48 one
        frames = _decode(paths[cache.read("clips/video", row)], cache.read("clips/frame_idx", row))
        x = torch.stack([transform(Image.fromarray(f)) for f in frames])
        cls, patches, embed = _own_forward(model, net, x, cls_kind)
        pairs = [(cache.read("cls", row), cls), (cache.read("embed", row), embed)]
        pairs += [(cache.read(f"tokens/{layer}", row), patches[:, i]) for i, layer in enumerate(LAYERS)]
        for cached, ref in pairs:
            cached = cached.astype(np.float32)
            assert cached.shape == ref.shape
            np.testing.assert_allclose(cached, ref, rtol=1.05 * 2.0 ** -11, atol=1e-5)
            worst = max(worst, float(np.max(np.abs(cached - ref) / np.maximum(np.abs(ref), 1e-3))))
    assert worst > 0          # float16 storage rounds: a cache equal to float32 would mean a float32 store


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("adapter,opts", [("temporal", {"dim": 32, "depth": 1}),
                                          ("evl", {"layers": 3}),
                                          ("madapter", {"dim": 32, "levels": 2}),
                                          ("dist", {"integration_dim": 32, "temporal_dim": 8, "pool_blocks": 1})])
def test_every_adapter_trains_on_every_family(family, adapter, opts, family_caches):
    """One epoch from the cache: widths, heads, grids and frames come from its metadata; EVL's temporal
    cross-attention rebuilds the q/k of the family's frozen blocks (rotary ones included)."""
    cfg = TrainConfig(adapter=adapter, adapter_opts=opts, epochs=1, batch_size=4, seed=0, warmup_epochs=0)
    run = open_run(cfg, family_caches[family])
    if adapter == "evl":
        assert run.model.tca is not None and run.model.tca[0].rope_pairing == FAMILIES[family][3]
    result = train(run, None, log=lambda s: None)
    (epoch,) = result.history
    assert np.isfinite(epoch["train_loss"])


@pytest.mark.parametrize("family", ["SigLIP2", "timm ViT"])
def test_features_recomputed_from_the_metadata_equal_the_cache(family, family_caches):
    """What predict and online training compute (the backbone rebuilt from the metadata, its weights hash
    checked; the recorded preprocessing: timm's crop_pct resize; the recorded cls: SigLIP's mean patch token)
    equals the cache, bit for bit in the cache's float16."""
    from cachefeat.adapters import Needs
    from cachefeat.train.online import OnlineFeatures, backbone_from_meta
    cache = open_cache(family_caches[family])
    online = OnlineFeatures(cache.meta, Needs(embed=True, cls_layers=(1, 3), token_layers=(3,)),
                            backbone_from_meta(cache.meta, device="cpu"))
    row = cache.num_clips - 1                               # the non-square video
    res = online.decode_result(cache.read("videos/path")[cache.read("clips/video", row)])
    got = online.extract(res.pixels)
    np.testing.assert_array_equal(got["cls"][0], cache.read("cls", row)[:, [1, 3]])
    np.testing.assert_array_equal(got["tokens"][0, :, 0], cache.read("tokens/3", row))
    np.testing.assert_array_equal(got["embed"][0], cache.read("embed", row))


def test_evl_tca_on_a_rotary_tower_refuses_pooled_tokens():
    from cachefeat import adapters
    from cachefeat.adapters.base import CacheMismatch, FeatureSpec
    spec = FeatureSpec(num_classes=3, frames=2, width=64, embed_dim=32, depth=4, heads=2, layers=(0, 1, 2, 3),
                       tokens=TokenSpec("pooled", (2, 2)), patch_grid=(4, 4), rope="interleaved")
    with pytest.raises(CacheMismatch, match="rotary embedding defined on the full 4x4 patch grid.*tca=false"):
        adapters.resolve("evl", {"layers": 3}, spec)
    adapters.resolve("evl", {"layers": 3, "tca": "false"}, spec)


def test_text_heads_and_zeroshot_refuse_image_only_families(family_caches, tmp_path):
    cache = family_caches["DINOv2 registers"]
    res = run_cli("zeroshot", "--cache", cache, ok=False)
    assert res.exit_code == 2 and "has no text tower" in res.output and len(res.output.strip().splitlines()) == 1
    res = run_cli("train", "--cache", cache, "--adapter", "dist", "--adapter-opt", "head=text", "--out",
                  tmp_path / "r", ok=False)
    assert res.exit_code == 2 and "has no text tower" in res.output and len(res.output.strip().splitlines()) == 1
    # a family with a text tower stores the class-name embeddings
    assert open_cache(family_caches["SigLIP2"]).text_embeddings().shape == (4, 64)


@pytest.mark.parametrize("model", ["cachefeat-tiny-EVA02", "cachefeat-tiny-PE-Core", "timm:cachefeat_tiny_dinov2_reg4"])
def test_evl_rebuilds_the_q_k_of_timm_blocks_rotary_ones_included(model, monkeypatch):
    """TCA's q/k for block b, recomputed from block b-1's cached patch tokens, equal the q/k the block itself
    computes (after its rotary embedding), captured from its attention call; prefix tokens take no part."""
    from cachefeat import adapters
    from cachefeat.adapters.base import FeatureSpec
    bb = load_backbone(model, "none", "cpu")
    spec = FeatureSpec(num_classes=3, frames=2, width=64, embed_dim=bb.embed_dim, depth=4, heads=2,
                       layers=(0, 1, 2, 3), tokens=TokenSpec("all", (4, 4)), patch_grid=(4, 4), rope=bb.tower.rope)
    evl = adapters.build("evl", {"layers": 2}, spec)          # taps 2, 3; TCA reads block 1's output
    evl.set_backbone(bb)
    captured = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: captured.append((q, k)) or sdpa(q, k, v, *a, **kw))
    for blk in bb.tower.trunk.blocks:
        blk.attn.fused_attn = True
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8))
    feats = bb.features(pixels, [1], TokenSpec("all", (4, 4)))
    monkeypatch.undo()
    q_ref, k_ref = captured[2]                                 # block 2's attention: (B, H, P+N, d)
    prefix = bb.tower.trunk.num_prefix_tokens
    with torch.no_grad():
        q, k = evl.tca[0]._qk(feats["tokens"][:, 0][:, None])           # (B, 1, H, N, d)
    torch.testing.assert_close(q[:, 0], q_ref[:, :, prefix:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k[:, 0], k_ref[:, :, prefix:], rtol=1e-4, atol=1e-5)
    assert ("tca.0.rope" in evl.state_dict()) == (bb.tower.rope is not None)


@pytest.mark.parametrize("cfg", [
    {"input_size": (3, 32, 32), "crop_pct": 0.9, "interpolation": "bicubic"},       # tiny timm ViT: 35 then 32
    {"input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic"},     # vit_base_patch16_224.augreg
    {"input_size": (3, 518, 518), "crop_pct": 1.0, "interpolation": "bicubic"},     # DINOv2 (an upscale here)
    {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear"},
    {"input_size": (3, 64, 64), "crop_pct": 0.95, "interpolation": "bicubic", "crop_mode": "squash"},
])
def test_timm_data_config_crops_equal_timms_own_transform(cfg, tmp_path):
    """Preprocessing.from_timm, cropped with PIL in the workers and on the device (resample), gives the bytes of
    timm's eval transform (before ToTensor/Normalize) on a decoded non-square frame."""
    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_mode": "center", **cfg}
    frames = np.random.default_rng(1).integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    frame = _decode(encode(tmp_path / "v.mp4", frames), [1])[0]
    prep = Preprocessing.from_timm(cfg)
    theirs = create_transform(**cfg, is_training=False).transforms[:-2]    # drop MaybeToTensor, Normalize
    img = Image.fromarray(frame)
    for t in theirs:
        img = t(img)
    mine = crops(frame, prep)[0]
    np.testing.assert_array_equal(mine, np.asarray(img))
    if resample.supported(prep.size, prep.interpolation, prep.resize_mode):
        dev = resample.view_crops(torch.from_numpy(frame[None]), prep.size[0], 1, prep.interpolation, prep.resize)
        np.testing.assert_array_equal(dev[0, 0].numpy(), mine)
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_crops_on_the_device_equal_the_workers_for_a_timm_crop_pct(videos, tmp_path):
    """timm's crop_pct (resize to 35, crop 32) cropped on the compute device gives the cache the workers' PIL
    crops give, byte for byte."""
    from helpers import assert_caches_equal
    args = ["extract", videos / "train.txt", "--model", "timm:cachefeat_tiny_vit", "--pretrained", "none", "--quiet",
            "--decode-workers", "1", "--frames", "2", "--layers", "3", "--tokens", "all", "--views", "1x3"]
    run_cli(*args, "--out", tmp_path / "w.zarr", "--preprocess", "workers")
    run_cli(*args, "--out", tmp_path / "d.zarr", "--preprocess", "device")
    assert open_cache(tmp_path / "w.zarr").meta["preprocessing"]["resize"] == 35
    assert_caches_equal(tmp_path / "w.zarr", tmp_path / "d.zarr")


def test_timm_names_tags_and_checkpoint_files(tmp_path):
    assert resolve_model_name("timm:vit_small_patch14_reg4_dinov2") == "timm:vit_small_patch14_reg4_dinov2.lvd142m"
    geo = model_geometry("timm:vit_base_patch14_reg4_dinov2.lvd142m")       # meta device: no weights, no memory
    assert (geo["depth"], geo["width"], geo["heads"], geo["patch_grid"], geo["text"]) == (12, 768, 12, [37, 37], False)
    assert model_geometry("cachefeat-tiny-SigL2")["text"]                  # --dry-run counts text embeddings
    for name, match in [("timm:convnext_tiny", "is not a plain ViT"), ("timm:vit_smal_patch14_dinov2",
                        "did you mean vit_small_patch14_dinov2"), ("RN50", "is not a ViT")]:
        with pytest.raises(BackboneError, match=match):
            load_backbone(name, "none", "cpu")
    with pytest.raises(BackboneError, match="has no pretrained tag 'openai'; tags: lvd142m"):
        load_backbone("timm:vit_small_patch14_reg4_dinov2", "openai", "cpu")
    with pytest.raises(BackboneError, match="names the tag 'lvd142m' and --pretrained the tag 'other'"):
        load_backbone("timm:vit_small_patch14_reg4_dinov2.lvd142m", "other", "cpu")
    # a checkpoint file: the tag's data config, the file's weights
    torch.manual_seed(7)
    net = timm.create_model("cachefeat_tiny_dinov2_reg4", num_classes=0)
    torch.save(net.state_dict(), tmp_path / "dino.pth")
    bb = load_backbone("timm:cachefeat_tiny_dinov2_reg4", str(tmp_path / "dino.pth"), "cpu")
    assert bb.weights_sha256 == weights_digest(net) and bb.init_seed is None
    assert bb.name == "timm:cachefeat_tiny_dinov2_reg4.untrained" and not bb.has_text_tower


def test_a_local_dir_timm_tower_builds(tmp_path):
    """open_clip's local-dir: (and hf-hub:) towers are recognised after building (they used to crash with
    AttributeError: 'TimmModel' object has no attribute 'transformer')."""
    register_model_configs()
    cfg = open_clip.get_model_config("cachefeat-tiny-EVA02")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    torch.manual_seed(3)
    clip = open_clip.create_model("cachefeat-tiny-EVA02")
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    bb = load_backbone(f"local-dir:{tmp_path}", "none", "cpu")
    assert bb.describe()["family"] == "EVA02-CLIP" and bb.weights_sha256 == weights_digest(clip.visual)
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5)


def test_models_lists_the_families_and_their_options():
    out = run_cli("models").output
    for family in ("open_clip ViT", "SigLIP / SigLIP2", "EVA02-CLIP", "PE-Core", "DINOv2 (timm)", "timm ViT"):
        assert family in out
    assert "ViT-B-16-SigLIP2" in out and "EVA02-B-16" in out and "PE-Core-B-16" in out
    assert "ViT-L-14-CLIPA" in out and "RN50 " not in out
    assert "siglip (text tokenizer)" in out and "cachefeat[EXTRA]" in out   # the extras a family needs
    out = run_cli("models", "--timm", "*reg4_dinov2").output
    assert "timm:vit_small_patch14_reg4_dinov2" in out and "lvd142m" in out
