"""The featurized data's manifest: what the featurize job made, as one typed object.

The featurize job builds a :class:`Manifest` and writes it (``manifest.json`` beside ``_SUCCESS``); the
trainer, the evaluator, retraining and the benchmarks read it back through :func:`read` /
:func:`open_featurized` and use its attributes. This is the only module that knows the JSON layout.
No pyspark and no torch import.

    >>> m = open_featurized("data/featurized")          # refuses an incomplete output or unknown version
    >>> m.splits["train"].rows, m.table_sizes()["C1"], m.sampling.neg_sample_rate
    (2495165, 20000, 0.5)
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline import layout
from pipeline.contract import ContractError, FeatureContract, parse_contract

# 2: typed (pipeline.manifest); the label is named as the output column and the source column.
MANIFEST_VERSION = 2
SPLITS = ("train", "valid", "test")
LABEL_COLUMN = "label"          # the label's column in the featurized Parquet, whatever the source calls it
DAY_COLUMN = "day"
CORRECTION = "p = q / (q + (1 - q) / neg_sample_rate)"
# A recall contract's sampling (RecallInfo): negative sampling does not apply, so there is nothing to undo.
RECALL_SAMPLING = ("none: a recall contract keeps only the positives (sampling.neg_sample_rate does not apply); "
                   "drawn negatives carry sample_prob")


class ManifestError(ValueError):
    """A featurized output that cannot be used: incomplete, unreadable, or of an unknown version."""


@dataclass(frozen=True)
class FieldInfo:
    """One feature column of the output: its table size and embedding dim (from the contract)."""

    name: str
    kind: str                           # categorical | continuous
    num_embeddings: int
    embedding_dim: int
    bucketing: str | None = None        # continuous: log_square | quantile
    min_count: int | None = None        # categorical
    side: str = "context"               # user | item | context (recall's towers; context is the user's)
    pooling: str | None = None          # list-valued categorical: sum | mean (the column is a list of ids)
    max_length: int | None = None       # list-valued: at most this many ids a row

    @property
    def is_list(self) -> bool:
        return self.pooling is not None


@dataclass(frozen=True)
class Vocabulary:
    """The frequent ids kept when a field has ``min_count`` > 0 (others map to the rare id)."""

    path: str                           # relative to the output folder
    ids_kept: Mapping[str, int]
    digest: str


@dataclass(frozen=True)
class SamplingInfo:
    neg_sample_rate: float
    seed: int
    correction: str = CORRECTION


@dataclass(frozen=True)
class Counts:
    rows: int
    positives: int


@dataclass(frozen=True)
class SplitInfo:
    days: tuple[int, ...]
    before_sampling: Counts
    rows: int
    positives: int
    files: int
    neg_sample_rate: float


@dataclass(frozen=True)
class Rejects:
    total: int
    by_reason: Mapping[str, int]
    path: str = layout.REJECTS              # written only when total > 0


@dataclass(frozen=True)
class InputInfo:
    path: str
    files: tuple[str, ...]
    days: tuple[int, ...]
    lines: int
    reused_from: str | None = None
    missing_days: tuple[int, ...] = ()  # days missing between the first and last, featurized with --allow-day-gaps


@dataclass(frozen=True)
class RecallInfo:
    """What a recall contract's featurize run adds (see docs/recall.md): the item catalogue and each
    user's seen items, and the dense indexes that tell raw keys apart (hash ids may collide).

    Every split holds only the positives (label 1) of its days, with the int32 columns ``user_index``
    and ``item_index``; with ``random_negatives`` > 0, train also holds that many label-0 rows per
    positive (the positive's user and context fields, a uniformly drawn catalogue item's item-side
    fields), and every split a double column ``sample_prob``: 1 / items for a drawn row (the
    probability of its item in one draw), 1.0 for a positive (not drawn). Negative sampling
    (``sampling.neg_sample_rate``) does not apply: no negative of the logs is kept.

    ``catalogue/``: :meth:`catalogue_columns`, one row per item in ``item_index`` order;
    ``seen/``: user_index, item_index, first_day (each distinct clicked pair, over all days);
    ``users/``: user_index, user_key."""

    user_key: str                       # the contract's recall.user_key field
    item_key: str
    items: int                          # catalogue rows: distinct raw item keys over all days
    users: int                          # distinct raw user keys over all days
    train_positives: int                # the positives the item frequencies count (train days)
    seen_rows: int = 0                  # rows of seen/: distinct (user, item) pairs clicked
    item_fields: tuple[str, ...] = ()   # the item side's fields (contract order): the catalogue's id columns
    heldout_split: str = "test"         # the held-out split (the last day)
    random_negatives: int = 0           # per train positive, items drawn uniformly from the catalogue
    sample_prob: str | None = None      # the splits' sampling-probability column, when random_negatives > 0
    user_index: str = layout.USER_INDEX     # the splits' (and seen/'s, users/') dense user index column
    item_index: str = layout.ITEM_INDEX     # ... item index column (the catalogue's row)
    catalogue: str = layout.CATALOGUE   # OUTPUT/catalogue: one row per item
    seen: str = layout.SEEN             # OUTPUT/seen: (user_index, item_index, first_day)
    users_path: str = layout.USERS      # OUTPUT/users: user_index, the raw user key

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns every split has after the label, fields and day: the two indexes, sample_prob."""
        return (self.user_index, self.item_index, *((self.sample_prob,) if self.sample_prob else ()))

    @property
    def catalogue_columns(self) -> tuple[str, ...]:
        return (self.item_index, layout.ITEM_KEY, *self.item_fields, layout.TRAIN_COUNT, layout.LOG_Q)


