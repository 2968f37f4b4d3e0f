"""Files a user points cachefeat at (issue 28, points 3, 5 and 6): `--pretrained FILE` weights, HDF5 files
given to `import`, and manifests / Kinetics CSVs. Weights load without running code from the file (a
malicious pickle's payload never runs; TorchScript and pickled modules need --trust-pretrained); hostile HDF5
features (external links, soft links, external raw storage, virtual datasets, crafted shapes and dtypes) and
non-text manifests are refused in one line with exit status 2; a manifest never makes cachefeat write or
delete anything (a sentinel folder it points into stays the same)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from cachefeat.extract.backbone import BackboneError, load_backbone, register_model_configs, weights_digest
from cachefeat.store import open_cache

from conftest import TINY, run_cli, tiny_extract_args
from helpers import invoke, make_sentinel, on_contract, tree_state

TIMM_TINY = "timm:cachefeat_tiny_vit"


class Payload:
    """Pickles as a call that creates `marker`: unpickling it in full would run that call."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def videos(synth_small, tmp_path_factory) -> Path:
    """A list manifest of two videos, with absolute paths."""
    d = tmp_path_factory.mktemp("inputs")
    lines = (synth_small / "val.txt").read_text().splitlines()[:2]
    m = d / "list.txt"
    m.write_text("".join(f"{synth_small / line.split()[0]} {line.split()[1]}\n" for line in lines))
    return m


def _tiny_clip(seed: int):
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY)


