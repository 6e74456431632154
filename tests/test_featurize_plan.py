"""The featurize job plans its output files from the input files' sizes and a sample of their start,
without a pass over the data, and skips the quarantine when nothing was rejected."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from jobs import featurize
from pipeline import layout
from pipeline.contract import load_contract
from pipeline.spark.hadoopfs import HadoopFS
from pipeline.spark.records import SAMPLE_BYTES, estimate_lines
from tests.conftest import RAW_ROWS, SMALL

C = load_contract(SMALL)


def _line(label: int, i: int) -> str:
    return "\t".join([str(label), *[str(i % 7)] * 13, *[f"{i:08x}"] * 26])


def test_a_file_within_the_sample_is_counted_exactly(spark, tmp_path: Path):
    (tmp_path / "day_0").write_text("".join(_line(int(i % 4 == 0), i) + "\n" for i in range(100)) + "\n")
    fs = HadoopFS(spark, str(tmp_path))
    assert estimate_lines(fs, [(0, str(tmp_path / "day_0"))], C) == {0: (100, 25)}


def test_a_large_file_is_estimated_from_its_start(spark, tmp_path: Path):
    n = 3 * SAMPLE_BYTES // len(_line(0, 0)) + 1000
    (tmp_path / "day_0").write_text("".join(_line(int(i % 4 == 0), i) + "\n" for i in range(n)))
    rows, pos = estimate_lines(HadoopFS(spark, str(tmp_path)), [(0, str(tmp_path / "day_0"))], C)[0]
    assert abs(rows - n) < 0.01 * n and abs(pos - n / 4) < 0.02 * n


def test_compressed_inputs_are_not_estimated(spark, tmp_path: Path):
    with gzip.open(tmp_path / "day_0.gz", "wt") as fh:
        fh.write(_line(1, 0) + "\n")
    assert estimate_lines(HadoopFS(spark, str(tmp_path)), [(0, str(tmp_path / "day_0.gz"))], C) is None


@pytest.mark.slow
def test_a_clean_run_needs_neither_a_line_count_nor_a_quarantine(featurized: Path):
    from pipeline import manifest
    m = manifest.read(featurized)
    assert m.rejects.total == 0 and not (featurized / layout.REJECTS).exists()
    assert not {"count lines (to plan files)", "quarantine malformed lines"} & set(m.seconds_by_step)
    # the plan from the estimate still gives every split its planned files (test_parquet_layout_serves_eight_ranks)
    assert m.splits["valid"].rows == RAW_ROWS


def test_the_quarantine_reads_again_only_the_days_with_rejects():
    from pipeline.spark.featurize import inputs_with_rejects
    days = [(0, "in/day_0"), (1, "in/day_1"), (2, "in/day_2.gz")]
    assert inputs_with_rejects(days, frozenset({1})) == [(1, "in/day_1")]
    assert inputs_with_rejects(days, frozenset({2, 0})) == [(0, "in/day_0"), (2, "in/day_2.gz")]
    # days read from a column: a bad line's day may be unreadable, so every input is read again
    assert inputs_with_rejects([(None, "in/logs")], frozenset()) == [(None, "in/logs")]


def test_the_parse_is_planned_once_however_many_days(spark, tmp_path: Path):
    """The ~280 expressions of the checks and hashing stay above the union of the day files instead of
    being copied into each day's branch (PushProjectionThroughUnion), so planning does not grow with days."""
    from pyspark.sql import functions as F

    from pipeline.spark.records import check_records, keep_projections_above_union, read_records
    from pipeline.spark.transforms import to_ids
    for d in range(3):
        (tmp_path / f"day_{d}").write_text(_line(d % 2, d) + "\n")

    def ids_of(days: int):
        inputs = [(d, str(tmp_path / f"day_{d}")) for d in range(days)]
        return to_ids(check_records(read_records(spark, inputs, C), C), C, {}, 1)

    def hashes_in_plan(days: int) -> int:
        return ids_of(days).filter(~F.col("_bad"))._jdf.queryExecution().optimizedPlan().toString().count("xxhash64")

    key = "spark.sql.optimizer.excludedRules"
    before = spark.conf.get(key, "")
    try:
        spark.conf.unset(key)
        assert hashes_in_plan(3) > 2 * hashes_in_plan(1)          # Spark's default: one copy per day
        keep_projections_above_union(spark)
        assert hashes_in_plan(3) == hashes_in_plan(2) <= hashes_in_plan(1)
        assert [(r.label, r.day) for r in ids_of(3).collect()] == [(0, 0), (1, 1), (0, 2)]
    finally:
        spark.conf.set(key, before) if before else spark.conf.unset(key)
