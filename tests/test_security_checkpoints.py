"""Issue 28, points 1 and 2: opening a checkpoint never runs code. A genuine checkpoint of the old pickle
format is refused in one line naming `cachefeat checkpoint migrate`, which converts it without --trust; a
malicious one (a correct digest header over a pickle whose __reduce__ writes a file) creates nothing when
eval, predict, train --resume, the Python API or migrate without --trust open it; hostile checkpoints of
the new format are refused in one line, and a sentinel folder beside them is unchanged."""
import hashlib
import io
import json
import os
import shutil

import pytest
import torch

import cachefeat
from cachefeat.train import TrainError, load_checkpoint

from conftest import run_cli, tiny_extract_args
from helpers import invoke, make_sentinel, on_contract, tree_state


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("seccks")
    cache = d / "c.zarr"
    run_cli(*tiny_extract_args(synth_small / "train.txt", cache, "--frames", "2", "--shard-size", "4"))
    run = d / "run"
    run_cli("train", "--cache", cache, "--adapter", "probe", "--epochs", "1", "--batch-size", "4", "--threads", "1",
            "--out", run, "--quiet")
    return {"cache": cache, "run": run, "video": synth_small / (synth_small / "val.txt").read_text().split()[0]}


def _old_format(obj, path):
    """A checkpoint file as cachefeat wrote them before 2026-12-06: a digest header, then torch.save's bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"cachefeat-checkpoint sha256:{hashlib.sha256(payload).hexdigest()} "
                     f"bytes:{len(payload)}\n".encode() + payload)


class _Payload:
    """What an attacker pickles: unpickling it calls open(marker, "w"), creating a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _openers(ck, trained, tmp_path):
    """Every way a user opens a checkpoint: eval, predict, train --resume (its run folder), the Python API."""
    run = ck if ck.is_dir() else ck.parent
    return {"eval": ["eval", "--checkpoint", ck, "--cache", trained["cache"], "--out", tmp_path / "ev"],
            "predict": ["predict", "--checkpoint", ck, trained["video"]],
            "resume": ["train", "--cache", trained["cache"], "--adapter", "probe", "--epochs", "2", "--batch-size",
                       "4", "--threads", "1", "--out", run, "--resume", "--quiet"]}


def test_an_old_checkpoint_is_refused_naming_migrate_which_converts_it(trained, tmp_path):
    old = tmp_path / "old" / "checkpoint.pt"
    ck = load_checkpoint(trained["run"])
    _old_format({**ck, "version": 1}, old)            # the dict the old code saved, written as it wrote it
    for name, args in _openers(old.parent, trained, tmp_path).items():
        line = on_contract(invoke(*args), {2}, name)
        assert "old pickle format" in line and f"cachefeat checkpoint migrate {old} NEW" in line and "--trust" in line
    res = invoke("checkpoint", "migrate", old, tmp_path / "new")
    assert res.exit_code == 0 and res.stderr == "", res.output
    new = load_checkpoint(tmp_path / "new")
    assert new["epoch"] == ck["epoch"] and new["history"] == ck["history"]
    assert all(torch.equal(new["state_dict"][k], v) for k, v in ck["state_dict"].items())
    assert invoke("eval", "--checkpoint", tmp_path / "new", "--cache", trained["cache"], "--json").exit_code == 0
    # a checkpoint already there is never replaced
    on_contract(invoke("checkpoint", "migrate", old, tmp_path / "new"), {2}, "migrate again")


def test_a_malicious_old_checkpoint_runs_nothing(trained, tmp_path):
    sentinel = make_sentinel(tmp_path)
    before = tree_state(sentinel)
    marker = sentinel / "pwned"
    ck = load_checkpoint(trained["run"])
    old = tmp_path / "evil" / "checkpoint.pt"
    _old_format({**ck, "version": 1, "cache_meta": _Payload(marker)}, old)
    for name, args in _openers(old.parent, trained, tmp_path).items():
        on_contract(invoke(*args), {2}, name)
        assert not marker.exists(), name
    with pytest.raises(TrainError, match="migrate"):
        cachefeat.load_adapter(old.parent)
    line = on_contract(invoke("checkpoint", "migrate", old, tmp_path / "out"), {2}, "migrate")
    assert "--trust" in line and "runs the file's code" in line and "open)" in line   # the import it found
    assert not marker.exists() and not (tmp_path / "out").exists() and tree_state(sentinel) == before
    # --trust does what it says: the file's code runs (the marker), and migrate tells it on stderr
    res = invoke("checkpoint", "migrate", old, tmp_path / "out", "--trust")
    assert marker.exists() and "runs any code it holds" in res.stderr


