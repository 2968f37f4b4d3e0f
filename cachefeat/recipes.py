"""Recipes: a YAML list of stages, each one cachefeat command with its options, run in order.

    name: demo
    stages:
      - name: data
        synth: {out: data, classes: 6}
      - name: extract-train
        extract: {input: data/train.txt, out: train.zarr, model: ViT-B/32, pretrained: none}

A stage is `<command>: {option: value}`: keys are the command's option names (dashes or underscores) or
its positional argument names; `true` is a flag; a list repeats the option. Paths are relative to the
work directory.

Variables: a top-level `vars: {name: default}` mapping; `${name}` anywhere in a string value (`workdir`,
stage options, stage names) is replaced by the variable's value. A value that is exactly `${name}` takes
the variable's type (a number stays a number). A variable may use the ones defined above it. Override them
with `cachefeat run RECIPE --set name=value` (repeatable): one recipe file per data set, with the backbone
and the frame count as variables, instead of a file per combination. A finished stage is recorded in
WORKDIR/recipe-state.json with a hash of its settings and is skipped next time, so re-running a recipe after
a crash continues where it stopped (and the stage that was interrupted resumes on its own: extract continues
its shards, train its checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import click
import yaml

from .yamlfile import YamlError, expanded_size, load_yaml


class RecipeError(ValueError):
    pass


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_-]*)\}")


def _substitute(value, env: dict, where: str):
    if isinstance(value, dict):
        return {_substitute(k, env, where): _substitute(v, env, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(name: str):
        if name not in env:
            raise RecipeError(f"{where}: ${{{name}}} is not a variable of the recipe (variables: "
                              f"{', '.join(env) or 'none; define them under `vars:`'})")
        return env[name]
    whole = _VAR.fullmatch(value.strip())
    if whole:
        return lookup(whole.group(1))
    return _VAR.sub(lambda m: str(lookup(m.group(1))), value)


def _parse_value(text: str):
    """`--set` values are read as YAML scalars: 16 is a number, ViT-L/14 a string."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    try:
        expanded_size(v, "--set")
    except YamlError:
        return text
    return v if isinstance(v, (str, int, float, bool)) else text


def resolve_vars(recipe: dict, overrides: dict | None, path) -> dict:
    """The recipe with its `vars` (defaults, then `overrides`) substituted everywhere; `vars` holds the
    values used."""
    defaults = recipe.get("vars") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"recipe {path}: `vars` must be a mapping of name: default")
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in defaults]
    if unknown:
        raise RecipeError(f"--set {unknown[0]}: recipe {path} has no such variable (variables: "
                          f"{', '.join(defaults) or 'none'})")
    env: dict = {}
    for name, default in defaults.items():
        value = overrides[name] if name in overrides else default
        env[str(name)] = _substitute(value, env, f"recipe {path}, variable {name}")
    out = {k: _substitute(v, env, f"recipe {path}") for k, v in recipe.items() if k != "vars"}
    out["vars"] = env
    return out


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Read and check a recipe; `overrides` ({name: value}, e.g. from --set) replace `vars` defaults."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        recipe = load_yaml(p, f"recipe {path}")
    except YamlError as e:
        raise RecipeError(str(e)) from None
    if isinstance(recipe, dict):
        recipe = resolve_vars(recipe, overrides, path)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise RecipeError(f"recipe {path} needs a non-empty `stages` list")
    names = set()
    for i, st in enumerate(recipe["stages"]):
        if not isinstance(st, dict):
            raise RecipeError(f"recipe {path}: stage {i + 1} is not a mapping")
        commands = [k for k in st if k != "name"]
        if len(commands) != 1:
            raise RecipeError(f"recipe {path}: stage {i + 1} must name exactly one command, has {commands}")
        if not isinstance(st[commands[0]], (dict, type(None))):
            raise RecipeError(f"recipe {path}: stage {i + 1}: the options of `{commands[0]}` must be a mapping "
                              f"{{option: value}}")
        if not isinstance(st.get("name", ""), (str, int)):
            raise RecipeError(f"recipe {path}: stage {i + 1}: its name must be a text")
        st.setdefault("name", f"{i + 1}-{commands[0]}")
        if st["name"] in names:
            raise RecipeError(f"recipe {path}: two stages are named {st['name']!r}")
        names.add(st["name"])
    return recipe


def stage_command(stage: dict) -> tuple[str, dict]:
    cmd = next(k for k in stage if k != "name")
    return cmd, dict(stage[cmd] or {})


