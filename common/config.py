"""Config loading: dataclass defaults <- configs/<script>.yaml defaults <- preset <- partial override files
<- `--set section.key=value`.

Configs are nested dataclasses (a top-level class whose fields are section dataclasses). Values are
converted by the field's type because YAML reads `1e-4` as a string; unknown keys are errors, not silent
typos.
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


def _to_bool(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    if isinstance(value, (bool, int)) and not isinstance(value, str):
        return bool(value)
    raise ValueError(value)


def _to_int(value: Any) -> int:
    number = float(value) if isinstance(value, str) else value
    if isinstance(number, float) and not number.is_integer():  # 2.5 steps is a typo, not 2
        raise ValueError(value)
    return int(number)


_SCALARS = {bool: _to_bool, int: _to_int, float: float, str: str}


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
    if tp not in _SCALARS:
        return value
    try:
        return _SCALARS[tp](value)
    except (TypeError, ValueError):
        raise UserError(f"config: {where} = {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None


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


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"config: {path} must hold a mapping at the top level")
    if set(raw) & {"defaults", "presets"} and not set(raw) <= {"defaults", "presets"}:
        raise UserError(
            f"config: {path} mixes 'defaults'/'presets' with sections ({', '.join(map(str, raw))}); "
            "use either the full layout (defaults + presets) or a partial override file (sections only)"
        )
    return raw


def _apply_from(cfg: Any, updates: dict, where: str) -> None:
    """`_apply`, with the file (and preset) named in the error: with several configs around, "unknown key"
    alone sends users hunting."""
    try:
        _apply(cfg, updates or {}, "")
    except UserError as exc:
        raise UserError(str(exc).replace("config:", f"config {where}:", 1)) from None


def _as_paths(config_paths: str | Path | list | tuple | None) -> list[Path]:
    if config_paths is None:
        return []
    if isinstance(config_paths, (str, Path)):
        return [Path(config_paths)]
    return [Path(p) for p in config_paths]


def load_config(
    cfg_cls: type,
    config_paths: str | Path | list | None,
    preset: str | None,
    overrides: list[str] | None,
    shipped: str | Path | None = None,
):
    """Build a config. Order (later wins): dataclass defaults <- `defaults` of the shipped file, then of each
    full file given <- `presets[preset]` (the last file that defines it) <- each partial override file, in the
    order given <- `--set` overrides.

    A full file holds `defaults` and/or `presets`; a partial override file holds sections in the flat layout
    of `defaults` (`train: {lr: 2.0e-6}`). `config_paths` is what `--config` gave (one path, several, or
    None); `shipped` is the script's own configs/<stem>.yaml, applied first when it exists."""
    given = [(path, _read_yaml(path)) for path in _as_paths(config_paths)]
    full = [(path, raw) for path, raw in given if set(raw) & {"defaults", "presets"}]
    partial = [(path, raw) for path, raw in given if not set(raw) & {"defaults", "presets"}]
    if shipped is not None and (Path(shipped).is_file() or not full):
        full.insert(0, (Path(shipped), _read_yaml(Path(shipped))))
    cfg = cfg_cls()
    presets: dict[str, tuple[Path, dict]] = {}
    for path, raw in full:
        _apply_from(cfg, raw.get("defaults") or {}, str(path))
        presets |= {name: (path, values or {}) for name, values in (raw.get("presets") or {}).items()}
    if preset is not None and preset in presets:
        path, values = presets[preset]
        _apply_from(cfg, values, f"{path} (preset {preset})")
    elif preset not in (None, "full"):
        where = ", ".join(str(path) for path, _ in full) or "no full config file"
        raise UserError(
            f"config: unknown preset '{preset}' in {where} (known: {', '.join(presets) or 'none'})"
        )
    for path, raw in partial:
        _apply_from(cfg, raw, str(path))
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
