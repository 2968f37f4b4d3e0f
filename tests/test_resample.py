"""Preprocessing on the device is PIL's, bit for bit: resize and crops of real decoded frames of several
sizes (odd sizes, an upscale, 1080p), and a whole cache extracted with --preprocess device equals the one
the workers' PIL path writes."""
import numpy as np
import pytest
import torch
from PIL import Image

from cachefeat.extract.preprocess import Preprocessing, crops, small
from cachefeat.extract.resample import resize, view_crops
from cachefeat.extract.video import DecodeRequest, decode_video
from cachefeat.specs import PixelSpec, SamplingSpec, ViewSpec

from conftest import run_cli, tiny_extract_args
from helpers import assert_caches_equal
from media import encode

# (height, width): Kinetics' 340x256 both ways, odd sizes, smaller than the crop (an upscale), 1080p
SIZES = [(256, 340), (340, 256), (97, 131), (36, 52), (1080, 1920)]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """Three decoded frames of a real H.264 file per size (textured, so every filter tap matters)."""
    out = {}
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        frames = np.stack([np.asarray(Image.fromarray(np.roll(base, k, axis=1)).resize((w, h), Image.NEAREST))
                           for k in range(3)])
        # 4:2:0 needs even sizes; odd ones are encoded 4:4:4
        path = encode(tmp_path_factory.mktemp("v") / f"{h}x{w}.mp4", frames,
                      pix_fmt="yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p")
        req = DecodeRequest(0, str(path), 3, SamplingSpec(), ViewSpec(), Preprocessing((224, 224), (0,) * 3, (1,) * 3),
                            raw=True)
        res = decode_video(req)
        assert res.ok and res.decoded.shape == (3, h, w, 3), res.error
        out[(h, w)] = res.decoded
    return out


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("interpolation,pil", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
def test_resize_is_pils(decoded, hw, interpolation, pil):
    frames = decoded[hw]
    for oh, ow in ((224, 224), (224, 298), (112, 75), (hw[0] + 3, hw[1] * 2)):
        ours = resize(torch.from_numpy(frames), ow, oh, interpolation).numpy()
        theirs = np.stack([np.asarray(Image.fromarray(f).resize((ow, oh), pil)) for f in frames])
        assert np.array_equal(ours, theirs), (hw, oh, ow, interpolation)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("spatial", [1, 3])
def test_test_crops_are_the_workers_crops(decoded, hw, spatial):
    frames = decoded[hw]
    prep = Preprocessing((224, 224), (0.5,) * 3, (0.5,) * 3)
    ours = view_crops(torch.from_numpy(frames), 224, spatial).numpy()
    theirs = np.stack([np.stack(crops(f, prep, spatial)) for f in frames], axis=1)    # (S, N, ...)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(resize(torch.from_numpy(ours[0]), 48, 48, "bilinear").numpy(),
                          np.stack([small(c, 48) for c in theirs[0]]))


def test_a_cache_cropped_on_the_device_equals_the_workers_cache(synth_small, tmp_path):
    """Every array and the metadata, for test views with 3 spatial crops and cached pixels: --preprocess is
    how, not what, so the two caches are one."""
    common = ["--layers", "all", "--tokens", "all", "--frames", "4", "--views", "2x3", "--pixels", "16x2"]
    for how in ("workers", "device"):
        run_cli(*tiny_extract_args(synth_small / "train.txt", tmp_path / f"{how}.zarr", *common, "--preprocess", how))
    assert_caches_equal(tmp_path / "workers.zarr", tmp_path / "device.zarr")


def test_raw_requests_give_the_frames_the_views_use(decoded, tmp_path):
    """A raw decode returns each needed frame once, with the indices the views' crops are made from."""
    path = encode(tmp_path / "v.mp4", np.repeat(decoded[(36, 52)], 4, axis=0))
    req = DecodeRequest(0, str(path), 4, SamplingSpec(), ViewSpec(2, 1), Preprocessing((32, 32), (0,) * 3, (1,) * 3),
                        pixels=PixelSpec(16, 2), raw=True)
    res = decode_video(req)
    assert res.ok and res.pixels is None and res.small is None
    assert set(np.unique(np.concatenate([res.frame_idx.ravel(), res.small_idx.ravel()]))) == set(res.decoded_idx)
    assert list(res.decoded_idx) == sorted(res.decoded_idx)


def test_a_size_not_reproduced_exactly_is_cropped_with_pil(decoded, monkeypatch):
    """Where neither pass order gives PIL's bytes (pass_order None), the crops come from PIL itself."""
    from cachefeat.extract import resample
    frames = decoded[(256, 340)]
    monkeypatch.setattr(resample, "pass_order", lambda *a: None)
    with pytest.raises(resample.NotExact):
        resample.resize(torch.from_numpy(frames), 224, 224)
    prep = Preprocessing((224, 224), (0.5,) * 3, (0.5,) * 3)
    idx = np.array([[0, 1], [1, 2]])
    pixels, small_frames = resample.views_from_frames(frames, np.arange(3), idx, idx, prep, 1, 48, "cpu")
    theirs = np.stack([crops(f, prep, 1)[0] for f in frames])
    assert np.array_equal(pixels.numpy(), theirs[idx])
    assert np.array_equal(small_frames, np.stack([small(c, 48) for c in theirs])[idx])
