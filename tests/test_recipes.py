import json
import os
import signal
import time
from pathlib import Path

import pytest

from cachefeat.store import open_cache

from conftest import TINY, cli_subprocess, run_cli

RECIPE = f"""
name: tiny
stages:
  - name: data
    synth: {{out: data, classes: 4, videos-per-class: 8, frames: 16, size: 64, quiet: true}}
  - name: extract-train
    extract: {{input: data/train.txt, out: train.zarr, model: {TINY}, pretrained: none, frames: 4,
              shard-size: 2, batch-size: 2, decode-workers: 1, quiet: true}}
  - name: extract-val
    extract: {{input: data/val.txt, out: val.zarr, model: {TINY}, pretrained: none, frames: 4,
              views: 2x1, decode-workers: 1, quiet: true}}
  - name: info
    info: {{cache: val.zarr, plot: val-info.png}}
"""


def test_recipe_killed_midway_resumes_without_redoing_finished_stages(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    work = tmp_path / "work"
    state = work / "recipe-state.json"
    proc = cli_subprocess("run", recipe, "--workdir", work)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if state.exists() and "data" in json.loads(state.read_text()) and (work / "train.zarr" / "zarr.json").exists():
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())
    assert "data" in done and "info" not in done
    res = run_cli("run", recipe, "--workdir", work)
    assert "== data: done earlier, skipped" in res.output
    assert "4 stages run" not in res.output
    assert open_cache(work / "train.zarr").complete and open_cache(work / "val.zarr").complete
    assert (work / "val-info.png").stat().st_size > 1000
    again = run_cli("run", recipe, "--workdir", work)
    assert "0 stages run, 4 skipped" in again.output
    # a changed stage runs again; the others stay done
    recipe.write_text(RECIPE.replace("plot: val-info.png", "plot: val-info-2.png"))
    res = run_cli("run", recipe, "--workdir", work)
    assert "1 stages run, 3 skipped" in res.output and (work / "val-info-2.png").exists()


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - synth: {out: d}\n    extract: {input: x}\n")
    res = run_cli("run", bad, ok=False)
    assert res.exit_code == 2 and "exactly one command" in res.output
    bad.write_text("stages:\n  - synth: {out: d, colours: 3}\n")
    res = run_cli("run", bad, "--workdir", tmp_path / "w", ok=False)
    assert res.exit_code == 2 and "`synth` has no option 'colours'" in res.output
    bad.write_text("name: [unclosed\n")
    res = run_cli("run", bad, ok=False)
    assert res.exit_code == 2 and "not valid YAML" in res.output


def _shipped():
    from pathlib import Path
    return sorted((Path(__file__).parents[1] / "pipelines").glob("*.yaml"))


def _variants(recipe_path):
    """The backbone x frame-count combinations a recipe is meant for (its `vars`), or just its defaults."""
    import yaml
    names = (yaml.safe_load(recipe_path.read_text()).get("vars") or {})
    if "model" in names and "frames" in names:
        return [{"model": m, "frames": f} for m in ("ViT-B-16", "ViT-L-14") for f in (8, 16)]
    return [{}]


def _make_inputs(command, argv, work):
    """Create the paths a stage reads that earlier stages of the recipe would have written (relative paths:
    caches, run folders, manifests), so that click's exists=True checks pass."""
    import click
    ctx = click.Context(command)
    raw, _, _ = command.make_parser(ctx).parse_args(list(argv))   # the strings, not yet checked
    for param in command.params:
        if not isinstance(param.type, click.Path) or not param.type.exists:
            continue
        values = raw.get(param.name)
        for v in values if isinstance(values, (list, tuple)) else [values]:
            if v is None or Path(v).is_absolute() or (work / v).exists():
                continue
            if param.type.dir_okay and not Path(v).suffix or str(v).endswith(".zarr"):
                (work / v).mkdir(parents=True)
            else:
                (work / v).parent.mkdir(parents=True, exist_ok=True)
                (work / v).write_text("")


