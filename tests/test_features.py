"""The Spark side's parts (pipeline.spark) on tiny DataFrames made in code, with exact expected ids."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, StringType, StructField, StructType

from pipeline.contract import CategoricalField, ContinuousField, load_contract
from pipeline.ids import categorical_id, log_square_id, quantile_id
from pipeline.manifest import Counts
from pipeline.metrics import debias
from pipeline.spark import placement as P, records as R, sql as S, transforms as T
from pipeline.spark.featurize import FeaturizeError, assign_splits
from tests.conftest import SMALL


def test_hash_categorical_matches_the_documented_formula(spark):
    f = CategoricalField("C1", hash_buckets=1000, embedding_dim=16)
    values = ["68fd1e64", "abc", None, "", "05db9164"]
    df = spark.createDataFrame([(v,) for v in values], StructType([StructField("C1", StringType())]))
    got = [r[0] for r in df.select(F.when(F.col("C1") == "", None).otherwise(F.col("C1")).alias("v")).select(F.expr(S.hash_categorical("v", f))).collect()]
    assert got[0] == 220                               # 2 + pmod(xxhash64("C1", "68fd1e64"), 998), by hand
    assert got == [categorical_id("C1", v, 1000) for v in values]
    assert got[2] == got[3] == 0                       # missing has its own id
    assert all(2 <= g < 1000 for g in got[:2] + got[4:])
    # the field name salts the hash: the same string in another field gets another id
    g2 = df.select(F.expr(S.hash_categorical("C1", CategoricalField("C2", 1000, 16)))).first()[0]
    assert g2 == categorical_id("C2", "68fd1e64", 1000) != 220


def test_log_square_buckets(spark):
    f = ContinuousField("I1", bucketing="log_square", num_buckets=64, embedding_dim=16)
    values = [None, -3.0, 0.0, 1.0, 2.0, 2.5, 5.0, 100.0, 1e9]
    df = spark.createDataFrame([(v,) for v in values], StructType([StructField("I1", DoubleType())]))
    got = [r[0] for r in df.select(F.expr(S.log_square_bucket("I1", f))).collect()]
    # missing 0, negative 1, then 2 + (v for v <= 2, floor(ln(v)^2) above), capped at 63
    assert got == [0, 1, 2, 3, 4, 2, 4, 2 + math.floor(math.log(100) ** 2), 2 + 63]
    assert got == [log_square_id(v, 64) for v in values]


def test_quantile_buckets(spark):
    f = ContinuousField("I1", bucketing="quantile", num_buckets=8, embedding_dim=16)
    bounds = [1.0, 10.0, 10.0, 100.0]                 # duplicates collapse
    values = [None, -1.0, 0.0, 1.0, 9.99, 10.0, 50.0, 100.0, 1e6]
    df = spark.createDataFrame([(v,) for v in values], StructType([StructField("I1", DoubleType())]))
    got = [r[0] for r in df.select(F.expr(S.quantile_bucket("I1", f, bounds))).collect()]
    assert got == [0, 1, 2, 3, 3, 4, 4, 5, 5]
    assert got == [quantile_id(v, bounds) for v in values]
    with pytest.raises(ValueError, match="boundaries"):
        S.quantile_bucket("I1", ContinuousField("I1", "quantile", 2, 16), [1.0, 2.0])
    # boundaries with no short decimal form are compared exactly: v == b_i is in bucket i
    awkward = [1e-05, 0.1, 0.30000000000000004, 123456.789]
    values = [1e-05, 9.999999999999999e-06, 0.1, 0.3, 0.30000000000000004, 123456.789, 123456.78899999999]
    df = spark.createDataFrame([(v,) for v in values], StructType([StructField("I1", DoubleType())]))
    got = [r[0] for r in df.select(F.expr(S.quantile_bucket("I1", f, awkward))).collect()]
    assert got == [quantile_id(v, awkward) for v in values] == [3, 2, 4, 4, 5, 6, 5]


def _lines(spark, lines, day=0):
    return spark.createDataFrame([(x, day) for x in lines], "value string, day int")


def test_parse_lines_gives_each_malformed_line_its_reason(spark):
    c = load_contract(SMALL)
    good = "1\t" + "\t".join(["5"] * 13) + "\t" + "\t".join(["a1"] * 26)
    missing = "0\t" + "\t".join([""] * 13) + "\t" + "\t".join([""] * 26)
    cases = {
        good: None,
        missing: None,
        good.replace("\ta1", "", 1): "column_count",
        good + "\textra": "column_count",
        "2" + good[1:]: "bad_label",
        "\t" + good[2:]: "bad_label",
        good.replace("\t5\t", "\tfive\t", 1): "non_numeric",
        good.replace("\t5\t", "\tNaN\t", 1): "non_numeric",
        good.replace("a1", "a\x00b", 1): "binary",
        "\ufffd\ufffdPK\x03\x04": "binary",
    }
    rows = R.parse_lines(_lines(spark, list(cases) + ["", "   "]), c).collect()
    assert len(rows) == len(cases)                     # blank lines are skipped, nothing else
    got = {r["_line"] if r["_reason"] else None: r["_reason"] for r in rows}
    for line, reason in cases.items():
        if reason:
            assert got[line] == reason, line
    ok = [r for r in rows if r["_reason"] is None]
    assert len(ok) == 2
    full = next(r for r in ok if r["label"] == 1)
    assert full["I1"] == 5.0 and full["C26"] == "a1" and full["_line"] is None
    empty = next(r for r in ok if r["label"] == 0)
    assert empty["I1"] is None and empty["C1"] is None


def test_a_day_read_from_a_column(spark):
    """The Avazu layout: the day is days since 1970-01-01 of the 'hour' column (yyMMddHH); a header
    line is dropped; an unreadable hour is a bad_day reject."""
    c = load_contract(Path(SMALL).parent / "avazu.yaml")
    header = ",".join(c.source.columns)
    row = ["1000", "1", "14102100"] + ["x"] * (len(c.source.columns) - 3)
    late = row[:2] + ["14102223"] + row[3:]
    bad = row[:2] + ["not-an-hour"] + row[3:]
    lines = spark.createDataFrame([(x,) for x in [header, ",".join(row), ",".join(late), ",".join(bad)]],
                                  "value string").withColumn("day", F.lit(None).cast("int"))
    rows = R.parse_lines(lines, c).collect()
    assert len(rows) == 3
    assert sorted((r["day"], r["label"], r["_reason"]) for r in rows if r["_reason"] is None) == [(16364, 1, None), (16365, 1, None)]
    assert [r["_reason"] for r in rows if r["_reason"]] == ["bad_day"]


def test_fast_and_slow_parse_agree_line_by_line(spark, tmp_path):
    """The job's fast path (Spark's CSV reader over the files) and the quarantine's slow path
    (from_csv over text lines) must call the same lines good, with the same values and hashes: a line
    good in one and bad in the other would be counted twice or lost."""
    c = load_contract(SMALL)
    good = "1\t" + "\t".join(["5"] * 13) + "\t" + "\t".join(["a1"] * 26)
    lines = [good, "0\t" + "\t".join([""] * 13) + "\t" + "\t".join([""] * 26),
             good.replace("\ta1", "", 1), good + "\textra", "2" + good[1:], "\t" + good[2:], "1.0" + good[1:],
             good.replace("\t5\t", "\tfive\t", 1), good.replace("\t5\t", "\tNaN\t", 1),
             good.replace("\t5\t", "\t1e999\t", 1), good.replace("\t5\t", "\t-7.5\t", 1),
             good.replace("a1", "a\x00b", 1), good.replace("a1", "a\ufffdb", 1), "\x00\x01garbage\t\t",
             good.replace("a1", '"q', 1), "   ", ""]
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fast = R.check_records(R.read_records(spark, [(0, str(path))], c), c).collect()
    slow = R.parse_lines(spark.read.text(str(path)).withColumn("day", F.lit(0)), c).collect()
    assert len(fast) == len(slow) == len(lines) - 2        # both skip the blank lines, nothing else
    assert sum(not r["_bad"] for r in fast) == sum(r["_reason"] is None for r in slow) == 4
    cols = [f.name for f in c.fields]
    good_fast = sorted(tuple(r[k] for k in ("day", "label", *cols)) for r in fast if not r["_bad"])
    good_slow = sorted(tuple(r[k] for k in ("day", "label", *cols)) for r in slow if r["_reason"] is None)
    assert good_fast == good_slow
    assert sorted(r["I1"] for r in fast if not r["_bad"] and r["I1"] is not None) == [-7.5, 5.0, 5.0]


def test_sampling_keeps_every_positive_and_the_rate_of_negatives(spark):
    df = spark.range(20000).select(F.xxhash64("id").alias("_h"), (F.col("id") % 4 == 0).cast("int").alias("label"))
    kept = T.sample_negatives(df, 0.25, seed=7)
    pos = kept.filter("label = 1").count()
    neg = kept.filter("label = 0").count()
    assert pos == 5000
    assert abs(neg - 15000 * 0.25) < 4 * math.sqrt(15000 * 0.25 * 0.75)
    # decided by the row's hash, not by partitioning
    again = T.sample_negatives(df.repartition(7), 0.25, seed=7)
    assert sorted(r[0] for r in kept.select("_h").collect()) == sorted(r[0] for r in again.select("_h").collect())
    assert T.sample_negatives(df, 1.0, 7).count() == 20000


def test_debias_undoes_sampling():
    # with rate r, a true p becomes q = p / (p + (1 - p) r); debias inverts it
    p, r = 0.1, 0.25
    q = p / (p + (1 - p) * r)
    assert debias(q, r) == pytest.approx(p)


def test_count_and_map_rare_ids(spark):
    c = [CategoricalField("C1", 100, 16, min_count=2)]
    ids = spark.createDataFrame([(5,), (5,), (7,), (0,), (0,), (9,)], "C1 int")
    counts = {(r["field"], r["id"]): r["count"] for r in T.count_ids(ids, c).collect()}
    assert counts == {("C1", 5): 2, ("C1", 7): 1, ("C1", 0): 2, ("C1", 9): 1}
    vocab = T.count_ids(ids, c).filter("count >= 2")
    mapped = [r[0] for r in T.map_rare(ids, vocab, c).orderBy("C1").collect()]
    assert sorted(mapped) == [0, 0, 1, 1, 5, 5]


@pytest.mark.parametrize("rows, per, groups, expected", [
    (1_000_000, 65536, 8, (16, 62500)),
    (100, 65536, 8, (8, 13)),
    (3, 65536, 8, (3, 1)),
    (0, 65536, 8, (0, 0)),
])
def test_row_group_plan(rows, per, groups, expected):
    assert P.row_group_plan(rows, per, groups) == expected


def test_spark_int_hash_is_sparks_hash(spark):
    values = [0, 1, -1, 7, 2**31 - 1, -2**31, 123456789]
    df = spark.createDataFrame([(v,) for v in values], "v int")
    assert [r[0] for r in df.select(F.hash("v")).collect()] == [P.spark_int_hash(v) for v in values]
    assert P.spark_int_hash(0) == 933211791


def test_partition_keys_reach_every_partition(spark):
    keys = P.partition_keys(7)
    df = spark.createDataFrame([(k, p) for p, k in enumerate(keys)], "k int, want int").repartition(7, "k")
    assert sorted(tuple(r) for r in df.select("want", F.spark_partition_id()).collect()) == [(p, p) for p in range(7)]


def test_assign_splits():
    assert assign_splits([3, 0, 1, 2], 1, 1) == {"train": [0, 1], "valid": [2], "test": [3]}
    assert assign_splits([0, 1, 2], 0, 2) == {"train": [0], "valid": [], "test": [1, 2]}
    with pytest.raises(FeaturizeError, match="leave none to train on"):
        assign_splits([0, 1], 1, 1)


def test_output_counts_from_footers_and_the_recount_fallback(spark, tmp_path):
    from pipeline.spark.counts import count_split, recount
    from pipeline.spark.hadoopfs import HadoopFS
    rows = [("train", False, 1), ("train", False, 0), ("train", True, None), ("valid", False, 1),
            ("valid", False, 1), ("test", False, 0)]
    df = spark.createDataFrame(rows, "_split string, _bad boolean, label int")
    assert recount(df) == (6, 1, {"train": Counts(rows=2, positives=1), "valid": Counts(rows=2, positives=2),
                                  "test": Counts(rows=1, positives=0)})
    out = str(tmp_path / "valid")
    df.filter("_split = 'valid' or _split = 'test'").repartition(2).write.parquet(out)
    assert count_split(spark, out) == Counts(rows=3, positives=2)
    assert HadoopFS(spark, out).parquet_rows(out) == 3


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a", "b", "c", "d"]])
def test_pack_ints_halves_the_columns_and_unpacks_exactly(spark, names):
    big, small = 2**31 - 1, -2**31
    rows = [(1, -2, 3, 0), (big, small, -1, big), (0, 0, 0, small), (small, big, 7, -5)]
    df = spark.createDataFrame([r[:len(names)] for r in rows], ", ".join(f"{n} int" for n in names))
    packed = df.selectExpr(*S.pack_ints(names))
    assert packed.columns == [f"_p{j}" for j in range((len(names) + 1) // 2)]
    assert packed.first()["_p0"] == (1 << 32) | 0xFFFFFFFE
    back = packed.selectExpr(*S.unpack_ints(names))
    assert back.dtypes == [(n, "int") for n in names]
    assert [tuple(r) for r in back.collect()] == [r[:len(names)] for r in rows]