# ------------------------------------------------------------------------------------------- --pretrained FILE
def test_plain_weights_files_load_without_trust(tmp_path):
    """A torch.save state dict (bare, in a checkpoint dict, with DDP prefixes) and a safetensors file load as
    they are, for open_clip and timm models."""
    clip = _tiny_clip(11)
    sd = clip.state_dict()
    files = {"bare.pt": sd, "ckpt.pt": {"epoch": 3, "state_dict": sd},
             "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in sd.items()}}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    for name in [*files, "w.safetensors"]:
        bb = load_backbone(TINY, str(tmp_path / name), "cpu")
        assert bb.weights_sha256 == weights_digest(clip.visual), name
    torch.manual_seed(12)
    net = timm.create_model(TIMM_TINY[len("timm:"):], num_classes=0)
    torch.save({"model": net.state_dict()}, tmp_path / "timm.pth")
    save_file(net.state_dict(), tmp_path / "timm.safetensors")
    for name in ("timm.pth", "timm.safetensors"):
        bb = load_backbone(TIMM_TINY, str(tmp_path / name), "cpu")
        assert bb.weights_sha256 == weights_digest(net), name
        assert "state_dict" not in bb.model.pretrained_cfg     # timm's copy of the weights is not kept


def test_malicious_weights_never_run(tmp_path, videos):
    """A torch.save file whose pickle would create a marker (zip and legacy formats), and an .npz whose object
    array would: refused in one line naming --trust-pretrained (the .npz: as not plain arrays), the marker never
    appears, nothing is written."""
    marker = tmp_path / "PWNED"
    sd = _tiny_clip(0).state_dict()
    torch.save({"state_dict": sd, "extra": Payload(marker)}, tmp_path / "evil.pt")
    torch.save({"state_dict": sd, "extra": Payload(marker)}, tmp_path / "evil-legacy.pt",
               _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "evil.npz", w=np.array([Payload(marker)], dtype=object))
    assert not marker.exists()
    for name in ("evil.pt", "evil-legacy.pt", "evil.npz"):
        for model in (TINY, TIMM_TINY):
            out = tmp_path / f"{name}-{model[:4]}.zarr"
            args = tiny_extract_args(videos, out, "--model", model, "--pretrained", tmp_path / name)
            line = on_contract(invoke(*args), (2,), f"{name} for {model}")
            assert ("--trust-pretrained" in line) != name.endswith(".npz"), line
            assert "not an .npz of plain arrays" in line or not name.endswith(".npz"), line
            assert not marker.exists() and not out.exists(), line
    # the Python API refuses the same way
    with pytest.raises(BackboneError, match="--trust-pretrained"):
        load_backbone(TINY, str(tmp_path / "evil.pt"), "cpu")
    assert not marker.exists()


def test_files_needing_a_full_unpickle_need_trust(tmp_path, videos):
    """A TorchScript archive (as OpenAI's original CLIP .pt) and a pickled nn.Module are refused without
    --trust-pretrained and load with it: the cache records the file's weights."""
    clip = _tiny_clip(21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # torch.jit.script is deprecated: OpenAI's files remain
        torch.jit.script(clip).save(tmp_path / "openai-style.pt")
    torch.save(clip, tmp_path / "module.pt")
    torch.manual_seed(22)
    net = timm.create_model(TIMM_TINY[len("timm:"):], num_classes=0)
    torch.save(net, tmp_path / "timm-module.pt")
    cases = [(TINY, "openai-style.pt", weights_digest(clip.visual), "TorchScript archive"),
             (TINY, "module.pt", weights_digest(clip.visual), "pickled objects"),
             (TIMM_TINY, "timm-module.pt", weights_digest(net), "pickled objects")]
    for model, name, digest, why in cases:
        out = tmp_path / f"{name}.zarr"
        args = tiny_extract_args(videos, out, "--model", model, "--pretrained", tmp_path / name, "--frames", "2",
                                 "--no-text")
        line = on_contract(invoke(*args), (2,), name)
        assert why in line and "--trust-pretrained" in line and not out.exists(), line
        res = run_cli(*args, "--trust-pretrained")
        assert "--trust-pretrained" in res.output      # says that it runs the file's code
        assert open_cache(out).meta["model"]["weights_sha256"] == digest, name
    assert "RUNS ANY CODE" in run_cli("extract", "--help").output.replace("\n", " ")


def test_files_that_are_not_weights_are_one_line(tmp_path, videos):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "cut.pt").write_bytes(b"")
    sd = _tiny_clip(0).state_dict()
    torch.save(sd, tmp_path / "whole.pt")
    (tmp_path / "half.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:20000])   # no zip directory left
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "half-legacy.pt").write_bytes((tmp_path / "legacy.pt").read_bytes()[:20000])
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "x.npz").write_bytes(b"PK not really")
    with open(tmp_path / "one-array.npz", "wb") as f:
        np.save(f, np.zeros(3))
    for name, says in [("random.pt", "not a weights file"), ("cut.pt", "not a weights file"),
                       ("half.pt", "not a weights file"), ("half-legacy.pt", "cannot be read as a torch.save file"),
                       ("bad.safetensors", "not a readable safetensors file"), ("list.pt", "holds no state dict"),
                       ("x.npz", "not an .npz of plain arrays"), ("one-array.npz", "a single array")]:
        line = on_contract(invoke(*tiny_extract_args(videos, tmp_path / "o.zarr", "--pretrained", tmp_path / name)),
                           (2,), name, foreseen=False)   # torch's own words may say "unexpected EOF"
        assert says in line and "Error: --pretrained" in line, line
    assert not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------------------------------- HDF5 import
@pytest.fixture(scope="module")
def export(videos, tmp_path_factory) -> Path:
    """An HDF5 export of a tiny cache of two videos (import of it works: test_exchange.py)."""
    d = tmp_path_factory.mktemp("h5")
    run_cli(*tiny_extract_args(videos, d / "c.zarr", "--frames", "2", "--no-text"))
    run_cli("export", d / "c.zarr", d / "c.h5", "--format", "hdf5", "-q")
    return d / "c.h5"


def _replace(f, name: str, make) -> None:
    """Put `make(f, name)` where dataset `name` was, with the attributes (its Zarr document) it had."""
    attrs = dict(f[name].attrs)
    del f[name]
    make(f, name)
    for k, v in attrs.items():
        f[name].attrs[k] = v


def _link(f, name: str, link) -> None:
    del f[name]
    f[name] = link


def _with_shape(f, name, shape):
    """Dataset `name` replaced by an unwritten chunked one of `shape`, its Zarr document saying the same."""
    doc = json.loads(f[name].attrs["zarr_json"])
    doc["shape"] = list(shape)
    dtype = f[name].dtype
    _replace(f, name, lambda f, n: f.create_dataset(n, shape=shape, dtype=dtype, chunks=(1024,) * len(shape)))
    f[name].attrs["zarr_json"] = json.dumps(doc)