@pytest.mark.parametrize("recipe_path", _shipped(), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe_path, tmp_path, monkeypatch):
    """Every recipe in pipelines/, for every backbone and frame count it documents, names real commands and
    options whose values the command accepts (click's own parsing and callbacks: types, ranges, the spec
    languages), a model open_clip knows, layers that model has, and adapter options the adapter has. The
    data paths are placeholders: they are pointed at existing files for the check. An ablation spec
    (`cachefeat ablate`) parses and validates (more in tests/test_ablate.py)."""
    from cachefeat.train.ablate import is_ablation_spec, load_spec
    if is_ablation_spec(recipe_path):
        load_spec(recipe_path)
        return
    import yaml

    from cachefeat import adapters
    from cachefeat.cli import _parse_adapter_opts, cli
    from cachefeat.extract.backbone import model_geometry
    from cachefeat.recipes import load_recipe, stage_command, to_argv
    from cachefeat.specs import parse_layers
    defaults = yaml.safe_load(recipe_path.read_text()).get("vars") or {}
    placeholder = {k: str(tmp_path) if "root" in k else str(tmp_path / "file.txt")
                   for k, v in defaults.items() if isinstance(v, str) and v.startswith("/data/")}
    (tmp_path / "file.txt").write_text("a\nb\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    stages_seen = 0
    for variant in _variants(recipe_path):
        recipe = load_recipe(recipe_path, {**placeholder, **variant})
        for stage in recipe["stages"]:
            name, options = stage_command(stage)
            command = cli.get_command(None, name)
            assert command is not None, f"{recipe_path.name}: unknown command {name}"
            argv = to_argv(command, options)
            _make_inputs(command, argv, tmp_path / "work")   # what earlier stages would have written
            ctx = command.make_context(f"cachefeat {name}", list(argv))   # raises on any bad value
            p = ctx.params
            if name == "extract":
                geo = model_geometry(p["model"])
                parse_layers(p["layers"], geo["depth"])
                if variant:
                    assert p["frames"] == variant["frames"] and variant["model"] in geo["name"]
            if name == "train":
                adapters.make_config(p["adapter"], _parse_adapter_opts(p["adapter_opt"]))
            stages_seen += 1
    assert stages_seen


def test_recipe_variables(tmp_path):
    from cachefeat.recipes import RecipeError, load_recipe, parse_set
    r = tmp_path / "v.yaml"
    r.write_text("vars: {model: ViT-B-16, frames: 8, out: 'c-${model}-${frames}f.zarr'}\n"
                 "workdir: w-${model}\n"
                 "stages:\n  - extract: {input: x.txt, model: '${model}', frames: '${frames}', out: '${out}'}\n")
    rec = load_recipe(r)
    assert rec["workdir"] == "w-ViT-B-16"
    assert rec["stages"][0]["extract"] == {"input": "x.txt", "model": "ViT-B-16", "frames": 8,
                                           "out": "c-ViT-B-16-8f.zarr"}
    rec = load_recipe(r, parse_set(["model=ViT-L/14", "frames=16"]))
    assert rec["stages"][0]["extract"]["frames"] == 16 and rec["stages"][0]["extract"]["out"] == "c-ViT-L/14-16f.zarr"
    assert rec["vars"] == {"model": "ViT-L/14", "frames": 16, "out": "c-ViT-L/14-16f.zarr"}
    with pytest.raises(RecipeError,
                       match="--set colour: recipe .* has no such variable .variables: model, frames, out"):
        load_recipe(r, {"colour": 1})
    with pytest.raises(RecipeError, match="expected NAME=VALUE"):
        parse_set(["frames"])
    r.write_text("stages:\n  - synth: {out: '${where}'}\n")
    with pytest.raises(RecipeError, match=r"\$\{where\} is not a variable of the recipe"):
        load_recipe(r)


def test_a_changed_variable_reruns_only_the_stages_it_changes(tmp_path):
    r = tmp_path / "v.yaml"
    r.write_text("vars: {size: 32}\nstages:\n"
                 "  - name: a\n    synth: {out: a, classes: 2, videos-per-class: 2, frames: 4, size: 32, quiet: true}\n"
                 "  - name: b\n    synth: {out: b, classes: 2, videos-per-class: 2, frames: 4, size: '${size}', "
                 "quiet: true}\n")
    work = tmp_path / "w"
    res = run_cli("run", r, "--workdir", work)
    assert "variables: size=32" in res.output and "2 stages run" in res.output
    res = run_cli("run", r, "--workdir", work, "--set", "size=48")
    assert ("== a: done earlier, skipped" in res.output and "--size 48" in res.output
            and "1 stages run, 1 skipped" in res.output)
    res = run_cli("run", r, "--workdir", work, "--set", "frames=8", ok=False)
    assert res.exit_code == 2 and "has no such variable" in res.output


# ------------------------------------------------------------------------------------------- hostile recipes
def _bomb() -> str:
    """The "billion laughs": 9 levels of 9 aliases each, 9^9 = 387 million values once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nstages: [{info: {cache: *i}}]\n"


def test_a_yaml_alias_bomb_is_refused_fast_in_one_line(tmp_path):
    """Issue 17: a 572-byte alias bomb kept `cachefeat run` growing in memory until killed. Expansion is now
    counted without expanding (shared values once), and refused past 100,000 values; a value that contains
    itself is refused too. Also in ablation specs and training config files, which share the loader."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    assert len(bomb.read_bytes()) <= 600
    t0 = time.monotonic()
    proc = cli_subprocess("run", bomb, "--workdir", tmp_path / "w")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and time.monotonic() - t0 < 30, output
    assert output.strip().splitlines() == [f"Error: recipe {bomb} expands to more than 100,000 values (YAML aliases "
                                           f"repeated inside each other?); refused before reading it further"]
    (tmp_path / "self.yaml").write_text("a: &a [*a]\nstages: *a\n")
    res = run_cli("run", tmp_path / "self.yaml", ok=False)
    assert res.exit_code == 2 and "holds a value that contains itself" in res.output
    spec = tmp_path / "spec.yaml"
    spec.write_text(_bomb().replace("stages: [{info: {cache: *i}}]", "train-cache: x\ngrid: {adapter: *i}"))
    res = run_cli("ablate", spec, "--check", ok=False)
    assert res.exit_code == 2 and "expands to more than 100,000 values" in res.output


def test_a_recipe_that_runs_itself_is_refused_in_one_line(tmp_path):
    """Issue 17: a recipe that runs itself recursed 194 times to a 2,993-line RecursionError. A recipe may run
    another (a `run:` stage), but not itself, directly or through others, and not deeper than 8 levels."""
    me = tmp_path / "me.yaml"
    me.write_text(f"stages:\n  - run: {{recipe: {me}}}\n")
    res = run_cli("run", me, "--workdir", tmp_path / "w", ok=False)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == (f"Error: recipe {me} runs itself (me.yaml -> me.yaml); remove "
                                                   f"the `run` stage that calls it")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"stages:\n  - run: {{recipe: {b}, workdir: {tmp_path / 'wb'}}}\n")
    b.write_text(f"stages:\n  - adapters: {{}}\n  - run: {{recipe: {a}, workdir: {tmp_path / 'wa'}}}\n")
    res = run_cli("run", a, "--workdir", tmp_path / "wa", ok=False)
    assert res.exit_code == 2 and f"recipe {a} runs itself (a.yaml -> b.yaml -> a.yaml)" in res.output
    # a chain of distinct recipes: fine up to 8 levels, refused past them
    chain = [tmp_path / f"level{i}.yaml" for i in range(10)]
    for i, p in enumerate(chain):
        nxt = i + 1
        inner = f"  - run: {{recipe: {chain[nxt]}, workdir: {tmp_path / f'w{nxt}'}}}\n" if nxt < len(chain) else ""
        p.write_text("stages:\n  - adapters: {}\n" + inner)
    res = run_cli("run", chain[0], "--workdir", tmp_path / "w0", ok=False)   # 10 levels: refused at the 9th
    assert res.exit_code == 2 and "recipes run recipes 8 deep" in res.output.strip().splitlines()[-1]
    res = run_cli("run", chain[2], "--workdir", tmp_path / "w2")    # 8 levels: runs
    assert res.output.count("== 1-adapters") == 8 and res.output.count("== 2-run") == 7


