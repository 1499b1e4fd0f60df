"""Config loading: dataclass defaults <- configs/<script>.yaml defaults <- preset <- `--set section.key=value`.

Configs are nested dataclasses (a top-level class whose fields are section dataclasses). Values are converted by
the field's type because YAML reads `1e-4` as a string; unknown keys are errors, not silent typos.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from common import UserError


def default_config_path(script_file: str | Path) -> Path:
    script = Path(script_file).resolve()
    return script.parent / "configs" / f"{script.stem}.yaml"


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "yes", "on", "1"):
                    return True
                if low in ("false", "no", "off", "0"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError(value)
                return int(f)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config: {where} = {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _apply(cfg: Any, updates: dict, where: str) -> None:
    if not isinstance(updates, dict):
        raise UserError(f"config: {where or 'top level'} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in updates.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise UserError(f"config: unknown key '{path}' (known: {', '.join(sorted(names))})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, path)
        else:
            setattr(cfg, key, _convert(value, hints[key], path))


def load_config(cfg_cls: type, config_path: str | Path | None, preset: str | None, overrides: list[str] | None):
    """Build a config: dataclass defaults <- yaml `defaults` <- `presets[preset]` <- overrides."""
    cfg = cfg_cls()
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise UserError(f"config: file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict) or not set(raw) <= {"defaults", "presets"}:
            raise UserError(f"config: {path} must hold only 'defaults' and 'presets' at the top level")
        presets = raw.get("presets") or {}
        if preset is not None and preset not in presets:
            raise UserError(f"config: unknown preset '{preset}' in {path} (known: {', '.join(presets)})")
        try:  # the error names the file: with several configs around, "unknown key" alone sends users hunting
            _apply(cfg, raw.get("defaults") or {}, "")
            if preset is not None:
                _apply(cfg, presets[preset] or {}, "")
        except UserError as exc:
            where = f"{path} (preset {preset})" if preset is not None else str(path)
            raise UserError(str(exc).replace("config:", f"config {where}:", 1)) from None
    elif preset not in (None, "full"):
        raise UserError(f"config: preset '{preset}' needs a config file")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"config: --set expects section.key=value, got '{item}'")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        update: Any = value
        for k in reversed(keys):
            update = {k: update}
        _apply(cfg, update, "")
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cfg_cls: type, d: dict):
    """Rebuild a config saved in a checkpoint; strict, so a checkpoint from another script is refused."""
    cfg = cfg_cls()
    _apply(cfg, d, "")
    return cfg
