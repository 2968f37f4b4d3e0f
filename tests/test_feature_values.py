"""Values that checksums cannot catch: NaN and Inf never pass as features (extraction records such a video as
failed and writes zeros; verify reports such values in a cache), and a chunk deleted from a shard file (it
then reads as zeros, with a valid index and checksums) is reported too; --repair mends both."""
import json
from contextlib import contextmanager

import numpy as np
import open_clip
import pytest
import torch

from cachefeat.store import open_cache
from cachefeat.store.shard_file import ShardFile

from conftest import TINY, run_cli, tiny_extract_args
from helpers import assert_caches_equal


@contextmanager
def _without_records(cache):
    """The cache as cachefeat wrote it before shards had checksum records (and tables checksums)."""
    doc = cache / "zarr.json"
    before = doc.read_text()
    zj = json.loads(before)
    del zj["attributes"]["cachefeat"]["table_checksums"]
    doc.write_text(json.dumps(zj))
    try:
        yield
    finally:
        doc.write_text(before)


def test_a_video_whose_features_are_nan_is_a_failure_not_data(synth_small, tmp_path):
    from cachefeat.extract.backbone import register_model_configs
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))            # the final embedding of every frame is NaN
    ckpt = tmp_path / "nan.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    args = tiny_extract_args(synth_small / "train.txt", tmp_path / "c.zarr", "--frames", "2", "--shard-size", "4")
    args[args.index("--pretrained") + 1] = str(ckpt)
    res = run_cli(*args, ok=False)
    assert res.exit_code == 1 and "no valid clips" in res.output
    c = open_cache(tmp_path / "c.zarr")
    assert not c.valid().any() and c.complete
    assert {f["stage"] for f in c.failures()} == {"backbone"} and "NaN or Inf" in c.failures()[0]["error"]
    assert not c.read("embed").any() and not c.read("cls").any()      # zeros, never the NaN


def test_verify_reports_nan_values_and_repair_mends_them(synth_small, tmp_path):
    args = tiny_extract_args(synth_small / "train.txt", tmp_path / "c.zarr", "--frames", "2", "--shard-size", "4")
    run_cli(*args)
    run_cli(*tiny_extract_args(synth_small / "train.txt", tmp_path / "ref.zarr", "--frames", "2", "--shard-size", "4"))
    c = open_cache(tmp_path / "c.zarr")
    cls = ShardFile.open(tmp_path / "c.zarr" / "cls")
    rows = cls.read(slice(4, 8))
    rows[1, 0, 0, 0] = np.inf                            # written with valid checksums: only the values are wrong
    cls.write(1, rows)
    res = run_cli("verify", tmp_path / "c.zarr", "--json", ok=False)
    report = json.loads(res.output)       # the shard's checksum record lists another chunk at clip 5
    assert res.exit_code == 1 and report["shards_to_reextract"] == [1] and report["damaged"] == {"cls": [5]}
    with _without_records(tmp_path / "c.zarr"):            # a cache made before records: the values tell
        report = json.loads(run_cli("verify", tmp_path / "c.zarr", "--json", ok=False).output)
        assert report["shards_to_reextract"] == [1]
        assert any("cls: clips 5 hold NaN or Inf" in s for s in report["suspicious"])
    run_cli(*args, "--repair")
    assert run_cli("verify", tmp_path / "c.zarr").exit_code == 0
    assert_caches_equal(tmp_path / "c.zarr", tmp_path / "ref.zarr")
    assert c.valid().all()


def test_a_chunk_deleted_from_its_shard_file_is_reported_and_repaired(synth_small, tmp_path):
    args = tiny_extract_args(synth_small / "train.txt", tmp_path / "c.zarr", "--frames", "2", "--shard-size", "4")
    run_cli(*args)
    run_cli(*tiny_extract_args(synth_small / "train.txt", tmp_path / "ref.zarr", "--frames", "2", "--shard-size", "4"))
    cls = ShardFile.open(tmp_path / "c.zarr" / "cls")
    rows = cls.read(slice(8, 12))
    rows[2] = 0                                          # zarr leaves a zero chunk out: the index says "absent"
    cls.write(2, rows)
    report = json.loads(run_cli("verify", tmp_path / "c.zarr", "--json", ok=False).output)
    assert report["shards_to_reextract"] == [2] and report["damaged"] == {"cls": [10]}     # its record says
    with _without_records(tmp_path / "c.zarr"):            # a cache made before records: the zeros tell
        report = json.loads(run_cli("verify", tmp_path / "c.zarr", "--json", ok=False).output)
        assert report["shards_to_reextract"] == [2]
        assert "shard 2: 1 valid clips hold no features in cls" in report["suspicious"]
    run_cli(*args, "--repair")
    assert run_cli("verify", tmp_path / "c.zarr").exit_code == 0
    assert_caches_equal(tmp_path / "c.zarr", tmp_path / "ref.zarr")