# ------------------------------------------------------------------------------------------- published recipes
PUBLISHED = Path(__file__).parents[1] / "pipelines" / "published" / "settings.yaml"


def _published():
    import yaml
    return yaml.safe_load(PUBLISHED.read_text())


def _expected(command, name: str, value):
    """A table value as the option's own parsing gives it (types, callbacks, spec languages)."""
    import click
    param = next(p for p in command.params if isinstance(p, click.Option) and name in
                 [o.lstrip("-") for o in p.opts])
    ctx = click.Context(command)
    if value == "absent":
        return param, None
    if param.is_flag:
        return param, bool(value)
    if param.multiple:
        return param, tuple(param.type.convert(v, param, ctx) for v in value)
    v = param.type_cast_value(ctx, value)
    return param, param.callback(ctx, param, v) if param.callback else v


def test_the_published_table_cites_a_source_for_every_value():
    tables = _published()
    assert set(tables) == {"evl-k400-b16-8f", "dist-k400-b16-8f", "dist-ssv2-b16-8f"}
    for table, stages in tables.items():
        for stage, settings in stages.items():
            for key, entry in settings.items():
                assert set(entry) == {"value", "source"}, (table, stage, key)
                assert entry["source"].split()[0] in ("EVL", "DiST"), (table, stage, key)


