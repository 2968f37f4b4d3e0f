"""Assertions shared by several test modules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cachefeat.cli import cli
from cachefeat.store import open_cache

VOLATILE_META = ("created", "source_path")


def assert_caches_equal(a_path, b_path, features_only: bool = False, exact: bool = False) -> None:
    """Every array (and the metadata, except timestamps and paths) of two caches is identical.
    exact=True: the stores are identical as Zarr stores: the same groups and arrays (found by walking
    them, so arrays this helper does not know are compared too), the same zarr.json documents (shape,
    chunks, sharding, codecs, dimension names, attributes, all metadata included), the same bits."""
    if exact:
        return _assert_stores_identical(a_path, b_path)
    a, b = open_cache(a_path), open_cache(b_path)
    names = list(a.layout.feature_arrays()) if features_only else a.array_names()
    assert names == b.array_names()[: len(names)]
    for name in names:
        x, y = a.read(name), b.read(name)
        assert x.shape == y.shape, name
        assert np.array_equal(x, y), f"array {name} differs"
    skip = VOLATILE_META + (("layout", "fingerprint") if features_only else ())  # sharding may differ
    ma = {k: v for k, v in a.meta.items() if k not in skip}
    mb = {k: v for k, v in b.meta.items() if k not in skip}
    assert ma == mb


def _assert_stores_identical(a_path, b_path) -> None:
    from cachefeat.store.exchange import store_nodes
    a, b = open_cache(a_path), open_cache(b_path)
    ga, aa = store_nodes(a.root)
    gb, ab = store_nodes(b.root)
    assert (ga, aa) == (gb, ab), "the stores hold different groups or arrays"
    for name in ["", *ga, *aa]:
        da = json.loads((Path(a_path) / name / "zarr.json").read_text())
        db = json.loads((Path(b_path) / name / "zarr.json").read_text())
        assert da == db, f"zarr.json of /{name} differs"
    for name in aa:
        x, y = a.root[name][...], b.root[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(bits(x), bits(y)), f"array {name} differs"


def bits(x: np.ndarray) -> np.ndarray:
    """Floats as their bit patterns (so -0.0 != 0.0 and NaN payloads count); strings as Python lists."""
    if x.dtype.kind == "f":
        return x.view(f"u{x.dtype.itemsize}")
    if x.dtype.kind in "TUO":
        return np.array(x.tolist(), dtype=object)
    return x


def live_children() -> set[int]:
    """Pids of this process's live (not zombie) descendants: what a test checks to see processes ended."""
    import psutil
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def invoke(*args):
    """The CLI in-process, stdout and stderr apart (click's Result)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def on_contract(res, codes, what, foreseen=True) -> str:
    """The exit-status contract: status in `codes`, one line on stderr, no traceback; returns that line."""
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code in codes, f"{what}: exit {res.exit_code}, expected {codes}:\n{res.output}"
    assert "Traceback" not in res.output, f"{what}: a traceback\n{res.output}"
    assert len(err) == 1, f"{what}: {len(err)} lines on stderr:\n{res.stderr}"
    assert not foreseen or "unexpected" not in err[0], f"{what}: {err[0]}"
    return err[0]


def tree_state(root) -> dict[str, tuple]:
    """Every entry under `root` (links not followed) -> (kind, size, mtime_ns, sha256 of a file's bytes): what a
    security test lists before and after running hostile input, to show nothing there was written, deleted or
    followed."""
    import hashlib
    import os
    root = Path(root)
    state = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                state[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif p.is_dir():
                state[str(p.relative_to(root))] = ("dir",)
            else:
                state[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns,
                                                   hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def make_sentinel(tmp_path) -> Path:
    """A folder with a few files and a subfolder that hostile input will try to reach (via `..`, links, paths)."""
    s = Path(tmp_path) / "sentinel"
    (s / "sub").mkdir(parents=True, exist_ok=True)
    (s / "precious.txt").write_text("do not touch\n")
    (s / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return s
