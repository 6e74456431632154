"""Spark transforms of the featurize job: pure ``DataFrame -> DataFrame`` functions.

Everything here is a JVM expression (no Python UDFs), so executors need none of this project's code
and the plan runs at Spark's own speed. The id layout is the contract's (see pipeline.contract):

    categorical: 0 missing, 1 rare, 2 + pmod(xxhash64(field name, value), hash_buckets - 2)
    continuous:  0 missing, 1 negative, 2 + bucket
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipeline.contract import (MISSING_ID, NEGATIVE_ID, RARE_ID, RESERVED_IDS, CategoricalField, ContinuousField,
                               FeatureContract)

# Reasons a line is rejected; each is counted in the manifest and written to DIR/rejects.
REASONS = ("binary", "column_count", "bad_label", "non_numeric", "bad_day")
# Binary garbage shows as NUL bytes or as U+FFFD, what Spark decodes invalid UTF-8 to. (Two substring
# searches: a regular expression over every line costs more than the rest of the parse.)
_BINARY_MARKS = ("\x00", "\ufffd")


def parse_lines(lines: DataFrame, contract: FeatureContract, seed: int) -> DataFrame:
    """Raw text lines -> one row per non-blank line with typed raw fields and a reject reason.

    Input columns: ``value`` (the line) and ``day`` (int, or null when the day comes from a column).
    Output: ``day``, ``label`` (int), each continuous field as double, each categorical field as
    string (null = missing), ``_h`` (a long hash of the line and seed: deterministic sampling and
    shuffling), ``_reason`` (null for good rows) and ``_line`` (the raw line, kept for rejects only).

        "1\\t5\\t\\ta1" -> label=1, I1=5.0, I2=null, C1="a1", _reason=null
        "x\\t5\\t\\ta1" -> _reason="bad_label"
    """
    src = contract.source
    ncols = len(src.columns)
    lines = lines.filter(F.trim(F.col("value")) != "")
    if src.header:
        lines = lines.filter(F.col("value") != src.delimiter.join(src.columns))
    parts = F.split(F.col("value"), _regex_quote(src.delimiter), -1)
    cols: dict[str, Column] = {}
    for i, name in enumerate(src.columns):
        v = F.try_element_at(parts, F.lit(i + 1))
        cols[name] = F.when(v == "", F.lit(None)).otherwise(v)
    df = lines.select(F.col("day"), F.col("value").alias("_line"), F.size(parts).alias("_n"),
                      *[c.alias(f"_raw_{n}") for n, c in cols.items()])

    # Each step is its own projection so that Spark computes the split, the casts and the reason once
    # per row (it does not collapse projections that would repeat a non-trivial expression).
    label_raw = F.col(f"_raw_{contract.label}")
    if src.day_from == "column":
        ts = F.expr(f"try_to_timestamp(`_raw_{src.day_column}`, '{src.day_format}')")
        day = F.datediff(F.to_date(ts), F.lit("1970-01-01").cast("date"))
    else:
        day = F.col("day")
    typed = df.select(day.cast("int").alias("day"), "_line", "_n", label_raw.alias("_label"),
                      *[F.expr(f"try_cast(`_raw_{f.name}` as double)").alias(f.name) for f in contract.continuous],
                      *[F.col(f"_raw_{f.name}").alias(f"_raw_{f.name}") for f in contract.continuous],
                      *[F.col(f"_raw_{f.name}").alias(f.name) for f in contract.categorical])
    bad_numeric = F.lit(False)
    for f in contract.continuous:
        num = F.col(f.name)
        finite = num.isNotNull() & ~F.isnan(num) & (F.abs(num) != float("inf"))
        bad_numeric = bad_numeric | (F.col(f"_raw_{f.name}").isNotNull() & ~finite)
    binary = F.lit(False)
    for mark in _BINARY_MARKS:
        binary = binary | F.col("_line").contains(mark)
    reason = (F.when(binary, "binary")
              .when(F.col("_n") != ncols, "column_count")
              .when(~F.col("_label").isin("0", "1") | F.col("_label").isNull(), "bad_label")
              .when(bad_numeric, "non_numeric")
              .when(F.col("day").isNull(), "bad_day"))
    checked = typed.select("*", reason.alias("_reason"))
    return checked.select(
        "day", F.expr("try_cast(_label as int)").alias("label"),
        *[F.col(f.name) for f in contract.fields],
        F.xxhash64(F.col("_line"), F.lit(seed)).alias("_h"), "_reason",
        F.when(F.col("_reason").isNotNull(), F.col("_line")).alias("_line"))


def _regex_quote(ch: str) -> str:
    return "\\" + ch if ch in r".^$*+?()[]{}|\\" else ch


def hash_categorical(col: Column, f: CategoricalField) -> Column:
    """A categorical value -> its id: null -> 0, else 2 + pmod(xxhash64(name, value), buckets - 2).

        C1="68fd1e64", hash_buckets=1000 -> 2 + pmod(xxhash64("C1", "68fd1e64"), 998)

    The field name is part of the hash, so equal strings in two fields get unrelated ids.
    """
    h = F.pmod(F.xxhash64(F.lit(f.name), col), F.lit(f.hash_buckets - RESERVED_IDS).cast("long"))
    return F.when(col.isNull(), F.lit(MISSING_ID)).otherwise(h + RESERVED_IDS).cast("int")


def log_square_bucket(col: Column, f: ContinuousField) -> Column:
    """The Criteo winners' rule: v <= 2 -> floor(v), else floor(ln(v)^2); capped at num_buckets - 1.

        null -> 0, -3 -> 1, 0 -> 2, 2 -> 4, 5 -> 2 + floor(ln(5)^2) = 4, 1e9 -> 2 + 63 (cap, 64 buckets)
    """
    b = F.when(col <= 2, F.floor(col)).otherwise(F.floor(F.pow(F.log(col), 2)))
    b = F.least(b, F.lit(f.num_buckets - 1))
    return _reserve(col, b + RESERVED_IDS)


def quantile_bucket(col: Column, f: ContinuousField, boundaries: Sequence[float]) -> Column:
    """Bucket by fitted boundaries b_1 < ... < b_k: the bucket is #{i: b_i <= v} (a binary search in
    nested CASE WHENs, so the plan stays in the JVM).

        boundaries [1, 10], v = 0 -> 2, v = 1 -> 3, v = 50 -> 4; null -> 0; -1 -> 1
    """
    bs = sorted(set(float(b) for b in boundaries))
    if len(bs) > f.num_buckets - 1:
        raise ValueError(f"{f.name}: {len(bs)} boundaries for {f.num_buckets} buckets")

    def search(lo: int, hi: int) -> Column:   # count of boundaries <= v, knowing it is in [lo, hi]
        if lo == hi:
            return F.lit(lo)
        mid = (lo + hi + 1) // 2               # is b_mid (1-based) <= v ?
        return F.when(col >= F.lit(bs[mid - 1]), search(mid, hi)).otherwise(search(lo, mid - 1))

    return _reserve(col, search(0, len(bs)) + RESERVED_IDS)


def _reserve(col: Column, bucket: Column) -> Column:
    return (F.when(col.isNull(), F.lit(MISSING_ID)).when(col < 0, F.lit(NEGATIVE_ID))
            .otherwise(bucket).cast("int"))


def quantile_probabilities(f: ContinuousField) -> list[float]:
    """The probabilities whose quantiles become the boundaries: k / num_buckets, k = 1..num_buckets-1."""
    return [k / f.num_buckets for k in range(1, f.num_buckets)]


def to_ids(parsed: DataFrame, contract: FeatureContract, boundaries: Mapping[str, Sequence[float]],
           keep: Sequence[str] = ()) -> DataFrame:
    """Parsed rows -> ``day``, ``label`` and one int id column per field (in contract order), ``_h``
    and the ``keep`` columns. Rare values are mapped afterwards by :func:`map_rare`."""
    out = [F.col("day"), F.col("label")]
    for f in contract.fields:
        c = F.col(f.name)
        if isinstance(f, CategoricalField):
            out.append(hash_categorical(c, f).alias(f.name))
        elif f.bucketing == "log_square":
            out.append(log_square_bucket(c, f).alias(f.name))
        else:
            if f.name not in boundaries:
                raise ValueError(f"{f.name}: quantile bucketing but no fitted boundaries")
            out.append(quantile_bucket(c, f, boundaries[f.name]).alias(f.name))
    return parsed.select(*out, F.col("_h"), *keep)


def count_ids(ids: DataFrame, fields: Sequence[CategoricalField]) -> DataFrame:
    """Per (field, id): how many rows carry it. Input: the train rows' ids. Output: field, id, count.

        C1 ids [5, 5, 7] -> (C1, 5, 2), (C1, 7, 1)
    """
    stacked = ids.select(F.explode(F.array(*[
        F.struct(F.lit(f.name).alias("field"), F.col(f.name).alias("id")) for f in fields])).alias("s"))
    return stacked.groupBy("s.field", "s.id").count()


def map_rare(ids: DataFrame, vocab: DataFrame, fields: Sequence[CategoricalField]) -> DataFrame:
    """Ids not in the frequent-id vocabulary (field, id) -> 1 (rare); 0 (missing) stays 0.

        vocab {(C1, 5)}; C1 ids [5, 7, 0] -> [5, 1, 0]
    """
    for f in fields:
        keep = vocab.filter(F.col("field") == f.name).select(F.col("id").alias(f"_v_{f.name}"))
        ids = ids.join(keep, ids[f.name] == keep[f"_v_{f.name}"], "left")
        ids = ids.withColumn(f.name, F.when(F.col(f.name) == MISSING_ID, F.lit(MISSING_ID))
                             .when(F.col(f"_v_{f.name}").isNull(), F.lit(RARE_ID))
                             .otherwise(F.col(f.name)).cast("int")).drop(f"_v_{f.name}")
    return ids


def sample_negatives(ids: DataFrame, rate: float, seed: int) -> DataFrame:
    """Keep every positive and a fraction ``rate`` of negatives, decided by the row's own hash (so the
    same rows are kept whatever the partitioning).

        rate=1.0 -> unchanged; rate=0.25 -> positives + about a quarter of negatives
    """
    if rate >= 1.0:
        return ids
    u = F.pmod(F.xxhash64(F.col("_h"), F.lit(seed)), F.lit(1 << 30)) / float(1 << 30)
    return ids.filter((F.col("label") == 1) | (u < rate))


def row_group_plan(rows: int, rows_per_row_group: int, min_row_groups: int) -> tuple[int, int]:
    """(files, rows per file) for a split: at least ``min_row_groups`` files when there are enough rows,
    none larger than ``rows_per_row_group``; each file is written as one row group.

        (1_000_000, 65536, 8) -> (16, 62500);  (100, 65536, 8) -> (8, 13);  (3, 65536, 8) -> (3, 1)
    """
    if rows <= 0:
        return 0, 0
    per = min(rows_per_row_group, max(1, math.ceil(rows / min_row_groups)))
    files = math.ceil(rows / per)
    return files, math.ceil(rows / files)
