"""One way to read and validate configuration: the feature contract, the training config and the
retrain config all go through here.

* :func:`load_yaml` reads a YAML file, refusing a key given twice in one mapping (YAML's "last one
  wins" would silently drop a block) and reading ``1e-3`` as the number it looks like (YAML 1.1
  wants ``1.0e-3``); syntax errors name the file and line.
* The checkers (:func:`integer`, :func:`number`, ...) take the value and its dotted key, and raise
  :class:`ConfigError` whose message starts with the key.
* :func:`build` makes a frozen dataclass from a mapping: unknown keys are named, each value is checked
  against its field's type (``hidden: 400`` is not a list; ``batch_size: 2048.0`` is not an integer),
  then against the field's ``check`` (in ``dataclasses.field(metadata=...)``). Defaults stay where they
  are stated: on the dataclass.

No pyspark and no torch import.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml


class ConfigError(ValueError):
    """A setting that cannot be used; the message starts with its dotted key (and the file)."""


# --- YAML ----------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e-3 / 1E+5 as floats."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)
for _ch in list("-+0123456789."):
    _Loader.yaml_implicit_resolvers[_ch] = [(t, r) for t, r in _Loader.yaml_implicit_resolvers.get(_ch, [])
                                            if t != "tag:yaml.org,2002:float"]
    _Loader.yaml_implicit_resolvers[_ch].insert(0, ("tag:yaml.org,2002:float", _FLOAT))


def _mapping_no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for k, _ in node.value:
        key = loader.construct_object(k, deep=True)      # type: ignore[no-untyped-call]
        if key in seen:
            raise ConfigError(f"{key}: given twice in one mapping (lines {seen[key] + 1} and {k.start_mark.line + 1});"
                              " remove one")
        seen[key] = k.start_mark.line
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node, deep=deep))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def parse_yaml(text: str, where: str = "<text>") -> Any:
    """YAML text -> plain data, by :func:`load_yaml`'s rules."""
    try:
        return yaml.load(text, Loader=_Loader)            # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None