def _hostile(run, tmp_path, sentinel) -> dict:
    """Copies of a good run, each with its checkpoint crafted one way."""
    def copy(name):
        d = tmp_path / name
        shutil.copytree(run, d)
        return d, d / "checkpoint"

    def manifest(ckd, edit):
        m = json.loads((ckd / "manifest.json").read_text())
        edit(m)
        (ckd / "manifest.json").write_text(json.dumps(m))

    def restate(ckd, state):
        data = json.dumps(state).encode()
        (ckd / "state.json").write_bytes(data)
        manifest(ckd, lambda m: m["files"].update({"state.json": {"bytes": len(data),
                                                                  "sha256": hashlib.sha256(data).hexdigest()}}))

    cases = {}
    d, c = copy("size-lie")
    manifest(c, lambda m: m["files"]["model.safetensors"].update(bytes=m["files"]["model.safetensors"]["bytes"] - 1))
    cases["size-lie"] = (d, {1})
    d, c = copy("huge-size")
    manifest(c, lambda m: m["files"]["state.json"].update(bytes=10 ** 15))
    cases["huge-size"] = (d, {1})
    d, c = copy("negative-size")
    manifest(c, lambda m: m["files"]["state.json"].update(bytes=-5))
    cases["negative-size"] = (d, {1})
    d, c = copy("safetensors-10e15")   # a header claiming 10^15 bytes, with a correct manifest
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [250_000_000_000_000], "data_offsets": [0, 10 ** 15]}}).encode()
    blob = len(hdr).to_bytes(8, "little") + hdr + b"\0" * 64
    (c / "model.safetensors").write_bytes(blob)
    manifest(c, lambda m: m["files"].update({"model.safetensors": {"bytes": len(blob),
                                                                   "sha256": hashlib.sha256(blob).hexdigest()}}))
    cases["safetensors-10e15"] = (d, {2})
    good = json.loads((run / "checkpoint" / "state.json").read_text())
    for name, change in {"epoch-a-string": {"epoch": "1"}, "history-a-dict": {"history": {}},
                         "bad-tag": {"state_dict": {"w": {"$tensor": "nowhere"}}},
                         "config-claims-a-huge-adapter": {"adapter_config": {"dropout": 0.0, "x": 10 ** 12}},
                         "unknown-tag": {"scaler": {"$pickle": "gASVAA=="}}}.items():
        d, c = copy(name)
        restate(c, {**good, **change})
        cases[name] = (d, {2})
    d, c = copy("not-an-object")
    restate(c, [1, 2, 3])
    cases["not-an-object"] = (d, {2})
    for name in ("model.safetensors", "state.json", "manifest.json"):   # a link to a file outside
        d, c = copy(f"link-{name}")
        target = sentinel / "precious.txt"
        (c / name).unlink()
        os.symlink(target, c / name)
        cases[f"link-{name}"] = (d, {1, 2})
    d, c = copy("link-folder")
    shutil.copytree(c, sentinel / "elsewhere")
    shutil.rmtree(c)
    os.symlink(sentinel / "elsewhere", c)
    cases["link-folder"] = (d, {2})
    return cases


def test_hostile_new_format_checkpoints_are_refused_in_one_line(trained, tmp_path):
    sentinel = make_sentinel(tmp_path)
    cases = _hostile(trained["run"], tmp_path, sentinel)
    before = tree_state(sentinel)
    for name, (run, codes) in cases.items():
        for opener, args in _openers(run, trained, tmp_path).items():
            on_contract(invoke(*args), codes, f"{name} by {opener}")
        with pytest.raises(TrainError):
            cachefeat.load_adapter(run)
        assert not (run / "eval-c").exists() and tree_state(sentinel) == before, name
