"""Raw rows -> ids in plain Python and numpy: the featurize job's parse and id rules, for serving.

The Spark job (pipeline.spark) parses a log line with Spark's CSV reader and computes ids with JVM
expressions; :class:`RowFeaturizer` gives the same ids for rows given as values (a dict per row, as an
online request holds them) without Spark, and :func:`split_line` turns a raw log line into such a row.
What "the same" means, rule by rule (tests/test_serving.py checks it against the Spark job):

- empty or absent = missing (id 0), as the CSV reader's ``nullValue`` is "";
- a continuous value is text that Java's ``Double.parseDouble`` reads (what Spark's CSV parser calls:
  surrounding characters <= U+0020 trimmed, an optional f/F/d/D suffix, hexadecimal floats) or a Python
  number; anything else, and NaN or an infinity, is a line the job rejects (``non_numeric``), so here a
  :class:`ValueError` that names the field;
- a categorical value is text taken as it is (no trimming), hashed with its field's name
  (pipeline.ids); text with a NUL or U+FFFD is a line the job rejects (``binary``): a ValueError;
- rare ids (fields with ``min_count``) become 1 when the featurized data's vocabulary does not hold them;
- a list-valued categorical field (the contract's ``list``, docs/recall.md): the text is split at the
  list's delimiter, each element trimmed as Java's ``String.trim()`` does, empty elements dropped, the
  first ``max_length`` kept, each hashed as a single value of the field (and the rare rule applied to
  each id); an empty or missing list is the one id 0. A NUL or U+FFFD anywhere rejects the line.

    >>> f = RowFeaturizer(contract, boundaries={}, vocabulary={})
    >>> f.ids([{"I1": "5", "C1": "68fd1e64"}])[0, :2]        # fields in contract order
    array([4, 0])
    >>> f.ids_jagged([{"item_genres": " Drama|| Comedy"}, {}])["item_genres"]   # a list field (conf/recall.yaml)
    (array([id("Drama"), id("Comedy"), 0]), array([2, 1]))

No pyspark and no torch import (numpy, xxhash and pyyaml only).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.contract import MISSING_ID, RARE_ID, CategoricalField, ContinuousField, FeatureContract
from pipeline.ids import categorical_id, log_square_id, quantile_id

# java.lang.Double.parseDouble's grammar (FloatingDecimal.readJavaFormatString), after String.trim():
# a sign, then NaN / Infinity, a decimal number or a hexadecimal one (its binary exponent required),
# then an optional type suffix; ASCII digits only. Python's float() differs: it takes "inf", "1_000" and
# other scripts' digits, and no suffix and no hex.
_JAVA_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fFdD]?")
_JAVA_HEX = re.compile(r"([+-]?)0[xX]((?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+)[fFdD]?")
_JAVA_SPECIAL = re.compile(r"[+-]?(?:NaN|Infinity)")
BINARY_MARKS = ("\x00", "\ufffd")       # what makes the featurize job reject a line as "binary"
CACHE_SIZE = 1 << 18                    # ids of texts seen, kept per field by RowFeaturizer


def java_trim(text: str) -> str:
    """Java's ``String.trim()``: strips leading and trailing characters <= U+0020 (not only spaces)."""
    i, j = 0, len(text)
    while i < j and text[i] <= " ":
        i += 1
    while j > i and text[j - 1] <= " ":
        j -= 1
    return text[i:j]


def parse_double(text: str) -> float | None:
    """A continuous field's text as Spark's CSV reader reads it: None when empty (missing), else the
    value ``Double.parseDouble`` gives; :class:`ValueError` when Java would not read it.

        "5" -> 5.0;  " 2.5d " -> 2.5;  "0x1p3" -> 8.0;  "" -> None;  "1_000" -> ValueError;  "NaN" -> nan
    """
    if text == "":
        return None
    t = java_trim(text)
    if _JAVA_DECIMAL.fullmatch(t):
        return float(t[:-1] if t[-1] in "fFdD" else t)
    m = _JAVA_HEX.fullmatch(t)
    if m:
        return float.fromhex(m.group(1) + "0x" + m.group(2))
    if _JAVA_SPECIAL.fullmatch(t):
        return float(t.replace("Infinity", "inf"))
    raise ValueError(f"{text!r} is not a number")