def load_yaml(path: str | Path, what: str = "config") -> Any:
    """A YAML file -> plain data; :class:`ConfigError` when missing, not YAML, or with duplicate keys."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {p}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror})") from None
    return parse_yaml(text, str(p))


# --- checkers: value and dotted key in, value (or ConfigError naming the key) out -----------------

def mapping(raw: Any, where: str, allowed: collections.abc.Set[str] | None = None,
            required: collections.abc.Set[str] = frozenset()) -> dict[str, Any]:
    """A mapping with only ``allowed`` keys (None: any) and every ``required`` key."""
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or '<top level>'}: expected a mapping, got {_show(raw)}")
    if allowed is not None:
        for k in raw:
            if k not in allowed:
                raise ConfigError(f"{prefix}{k}: unknown key (allowed: {', '.join(sorted(allowed))})")
    for k in sorted(required):
        if k not in raw:
            raise ConfigError(f"{prefix}{k}: required key is missing")
    return raw


def string(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected a non-empty string, got {_show(raw)}")
    return raw


def boolean(raw: Any, where: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(f"{where}: expected true or false, got {_show(raw)}")
    return raw


def integer(raw: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"{where}: expected an integer, got {_show(raw)}")
    if (lo is not None and raw < lo) or (hi is not None and raw > hi):
        raise ConfigError(f"{where}: {raw} is out of range [{'-inf' if lo is None else lo}, "
                          f"{'inf' if hi is None else hi}]")
    return raw


def number(raw: Any, where: str, lo: float | None = None, hi: float | None = None, low_open: bool = False) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigError(f"{where}: expected a number (finite), got {_show(raw)}")
    x = float(raw)
    if (lo is not None and not (lo < x if low_open else lo <= x)) or (hi is not None and x > hi):
        raise ConfigError(f"{where}: {x} is out of range {'(' if low_open else '['}{'-inf' if lo is None else lo}, "
                          f"{'inf' if hi is None else hi}]")
    return x


def _show(raw: Any) -> str:
    return f"{raw!r} ({type(raw).__name__})" if raw is not None else "nothing"


# --- field checks for build(): metadata={"check": ...} ----------------------------------------------

Check = Callable[[Any, str], Any]


def at_least(lo: float) -> Check:
    def check(v: Any, where: str) -> Any:
        if v < lo:
            raise ConfigError(f"{where}: {v} must be at least {lo}")
        return v
    return check


def positive(v: Any, where: str) -> Any:
    if not v > 0:
        raise ConfigError(f"{where}: {v} must be positive")
    return v


def in_range(lo: float, hi: float, hi_open: bool = False) -> Check:
    def check(v: Any, where: str) -> Any:
        if not (lo <= v < hi if hi_open else lo <= v <= hi):
            raise ConfigError(f"{where}: {v} is not in [{lo}, {hi}{')' if hi_open else ']'}")
        return v
    return check


def one_of(*choices: Any) -> Check:
    def check(v: Any, where: str) -> Any:
        if v not in choices:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, choices))}")
        return v
    return check


def each(inner: Check) -> Check:
    """Apply ``inner`` to every item of a list or every value of a mapping."""
    def check(v: Any, where: str) -> Any:
        if isinstance(v, Mapping):
            for k, x in v.items():
                inner(x, f"{where}.{k}")
        else:
            for i, x in enumerate(v):
                inner(x, f"{where}[{i}]")
        return v
    return check


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, *, factory: Any = dataclasses.MISSING,
            doc: str = "") -> Any:
    """A dataclass field with a value check and a one-line description. (A field typed ``Path`` is
    resolved against the config file's folder by :func:`build`.)"""
    meta = {"check": check, "doc": doc}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --- dataclass from a mapping -----------------------------------------------------------------------

T = typing.TypeVar("T")


def build(cls: type[T], raw: Any, where: str = "", base: Path | None = None, **fixed: Any) -> T:
    """``cls(**raw)``, checked: every key of ``raw`` must be a field of ``cls`` (``fixed`` fields are set by
    the caller, not the file); values must have the field's type (nested dataclasses recurse, tuples and
    mappings item by item, ``X | None`` allows null); then each field's ``check`` runs. Relative
    ``Path`` fields resolve against ``base``.

        build(TrainConfig, {"hidden": 400}) -> ConfigError("hidden: expected a list of integers, got 400 (int)")
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in fixed}  # type: ignore[arg-type]
    required = {n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values = mapping({} if raw is None else raw, where, set(fields), required)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = dict(fixed)
    for k, v in values.items():
        f = fields[k]
        key = f"{where}.{k}" if where else k
        x = _typed(hints[k], v, key, base)
        check = f.metadata.get("check")
        if check is not None and x is not None:
            x = check(x, key)
        out[k] = x
    return cls(**out)


def _typed(tp: Any, v: Any, key: str, base: Path | None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return _typed(a, v, key, base)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: expected {' or '.join(_name(a) for a in rest)}, got {_show(v)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, v, key, base)  # type: ignore[type-var, arg-type]
    if typing.get_origin(tp) is typing.Literal:
        if v not in args:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, args))}")
        return v
    if origin is tuple:
        if not isinstance(v, list):
            raise ConfigError(f"{key}: expected {_name(tp)}, got {_show(v)}")
        if args[0] is str:      # command-line arguments: [--min-row-groups, 4] means "4"
            v = [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v]
        return tuple(_typed(args[0], x, f"{key}[{i}]", base) for i, x in enumerate(v))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(v, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(v)}")
        return {str(k): _typed(args[1], x, f"{key}.{k}", base) for k, x in v.items()}
    if tp is Path:
        p = Path(string(v, key)).expanduser()
        return (base / p).resolve() if base is not None and not p.is_absolute() else p
    if tp is bool:
        return boolean(v, key)
    if tp is int:
        return integer(v, key)
    if tp is float:
        return number(v, key)
    if tp is str:
        return string(v, key)
    if tp is Any:
        return v
    raise TypeError(f"{key}: config type {tp!r} is not supported")


def _name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return f"a list of {_name(args[0])}s"
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(map(repr, args))
    return {int: "integer", float: "number", str: "string", bool: "true/false", Path: "path"}.get(tp, str(tp))