@dataclass(frozen=True)
class Manifest:
    contract: FeatureContract
    contract_fingerprint: str
    feature_fingerprint: str            # contract + fitted boundaries + vocabulary: what an id means
    source_label: str                   # the contract's label column in the raw logs (e.g. "click")
    fields: tuple[FieldInfo, ...]
    boundaries: Mapping[str, tuple[float, ...]]
    vocab: Vocabulary | None
    sampling: SamplingInfo
    splits: Mapping[str, SplitInfo]
    rejects: Rejects
    input: InputInfo
    seconds: float
    seconds_by_step: Mapping[str, float]
    spark_version: str
    created: str
    label_column: str = LABEL_COLUMN
    day_column: str = DAY_COLUMN
    version: int = MANIFEST_VERSION
    recall: RecallInfo | None = None    # a recall contract's catalogue, seen items and indexes

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def columns(self) -> tuple[str, ...]:
        """The Parquet columns of every split, in order: int32, except a list-valued field's
        list<int32> (:attr:`FieldInfo.is_list`) and a recall output's ``sample_prob`` (double; see
        :class:`RecallInfo`)."""
        return (self.label_column, *self.field_names, self.day_column, *(self.recall.columns if self.recall else ()))

    def table_sizes(self) -> dict[str, int]:
        return {f.name: f.num_embeddings for f in self.fields}

    def rows(self, split: str) -> int:
        return self.splits[split].rows

    def summary_line(self) -> str:
        s = self.splits
        return ("featurize: " + ", ".join(f"{k} {v.before_sampling.rows}->{v.rows} rows" for k, v in s.items())
                + f", {self.rejects.total} rejected, {self.input.lines} lines in, {self.seconds} s")

    # -- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = encode_typed(self)
        d["contract"] = self.contract.to_raw()
        return {"manifest_version": d.pop("version"), **d}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "manifest") -> "Manifest":
        version = d.get("manifest_version") if isinstance(d, Mapping) else None
        if version != MANIFEST_VERSION:
            raise ManifestError(f"{where}: manifest_version {version!r} is not {MANIFEST_VERSION}, the version this "
                                "code reads; featurize the data again with this version of jobs/featurize.py")
        body = {k: v for k, v in d.items() if k != "manifest_version"}
        try:
            contract = parse_contract(body.pop("contract"))
            m = decode_typed(cls, {**body, "contract": None, "version": version}, where)
        except (KeyError, TypeError, ValueError, ContractError) as e:
            raise ManifestError(f"{where}: not a readable manifest: {e}") from None
        m = dataclasses.replace(m, contract=contract)
        if contract.fingerprint != m.contract_fingerprint:
            raise ManifestError(f"{where}: its contract's fingerprint {contract.fingerprint} is not the recorded "
                                f"{m.contract_fingerprint}; the file was edited")
        return m

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def loads(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{where}: not JSON: {e}") from None
        return cls.from_json(d, where)


def fields_of(contract: FeatureContract) -> tuple[FieldInfo, ...]:
    """The contract's fields as the manifest records them, in contract order."""
    def one(f: Any) -> FieldInfo:
        ls = getattr(f, "list", None)
        return FieldInfo(f.name, f.kind, f.num_embeddings, f.embedding_dim,
                         bucketing=getattr(f, "bucketing", None), min_count=getattr(f, "min_count", None),
                         side=f.side, pooling=ls.pooling if ls else None, max_length=ls.max_length if ls else None)
    return tuple(one(f) for f in contract.fields)


def write(folder: str | Path, m: Manifest) -> None:
    """Write ``folder/manifest.json`` (atomically: a temporary file renamed into place)."""
    p = Path(folder) / layout.MANIFEST
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(m.dumps())
    os.replace(tmp, p)


def read(folder: str | Path) -> Manifest:
    """``folder/manifest.json`` as a :class:`Manifest`; :class:`ManifestError` when missing or unreadable."""
    p = Path(folder) / layout.MANIFEST
    try:
        text = p.read_text()
    except OSError as e:
        raise ManifestError(f"{p}: cannot read it ({e.strerror})") from None
    return Manifest.loads(text, str(p))


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / layout.SUCCESS).exists() and (Path(folder) / layout.MANIFEST).exists()