@pytest.mark.parametrize("recipe_path", [p for p in _shipped() if "published:" in p.read_text()],
                         ids=lambda p: p.name)
def test_recipes_match_the_published_tables(recipe_path, tmp_path, monkeypatch):
    """Every setting a published table lists is what the recipe's stage passes (after the option's own
    parsing; `absent`: left at its default), for the recipe's default variables."""
    import yaml

    from cachefeat.cli import cli
    from cachefeat.recipes import load_recipe, stage_command, to_argv
    defaults = yaml.safe_load(recipe_path.read_text()).get("vars") or {}
    placeholder = {k: str(tmp_path) if "root" in k else str(tmp_path / "file.txt")
                   for k, v in defaults.items() if isinstance(v, str) and v.startswith("/data/")}
    (tmp_path / "file.txt").write_text("a\nb\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    recipe = load_recipe(recipe_path, placeholder)
    table = _published()[recipe["published"]]
    stages = {s["name"]: s for s in recipe["stages"]}
    assert set(table) <= set(stages), f"{recipe_path.name}: stages {set(table) - set(stages)} missing"
    for stage_name, settings in table.items():
        name, options = stage_command(stages[stage_name])
        command = cli.get_command(None, name)
        argv = to_argv(command, options)
        _make_inputs(command, argv, tmp_path / "work")
        params = command.make_context(f"cachefeat {name}", list(argv)).params
        for key, entry in settings.items():
            param, want = _expected(command, key, entry["value"])
            got = params[param.name]
            if entry["value"] == "absent":
                got, want = got in (None, False, ()), True
            assert got == want, f"{recipe_path.name} {stage_name} --{key}: {got!r}, the paper's is {want!r} " \
                                f"({entry['source']})"


def test_the_adapter_ablation_trains_evl_with_evls_recipe():
    """ablate-adapters.yaml's evl trials use EVL's settings (the published table's train-evl)."""
    from cachefeat.cli import cli
    from cachefeat.train.ablate import load_spec, trial_config
    spec = load_spec(Path(__file__).parents[1] / "pipelines" / "ablate-adapters.yaml")
    cfg = trial_config(spec, {"adapter": "evl", "seed": 0})
    command = cli.get_command(None, "train")
    for key, entry in _published()["evl-k400-b16-8f"]["train-evl"].items():
        param, want = _expected(command, key, entry["value"])
        if key == "adapter-opt":
            got = tuple(f"{k}={v}" for k, v in cfg.adapter_opts.items())
        else:
            got = getattr(cfg, param.name)
        assert got == want, (key, got, want, entry["source"])
