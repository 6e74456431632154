"""Spark transforms of the featurize job: pure ``DataFrame -> DataFrame`` functions.

Everything here is a JVM expression (no Python UDFs), so executors need none of this project's code
and the plan runs at Spark's own speed. The id layout is the contract's (see pipeline.contract):

    categorical: 0 missing, 1 rare, 2 + pmod(xxhash64(field name, value), hash_buckets - 2)
    continuous:  0 missing, 1 negative, 2 + bucket
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from pipeline.contract import (MISSING_ID, NEGATIVE_ID, RARE_ID, RESERVED_IDS, CategoricalField, ContinuousField,
                               FeatureContract)

# Reasons a line is rejected; each is counted in the manifest and written to DIR/rejects.
REASONS = ("binary", "column_count", "bad_label", "non_numeric", "bad_day")
# Binary garbage shows as NUL bytes or as U+FFFD, what Spark decodes invalid UTF-8 to. (Two substring
# searches: a regular expression over every line costs more than the rest of the parse.)
_BINARY_MARKS = ("char(0)", "'\\uFFFD'")      # as Spark SQL
CORRUPT = "_corrupt"   # Spark's column for a line that does not fit the schema
# Lines Spark's CSV reader skips: Java's String.trim() leaves nothing, i.e. every character is at most
# U+0020 (tabs, form feeds, \x1a, NULs, not only spaces). The quarantine skips the same lines.
BLANK_LINE = "^[\\x00-\\x20]*$"

# The per-column expressions below are Spark SQL text, projected together (selectExpr) or made
# a Column with F.expr: every call of the Column API is a round trip to the JVM, and the
# wide projections of a run made about 14,000 of them (about 2 s of a 1M-row run).


def q(name: str) -> str:
    """A column name as a Spark SQL identifier: C1 -> `C1`."""
    return "`" + name.replace("`", "``") + "`"


def _lit(text: str) -> str:
    """A Python string as a Spark SQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _num(x: float) -> str:
    """A float as an exact Spark SQL double literal (Python's repr round-trips; D makes it a double)."""
    return f"{float(x)!r}D"


def csv_schema(contract: FeatureContract) -> StructType:
    """The typed schema of one log line: the label as int, continuous fields as double, everything
    else as string, and ``_corrupt`` (Spark's column for lines that do not fit it)."""
    cont = {f.name for f in contract.continuous}
    types = {n: (IntegerType() if n == contract.label else DoubleType() if n in cont else StringType())
             for n in contract.source.columns}
    return StructType([StructField(n, t) for n, t in types.items()] + [StructField(CORRUPT, StringType())])


