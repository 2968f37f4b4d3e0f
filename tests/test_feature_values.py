"""Values that checksums cannot catch: NaN and Inf never pass as features (extraction records such a video as
failed and writes zeros; verify reports such values in a cache), and a chunk deleted from a shard file (it
then reads as zeros, with a valid index and checksums) is reported too; --repair mends both."""
import json
from contextlib import contextmanager

import numpy as np
import open_clip
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
    from cachefeat.extract.pipeline import _unstorable
    f32max = torch.finfo(torch.float32).max
    feats = torch.randn(6, 3, 5)
    feats[1, 2, 4] = float("nan")
    feats[2, 0, 0] = float("inf")
    feats[3, 1, 1] = -float("inf")
    feats[4, 0, 3] = 7e4                                  # finite, but Inf once stored as float16
    assert _unstorable(feats, f32max).tolist() == [False, True, True, True, False, False]
    assert _unstorable(feats, 65504.0).tolist() == [False, True, True, True, True, False]
    half = feats.clone()
    half[4, 0, 3] = 0
    assert _unstorable(half.half(), f32max).tolist() == [False, True, True, True, False, False]   # GPU outputs
