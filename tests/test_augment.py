"""Augmented training views as the papers draw them: timm's RandAugment reproduced op by op, drawn once per
view and applied alike to every frame, deterministic for a seed; flips that swap the labels of mirror-image
classes (DiST's SSv2 pairs), checked on a tiny labelled set whose direction of motion is measurable."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from cachefeat.extract import randaugment as ra
from cachefeat.extract.preprocess import Preprocessing
from cachefeat.extract.video import DecodeRequest, decode_video
from cachefeat.specs import AugmentSpec, SamplingSpec, SpecError, ViewSpec, parse_flip_pairs

from conftest import run_cli, tiny_extract_args
from media import good_video

PREP = Preprocessing(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _image(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 5, size[0] // 5, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(base, np.ones((5, 5, 1), np.uint8)))


@pytest.fixture(scope="module")
def timm_aa():
    """timm's timm/data/auto_augment.py, loaded on its own (it imports only PIL and numpy; importing the
    timm package would build its whole model registry)."""
    import importlib.util
    from pathlib import Path
    path = Path(importlib.util.find_spec("timm").origin).parent / "data" / "auto_augment.py"
    spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(set(ra.RAND_TRANSFORMS) | set(ra.RAND_INCREASING_TRANSFORMS)))
def test_every_randaugment_op_is_timms(name, timm_aa, monkeypatch):
    """Each op's arguments (timm's LEVEL_TO_ARG, signs included) and its image (timm's NAME_TO_OP with
    EVL's fill and bicubic resampling) are exactly timm's, at several magnitudes."""
    img = _image()
    hparams = {"translate_const": 13, "interpolation": Image.BICUBIC}
    for magnitude in (0.0, 3.3, 7.0, 10.0):
        for negate in (False, True):
            draw = 1.0 if negate else 0.0                  # timm negates when random.random() > 0.5
            monkeypatch.setattr(random, "random", lambda d=draw: d)
            fn = timm_aa.LEVEL_TO_ARG[name]
            want = list(fn(magnitude, hparams)) if fn else []
            rng = type("R", (), {"random": lambda self, d=draw: d})()
            got = ra.level_args(name, magnitude, rng)
            assert got == pytest.approx(want), (name, magnitude, negate)
            ours = np.asarray(ra.apply_op(img, [name, *got]))
            if name.startswith("Posterize") and want[0] == 0:    # PIL now refuses 0 bits; it used to give black
                assert not ours.any()
                continue
            theirs = np.asarray(timm_aa.NAME_TO_OP[name](img, *want, fillcolor=ra.FILL, resample=Image.BICUBIC))
            assert np.array_equal(ours, theirs), (name, magnitude, negate)


def test_randaugment_config_is_timms_syntax():
    c = ra.RandAugmentConfig.parse("rand-m7-n4-mstd0.5-inc1")
    assert (c.magnitude, c.num_ops, c.mstd, c.increasing, c.prob) == (7, 4, 0.5, True, 0.5)
    assert ra.RandAugmentConfig.parse("m7-n4-mstd0.5-inc1") == c and c.canonical() == "rand-m7-n4-mstd0.5-inc1"
    assert c.transforms == ra.RAND_INCREASING_TRANSFORMS
    assert ra.RandAugmentConfig.parse("m9").transforms == ra.RAND_TRANSFORMS
    with pytest.raises(ra.RandAugmentError, match="'x3' is not one of"):
        ra.RandAugmentConfig.parse("m7-x3")
    # the draw follows timm's RandAugment: n picks with replacement, each applied with probability p
    rng = np.random.default_rng(0)
    draws = [ra.draw(rng, c) for _ in range(2000)]
    assert 1.8 < np.mean([len(d) for d in draws]) < 2.2                 # 4 ops x p 0.5
    rot = [abs(op[1]) for d in draws for op in d if op[0] == "Rotate"]
    assert abs(np.mean(rot) - 21.0) < 0.5 and max(rot) <= 30.0           # m 7 of 10 -> 21 degrees, noise 0.5


def _request(path, seed, views=3, randaugment="rand-m7-n4-mstd0.5-inc1", **kw):
    aug = AugmentSpec(views, scale=(0.3, 1.0), flip=True, seed=seed, randaugment=randaugment, **kw)
    return DecodeRequest(key=5, path=str(path), frames=4, sampling=SamplingSpec("uniform"), views=ViewSpec(),
                         prep=PREP, reader="pyav", augment=aug)


def test_randaugment_views_are_deterministic_per_seed_and_the_same_on_every_frame(tmp_path):
    """The same (seed, video, view) gives the same frames, crops and RandAugment ops (recorded per view);
    another seed other ones. A static video stays static: each view's ops and crop act on every frame
    alike (EVL's clip-consistent RandAugment)."""
    video = good_video(tmp_path / "v.mp4", label=0, frames=16, size=48)
    a, b, c = (decode_video(_request(video, s)) for s in (1, 1, 2))
    assert a.ok and b.ok and c.ok
    assert np.array_equal(a.pixels, b.pixels) and a.augment == b.augment and np.array_equal(a.frame_idx, b.frame_idx)
    assert not np.array_equal(a.pixels, c.pixels) and a.augment != c.augment
    assert all("randaugment" in p for p in a.augment) and any(p["randaugment"] for p in a.augment)
    json.dumps(a.augment)                                   # what clips/aug stores
    still = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 48, 48, 3), dtype=np.uint8), 16, axis=0)
    from cachefeat.synth import write_mp4
    write_mp4(tmp_path / "still.mp4", still)
    s = decode_video(_request(tmp_path / "still.mp4", 3, views=4))
    for view in s.pixels:
        assert np.abs(view.astype(int) - view[:1].astype(int)).max() <= 2      # codec noise only
    # without RandAugment the views are drawn exactly as before it existed
    plain = decode_video(_request(video, 1, randaugment=None))
    assert all("randaugment" not in p for p in plain.augment)
    assert [p["crop"] for p in plain.augment] == [p["crop"] for p in a.augment]