HOSTILE_HDF5 = {
    # each: (what it does to the export, with the sentinel folder's path; what the refusal says)
    "external link": (lambda f, s: _link(f, "videos/label", h5py.ExternalLink(str(s / "other.h5"), "/label")),
                      "is an external link"),
    "soft link": (lambda f, s: _link(f, "videos/label", h5py.SoftLink("/videos/num_frames")),
                  "is a SoftLink to /videos/num_frames"),
    "soft link to a group": (lambda f, s: f.__setitem__("alias", h5py.SoftLink("/videos")), "is a SoftLink"),
    "external raw storage": (lambda f, s: _replace(f, "videos/label", lambda f, n: f.create_dataset(
        n, shape=(2,), dtype="int64", external=[(str(s / "sub" / "data.bin"), 0, 16)])), "external files"),
    "virtual dataset": (lambda f, s: _replace(f, "videos/label", lambda f, n: f.create_virtual_dataset(
        n, _layout(s))), "is a virtual dataset"),
    "hard link twice": (lambda f, s: f.__setitem__("again", f["videos/label"]), "second name of another node"),
    "2^30 values, none stored": (lambda f, s: _with_shape(f, "videos/label", (2 ** 30,)), "claims 4294967296 bytes"),
    "10^15 rows": (lambda f, s: _with_shape(f, "videos/label", (10 ** 15,)), "Zarr metadata is not what cachefeat"),
    "compound dtype": (lambda f, s: _replace(f, "videos/label", lambda f, n: f.create_dataset(
        n, shape=(2,), dtype=[("a", "i4"), ("b", "f4")])), "has dtype"),
    "object references": (lambda f, s: _replace(f, "videos/label", lambda f, n: f.create_dataset(
        n, shape=(2,), dtype=h5py.ref_dtype)), "has dtype"),
    "fixed-length strings": (lambda f, s: _replace(f, "videos/path", lambda f, n: f.create_dataset(
        n, data=np.array([b"a", b"b"], dtype="S1"))), "strings; an export writes variable-length UTF-8 only"),
    "metadata not a document": (lambda f, s: f["videos/label"].attrs.__setitem__("zarr_json", "[1, 2]"),
                                "is not a Zarr metadata document"),
    "mark not an object": (lambda f, s: f.attrs.__setitem__("cachefeat_export", "[]"), "is no export"),
}


def _layout(sentinel: Path):
    """A virtual layout reading the dataset of the sentinel's other.h5."""
    layout = h5py.VirtualLayout(shape=(2,), dtype="int64")
    layout[:] = h5py.VirtualSource(str(sentinel / "other.h5"), "label", shape=(2,))
    return layout


@pytest.mark.parametrize("case", list(HOSTILE_HDF5))
def test_hostile_hdf5_is_refused_before_anything_is_read(export, tmp_path, case):
    sentinel = make_sentinel(tmp_path)
    with h5py.File(sentinel / "other.h5", "w") as g:    # what a link or a virtual dataset would read
        g["label"] = np.arange(2, dtype="int64")
    h5 = Path(shutil.copy(export, tmp_path / "hostile.h5"))
    edit, says = HOSTILE_HDF5[case]
    with h5py.File(h5, "r+") as f:
        edit(f, sentinel)
    before = tree_state(sentinel)
    out = tmp_path / "imported.zarr"
    line = on_contract(invoke("import", h5, "--out", out), (2,), case)
    assert says in line, line
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    assert tree_state(sentinel) == before


def test_the_untouched_export_imports(export, tmp_path):
    run_cli("import", export, "--out", tmp_path / "good.zarr")
    assert open_cache(tmp_path / "good.zarr").num_videos == 2


