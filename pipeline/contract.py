"""The feature contract: one YAML file under conf/ that says which columns mean what.

The Spark job (jobs/featurize.py), the generator and the online id path load the file through
:func:`load_contract`, so field names, hash buckets, bucketing rules, embedding dims and the sampling
rate are written down exactly once; the featurized data's manifest (pipeline.manifest) carries the
contract on to the trainer, which reads only the manifest. This module imports neither pyspark nor torch.

    >>> c = load_contract("conf/criteo.yaml")
    >>> c.field("C1").num_embeddings, c.field("I1").num_embeddings
    (1000000, 66)

Id layout (the same for every field, so that a model can be read without this module):
  categorical: 0 = missing, 1 = rare (seen < min_count times in the train days), 2.. = hashed values;
  continuous:  0 = missing, 1 = negative, 2.. = the value's bucket.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields as dc_fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline import config as C

CONTRACT_VERSION = 1
MISSING_ID = 0
RARE_ID = 1
NEGATIVE_ID = 1
RESERVED_IDS = 2
BUCKETINGS = ("log_square", "quantile")
DAY_FROM = ("file_name", "column")
SIDES = ("user", "item", "context")     # recall's towers: context goes with the user
POOLINGS = ("sum", "mean")


class ContractError(C.ConfigError):
    """A feature contract that cannot be used. The message names the offending key."""


@dataclass(frozen=True)
class ListSpec:
    """A list-valued categorical column (e.g. an item's genres ``Comedy|Drama``): the column's text is
    split at ``delimiter``, each element hashed as a value of the field, the first ``max_length`` kept,
    and the field's embedding is the ``pooling`` (sum or mean) of the elements' rows. An empty or
    missing list is the one id 0 (missing)."""

    delimiter: str
    pooling: str = "sum"
    max_length: int = 32


@dataclass(frozen=True)
class CategoricalField:
    """A categorical field: values are hashed to ids in [2, hash_buckets). ``list``: list-valued (ListSpec).
    ``side``: which tower of a recall model reads it (user, item, or context = the user's)."""

    name: str
    hash_buckets: int
    embedding_dim: int
    min_count: int = 0
    side: str = "context"
    list: ListSpec | None = None
    kind: str = field(default="categorical", init=False)

    @property
    def num_embeddings(self) -> int:
        return self.hash_buckets


@dataclass(frozen=True)
class ContinuousField:
    """A continuous (integer or float) field, made categorical by bucketing.

    ``bucketing='log_square'`` is the Criteo winners' fixed rule (v <= 2 -> v, else floor(ln(v)^2));
    ``'quantile'`` uses ``num_buckets - 1`` boundaries fitted on the train days (stored in the
    featurized data's manifest, not here).
    """

    name: str
    bucketing: str
    num_buckets: int
    embedding_dim: int
    side: str = "context"
    kind: str = field(default="continuous", init=False)

    @property
    def num_embeddings(self) -> int:
        return self.num_buckets + RESERVED_IDS


Field = CategoricalField | ContinuousField


@dataclass(frozen=True)
class Source:
    """How raw log files are laid out."""

    format: str
    delimiter: str
    header: bool
    columns: tuple[str, ...]
    day_from: str
    file_pattern: str
    day_column: str | None = None
    day_format: str | None = None
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sampling:
    neg_sample_rate: float
    seed: int


@dataclass(frozen=True)
class Splits:
    valid_days: int
    test_days: int


@dataclass(frozen=True)
class Output:
    rows_per_row_group: int
    min_row_groups: int


@dataclass(frozen=True)
class Quality:
    max_reject_fraction: float


@dataclass(frozen=True)
class Recall:
    """A recall (two-tower) contract: which categorical fields are the user's and the item's key.

    ``random_negatives``: per train positive, this many items drawn from the whole catalogue (uniformly)
    are written as labelled negatives with their sampling probability, for the pointwise mode; 0 = none
    (the in-batch softmax needs only the positives)."""

    user_key: str
    item_key: str
    random_negatives: int = 0


@dataclass(frozen=True)
class FeatureContract:
    name: str
    source: Source
    label: str
    fields: tuple[Field, ...]
    sampling: Sampling
    splits: Splits
    output: Output
    quality: Quality
    recall: Recall | None = None

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def categorical(self) -> tuple[CategoricalField, ...]:
        return tuple(f for f in self.fields if isinstance(f, CategoricalField))

    @property
    def continuous(self) -> tuple[ContinuousField, ...]:
        return tuple(f for f in self.fields if isinstance(f, ContinuousField))

    def side(self, side: str) -> tuple[Field, ...]:
        """The fields of one side, in contract order: ``side("user")`` is the user tower's (user and
        context fields), ``side("item")`` the item tower's."""
        want = ("user", "context") if side == "user" else (side,)
        return tuple(f for f in self.fields if f.side in want)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_raw(self) -> dict[str, Any]:
        """The contract in its YAML form (defaults expanded per field): :func:`parse_contract` reads it back."""
        return _to_raw(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = CONTRACT_VERSION
        return d

    @property
    def fingerprint(self) -> str:
        """A stable hash of everything that decides what an id means (16 hex digits).

        Sampling, splits, output layout and quality limits are left out: they change which rows are
        written, not what a feature id means, so a model stays valid across them.
        """
        d = self.to_dict()
        keep = {k: d[k] for k in ("version", "source", "label", "fields")}
        keep["source"] = {k: v for k, v in keep["source"].items() if k in ("columns", "ignore")}
        # Keys added after version 1 enter only when set, so older contracts keep their fingerprints.
        # ``side`` decides which tower reads a field, not what its ids mean: it is left out.
        keep["fields"] = [{k: v for k, v in f.items() if k != "side" and not (k == "list" and v is None)}
                          for f in keep["fields"]]
        blob = json.dumps(keep, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_overrides(self, **changes: Any) -> "FeatureContract":
        """A copy with dotted-key overrides, e.g. ``with_overrides(**{"sampling.neg_sample_rate": 0.5})``.
        ``categorical.defaults.K`` / ``continuous.defaults.K`` set K for every field of that kind (applied
        before per-field keys, whatever the order given)."""
        data = _to_raw(self)
        for key, value in sorted(changes.items(), key=lambda kv: ".defaults." not in f".{kv[0]}"):
            kind, _, rest = key.partition(".defaults.")
            if kind in ("categorical", "continuous") and rest:
                allowed = _CAT_KEYS if kind == "categorical" else _CONT_KEYS
                if rest not in allowed:
                    raise ContractError(f"{key}: unknown key in override (allowed: {', '.join(sorted(allowed))})")
                for f in data[kind]["fields"].values():
                    f[rest] = value
            else:
                _set_dotted(data, key, value)
        return parse_contract(data)


# --- parsing ---------------------------------------------------------------------------------

_TOP_KEYS = {"version", "name", "source", "label", "continuous", "categorical", "sampling", "splits",
             "output", "quality", "recall"}
_SOURCE_KEYS = {"format", "delimiter", "header", "columns", "day_from", "file_pattern", "day_column",
                "day_format", "ignore"}
_CONT_KEYS = {"bucketing", "num_buckets", "embedding_dim", "side"}
_CAT_KEYS = {"hash_buckets", "embedding_dim", "min_count", "side", "list"}
_LIST_KEYS = {"delimiter", "pooling", "max_length"}
_RECALL_KEYS = {"user_key", "item_key", "random_negatives"}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load_contract(path: str | Path) -> FeatureContract:
    """Load and validate a contract YAML file; raises :class:`ContractError` naming the bad key."""
    p = Path(path)
    try:
        data = _read_yaml(p, seen=())
        return parse_contract(data)
    except ContractError as e:
        raise ContractError(f"{p}: {e}") from None


def _read_yaml(p: Path, seen: tuple[Path, ...]) -> Any:
    """The file's mapping; with ``base: other.yaml`` (relative to the file), merged over that file's
    (mappings merge key by key, anything else replaces)."""
    try:
        data = C.load_yaml(p, "feature contract")
    except C.ConfigError as e:
        raise ContractError(str(e)) from None
    if not isinstance(data, dict) or "base" not in data:
        return data
    base = p.parent / str(data.pop("base"))
    if base.resolve() in seen:
        raise ContractError(f"base: {base} includes itself")
    return _merge(_read_yaml(base, seen + (p.resolve(),)), data)


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a[k], v) if k in a else v for k, v in b.items()}}
    return b


def parse_contract(data: Any) -> FeatureContract:
    """Validate a contract given as plain data (the parsed YAML) into frozen objects."""
    top = _mapping(data, "<top level>", _TOP_KEYS, required={"name", "source", "label"})
    version = top.get("version", CONTRACT_VERSION)
    if version != CONTRACT_VERSION:
        raise ContractError(f"version: unsupported contract version {version!r} (this code reads {CONTRACT_VERSION})")
    name = _str(top["name"], "name")
    source = _parse_source(top["source"])
    label = _str(top["label"], "label")
    if label not in source.columns:
        raise ContractError(f"label: column {label!r} is not in source.columns")

    fields: list[Field] = []
    fields += _parse_group(top.get("continuous"), "continuous", _CONT_KEYS, _make_continuous)
    fields += _parse_group(top.get("categorical"), "categorical", _CAT_KEYS, _make_categorical)
    if not fields:
        raise ContractError("continuous/categorical: the contract declares no feature fields")
    seen: set[str] = set()
    for f in fields:
        where = f"{f.kind}.fields.{f.name}"
        if f.name in seen:
            raise ContractError(f"{where}: field declared twice")
        seen.add(f.name)
        if f.name not in source.columns:
            raise ContractError(f"{where}: no column {f.name!r} in source.columns")
        if f.name in (label, source.day_column) or f.name in source.ignore:
            raise ContractError(f"{where}: column {f.name!r} is also the label, day column or ignored")
        if isinstance(f, CategoricalField) and f.list is not None and f.list.delimiter == source.delimiter:
            raise ContractError(f"{where}.list.delimiter: {f.list.delimiter!r} is also source.delimiter")
    declared = seen | {label} | set(source.ignore) | ({source.day_column} if source.day_column else set())
    undeclared = [c for c in source.columns if c not in declared]
    if undeclared:
        raise ContractError(f"source.columns: {undeclared[0]!r} is neither a field, the label, the day "
                            "column nor listed in source.ignore")

    s = _mapping(top.get("sampling", {}), "sampling", {"neg_sample_rate", "seed"})
    sampling = Sampling(neg_sample_rate=_float(s.get("neg_sample_rate", 1.0), "sampling.neg_sample_rate", 0.0, 1.0,
                                               low_open=True),
                        seed=_int(s.get("seed", 0), "sampling.seed", 0))
    sp = _mapping(top.get("splits", {}), "splits", {"valid_days", "test_days"})
    splits = Splits(valid_days=_int(sp.get("valid_days", 1), "splits.valid_days", 0),
                    test_days=_int(sp.get("test_days", 1), "splits.test_days", 0))
    o = _mapping(top.get("output", {}), "output", {"rows_per_row_group", "min_row_groups"})
    output = Output(rows_per_row_group=_int(o.get("rows_per_row_group", 65536), "output.rows_per_row_group", 1),
                    min_row_groups=_int(o.get("min_row_groups", 8), "output.min_row_groups", 1))
    q = _mapping(top.get("quality", {}), "quality", {"max_reject_fraction"})
    quality = Quality(max_reject_fraction=_float(q.get("max_reject_fraction", 0.01), "quality.max_reject_fraction",
                                                 0.0, 1.0))
    recall = _parse_recall(top.get("recall"), fields, source)
    return FeatureContract(name=name, source=source, label=label, fields=tuple(fields), sampling=sampling,
                           splits=splits, output=output, quality=quality, recall=recall)


def _parse_recall(raw: Any, fields: Sequence[Field], source: Source) -> Recall | None:
    if raw is None:
        return None
    r = _mapping(raw, "recall", _RECALL_KEYS, required={"user_key", "item_key"})
    by_name = {f.name: f for f in fields}
    keys = {}
    for key, side in (("user_key", "user"), ("item_key", "item")):
        name = _str(r[key], f"recall.{key}")
        f = by_name.get(name)
        if not isinstance(f, CategoricalField):
            raise ContractError(f"recall.{key}: {name!r} is not a categorical field of the contract")
        if f.side != side:
            raise ContractError(f"recall.{key}: field {name!r} has side {f.side!r}; the {side} key must have side {side!r}")
        if f.list is not None:
            raise ContractError(f"recall.{key}: field {name!r} is list-valued; a key is one value")
        if f.min_count:
            raise ContractError(f"recall.{key}: field {name!r} has min_count {f.min_count}; a key keeps every value "
                                "(its ids must tell items apart)")
        keys[key] = name
    return Recall(user_key=keys["user_key"], item_key=keys["item_key"],
                  random_negatives=_int(r.get("random_negatives", 0), "recall.random_negatives", 0, 1000))


def _parse_source(raw: Any) -> Source:
    s = _mapping(raw, "source", _SOURCE_KEYS, required={"columns"})
    fmt = s.get("format", "delimited")
    if fmt != "delimited":
        raise ContractError(f"source.format: {fmt!r} is not supported (use 'delimited')")
    delimiter = _str(s.get("delimiter", "\t"), "source.delimiter")
    if len(delimiter) != 1:
        raise ContractError(f"source.delimiter: must be one character, got {delimiter!r}")
    columns = tuple(_names(s["columns"], "source.columns"))
    if len(set(columns)) != len(columns):
        raise ContractError("source.columns: a column name appears twice")
    day_from = s.get("day_from", "file_name")
    if day_from not in DAY_FROM:
        raise ContractError(f"source.day_from: {day_from!r} is not one of {DAY_FROM}")
    pattern = _str(s.get("file_pattern", r"day_(\d+)(\.gz)?$"), "source.file_pattern")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ContractError(f"source.file_pattern: not a regular expression: {e}") from None
    day_column = s.get("day_column")
    day_format = s.get("day_format")
    if day_from == "file_name":
        if rx.groups < 1:
            raise ContractError("source.file_pattern: needs a capture group for the day number")
        if day_column is not None:
            raise ContractError("source.day_column: only used with day_from: column")
    else:
        if day_column is None or day_column not in columns:
            raise ContractError("source.day_column: day_from is 'column' but the column is missing from source.columns")
        if not day_format:
            raise ContractError("source.day_format: needed with day_from: column (a Spark datetime pattern, e.g. yyMMddHH)")
    ignore = tuple(_names(s.get("ignore", []), "source.ignore"))
    for c in ignore:
        if c not in columns:
            raise ContractError(f"source.ignore: {c!r} is not in source.columns")
    return Source(format=fmt, delimiter=delimiter, header=bool(_bool(s.get("header", False), "source.header")),
                  columns=columns, day_from=day_from, file_pattern=pattern,
                  day_column=_str(day_column, "source.day_column") if day_column else None,
                  day_format=_str(day_format, "source.day_format") if day_format else None, ignore=ignore)


def _parse_group(raw: Any, kind: str, keys: set[str], make: Any) -> list[Field]:
    if raw is None:
        return []
    g = _mapping(raw, kind, {"defaults", "fields"})
    defaults = _mapping(g.get("defaults", {}), f"{kind}.defaults", keys)
    spec = g.get("fields", [])
    out: list[Field] = []
    if isinstance(spec, list):
        items: list[tuple[str, Mapping[str, Any]]] = [(n, {}) for n in _names(spec, f"{kind}.fields")]
    elif isinstance(spec, dict):
        items = []
        for n, over in spec.items():
            where = f"{kind}.fields.{n}"
            _names([n], f"{kind}.fields")
            items.append((n, _mapping(over or {}, where, keys)))
    else:
        raise ContractError(f"{kind}.fields: expected a list of names or a mapping name -> settings")
    for n, over in items:
        merged = {**defaults, **over}
        out.append(make(n, merged, f"{kind}.fields.{n}"))
    return out


def _make_continuous(name: str, m: Mapping[str, Any], where: str) -> ContinuousField:
    bucketing = m.get("bucketing", "log_square")
    if bucketing not in BUCKETINGS:
        raise ContractError(f"{where}.bucketing: {bucketing!r} is not one of {BUCKETINGS}")
    return ContinuousField(name=name, bucketing=bucketing,
                           num_buckets=_int(m.get("num_buckets", 64), f"{where}.num_buckets", 2, 1 << 20),
                           embedding_dim=_dim(m.get("embedding_dim"), f"{where}.embedding_dim"),
                           side=_side(m.get("side", "context"), f"{where}.side"))


def _make_categorical(name: str, m: Mapping[str, Any], where: str) -> CategoricalField:
    return CategoricalField(name=name,
                            hash_buckets=_int(m.get("hash_buckets"), f"{where}.hash_buckets", RESERVED_IDS + 1,
                                              (1 << 31) - 1),
                            embedding_dim=_dim(m.get("embedding_dim"), f"{where}.embedding_dim"),
                            min_count=_int(m.get("min_count", 0), f"{where}.min_count", 0),
                            side=_side(m.get("side", "context"), f"{where}.side"),
                            list=_list_spec(m.get("list"), f"{where}.list"))


def _side(raw: Any, where: str) -> str:
    if raw not in SIDES:
        raise ContractError(f"{where}: {raw!r} is not one of {', '.join(SIDES)}")
    return str(raw)


def _list_spec(raw: Any, where: str) -> ListSpec | None:
    if raw is None:
        return None
    m = _mapping(raw, where, _LIST_KEYS, required={"delimiter"})
    delimiter = _str(m["delimiter"], f"{where}.delimiter")
    if len(delimiter) != 1:
        raise ContractError(f"{where}.delimiter: must be one character, got {delimiter!r}")
    pooling = m.get("pooling", "sum")
    if pooling not in POOLINGS:
        raise ContractError(f"{where}.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    return ListSpec(delimiter=delimiter, pooling=pooling,
                    max_length=_int(m.get("max_length", 32), f"{where}.max_length", 1, 4096))


# --- small validators; every message starts with the key -------------------------------------

def _checked(check: Any, raw: Any, where: str, *args: Any, **kw: Any) -> Any:
    try:
        return check(raw, where, *args, **kw)
    except ContractError:
        raise
    except C.ConfigError as e:
        raise ContractError(str(e)) from None


def _mapping(raw: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    return _checked(C.mapping, raw, "" if where == "<top level>" else where, allowed, required)


def _names(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list):
        raise ContractError(f"{where}: expected a list of names")
    for n in raw:
        if not isinstance(n, str) or not _NAME_RE.match(n):
            raise ContractError(f"{where}: {n!r} is not a valid column name")
    return list(raw)


def _str(raw: Any, where: str) -> str:
    return _checked(C.string, raw, where)


def _bool(raw: Any, where: str) -> bool:
    return _checked(C.boolean, raw, where)


def _int(raw: Any, where: str, lo: int, hi: int | None = None) -> int:
    return _checked(C.integer, raw, where, lo, hi)


def _float(raw: Any, where: str, lo: float, hi: float, low_open: bool = False) -> float:
    return _checked(C.number, raw, where, lo, hi, low_open)


def _dim(raw: Any, where: str) -> int:
    d = _int(raw, where, 4, 4096)
    if d % 4:
        # FBGEMM's fused embedding kernels need every table's dim (per shard) divisible by 4.
        raise ContractError(f"{where}: {d} is not a multiple of 4 (FBGEMM's fused tables require it)")
    return d


# --- overrides -------------------------------------------------------------------------------

def _to_raw(c: FeatureContract) -> dict[str, Any]:
    """The contract back in YAML form (defaults expanded per field), so it can be re-parsed."""
    def fields_of(kind: str) -> dict[str, dict[str, Any]]:
        out = {}
        for f in c.fields:
            if f.kind == kind:
                d = {x.name: getattr(f, x.name) for x in dc_fields(f) if x.init and x.name != "name"}
                if d.get("list") is None:
                    d.pop("list", None)
                else:
                    d["list"] = asdict(d["list"])
                out[f.name] = d
        return out

    src = asdict(c.source)
    src["columns"] = list(src["columns"])
    src["ignore"] = list(src["ignore"])
    src = {k: v for k, v in src.items() if v is not None}
    return {"version": CONTRACT_VERSION, "name": c.name, "source": src, "label": c.label,
            "continuous": {"fields": fields_of("continuous")}, "categorical": {"fields": fields_of("categorical")},
            "sampling": asdict(c.sampling), "splits": asdict(c.splits), "output": asdict(c.output),
            "quality": asdict(c.quality), **({"recall": asdict(c.recall)} if c.recall else {})}


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, p in enumerate(parts):
        if not isinstance(node, dict) or p not in node:
            raise ContractError(f"{'.'.join(parts[:i + 1])}: unknown key in override {key!r}")
        if i == len(parts) - 1:
            node[p] = value
        else:
            node = node[p]