def test_the_storable_check_finds_nan_inf_and_float16_overflow_per_frame():
    from cachefeat.extract.pipeline import _nonfinite
    feats = torch.randn(7, 3, 5)
    feats[1, 2, 4] = float("nan")
    feats[2, 0, 0] = float("inf")
    feats[3, 1, 1] = -float("inf")
    feats[4, 0, 3] = 7e4                                  # finite, but Inf once stored as float16
    feats[5, 2, 2] = -65504.0                             # float16's largest magnitude: stored as it is
    feats[6, 1, 0] = -float("nan")
    assert _nonfinite(feats).tolist() == [False, True, True, True, False, False, True]
    assert _nonfinite(feats.half()).tolist() == [False, True, True, True, True, False, True]
    assert _nonfinite(feats.bfloat16()).tolist() == [False, True, True, True, False, False, True]   # GPU outputs


def _frames_of(path, frames: int) -> np.ndarray:
    """The frames the pipeline's decoders hand the backbone for a video (default sampling, one view)."""
    from cachefeat.extract.backbone import load_backbone
    from cachefeat.extract.video import DecodeRequest, decode_video
    from cachefeat.specs import SamplingSpec, ViewSpec
    prep = load_backbone(TINY, "none", "cpu").preprocessing
    res = decode_video(DecodeRequest(0, str(path), frames, SamplingSpec(), ViewSpec(), prep))
    assert res.ok, res.error
    return res.pixels.reshape(-1, *res.pixels.shape[-3:])


@pytest.mark.parametrize("dtype,piece_bytes", [("float16", 1), ("float16", None), ("int8", 1), ("float32", 5000)])
def test_only_the_videos_with_frames_the_cache_cannot_hold_fail(synth_small, tmp_path, monkeypatch, dtype,
                                                                piece_bytes):
    """Features are stored and checked a piece of frames at a time (PIECE_BYTES; 1: one frame per piece):
    a frame of one video with an Inf in one layer's tokens, and (float16) a frame of another whose class
    token exceeds float16's range, fail exactly those two videos; every other video is stored as without
    them (int8: the Inf is not in the steps either, as the video is among those they are calibrated on)."""
    from cachefeat.extract import pipeline
    from cachefeat.extract.backbone import Backbone
    from cachefeat.extract.manifest import load_manifest
    if piece_bytes is not None:
        monkeypatch.setattr(pipeline, "PIECE_BYTES", piece_bytes)
    manifest = synth_small / "train.txt"
    args = ("--frames", "2", "--shard-size", "5", "--batch-size", "3", "--layers", "last:2", "--tokens", "all",
            "--dtype", dtype)
    run_cli(*tiny_extract_args(manifest, tmp_path / "ref.zarr", *args))
    videos = load_manifest(manifest).videos
    inf_video, big_video = 4, 7                        # in the middle of shards, their frames split over batches
    failed = [inf_video, big_video] if dtype == "float16" else [inf_video]    # 7e4: float16's Inf
    marks = {int(f.astype(np.int64).sum()): kind for v, kind in zip(failed, ("inf", "big"))
             for f in _frames_of(videos[v].path, 2)[1:]}    # their second frames
    real = Backbone.features

    def marked(self, pixels, layers, tokens):
        out = real(self, pixels, layers, tokens)
        with torch.inference_mode():                   # as the backbone made them
            for i, f in enumerate(pixels):
                kind = marks.get(int(f.to(torch.int64).sum()))
                if kind == "inf":
                    out["tokens"][i, 1, 3, 5] = float("inf")
                elif kind == "big":
                    out["cls"][i, 0, 2] = 7e4
        return out
    monkeypatch.setattr(Backbone, "features", marked)
    run_cli(*tiny_extract_args(manifest, tmp_path / "c.zarr", *args))
    c, ref = open_cache(tmp_path / "c.zarr"), open_cache(tmp_path / "ref.zarr")
    assert [f["video"] for f in c.failures()] == failed
    assert {f["stage"] for f in c.failures()} == {"backbone"}
    keep = np.setdiff1d(np.arange(len(videos)), failed)
    for name in ref.layout.feature_arrays():
        got, want = c.root[name][:], ref.root[name][:]
        assert np.array_equal(got[keep], want[keep]), name
        assert not got[failed].any(), name
        read = c.read(name, keep)                     # (int8: dequantized into `out` as into a new array)
        into = np.full(read.shape, 9, c.read_dtype(name))
        assert c.read(name, keep, out=into) is into and np.array_equal(into, read), name