# ------------------------------------------------------------------------------------------- manifests
def _not_text_cases(tmp_path: Path, video: str) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, what the refusal says): each a list manifest, a Kinetics CSV or a class list."""
    header = b"label,youtube_id,time_start,time_end,split\n"
    quoted = b'a,"' + (b"x" * 60000 + b"\n") * 3 + b'",0,10,train\n'   # a CSV field past csv's limit, short lines
    rng = np.random.default_rng(1)
    return {
        "list.txt": (f"{video} 0\n".encode() + b"x" * (70 << 10) + b" 1\n", "line 2 is longer than 65536 bytes"),
        "nul.txt": (f"{video} 0\n{video} 1\n".encode() + b"a\x00b 1\n", "line 3 holds a NUL byte"),
        "control.txt": (f"{video} 0\n".encode() + b"\x1b[2J 1\n", "line 2 holds the control character 0x1b"),
        "random.txt": (rng.bytes(1 << 16), "line"),
        "random-no-nul.txt": (bytes(b for b in rng.bytes(1 << 16) if b), "line"),
        "long.csv": (header + b"a," + b"y" * (70 << 10) + b",0,10,train\n", "line 2 is longer than 65536 bytes"),
        "nul.csv": (header + b"a,abc\x00,0,10,train\n", "line 2 holds a NUL byte"),
        "quoted.csv": (header + quoted, "not a CSV row"),
        "random.csv": (rng.bytes(1 << 16), "line"),
        "classes.txt": (b"a\n" + b"b" * (70 << 10) + b"\n", "line 2 is longer than 65536 bytes"),
    }


def test_manifests_that_are_not_text_are_one_line(tmp_path, videos):
    video = videos.read_text().split()[0]
    for name, (data, says) in _not_text_cases(tmp_path, video).items():
        f = tmp_path / name
        f.write_bytes(data)
        args = (tiny_extract_args(videos, tmp_path / "o.zarr", "--classes", f) if name == "classes.txt" else
                tiny_extract_args(f, tmp_path / "o.zarr"))
        line = on_contract(invoke(*args), (2,), name)
        assert str(f) in line and says in line, f"{name}: {line}"
        assert not (tmp_path / "o.zarr").exists()


def test_a_manifest_never_writes_or_deletes(tmp_path, videos):
    """Rows pointing into a sentinel folder (its files, the folder itself, `../` paths from the manifest's
    folder, a Kinetics id climbing out of the video root) are read as inputs and fail as videos; extract,
    its resume and --overwrite leave the sentinel as it was."""
    sentinel = make_sentinel(tmp_path)
    (sentinel / "clip.mp4").write_bytes(b"not a video")
    (sentinel / "linked.mp4").symlink_to(sentinel / "precious.txt")
    work = tmp_path / "work" / "lists"
    work.mkdir(parents=True)
    real = videos.read_text().splitlines()[0]
    rows = [real, f"{sentinel / 'precious.txt'} 0", f"{sentinel / 'sub'} 1", "../../sentinel/sub/data.bin 0",
            "../../sentinel/clip.mp4 1", f"{sentinel / 'linked.mp4'} 0", "../../sentinel/gone.mp4 1"]
    (work / "list.txt").write_text("\n".join(rows) + "\n")
    (work / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                "a,../../sentinel/precious,0,10,train\nb,../../sentinel/sub/data,0,10,train\n"
                                f"a,{'z' * 60000},0,10,train\n")              # a name no file system holds
    before = tree_state(sentinel)
    out = tmp_path / "out" / "c.zarr"
    for extra in ([], [], ["--overwrite"]):                  # extract, resume, replace
        res = invoke(*tiny_extract_args(work / "list.txt", out, "--frames", "2", "--no-text", *extra))
        assert res.exit_code == 0, res.output
        assert tree_state(sentinel) == before
    failed = {f["path"] for f in open_cache(out).failures()}
    assert {str(sentinel / "precious.txt"), str(work / "../../sentinel/sub/data.bin")} <= failed
    res = invoke(*tiny_extract_args(work / "k.csv", tmp_path / "out" / "k.zarr", "--frames", "2", "--no-text"))
    assert "no valid clips: 3 of 3 videos failed" in on_contract(res, (1,), "k.csv")   # all rows are failures
    assert tree_state(sentinel) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.zarr", "k.zarr"]    # --out alone written
    assert sorted(p.name for p in work.iterdir()) == ["k.csv", "list.txt"]
