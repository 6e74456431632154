"""Rows and positives per split, three ways: aggregates that ride along the one pass (``observe``), the
written files read back, and a pass of its own over the ids (when the observed counts cannot be trusted:
they count twice when Spark re-runs a stage after a lost executor)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.manifest import LABEL_COLUMN, SPLITS, Counts


def split_counts(where: Column) -> list[Column]:
    """Aggregates ``<split>_rows`` and ``<split>_pos`` (rows and positives of each split) over the rows
    where ``where`` holds, for an ``observe``; :func:`observed` reads them back.

        where=~_bad -> train_rows, train_pos, valid_rows, valid_pos, test_rows, test_pos
    """
    label = F.col(LABEL_COLUMN)
    return [a for s in SPLITS for a in (F.count_if(where & (F.col("_split") == s)).alias(f"{s}_rows"),
                                        F.sum(F.when(where & (F.col("_split") == s), label)).alias(f"{s}_pos"))]


def observed(metrics: Mapping[str, Any]) -> dict[str, Counts]:
    """The :func:`split_counts` of an observation, per split (a sum over no rows is null: 0)."""
    return {s: Counts(rows=int(metrics[f"{s}_rows"]), positives=int(metrics[f"{s}_pos"] or 0)) for s in SPLITS}


def merged(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The observations of several queries over disjoint rows as one: counts summed (a sum over no rows,
    null, counts 0), sets (``collect_set``, a list) joined.

        [{"lines": 3, "train_pos": None, "bad_days": [1]}, {"lines": 2, "train_pos": 4, "bad_days": [1, 2]}]
        -> {"lines": 5, "train_pos": 4, "bad_days": [1, 2]}
    """
    out: dict[str, Any] = {}
    for m in metrics:
        for k, v in m.items():
            if isinstance(v, list):
                out[k] = sorted(set(out.get(k, [])) | set(v))
            else:
                out[k] = (out.get(k) or 0) + (v or 0)
    return out


def count_split(spark: SparkSession, path: str) -> Counts:
    """Rows and positives of the Parquet files under ``path``, read back."""
    r = spark.read.parquet(path).agg(F.count(F.lit(1)).alias("rows"), F.sum(LABEL_COLUMN).alias("pos")).collect()[0]
    return Counts(rows=int(r["rows"]), positives=int(r["pos"] or 0))


def recount(ids: DataFrame) -> tuple[int, int, dict[str, Counts]]:
    """(lines, malformed lines, rows and positives per split before sampling), by a pass of its own over
    rows with ``_split``, ``_bad`` and the label.

        (train, good, 1), (train, bad, null), (valid, good, 0) -> (3, 1, {train: Counts(1, 1), valid: Counts(1, 0), test: Counts(0, 0)})
    """
    rows = ids.groupBy("_split", "_bad").agg(F.count(F.lit(1)).alias("n"), F.sum(LABEL_COLUMN).alias("pos")).collect()
    before = {s: Counts(0, 0) for s in SPLITS}
    for r in rows:
        if not r["_bad"] and r["_split"] in before:
            b = before[r["_split"]]
            before[r["_split"]] = Counts(b.rows + int(r["n"]), b.positives + int(r["pos"] or 0))
    return sum(int(r["n"]) for r in rows), sum(int(r["n"]) for r in rows if r["_bad"]), before
