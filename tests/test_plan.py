"""One planner: `extract --dry-run` announces the shards the real run writes, and --shard-size counts clips,
augmented views included."""
import re

import numpy as np
import pytest

from cachefeat.store import open_cache

from conftest import run_cli, tiny_extract_args


def _announced(output: str) -> tuple[int, int, int]:
    """(clips, clips per shard, shards) from a dry run's header."""
    m = re.search(r"= (\d+) clips x \d+ frames = \d+ frames; shards of (\d+) clips \((\d+) shards\)", output)
    assert m, output
    return int(m[1]), int(m[2]), int(m[3])


@pytest.mark.parametrize("extra", [["--aug-views", "4", "--shard-size", "8"], ["--aug-views", "3"],
                                   ["--views", "2x1", "--shard-size", "5"], []])
def test_dry_run_announces_the_shards_the_real_run_writes(synth_small, tmp_path, extra):
    out = tmp_path / "c.zarr"
    args = tiny_extract_args(synth_small / "train.txt", out, "--frames", "2", *extra)
    announced = _announced(run_cli(*args, "--dry-run").output)
    assert not out.exists()
    run_cli(*args)
    c = open_cache(out)
    rows = c.layout.shard_rows
    assert announced == (c.num_clips, rows, c.layout.num_shards)
    assert c.root["embed"].shards[0] == rows and c.root["progress"].shape == (c.layout.num_shards,)
    if "--shard-size" in extra:     # clips per shard, in whole videos: the largest multiple of the views
        size, views = int(extra[extra.index("--shard-size") + 1]), c.views.count
        assert rows == max(1, size // views) * views


def test_shard_size_counts_augmented_views_as_clips(synth_small, tmp_path):
    """--aug-views 4 --shard-size 4 on 3 videos: three shards of one video's 4 views each (the bug the
    architecture issue measured: one 12-clip shard, while --dry-run said three of 4)."""
    manifest = tmp_path / "three.txt"
    manifest.write_text("".join((synth_small / "train.txt").read_text().splitlines(keepends=True)[:3]))
    (tmp_path / "classes.txt").write_text((synth_small / "classes.txt").read_text())
    out = tmp_path / "aug.zarr"
    args = tiny_extract_args(manifest, out, "--frames", "2", "--video-root", synth_small, "--aug-views", "4",
                             "--shard-size", "4")
    assert _announced(run_cli(*args, "--dry-run").output) == (12, 4, 3)
    run_cli(*args)
    assert (open_cache(out).layout.shard_rows, open_cache(out).layout.num_shards) == (4, 3)


def test_extract_defaults_are_the_library_defaults():
    from cachefeat.cli import cli
    from cachefeat.extract.plan import ExtractSettings
    from cachefeat.store import DEFAULT_CODEC
    options = {p.name: p.default for p in cli.commands["extract"].params}
    assert options["codec"] == ExtractSettings().codec == DEFAULT_CODEC


def test_reused_shard_buffers_leave_no_trace_of_earlier_shards(synth_small, tmp_path):
    """Shards are assembled in buffers reused once written: a failed video's rows must read as zeros (as in a
    cache written in one shard), not as the clips an earlier shard held there."""
    lines = (synth_small / "train.txt").read_text().splitlines()
    lines[7] = "train/nowhere/missing.mp4 0"                 # fails in shard 7, after buffers came back
    lines[10] = "train/nowhere/missing2.mp4 1"
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text((synth_small / "classes.txt").read_text())
    caches = {}
    for shard_size in ("1", "64"):
        out = tmp_path / f"s{shard_size}.zarr"
        run_cli(*tiny_extract_args(manifest, out, "--frames", "2", "--video-root", synth_small, "--tokens", "all",
                                   "--aug-views", "1", "--pixels", "8", "--shard-size", shard_size))
        caches[shard_size] = open_cache(out)
    small, whole = caches["1"], caches["64"]
    assert small.layout.num_shards == len(lines) and whole.layout.num_shards == 1
    assert list(np.flatnonzero(~small.valid())) == [7, 10]
    for name in small.layout.row_arrays():
        a, b = small.read(name), whole.read(name)
        assert np.array_equal(a, b), name
        failed = a[[7, 10]]
        assert (not failed.any()) if failed.dtype.kind in "biuf" else all(str(x) == "" for x in failed), name


def test_no_fsync_writes_the_same_cache(synth_small, tmp_path):
    """--no-fsync changes when bytes reach the disk, never which bytes."""
    for name, extra in (("a", []), ("b", ["--no-fsync"])):
        run_cli(*tiny_extract_args(synth_small / "train.txt", tmp_path / f"{name}.zarr", "--frames", "2",
                                   "--tokens", "all", "--shard-size", "4", *extra))
    from helpers import assert_caches_equal
    assert_caches_equal(tmp_path / "a.zarr", tmp_path / "b.zarr")
