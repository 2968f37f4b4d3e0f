"""The registry of adapters by name: each adapter module registers its class with `@register`; `resolve`
parses options against the adapter's Config dataclass (unknown keys and bad values are refused in one
line) and says what it reads from a cache."""
from __future__ import annotations

import dataclasses
import difflib

from .base import Adapter, AdapterError, FeatureSpec

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    _REGISTRY[cls.name] = cls
    return cls


def list_adapters() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> type[Adapter]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AdapterError(f"unknown adapter {name!r} (known: {', '.join(_REGISTRY)}){hint}")
    return _REGISTRY[name]


def _convert(adapter: str, key: str, value, default):
    """A value (string from --adapter-opt, or typed from a config file) -> the type of the default."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise AdapterError(f"adapter {adapter}: option {key}={value!r} is not a valid {kind.__name__}") from None


def make_config(name: str, options: dict | None = None):
    """The adapter's Config with `options` applied (keys may use dashes or underscores)."""
    cls = get(name)
    defaults = cls.Config()
    known = {f.name: f for f in dataclasses.fields(defaults)}
    values = {}
    for key, value in (options or {}).items():
        k = str(key).replace("-", "_")
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise AdapterError(f"adapter {name} has no option {key!r} (options: {', '.join(known) or 'none'}){hint}")
        values[k] = _convert(name, k, value, getattr(defaults, k))
    return dataclasses.replace(defaults, **values)


def resolve(name: str, options: dict | None, spec: FeatureSpec):
    """(adapter class, config, needs) for a feature space; raises AdapterError/CacheMismatch."""
    cls = get(name)
    config = make_config(name, options)
    needs = cls.needs(config, spec)
    return cls, config, needs


def build(name: str, options: dict | None, spec: FeatureSpec) -> Adapter:
    cls, config, _ = resolve(name, options, spec)
    return cls(config, spec)