def test_flip_pairs_file():
    classes = ["moving right", "moving left", "moving down", "moving up"]
    assert parse_flip_pairs("0 1  # mirror images\n", classes) == ((0, 1),)
    assert parse_flip_pairs("moving right\tmoving left\n", classes) == ((0, 1),)
    for bad, msg in (("0\n", "expected two class"), ("0 9\n", "not in the class list"), ("0 1\n1 2\n", "one pair"),
                     ("# nothing\n", "no pairs"), ("left right\n", "neither a class index")):
        with pytest.raises(SpecError, match=msg):
            parse_flip_pairs(bad, classes)
    assert AugmentSpec(2, flip_pairs=((86, 87), (93, 94))).partner() == {86: 87, 87: 86, 93: 94, 94: 93}


def _direction(pixels: np.ndarray) -> float:
    """Mean horizontal velocity of the bright moving shape in a view's frames (T, S, S, 3)."""
    xs = []
    for f in pixels.astype(float).mean(-1):
        w = np.clip(f - np.percentile(f, 90), 0, None)
        xs.append((w.sum(0) * np.arange(f.shape[1])).sum() / max(w.sum(), 1e-6))
    return float(np.mean(np.diff(xs)))


def test_flipped_views_of_mirror_classes_train_as_their_partner(tmp_path):
    """A tiny labelled set (moving right / moving left, and moving down / up, which a flip leaves alone),
    4 augmented views per video with flips and --flip-pairs 0<->1: the label each clip trains with is the
    partner exactly for the flipped views of a paired class, and it agrees with the direction of motion
    measured in the clip's own cached pixels."""
    from cachefeat.store import open_cache
    from cachefeat.synth import generate
    from cachefeat.train.reader import clip_labels
    data = tmp_path / "data"
    generate(data, num_classes=4, videos_per_class=4, frames=16, size=64, seed=3, val_fraction=0.25, progress=False)
    (tmp_path / "pairs.txt").write_text("moving right\tmoving left\n")
    out = tmp_path / "flip.zarr"
    run_cli(*tiny_extract_args(data / "train.txt", out, "--frames", "8", "--aug-views", "4", "--aug-scale", "0.9,1",
                               "--pixels", "32", "--flip-pairs", tmp_path / "pairs.txt", "--aug-seed", "1"))
    cache = open_cache(out)
    assert cache.augment["flip_pairs"] == [[0, 1]]
    raw, trained = cache.labels(), clip_labels(cache)
    flips = np.array([json.loads(s)["flip"] for s in cache.root["clips/aug"][:].tolist()])
    assert flips.any() and (~flips).any()
    paired = raw <= 1
    assert np.array_equal(trained[paired & flips], 1 - raw[paired & flips])
    assert np.array_equal(trained[~(paired & flips)], raw[~(paired & flips)])
    pixels = cache.root["pixels"][:]
    for row in np.flatnonzero(paired):
        moving_right = _direction(pixels[row]) > 0
        assert moving_right == (trained[row] == 0), (row, raw[row], flips[row])
    # extraction refuses contradictory settings in one line
    res = run_cli(*tiny_extract_args(data / "train.txt", tmp_path / "x.zarr", "--flip-pairs", tmp_path / "pairs.txt"),
                  ok=False)
    assert res.exit_code == 2 and "add --aug-views K" in res.output
    res = run_cli(*tiny_extract_args(data / "train.txt", tmp_path / "x.zarr", "--aug-views", "2", "--no-flip",
                                     "--flip-pairs", tmp_path / "pairs.txt"), ok=False)
    assert res.exit_code == 2 and "choose one" in res.output


