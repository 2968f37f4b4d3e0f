"""YAML files the user writes (recipes, ablation specs, training config files), read with bounds: safe
types only, and a document whose aliases expand to more than `MAX_VALUES` values (a "billion laughs" bomb:
572 bytes that expand to billions) or refer to themselves is refused in one line before anything walks it."""
from __future__ import annotations

from pathlib import Path

import yaml

MAX_VALUES = 100_000   # the largest recipe or spec in pipelines/ holds a few hundred
MAX_BYTES = 4 << 20


class YamlError(ValueError):
    """A YAML file that cannot be read, or is too large once its aliases are expanded (one line)."""


def load_yaml(path: str | Path, what: str, max_values: int = MAX_VALUES):
    """The document of a YAML (or JSON) file, checked to expand to at most `max_values` values, without
    self-reference. `what` names the file in messages (e.g. "recipe pipelines/k400.yaml")."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_BYTES:
            raise YamlError(f"{what} is {p.stat().st_size:,} bytes: too large for a settings file")
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise YamlError(f"{what}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise YamlError(f"{what} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise YamlError(f"{what} is not valid YAML: {describe(e)}") from None
    expanded_size(data, what, max_values)
    return data


def describe(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def expanded_size(data, what: str, max_values: int = MAX_VALUES) -> int:
    """How many values `data` holds with every alias expanded, counted without expanding anything (each
    shared object once, memoised); YamlError past `max_values` or on an object that contains itself."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(obj) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        key = id(obj)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlError(f"{what} holds a value that contains itself (a YAML alias inside its own anchor)")
        active.add(key)
        children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        n = 1
        for child in children:
            n += size(child)
            if n > max_values:
                raise YamlError(f"{what} expands to more than {max_values:,} values (YAML aliases repeated inside "
                                f"each other?); refused before reading it further")
        active.discard(key)
        sizes[key] = n
        return n

    try:
        return size(data)
    except RecursionError:
        raise YamlError(f"{what} is nested too deeply") from None
