"""Typed dataclass configs: YAML loading, ``key.sub=value`` overrides, validation.

Every experiment config is a tree of dataclasses. ``load_config(cls, path,
overrides)`` reads a YAML file, applies command-line overrides and builds the
tree, checking every key and type on the way. Errors are ``ConfigError`` and
name the offending key and the file it came from.

Fields may carry ``metadata={"help": ...}``; ``describe(cls)`` prints them.
A dataclass may define ``validate(self)`` for cross-field checks; it runs after
construction, on every nested level.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import re

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "apply_overrides", "parse_overrides",
           "save_config", "describe", "field", "Renamed", "upgrade_keys"]


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or invalid value (message names key and source)."""


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING):
    """``dataclasses.field`` with a help string in its metadata (peft style)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


@dataclasses.dataclass(frozen=True)
class Renamed:
    """An old config key still read for one release: dotted ``old`` -> dotted ``new``.

    ``new`` may name several keys (one old value split in two, e.g. ``optim.betas`` ->
    ``optimizer.adam_beta1``, ``optimizer.adam_beta2``); ``convert`` maps the old value to the new
    one (a tuple of values for several keys) and leaves values it does not know unchanged, so that
    the type check names the new key.
    """

    old: str
    new: Union[str, tuple]
    convert: Any = None

    @property
    def targets(self) -> tuple:
        return (self.new,) if isinstance(self.new, str) else tuple(self.new)


def _pop_path(data: dict, dotted: str) -> tuple[bool, Any]:
    """Remove ``a.b.c`` from nested ``data`` (and parents left empty); (found, value)."""
    parts = dotted.split(".")
    trail, node = [], data
    for part in parts[:-1]:
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            return False, None
        trail.append((node, part))
        node = child
    if not isinstance(node, dict) or parts[-1] not in node:
        return False, None
    value = node.pop(parts[-1])
    for parent, part in reversed(trail):
        if parent[part] == {}:
            del parent[part]
    return True, value


def _has_path(data: dict, dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def upgrade_keys(data: dict, renames, source: str | None, warn: bool = True) -> dict:
    """Move every old key in ``data`` to its new name (a copy; one ``logging.warning`` per old key).

    Raises ConfigError when a key is given under both names (which one was meant is unclear).
    """
    import copy
    import logging

    data = copy.deepcopy(data)
    for r in renames:
        found, value = _pop_path(data, r.old)
        if not found:
            continue
        targets = r.targets
        both = [t for t in targets if _has_path(data, t)]
        if both:
            raise ConfigError(f"{_where(r.old, source)} is the old name of '{both[0]}', which is given too; "
                              f"keep only '{both[0]}'")
        new_value = r.convert(value) if r.convert else value
        values = new_value if len(targets) > 1 else (new_value,)
        if len(targets) > 1 and (not isinstance(values, (list, tuple)) or len(values) != len(targets)):
            raise ConfigError(f"{_where(r.old, source)}: expected {len(targets)} items, got {value!r}; "
                              f"write {', '.join(targets)} instead")
        for target, v in zip(targets, values):
            _set_path(data, target, v)
        if warn:
            logging.getLogger("accord_face.config").warning(
                "%s: '%s' is deprecated, use '%s' (the old name is read for one more release)",
                source or "config", r.old, "', '".join(targets))
    return data


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _where(key: str, source: str | None) -> str:
    return f"'{key}'" + (f" in {source}" if source else "")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{_where(key, source)}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            # YAML 1.1 reads a bare no / off / yes / on as a boolean: mixed_precision: no means "no"
            spelled = [a for a in (("yes", "on", "true") if value else ("no", "off", "false")) if a in args]
            value = spelled[0] if spelled else value
        if value not in args:
            raise ConfigError(f"{_where(key, source)}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, source)}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(key, source)}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_where(key, source)}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, source)}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(key, source)}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(key, source)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; accept it as the number it means.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{_where(key, source)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{_where(key, source)}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{_where(key, source)}: expected a path, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{_where(key, source)}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], source: str | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(prefix or '<root>', source)}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(_unknown(full, key, fields, source, cls))
        kwargs[key] = _coerce(value, hints[key], full, source)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        if source == "command line":
            raise ConfigError("missing required flag(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
        names = ", ".join(f"{prefix}.{m}" if prefix else m for m in missing)
        raise ConfigError(f"missing required key(s) {names}" + (f" in {source}" if source else "")
                          + f"; set {names.split(', ')[0]}=...")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            if prefix:
                raise ConfigError(f"{_where(prefix, source)}: {err}") from None
            raise ConfigError(f"{source}: {err}" if source else str(err)) from None
    return obj


def _unknown(full: str, key: str, names, source: str | None, cls: type | None = None) -> str:
    """One line: the unknown key, the closest valid one (difflib), where it came from.

    With ``cls``, the keys of its sections count too: ``learning_rate`` at the top level suggests
    ``optimizer.learning_rate``.
    """
    import difflib

    parent = full[: -len(str(key))]
    nested: dict[str, str] = {}
    if cls is not None:
        hints = typing.get_type_hints(cls)
        sections = [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
        # the sections both trainers share (accord_face.sections) first: 'learning_rate' -> optimizer.learning_rate
        sections.sort(key=lambda s: not any(c.__module__ == "accord_face.sections" for c in s[1].__mro__))
        for name, sub in sections:
            for g in dataclasses.fields(sub):
                nested.setdefault(g.name, f"{name}.{g.name}")
    close = [nested[key]] if key in nested else difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
    if not close and nested:
        inner = difflib.get_close_matches(str(key), sorted(nested), n=1, cutoff=0.75)
        close = [nested[inner[0]]] if inner else []
    hint = f"did you mean '{parent}{close[0]}'?" if close else f"valid keys here: {', '.join(sorted(names))}"
    return f"unknown key {_where(full, source)}; {hint}"


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-safe structure (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers: ``12:30`` stays a string (1.1 reads it as the
    base-60 integer 750) and ``1e-3`` is a float (1.1 wants ``1.0e-3``)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in (_INT, _FLOAT)]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1,2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]``; values parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        parsed.append((key.strip(), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (intermediate mappings created)."""
    import copy

    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                defaults: dict[str, Any] | None = None, warn_renamed: bool = True) -> T:
    """Read YAML ``path`` (optional), apply ``key.sub=value`` overrides, build ``cls``.

    Old key names listed in ``cls.RENAMED`` (``Renamed`` entries) are moved to their new names, with
    one deprecation line each naming the file (or "command line"); ``warn_renamed=False`` reads them
    silently (a stored run config written by an older release).
    Errors name the key and ``path`` (or "command line" for an override).
    """
    renames = getattr(cls, "RENAMED", ())
    data: dict[str, Any] = dict(defaults or {})
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(_yaml_error(path, err)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data.update(upgrade_keys(loaded, renames, source, warn_renamed) if renames else loaded)
    if overrides:
        # Check override keys against the schema on their own so that the error
        # blames the command line, not the file.
        given = apply_overrides({}, overrides)
        if renames:
            given = upgrade_keys(given, renames, "command line", warn_renamed)
            from_dict_keys_only(cls, given, "command line")
            data = _deep_merge(data, given)
        else:
            from_dict_keys_only(cls, given, "command line")
            data = apply_overrides(data, overrides)
    return from_dict(cls, data, source=source + " (with command-line overrides)" if source and overrides else source)


def _yaml_error(path: Path, err: Exception) -> str:
    """PyYAML's multi-line error as one line with the file position (and the usual fix for tabs)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    fix = "; YAML indents with spaces, not tabs: replace the tab" if "'\\t'" in problem or "\t" in problem else ""
    return f"{where}: not valid YAML ({problem}){fix}"


def from_dict_keys_only(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Raise ConfigError for keys in ``data`` that ``cls`` does not have, and for leaf values of the wrong
    type (so that a bad command-line value is blamed on the command line, not on the YAML file)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(_unknown(full, key, names, source, cls))
        tp = hints[key]
        sub = next((a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)), None)
        if sub is not None and isinstance(value, dict):
            from_dict_keys_only(sub, value, source, full)
        elif sub is None:
            _coerce(value, tp, full, source)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    tmp.replace(path)


def _describe_type(tp: Any) -> str:
    """``one of 'a' | 'b'`` for Literal, ``X or null`` for Optional, ``list of X``; else the type name."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_describe_type(a) for a in inner)
        return text + (" or null" if len(inner) < len(args) else "")
    if origin in (list, tuple) and args:
        return f"{origin.__name__} of " + ", ".join(_describe_type(a) for a in args if a is not Ellipsis)
    return _type_name(tp)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: ``key (type, default): help``; nested dataclasses expanded."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, full + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        lines.append(f"{full} ({_describe_type(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return lines
