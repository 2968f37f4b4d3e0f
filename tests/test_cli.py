import click
import pytest

from cachefeat.cli import cli

from conftest import TINY, run_cli, tiny_extract_args


@pytest.mark.parametrize("extra,message", [
    (["--layers", "9"], "block index 9 is out of range; this model has blocks 0..3"),
    (["--tokens", "pooled:9x9"], "pooled grid must be between 1x1 and the model's patch grid 4x4"),
    (["--tokens", "patches"], "expected cls, all or pooled:HxW"),
    (["--views", "2x2"], "spatial crops must be 1"),
    (["--sampling", "dense:0"], "STRIDE >= 1"),
    (["--codec", "lz5"], "expected none, zstd"),
    (["--shard-size", "0"], "positive number of clips"),
    (["--model", "ViT-B/61"], "unknown model 'ViT-B/61'; did you mean"),
])
def test_bad_option_values_are_one_line_usage_errors(tmp_path, synth_small, extra, message):
    args = tiny_extract_args(synth_small / "val.txt", tmp_path / "c.zarr")
    if "--model" in extra:
        args[args.index("--model") + 1] = extra[1]
        extra = []
    res = run_cli(*args, *extra, ok=False)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "c.zarr" / "zarr.json").exists()


def test_info_on_something_that_is_not_a_cache(tmp_path):
    res = run_cli("info", tmp_path, ok=False)
    assert res.exit_code == 2 and "is not a cachefeat cache" in res.output
    import zarr
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    res = run_cli("info", tmp_path / "plain.zarr", ok=False)
    assert res.exit_code == 2 and "not a cachefeat cache (no 'cachefeat' metadata)" in res.output


def test_missing_input_and_bad_manifest(tmp_path):
    res = run_cli("extract", tmp_path / "nope.txt", "--out", tmp_path / "c.zarr", ok=False)
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "empty.txt").write_text("")
    res = run_cli("extract", tmp_path / "empty.txt", "--out", tmp_path / "c.zarr", "--model", TINY, ok=False)
    assert res.exit_code == 2 and "no videos found" in res.output


def _commands(group, prefix=()):
    """(words after `cachefeat`, command) of every command, those of groups such as `checkpoint` included."""
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            assert cmd.help and len(cmd.help) > 20, f"`cachefeat {name}` has no help text"
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_command_and_option_is_documented():
    for words, cmd in _commands(cli):
        name = " ".join(words)
        assert cmd.help and len(cmd.help) > 20, f"`cachefeat {name}` has no help text"
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("help",):
                assert p.help, f"`cachefeat {name} {p.opts[0]}` has no help text"
        assert run_cli(*words, "--help").exit_code == 0


def test_synth_rejects_odd_class_count(tmp_path):
    res = run_cli("synth", tmp_path / "d", "--classes", "5", ok=False)
    assert res.exit_code == 2 and "even number" in res.output