def open_featurized(folder: str | Path) -> Manifest:
    """The manifest of a complete featurized output (``_SUCCESS`` present), else :class:`ManifestError`."""
    if not is_complete(folder):
        raise ManifestError(f"{folder}: not a complete featurized output (no {layout.SUCCESS} or {layout.MANIFEST}); "
                            "run jobs/featurize.py first")
    return read(folder)


# --- dataclass <-> JSON (also pipeline.artifact's) ------------------------------------------------

def encode_typed(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: encode_typed(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): encode_typed(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode_typed(v) for v in x]
    return x


def decode_typed(tp: Any, v: Any, where: str) -> Any:
    """JSON value ``v`` as type ``tp`` (the dataclasses above, tuples, mappings, unions with None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is FeatureContract:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return decode_typed(inner, v, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(v, Mapping):
            raise TypeError(f"{tp.__name__}: expected an object, got {v!r}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in v:
                kwargs[f.name] = decode_typed(hints[f.name], v[f.name], where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f"{tp.__name__}.{f.name}")
        return tp(**kwargs)
    if origin is tuple:
        return tuple(decode_typed(args[0], x, where) for x in v)
    if origin in (collections.abc.Mapping, dict) or tp is dict:
        kt, vt = args if args else (str, Any)
        return {k: decode_typed(vt, x, where) for k, x in v.items()}
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"expected a number, got {v!r}")
        return float(v)
    if tp in (int, str, bool):
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise TypeError(f"expected {tp.__name__}, got {v!r}")
        return v
    return v


__all__ = ["MANIFEST_VERSION", "SPLITS", "LABEL_COLUMN", "ManifestError", "FieldInfo", "Vocabulary",
           "SamplingInfo", "Counts", "SplitInfo", "Rejects", "InputInfo", "RecallInfo", "Manifest", "fields_of",
           "write", "read", "is_complete", "open_featurized"]