def test_pixel_frames_are_cut_from_the_same_augmented_view(tmp_path):
    """DiST-style pixels of an augmented view come from the view's own crop, flip and RandAugment: at the
    model's size and twice the frames, every other pixel frame is exactly the backbone's crop."""
    from cachefeat.specs import PixelSpec
    video = good_video(tmp_path / "v.mp4", label=2, frames=16, size=48)
    req = _request(video, 4, views=3)
    res = decode_video(DecodeRequest(**{**req.__dict__, "pixels": PixelSpec(32, 2)}))
    assert res.ok and res.small.shape == (3, 8, 32, 32, 3)
    assert np.array_equal(res.small[:, ::2], res.pixels)
    assert np.array_equal(res.small_idx[:, ::2], res.frame_idx)


def test_the_alt_synthetic_family_is_another_temporal_set():
    """synth --motions alt: other motions, shapes and backgrounds; each class is its partner played
    backwards (the same frames, so a frame-averaging classifier cannot separate a pair); deterministic."""
    from cachefeat.synth import FAMILIES, class_names, family_of, render_video
    names = class_names(12, "alt")
    assert family_of(names) == "alt" and family_of(class_names(6)) == "shapes" and family_of(["a", "b"]) is None
    assert not set(names) & {n for p in FAMILIES["shapes"] for n in p[:2]}
    for label in range(0, 12, 2):
        fwd = render_video(label, 12, 40, np.random.default_rng([7, label]), "alt")
        rev = render_video(label + 1, 12, 40, np.random.default_rng([7, label]), "alt")
        assert fwd.shape == (12, 40, 40, 3) and np.array_equal(fwd[::-1], rev)
        assert np.abs(fwd[0].astype(int) - fwd[-1].astype(int)).mean() > 1.0, names[label]   # something moves
        again = render_video(label, 12, 40, np.random.default_rng([7, label]), "alt")
        assert np.array_equal(fwd, again)
    with pytest.raises(ValueError, match="--motions"):
        class_names(4, "spirals")
