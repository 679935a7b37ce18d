"""The mechanics behind `ffasynth.config`: typed coercion of plain values onto dataclass trees,
merging, validation and `key=value` overrides. Errors name the dotted key."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ffasynth.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    """Refuse a value breaking a rule; `validate` adds the value asked to the message (key=value)."""
    if not ok:
        error = ConfigError(f"config value {key} {message}")
        error.key, error.rule = key, message
        raise error


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one value against a type hint; raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"config value {key} may not be None")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: take the choice so spelt back
            spelt = [a for a in args if isinstance(a, str) and yaml.safe_load(a) is value]
            value = spelt[0] if len(spelt) == 1 else value
        if value not in args:
            raise ConfigError(f"config value {key}={value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config value {key}={value!r} must be a list")
        item_hint = args[0] if args else Any
        items = [coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config value {key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config value {key}={value!r} must be an integer")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"config value {key}={value!r} must be a number")
        if not math.isfinite(number):  # .nan / .inf in YAML, "nan" as text: no setting means that
            raise ConfigError(f"config value {key}={value!r} must be a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config value {key}={value!r} must be a string")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key} must be a mapping, not {value!r}")
        return build(hint, value, key)
    raise ConfigError(f"config value {key} has an unsupported type {hint!r}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:  # every unknown key at once, each with the known key it most resembles (a typo, a renamed key)
        where = f"{prefix}." if prefix else ""
        said = []
        for name in unknown:
            close = difflib.get_close_matches(name, names, n=1)
            said.append(f"{where}{name}" + (f" (did you mean {where}{close[0]}?)" if close else ""))
        raise ConfigError(
            f"unknown config key{'s' * (len(said) > 1)} {', '.join(said)}; known in this section: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce(value, hints[name], key)
    instance = cls(**{k: v for k, v in kwargs.items() if not dataclasses.is_dataclass(hints[k])})
    for name, value in kwargs.items():  # sections: merge into the default instance
        if dataclasses.is_dataclass(hints[name]):
            setattr(instance, name, value)
    return instance


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error, not silently the last one
    (a second `stage1:` section would replace the first whole)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _safe_load(text: str) -> Any:
    """yaml.safe_load with _UniqueKeyLoader (a SafeLoader: plain data only, no object construction)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file's values merged over those of the file its `extends:` key names (a path
    relative to it; that file may extend another). A cycle is refused, naming the files."""
    path = Path(path)
    where = f"config file {path}" + (f" (extended by {_chain[-1]})" if _chain else "")
    if path.resolve() in {p.resolve() for p in _chain}:
        cycle = " → ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config files extend each other in a cycle ({cycle}): remove one of their `extends:`")
    try:
        loaded = _safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"{where} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not a text (YAML) file") from None
    except OSError as error:
        raise ConfigError(f"{where} cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:  # what PyYAML found, and where (its first line alone says neither)
        problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML: {problem or str(error).splitlines()[0]}{at}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{where} must hold a mapping of keys to values")
    values = dict(loaded or {})
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"config value extends in {path} must be a file name, e.g. extends: sd15.yaml")
    return merge(read_yaml(path.parent / parent, (*_chain, path)), values)


def validate(config: Any, root: Any = None) -> None:
    """Run every section's validate(), depth first. A broken rule names the key and the value asked."""
    root = config if root is None else root
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, root)
    if hasattr(config, "validate"):
        try:
            config.validate()
        except ConfigError as error:
            key = getattr(error, "key", None)
            asked = _lookup(root, key) if key else _MISSING
            if asked is _MISSING:
                raise
            raise ConfigError(f"config value {key}={_plain(asked)!r} {error.rule}") from None


_MISSING = object()


def _lookup(root: Any, key: str) -> Any:
    """The value at a dotted key of a config tree, or _MISSING."""
    node = root
    for part in key.split("."):
        node = getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def plain_lookup(root: Any, key: str) -> Any:
    """The value at a dotted key as YAML would write it (tuples as lists), or None when absent."""
    value = _lookup(root, key)
    return None if value is _MISSING else _plain(value)


def parse_override(text: str) -> tuple[str, Any]:
    """'stage1.lr=1e-4' → ('stage1.lr', 0.0001); the value is read as YAML (numbers, bools, lists), except what
    YAML 1.1 would read unlike a command line: ` #` starts no comment (`/data/runs #2/vae` stays whole), `010`
    is ten (not octal 8) and `1:30` is text (not sexagesimal 90)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value")
    stripped = raw.strip()
    if re.fullmatch(r"[-+]?0[0-9_]+", stripped):
        return key, int(stripped.replace("_", ""))
    comment = stripped[:1] not in ("'", '"') and (" #" in raw or stripped.startswith("#"))  # not in a quoted text
    if comment or re.fullmatch(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?", stripped):
        return key, raw
    try:
        value = yaml.safe_load(raw) if stripped else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return nested
