"""One typed configuration tree (plain dataclasses), YAML in and out, presets and `key=value`
overrides. Unknown keys and bad values are refused with the dotted key's name.

Add a section by writing a dataclass and a field on `Config`; loading, saving, overrides and
validation follow from the type hints (int, float, bool, str, Literal[...], X | None, tuple/list).
Cross-field rules go in a section's `validate()`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ffasynth.errors import ConfigError
from ffasynth.files import atomic_write_text


@dataclass
class DataConfig:
    layout: Literal["auto", "uwf", "isfahan", "manifest"] = "auto"
    # uwf layout: which FFA phase(s) are targets; "both" makes one sample per phase.
    phase: Literal["early", "late", "both"] = "both"
    crop_size: int = 768
    hflip: bool = True
    vflip: bool = False
    # Crops are drawn among windows with at least this fraction inside the field of view.
    min_fov_fraction: float = 0.5
    fov_threshold: float = 0.04  # source intensity (0-1) above which a pixel is inside the FOV
    max_pixels: int = 64_000_000
    cache_images: bool = True

    def validate(self) -> None:
        _require(self.crop_size >= 8, "data.crop_size", "must be at least 8")
        _require(0.0 <= self.min_fov_fraction <= 1.0, "data.min_fov_fraction", "must be in [0, 1]")
        _require(0.0 <= self.fov_threshold < 1.0, "data.fov_threshold", "must be in [0, 1)")
        _require(self.max_pixels > 0, "data.max_pixels", "must be positive")


@dataclass
class Config:
    preset: str = "tiny"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        _require(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}")


# Presets are plain override dictionaries applied on top of the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"data": {"crop_size": 128}},
    "sd15": {"data": {"crop_size": 768}},
}


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config value {key} {message}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one value against a type hint; raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"config value {key} may not be None")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config value {key}={value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config value {key}={value!r} must be a list")
        item_hint = args[0] if args else Any
        items = [_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config value {key}={value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config value {key}={value!r} must be a string")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key} must be a mapping, not {value!r}")
        return _build(hint, value, key)
    raise ConfigError(f"config value {key} has an unsupported type {hint!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    instance = cls(**{k: v for k, v in kwargs.items() if not dataclasses.is_dataclass(hints[k])})
    for name, value in kwargs.items():  # sections: merge into the default instance
        if dataclasses.is_dataclass(hints[name]):
            setattr(instance, name, value)
    return instance


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_dict(config: Config) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def validate(config: Any) -> None:
    """Run every section's validate(), depth first."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    if hasattr(config, "validate"):
        config.validate()


def from_dict(values: dict[str, Any]) -> Config:
    """Defaults ← preset ← values. `values["preset"]` picks the preset (default tiny)."""
    if not isinstance(values, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    preset = values.get("preset", Config.preset)
    if preset not in PRESETS:
        raise ConfigError(f"config value preset={preset!r} is not one of {sorted(PRESETS)}")
    config = _build(Config, _merge(_merge(to_dict(Config()), PRESETS[preset]), values))
    validate(config)
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """'stage1.lr=1e-4' → ('stage1.lr', 0.0001); the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
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


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Defaults ← preset ← YAML file ← key=value overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}".splitlines()[0]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values = loaded or {}
    if preset is not None:
        values = {**values, "preset": preset}
    if overrides:
        values = _merge(values, overrides_to_dict(overrides))
    return from_dict(values)


def save_config(config: Config, path: str | Path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