def csv_options(contract: FeatureContract) -> dict[str, str]:
    """Spark CSV options for the contract's lines: its delimiter, no quoting or escaping (click logs are
    plain delimited text), empty = missing, malformed lines kept with their text in ``_corrupt``."""
    return {"sep": contract.source.delimiter, "quote": "\u0000", "escape": "\u0000", "header": "false",
            "mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT, "enforceSchema": "true"}


def read_records(spark: SparkSession, inputs: Sequence[tuple[int | None, str]], contract: FeatureContract) -> DataFrame:
    """The input files through Spark's CSV reader with :func:`csv_schema`: typed columns, ``day`` (from
    the file name; null when it comes from a column) and ``_corrupt``. This is the job's fast path: the
    native parser splits and converts each line once. Blank lines are skipped; a header line (when the
    contract has one) is dropped in :func:`check_records`."""
    reader = spark.read.schema(csv_schema(contract)).options(**csv_options(contract))
    return union_days(inputs, reader.csv)


def union_days(inputs: Sequence[tuple[int | None, str]], read: Callable[[str], DataFrame]) -> DataFrame:
    """``read(path)`` of every (day, path) input with a ``day`` column (null when days come from a
    column), as one DataFrame."""
    frames = [read(path).withColumn("day", F.lit(day).cast("int")) for day, path in inputs]
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    return df


def check_records(records: DataFrame, contract: FeatureContract, keep: Sequence[str] = ()) -> DataFrame:
    """Typed records -> ``day``, ``label``, the contract's fields, ``_bad`` (true for a malformed line)
    and ``keep``.

    A line is malformed when Spark's parser could not fit it to the schema (wrong column count,
    a non-numeric value in a continuous field), its label is not 0 or 1, a continuous value is not
    finite, a string holds binary garbage (NUL, or U+FFFD: what invalid UTF-8 decodes to), or its day
    cannot be read. The same rule runs in the fast path and in :func:`parse_lines`, so both agree on
    which lines are good. ``keep``: more columns, as Spark SQL (a name, or ``expr AS name``).
    """
    src = contract.source
    if src.header:   # the header does not fit the schema (its label is a name): drop it wherever it is
        header = src.delimiter.join(src.columns)
        records = records.filter(F.col(CORRUPT).isNull() | (F.col(CORRUPT) != header))
    if src.day_from == "column":
        assert src.day_column and src.day_format      # load_contract requires both with day_from: column
        day = (f"CAST(datediff(to_date(try_to_timestamp({q(src.day_column)}, {_lit(src.day_format)})), "
               "DATE'1970-01-01') AS INT)")
    else:
        day = "`day`"
    label = q(contract.label)
    cont = {f.name for f in contract.continuous}
    # every string column, the ignored ones too, so both paths parse them all; joined once and searched
    # once per mark (52 searches of short values: 16.4 s against 13.9 s for 2M rows, parse to ids)
    text = "concat_ws(''" + "".join(f", {q(n)}" for n in src.columns if n != contract.label and n not in cont) + ")"
    bad = " OR ".join([f"{q(CORRUPT)} IS NOT NULL", f"{label} IS NULL", f"NOT ({label} IN (0, 1))",
                       non_finite_sql(contract), *[f"contains({text}, {m})" for m in _BINARY_MARKS],
                       f"({day}) IS NULL"])
    return records.selectExpr(f"{day} AS `day`", f"{label} AS `label`", *[q(f.name) for f in contract.fields],
                              f"{bad} AS `_bad`", *keep)


def non_finite_sql(contract: FeatureContract) -> str:
    """Spark SQL: true when a continuous field holds NaN or an infinity."""
    parts = [f"coalesce(isnan({q(f.name)}) OR abs({q(f.name)}) = CAST('Infinity' AS DOUBLE), false)"
             for f in contract.continuous]
    return "(" + (" OR ".join(parts) or "false") + ")"


def parse_lines(lines: DataFrame, contract: FeatureContract) -> DataFrame:
    """Raw text lines -> the rows of :func:`check_records` with a reject reason and the line itself.

    The slow path, for the lines a run has to quarantine (the job reads the text again only when the
    fast path counted malformed lines) and for tests. It parses with the same CSV parser, schema and
    options as :func:`read_records` (``from_csv``), applies the same :func:`check_records` rule, and
    says why: ``binary``, ``column_count``, ``bad_label``, ``non_numeric``, ``bad_day``.

    Input columns: ``value`` (the line) and ``day`` (int, or null when the day comes from a column).
    Output: ``day``, ``label``, each field, ``_reason`` (null for good rows) and ``_line``
    (the raw line, for rejects only).

        "1\\t5\\t\\ta1" -> label=1, I1=5.0, I2=null, C1="a1", _reason=null
        "x\\t5\\t\\ta1" -> _reason="bad_label"
    """
    src = contract.source
    schema = csv_schema(contract)
    lines = lines.filter(~F.col("value").rlike(BLANK_LINE))
    parsed = lines.select("day", F.col("value").alias("_line"),
                          F.from_csv(F.col("value"), schema.simpleString(), csv_options(contract)).alias("_p"))
    records = parsed.select("day", "_line", *[F.col("_p")[n].alias(n) for n in schema.names])
    checked = check_records(records, contract, keep=["_line", CORRUPT, f"{non_finite_sql(contract)} AS `_nf`"])
    parts = F.split(F.col("_line"), _regex_quote(src.delimiter), -1)
    label_raw = F.try_element_at(parts, F.lit(src.columns.index(contract.label) + 1))
    binary = F.expr(" OR ".join(f"contains(`_line`, {m})" for m in _BINARY_MARKS))
    reason = (F.when(~F.col("_bad"), F.lit(None).cast("string"))
              .when(binary, "binary")
              .when(F.size(parts) != len(src.columns), "column_count")
              .when(~label_raw.isin("0", "1") | label_raw.isNull(), "bad_label")
              .when(F.col(CORRUPT).isNotNull() | F.col("_nf"), "non_numeric")
              .otherwise("bad_day"))
    return checked.select("day", "label", *[F.col(f.name) for f in contract.fields], reason.alias("_reason"),
                          F.when(F.col("_bad"), F.col("_line")).alias("_line"))


def _regex_quote(ch: str) -> str:
    return "\\" + ch if ch in r".^$*+?()[]{}|\\" else ch


def hash_categorical(name: str, f: CategoricalField) -> str:
    """Spark SQL: column ``name`` holding field ``f``'s values -> its id: null -> 0, else
    2 + pmod(xxhash64(f.name, value), buckets - 2).

        C1="68fd1e64", hash_buckets=1000 -> 2 + pmod(xxhash64("C1", "68fd1e64"), 998)

    The field name is part of the hash, so equal strings in two fields get unrelated ids.
    """
    c = q(name)
    return (f"CAST(CASE WHEN {c} IS NULL THEN {MISSING_ID} ELSE pmod(xxhash64({_lit(f.name)}, {c}), "
            f"CAST({f.hash_buckets - RESERVED_IDS} AS BIGINT)) + {RESERVED_IDS} END AS INT)")


def log_square_bucket(name: str, f: ContinuousField) -> str:
    """Spark SQL for the Criteo winners' rule: v <= 2 -> floor(v), else floor(ln(v)^2); capped at num_buckets - 1.

        null -> 0, -3 -> 1, 0 -> 2, 2 -> 4, 5 -> 2 + floor(ln(5)^2) = 4, 1e9 -> 2 + 63 (cap, 64 buckets)
    """
    c = q(name)
    b = f"least(CASE WHEN {c} <= 2 THEN floor({c}) ELSE floor(pow(ln({c}), 2)) END, {f.num_buckets - 1})"
    return _reserve(c, f"{b} + {RESERVED_IDS}")


def quantile_bucket(name: str, f: ContinuousField, boundaries: Sequence[float]) -> str:
    """Spark SQL: bucket by fitted boundaries b_1 < ... < b_k: the bucket is #{i: b_i <= v} (a binary search in
    nested CASE WHENs, so the plan stays in the JVM).

        boundaries [1, 10], v = 0 -> 2, v = 1 -> 3, v = 50 -> 4; null -> 0; -1 -> 1
    """
    bs = sorted(set(float(b) for b in boundaries))
    if len(bs) > f.num_buckets - 1:
        raise ValueError(f"{f.name}: {len(bs)} boundaries for {f.num_buckets} buckets")
    c = q(name)

    def search(lo: int, hi: int) -> str:     # count of boundaries <= v, knowing it is in [lo, hi]
        if lo == hi:
            return str(lo)
        mid = (lo + hi + 1) // 2               # is b_mid (1-based) <= v ?
        return f"CASE WHEN {c} >= {_num(bs[mid - 1])} THEN {search(mid, hi)} ELSE {search(lo, mid - 1)} END"

    return _reserve(c, f"{search(0, len(bs))} + {RESERVED_IDS}")


def _reserve(c: str, bucket: str) -> str:
    # A non-finite value makes the line malformed (check_records), but Spark evaluates this expression on
    # rows a later filter drops, and under ANSI mode floor(ln(inf)^2) cast to int raises: such a value
    # gets the missing id here, so the expression cannot fail whatever the row.
    return (f"CAST(CASE WHEN {c} IS NULL OR isnan({c}) OR abs({c}) = CAST('Infinity' AS DOUBLE) THEN {MISSING_ID} "
            f"WHEN {c} < 0 THEN {NEGATIVE_ID} ELSE {bucket} END AS INT)")


def quantile_probabilities(f: ContinuousField) -> list[float]:
    """The probabilities whose quantiles become the boundaries: k / num_buckets, k = 1..num_buckets-1."""
    return [k / f.num_buckets for k in range(1, f.num_buckets)]


def to_ids(parsed: DataFrame, contract: FeatureContract, boundaries: Mapping[str, Sequence[float]], seed: int,
           keep: Sequence[str] = ()) -> DataFrame:
    """Parsed rows -> ``day``, ``label`` and one int id column per field (in contract order), ``_h``
    and the ``keep`` columns. Rare values are mapped afterwards by :func:`map_rare`.

    ``_h`` = xxhash64(day, label, ids..., seed) decides negative sampling and the shuffle: the same row
    gets the same decision in every run and partitioning. It hashes the ids rather than the 40 text
    columns (fewer bytes), so rows that look the same to the model are sampled alike."""
    out = []
    for f in contract.fields:
        if isinstance(f, CategoricalField):
            out.append(hash_categorical(f.name, f))
        elif f.bucketing == "log_square":
            out.append(log_square_bucket(f.name, f))
        else:
            if f.name not in boundaries:
                raise ValueError(f"{f.name}: quantile bucketing but no fitted boundaries")
            out.append(quantile_bucket(f.name, f, boundaries[f.name]))
    names = ["`day`", "`label`", *[q(f.name) for f in contract.fields]]
    kept = [q(k) for k in keep]
    # a projection of its own: the hash reads the ids, not their recipes
    ids = parsed.selectExpr(*names[:2], *[f"{e} AS {n}" for e, n in zip(out, names[2:])], *kept)
    return ids.selectExpr(*names, f"xxhash64({', '.join(names)}, {int(seed)}) AS `_h`", *kept)


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


def sample_negatives(ids: DataFrame, rate: float, seed: int, only: Column | None = None) -> DataFrame:
    """Keep every positive and a fraction ``rate`` of negatives, decided by the row's own hash (so the
    same rows are kept whatever the partitioning); with ``only``, rows where it is false are all kept.

        rate=1.0 -> unchanged; rate=0.25 -> positives + about a quarter of negatives
    """
    if rate >= 1.0:
        return ids
    u = F.pmod(F.xxhash64(F.col("_h"), F.lit(seed)), F.lit(1 << 30)) / float(1 << 30)
    keep = (F.col("label") == 1) | (u < rate)
    return ids.filter(keep if only is None else (~only | keep))


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


def spark_int_hash(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` of an int column (Murmur3_x86_32.hashInt), as a signed 32-bit int, in Python.

        spark_int_hash(0) -> 933211791;  spark_int_hash(1) -> -559580957  (Spark's hash(0), hash(1))
    """
    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF

    k1 = (value & 0xFFFFFFFF) * 0xCC9E2D51 & 0xFFFFFFFF
    k1 = rotl(k1, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = rotl((seed & 0xFFFFFFFF) ^ k1, 13)
    h1 = (h1 * 5 + 0xE6546B64) & 0xFFFFFFFF
    h1 ^= 4
    h1 ^= h1 >> 16
    h1 = h1 * 0x85EBCA6B & 0xFFFFFFFF
    h1 ^= h1 >> 13
    h1 = h1 * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(n: int) -> list[int]:
    """For each partition p < n an int key that Spark's hash partitioning into n partitions
    (``repartition(n, col)``: pmod(hash(key), n)) sends to p, so that a row can be sent to a chosen file.

        partition_keys(3) -> [0, 1, 11]   (pmod(hash(11), 3) == 2)
    """
    found: dict[int, int] = {}
    k = 0
    while len(found) < n:
        found.setdefault(spark_int_hash(k) % n, k)      # Python's % of a positive n is Spark's pmod
        k += 1
    return [found[p] for p in range(n)]


def pack_ints(names: Sequence[str]) -> list[str]:
    """Non-null int columns -> Spark SQL for longs holding two each (``_p0`` = names[0] << 32 | names[1],
    ...; an odd last one alone), for a shuffle: Spark's rows spend 8 bytes on every field, so 41 int
    columns shuffle and sort as 21 longs, half the bytes. :func:`unpack_ints` undoes it.

        a=1, b=-2 -> _p0 = 0x00000001_FFFFFFFE
    """
    out = []
    for j in range(0, len(names), 2):
        hi = f"CAST({q(names[j])} AS BIGINT)"
        if j + 1 < len(names):
            hi = f"shiftleft({hi}, 32) | (CAST({q(names[j + 1])} AS BIGINT) & 4294967295)"
        out.append(f"{hi} AS `_p{j // 2}`")
    return out


def unpack_ints(names: Sequence[str]) -> list[str]:
    """Spark SQL turning the columns of :func:`pack_ints` into the int columns ``names`` again (signs kept)."""
    out = []
    for j, name in enumerate(names):
        p = f"`_p{j // 2}`"
        if j % 2 == 0 and j + 1 < len(names):
            v = f"shiftright({p}, 32)"
        elif j % 2 == 0:
            v = p
        else:    # the low 32 bits, sign-extended in long arithmetic before the (then exact) cast
            v = f"(({p} & 4294967295) ^ 2147483648) - 2147483648"
        out.append(f"CAST({v} AS INT) AS {q(name)}")
    return out