def continuous_value(name: str, raw: Any) -> float | None:
    """A continuous field's value from a request (text as in the logs, or a number): None = missing;
    :class:`ValueError` naming the field for what the featurize job would reject."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise ValueError(f"{name}: {raw!r} is a boolean, not a number")
    v: float | None
    if isinstance(raw, (int, float)):
        v = float(raw)
    elif isinstance(raw, str):
        try:
            v = parse_double(raw)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (the featurize job rejects such a line: non_numeric)") from None
        if v is None:
            return None
    else:
        raise ValueError(f"{name}: a {type(raw).__name__} is not a number")
    if not math.isfinite(v):
        raise ValueError(f"{name}: {raw!r} is not finite (the featurize job rejects such a line: non_numeric)")
    return v


def categorical_value(name: str, raw: Any) -> str | None:
    """A categorical field's value from a request: text as it is (an int is written in decimal, as the
    logs would hold it); None or "" = missing; :class:`ValueError` naming the field otherwise."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError(f"{name}: a {type(raw).__name__} is not a categorical value (give the text of the logs)")
    text = raw if isinstance(raw, str) else str(raw)
    if any(m in text for m in BINARY_MARKS):
        raise ValueError(f"{name}: holds a NUL or U+FFFD (the featurize job rejects such a line: binary)")
    return text or None


def list_elements(f: CategoricalField, raw: Any) -> list[str]:
    """A list-valued field's elements from a request: the column's text (or a list of values, read as
    their text joined by the delimiter), split, each element Java-trimmed, empties dropped, the first
    ``max_length`` kept; :class:`ValueError` naming the field for what the featurize job would reject.

        delimiter "|", max_length 2: " Drama||Comedy |War" -> ["Drama", "Comedy"];  "" -> [];  None -> []
    """
    spec = f.list
    if spec is None:
        raise ValueError(f"{f.name}: not a list-valued field")
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        text = spec.delimiter.join(categorical_value(f.name, v) or "" for v in raw)
    else:
        text = categorical_value(f.name, raw) or ""
    elements = (java_trim(e) for e in text.split(spec.delimiter))
    return [e for e in elements if e][:spec.max_length]


def list_ids(f: CategoricalField, raw: Any) -> list[int]:
    """A list-valued field's ids (before the rare-id rule): each element hashed as a single value of the
    field; ``[0]`` (missing) when no element is left."""
    return [categorical_id(f.name, e, f.hash_buckets) for e in list_elements(f, raw)] or [MISSING_ID]


