"""Strict, typed configuration loading shared by every stage.

Configs are plain ``@dataclass`` classes (nested dataclasses allowed).  They are loaded from
YAML with :func:`load_config`; unknown keys, wrong types and missing required fields raise
:class:`ConfigError` naming the dotted field path.  ``--set a.b=c`` overrides are applied on
the raw mapping before validation, with values parsed as YAML scalars.

Every job uses :func:`job_argparser` / :func:`parse_job_args` so that the command-line surface
is the same everywhere::

    python jobs/<name>.py --config spec.yaml [--set key=value ...] [--output URI]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml
from .errors import UserError

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "check_override_key",
    "job_argparser",
    "parse_job_args",
    "check_keywords",
]


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type (message names the field)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Validate/coerce ``value`` against annotation ``tp``; raise ConfigError naming ``path``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        members = [arg for arg in args if arg is not type(None)]
        if len(members) == 1:                  # Optional[X]: X's own message names what is wrong
            return _coerce(value, members[0], path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:  # try the next member of the union
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, _path=path)
    if origin in (list, Sequence, typing.Sequence) or tp in (list,):
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        kt, vt = get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {_coerce(k, kt, f"{path}.<key>"): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], _path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types are errors."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {_path}" if _path else ""
        raise ConfigError(
            f"unknown key(s){where}: {', '.join(map(str, unknown))} (allowed: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{_path}.{name}" if _path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key: {sub}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise ConfigError(f"{_path or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list structure (YAML/JSON serialisable)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check_override_key(cls: Any, key: str) -> None:
    """``--set key=...`` must name a field of ``cls`` (dotted through nested dataclasses); an unknown
    key is reported as coming from ``--set``, not from the config file."""
    tp = cls
    done: list[str] = []
    for part in key.split("."):
        while get_origin(tp) is Union or get_origin(tp) is types.UnionType:     # Optional[Dataclass]
            inner = [a for a in get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return
            tp = inner[0]
        if get_origin(tp) in (dict, Mapping, typing.Mapping) and len(get_args(tp)) == 2:
            tp = get_args(tp)[1]            # any key of a mapping; its values are checked below it
            done.append(part)
            continue
        if not dataclasses.is_dataclass(tp):
            return                      # a mapping / Any: free-form below this point
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        if part not in fields:
            where = f" in {'.'.join(done)}" if done else ""
            raise ConfigError(f"--set {key}: unknown key {part!r}{where} (allowed: {', '.join(sorted(fields))})")
        tp = typing.get_type_hints(tp)[part]
        done.append(part)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {part} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (or ``base`` mapping) plus ``--set`` overrides."""
    data: dict = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    for item in overrides or ():
        if "=" in item and dataclasses.is_dataclass(cls):
            check_override_key(cls, item.split("=", 1)[0].strip())
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from exc
        raise


def check_keywords(cls: Any, kwargs: Mapping[str, Any], field: str) -> None:
    """Raise ``ValueError('<field>.<key>: ...')`` for a keyword ``cls(...)`` does not take (free-form
    mappings of constructor arguments, e.g. ``model.<name>``, are checked here at load)."""
    params = inspect.signature(cls.__init__ if isinstance(cls, type) else cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL)
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(f"{field}.{bad[0]}: not a keyword of {getattr(cls, '__name__', cls)} "
                         f"(allowed: {', '.join(allowed)})")


def check_import_allowed(value: Any, field: str, allow_import: bool) -> None:
    """Configs are trusted input only when they say so: a ``module:factory`` value imports code,
    which is refused unless the config sets ``allow_import: true``.  Raises ``ValueError`` naming
    ``field`` (a one-line ConfigError at load)."""
    if not allow_import:
        raise ValueError(f"{field}: {value!r} would import and run code (module:factory); set allow_import: true "
                         "in this config if you trust it")


def override_value(v: Any) -> str:
    """``v`` as the value of a ``key=value`` override that :func:`apply_overrides` reads back as
    ``v`` itself.  YAML, not JSON: ``json.dumps(1e-05)`` is ``1e-05``, which YAML 1.1 reads as a
    string; YAML writes ``1.0e-05`` (also inside lists and mappings) and quotes strings that
    would read as something else."""
    text = yaml.safe_dump(v, default_flow_style=True, width=float("inf")).strip()
    return text[:-3].rstrip() if text.endswith("...") else text     # a bare scalar ends "..."


def job_overrides(args: argparse.Namespace, field: str = "output") -> list[str]:
    """The job's ``--set`` overrides, plus ``--output`` (if given) as an override of ``field``."""
    out = list(args.overrides)
    if args.output:
        out.append(f"{field}={override_value(args.output)}")
    return out


def job_argparser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """The common command line of every job: --config, --set (repeatable), --output, --address."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=config_required, help="YAML config/spec file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted path, YAML value); repeatable")
    p.add_argument("--output", default=None, help="output URI (local folder, file:// or s3://)")
    p.add_argument("--address", default=None,
                   help="Ray address; default: the running cluster under `ray job submit`, else an embedded local Ray")
    return p


def parse_job_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parser.parse_args(argv)