def to_argv(command: click.Command, options: dict) -> list[str]:
    """{option: value} -> argv for `command`, positional arguments by name first."""
    positional = {p.name: p for p in command.params if isinstance(p, click.Argument)}
    by_name = {}
    for p in command.params:
        if isinstance(p, click.Option):
            for opt in p.opts + p.secondary_opts:
                by_name[opt.lstrip("-").replace("-", "_")] = (opt, p)
            by_name.setdefault(p.name, (p.opts[0], p))
    argv, pos = [], []
    for key, value in options.items():
        k = key.replace("-", "_")
        if k in positional:
            pos += [str(v) for v in value] if isinstance(value, list) else [str(value)]
            continue
        if k not in by_name:
            raise RecipeError(f"`{command.name}` has no option {key!r}")
        opt, param = by_name[k]
        if param.is_flag:
            if value is True:
                argv.append(opt)
            elif value is False and param.secondary_opts:
                argv.append(param.secondary_opts[0])
            continue
        for v in value if isinstance(value, list) else [value]:
            argv += [opt, str(v)]
    return pos + argv


def _digest(stage: dict) -> str:
    return hashlib.sha256(json.dumps(stage, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def parse_set(items) -> dict:
    """`--set name=value` items -> {name: value}."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise RecipeError(f"--set {item!r}: expected NAME=VALUE")
        out[name.strip()] = _parse_value(value.strip())
    return out


MAX_NESTING = 8          # a recipe may run a recipe (a `run:` stage) that runs a recipe ..., this deep at most
_RUNNING: list[Path] = []   # the recipes running in this process, outermost first


def run_recipe(group: click.Group, recipe_path: str, workdir: str | None = None, force: bool = False,
               only: tuple[str, ...] = (), echo=click.echo, overrides: dict | None = None) -> list[dict]:
    """Run a recipe's stages in order. A stage may run another recipe (`run: {recipe: ...}`), to a depth of
    MAX_NESTING; a recipe that runs itself, directly or through others, is refused (RecipeError)."""
    me = Path(recipe_path).resolve()
    if me in _RUNNING:
        chain = " -> ".join(p.name for p in [*_RUNNING[_RUNNING.index(me):], me])
        raise RecipeError(f"recipe {recipe_path} runs itself ({chain}); remove the `run` stage that calls it")
    if len(_RUNNING) >= MAX_NESTING:
        raise RecipeError(f"recipe {recipe_path}: recipes run recipes {MAX_NESTING} deep "
                          f"({' -> '.join(p.name for p in _RUNNING)} -> ...); at most {MAX_NESTING} levels")
    _RUNNING.append(me)
    try:
        return _run_recipe(group, recipe_path, workdir, force, only, echo, overrides)
    finally:
        _RUNNING.pop()


def _run_recipe(group, recipe_path, workdir, force, only, echo, overrides) -> list[dict]:
    recipe = load_recipe(recipe_path, overrides)
    work = Path(workdir or recipe.get("workdir") or Path(recipe_path).stem).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if recipe["vars"]:
        echo("variables: " + ", ".join(f"{k}={v}" for k, v in recipe["vars"].items()))
    state_path = work / "recipe-state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    report = []
    known = [s["name"] for s in recipe["stages"]]
    for o in only:
        if o not in known:
            raise RecipeError(f"--only {o}: no such stage (stages: {', '.join(known)})")
    for stage in recipe["stages"]:
        name = stage["name"]
        cmd_name, options = stage_command(stage)
        command = group.get_command(None, cmd_name)
        if command is None:
            raise RecipeError(f"stage {name}: unknown command {cmd_name!r}")
        digest = _digest(stage)
        if only and name not in only:
            continue
        if not force and state.get(name, {}).get("digest") == digest:
            echo(f"== {name}: done earlier, skipped")
            report.append({"stage": name, "skipped": True})
            continue
        argv = to_argv(command, options)
        echo(f"== {name}: cachefeat {cmd_name} {' '.join(argv)}")
        t0 = time.time()
        with _cwd(work):
            try:
                command.main(argv, prog_name=f"cachefeat {cmd_name}", standalone_mode=False)
            except SystemExit as e:  # a command that exits 0 explicitly is fine
                if e.code not in (0, None):
                    raise click.ClickException(f"stage {name} stopped (exit status {e.code}); run the recipe "
                                               f"again to continue") from None
        seconds = time.time() - t0
        state[name] = {"digest": digest, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1)}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)
        report.append({"stage": name, "skipped": False, "seconds": seconds})
    return report
