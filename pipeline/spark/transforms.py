"""Transform: the featurize job's ``DataFrame -> DataFrame`` steps, each with explicit parameters and
testable on a tiny DataFrame. The per-column expressions are Spark SQL text from pipeline.spark.sql.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipeline.contract import MISSING_ID, RARE_ID, CategoricalField, FeatureContract
from pipeline.spark.sql import field_ids, log_square_bucket, q, quantile_bucket


def within_days(rows: DataFrame, days: tuple[int, int] | None) -> DataFrame:
    """Rows whose ``day`` is in ``days`` (FIRST, LAST inclusive), and rows without a day (malformed
    lines, so that they are still counted and quarantined); all rows when ``days`` is None.

        days (3, 9): day 2 -> dropped, day 3 -> kept, day null -> kept
    """
    if days is None:
        return rows
    return rows.filter(F.col("day").isNull() | F.col("day").between(*days))


def to_ids(parsed: DataFrame, contract: FeatureContract, boundaries: Mapping[str, Sequence[float]], seed: int,
           keep: Sequence[str] = ()) -> DataFrame:
    """Parsed rows -> ``day``, ``label`` and one int id column per field (in contract order; an
    array<int> for a list-valued field), ``_h`` and the ``keep`` columns. Rare values are mapped
    afterwards by :func:`map_rare`.

        C1="68fd1e64" (1000 buckets), I1=5.0 (log_square) -> C1=220, I1=4
        genres="Comedy|Drama" (list) -> genres=[id of "Comedy", id of "Drama"]

    ``_h`` = xxhash64(day, label, ids..., seed) decides negative sampling and the shuffle: the same row
    gets the same decision in every run and partitioning. It hashes the ids rather than the 40 text
    columns (fewer bytes), so rows that look the same to the model are sampled alike."""
    out = []
    for f in contract.fields:
        if isinstance(f, CategoricalField):
            out.append(field_ids(f.name, f))
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


def with_split(rows: DataFrame, split_days: Mapping[str, Sequence[int]]) -> DataFrame:
    """Adds ``_split``: the split whose days hold the row's ``day`` (null for a day in none).

        {"train": [0, 1], "valid": [2]}: day 1 -> "train", day 2 -> "valid", day 5 -> null
    """
    split_of = F.create_map(*[x for s, ds in split_days.items() for d in ds for x in (F.lit(d), F.lit(s))])
    return rows.withColumn("_split", split_of[F.col("day")])


def count_ids(ids: DataFrame, fields: Sequence[CategoricalField]) -> DataFrame:
    """Per (field, id): how many times it occurs (a row's one id; each element of a list-valued field's
    list). Input: the train rows' ids. Output: field, id, count.

        C1 ids [5, 5, 7] -> (C1, 5, 2), (C1, 7, 1);  genres lists [[5, 7], [5]] -> (genres, 5, 2), (genres, 7, 1)
    """
    def pairs(f: CategoricalField) -> Column:
        def pair(x: Column) -> Column:
            return F.struct(F.lit(f.name).alias("field"), x.alias("id"))
        return F.transform(F.col(f.name), pair) if f.list is not None else F.array(pair(F.col(f.name)))
    stacked = ids.select(F.explode(F.flatten(F.array(*[pairs(f) for f in fields]))).alias("s"))
    return stacked.groupBy("s.field", "s.id").count()


def frequent_ids(ids: DataFrame, fields: Sequence[CategoricalField]) -> DataFrame:
    """The vocabulary: (field, id, count) of the ids seen at least the field's ``min_count`` times.

        C1 ids [5, 5, 7], min_count 2 -> (C1, 5, 2)
    """
    mins = F.create_map(*[x for f in fields for x in (F.lit(f.name), F.lit(f.min_count))])
    return count_ids(ids, fields).filter(F.col("count") >= mins[F.col("field")])


def map_rare(ids: DataFrame, vocab: DataFrame, fields: Sequence[CategoricalField],
             broadcast: bool = False) -> DataFrame:
    """Ids not in the frequent-id vocabulary (field, id) -> 1 (rare); 0 (missing) stays 0.
    ``broadcast``: join each field's ids as a broadcast (the rows keep their partitions and order: no
    shuffle; the scoring job's choice, whose vocabulary comes from the model file). A list-valued
    field's elements are mapped one by one (:func:`map_rare_lists`).

        vocab {(C1, 5)}; C1 ids [5, 7, 0] -> [5, 1, 0];  genres [5, 7] -> [5, 1]
    """
    lists = [f for f in fields if f.list is not None]
    if lists:
        ids = map_rare_lists(ids, vocab, lists)
    for f in (f for f in fields if f.list is None):
        keep = vocab.filter(F.col("field") == f.name).select(F.col("id").alias(f"_v_{f.name}"))
        if broadcast:
            keep = F.broadcast(keep)
        ids = ids.join(keep, ids[f.name] == keep[f"_v_{f.name}"], "left")
        ids = ids.withColumn(f.name, F.when(F.col(f.name) == MISSING_ID, F.lit(MISSING_ID))
                             .when(F.col(f"_v_{f.name}").isNull(), F.lit(RARE_ID))
                             .otherwise(F.col(f.name)).cast("int")).drop(f"_v_{f.name}")
    return ids


def map_rare_lists(ids: DataFrame, vocab: DataFrame, fields: Sequence[CategoricalField]) -> DataFrame:
    """:func:`map_rare` for list-valued fields: each element not in the vocabulary -> 1 (rare), 0 stays
    0, the order kept. The rows' elements are exploded with their positions, joined with the field's
    kept ids (broadcast: a vocabulary is at most a table's size), and gathered back by a row number
    (one shuffle of the rows, only for list fields with a ``min_count``).

        vocab {(genres, 5)}; genres [[5, 7], [0]] -> [[5, 1], [0]]
    """
    ids = ids.withColumn("_row", F.monotonically_increasing_id())
    for f in fields:
        keep = F.broadcast(vocab.filter(F.col("field") == f.name).select(F.col("id").alias("_v")).distinct())
        rest = [c for c in ids.columns if c not in (f.name, "_row")]
        exploded = ids.select("_row", *rest, F.posexplode(f.name).alias("_pos", "_e"))
        mapped = exploded.join(keep, exploded["_e"] == keep["_v"], "left").withColumn(
            "_e", F.when(F.col("_e") == MISSING_ID, F.lit(MISSING_ID)).when(F.col("_v").isNull(), F.lit(RARE_ID))
            .otherwise(F.col("_e")).cast("int"))
        gathered = mapped.groupBy("_row").agg(
            *[F.first(c).alias(c) for c in rest],
            F.array_sort(F.collect_list(F.struct("_pos", "_e"))).alias("_l"))
        ids = gathered.select("_row", *rest, F.transform("_l", lambda s: s["_e"]).alias(f.name))
    return ids.drop("_row")


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