class RowFeaturizer:
    """Rows of raw values -> ids ``int64 [B, F]`` (F = the contract's fields, in contract order), by the
    featurize job's rules (see the module docstring); with list-valued fields, :meth:`ids_jagged`.

    ``boundaries``: the fitted boundaries of the quantile fields (the manifest's); ``vocabulary``: per
    field with ``min_count`` > 0, the ids kept (sorted or not); ids outside it become :data:`RARE_ID`.
    """

    def __init__(self, contract: FeatureContract, boundaries: Mapping[str, Sequence[float]],
                 vocabulary: Mapping[str, np.ndarray]):
        self.contract = contract
        self.fields = contract.fields
        self.boundaries = {k: sorted(set(float(b) for b in v)) for k, v in boundaries.items()}
        for cont in contract.continuous:
            if cont.bucketing == "quantile" and cont.name not in self.boundaries:
                raise ValueError(f"{cont.name}: quantile bucketing but no fitted boundaries")
        self.kept: dict[str, np.ndarray] = {}
        for cat in contract.categorical:
            if cat.min_count > 0:
                if cat.name not in vocabulary:
                    raise ValueError(f"{cat.name}: min_count {cat.min_count} but no vocabulary")
                mask = np.zeros(cat.hash_buckets, dtype=np.bool_)
                mask[np.asarray(vocabulary[cat.name], dtype=np.int64)] = True
                mask[MISSING_ID] = True                    # missing stays missing (pipeline.spark.transforms.map_rare)
                self.kept[cat.name] = mask
        self._caches: list[dict[str, Any]] = [{} for _ in self.fields]   # text -> id (a tuple of ids for a list)

    def _id(self, i: int, f: CategoricalField | ContinuousField, raw: Any) -> int:
        try:
            return self.field_id(f, raw)
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None

    def field_id(self, f: CategoricalField | ContinuousField, raw: Any) -> int:
        """One value's id (before the rare-id rule)."""
        if isinstance(f, CategoricalField):
            return categorical_id(f.name, categorical_value(f.name, raw), f.hash_buckets)
        v = continuous_value(f.name, raw)
        if f.bucketing == "log_square":
            return log_square_id(v, f.num_buckets)
        return quantile_id(v, self.boundaries[f.name])

    def ids(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``int64 [len(rows), F]``; :class:`ValueError` naming the row and field of a value the featurize
        job would reject. A contract with list-valued fields is refused (use :meth:`ids_jagged`).

        A text value's id depends on the text alone, so each field keeps the ids of the texts it has
        seen (up to :data:`CACHE_SIZE` a field): click logs repeat their values, and a dict lookup is
        a tenth of a hash and a parse. Errors are never cached; numbers are not cached."""
        lists = [f.name for f in self.contract.categorical if f.list is not None]
        if lists:
            raise ValueError(f"contract {self.contract.name}: list-valued field(s) {', '.join(lists)} have no "
                             "[B, F] ids; use ids_jagged(rows)")
        table = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"row {i}: expected a mapping of field -> value, got a {type(row).__name__}")
            get = row.get
            ids = []
            for f, cache in zip(self.fields, self._caches):
                raw = get(f.name)
                if type(raw) is str:
                    v = cache.get(raw)
                    if v is None:
                        v = self._id(i, f, raw)
                        if len(cache) < CACHE_SIZE:
                            cache[raw] = v
                else:
                    v = self._id(i, f, raw)
                ids.append(v)
            table.append(ids)
        out = np.array(table, dtype=np.int64).reshape(len(rows), len(self.fields))
        for j, f in enumerate(self.fields):
            mask = self.kept.get(f.name)
            if mask is not None:
                col = out[:, j]
                out[:, j] = np.where(mask[col], col, RARE_ID)
        return out


    def ids_jagged(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per field (contract order) ``(values int64 [N], lengths int64 [B])``: the ids of every row, row
        after row, and how many each row has. A single-valued field has one id a row (lengths all 1), a
        list-valued field 1 .. max_length (an empty list is the one id 0): the layout of a TorchRec
        KeyedJaggedTensor. The same rules and errors as :meth:`ids`; text values are cached alike.

            list field, delimiter "|": rows [{"g": "a|b"}, {"g": ""}] -> {"g": ([id(a), id(b), 0], [2, 1])}
        """
        per_field: list[list[Any]] = [[] for _ in self.fields]
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"row {i}: expected a mapping of field -> value, got a {type(row).__name__}")
            for f, cache, out in zip(self.fields, self._caches, per_field):
                raw = row.get(f.name)
                if isinstance(f, CategoricalField) and f.list is not None:
                    v: Any = cache.get(raw) if type(raw) is str else None
                    if v is None:
                        try:
                            v = tuple(list_ids(f, raw))
                        except ValueError as e:
                            raise ValueError(f"row {i}: {e}") from None
                        if type(raw) is str and len(cache) < CACHE_SIZE:
                            cache[raw] = v
                elif type(raw) is str:
                    v = cache.get(raw)
                    if v is None:
                        v = self._id(i, f, raw)
                        if len(cache) < CACHE_SIZE:
                            cache[raw] = v
                else:
                    v = self._id(i, f, raw)
                out.append(v)
        result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for f, got in zip(self.fields, per_field):
            if isinstance(f, CategoricalField) and f.list is not None:
                lengths = np.fromiter((len(t) for t in got), dtype=np.int64, count=len(got))
                values = np.fromiter((x for t in got for x in t), dtype=np.int64, count=int(lengths.sum()))
            else:
                values = np.array(got, dtype=np.int64).reshape(len(got))
                lengths = np.ones(len(got), dtype=np.int64)
            mask = self.kept.get(f.name)
            if mask is not None:
                values = np.where(mask[values], values, RARE_ID)
            result[f.name] = (values, lengths)
        return result


def split_line(line: str, contract: FeatureContract) -> dict[str, str]:
    """A raw log line (no line terminator) -> column -> text, as the contract's ``source`` lays it out;
    :class:`ValueError` when the column count differs (the featurize job's ``column_count``).

        "1\\t5\\t\\t68fd1e64..." (criteo) -> {"label": "1", "I1": "5", "I2": "", ..., "C1": "68fd1e64", ...}
    """
    cols = contract.source.columns
    parts = line.split(contract.source.delimiter)
    if len(parts) != len(cols):
        raise ValueError(f"{len(parts)} columns, the contract's source.columns has {len(cols)}")
    return dict(zip(cols, parts))
