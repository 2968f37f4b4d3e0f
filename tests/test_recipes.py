import json
import os
import signal
import time

import pytest

from cachefeat.cache import open_cache

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


def test_shipped_recipes_parse():
    """Every recipe in pipelines/ names real commands and options; every ablation spec there (`cachefeat
    ablate`) parses and validates (more in tests/test_ablate.py)."""
    from pathlib import Path
    from cachefeat.ablate import is_ablation_spec, load_spec
    from cachefeat.cli import cli
    from cachefeat.recipes import load_recipe, stage_command, to_argv
    recipes = sorted((Path(__file__).parents[1] / "pipelines").glob("*.yaml"))
    assert recipes
    for r in recipes:
        if is_ablation_spec(r):
            load_spec(r)
            continue
        for stage in load_recipe(r)["stages"]:
            name, options = stage_command(stage)
            command = cli.get_command(None, name)
            assert command is not None, f"{r.name}: unknown command {name}"
            to_argv(command, options)
