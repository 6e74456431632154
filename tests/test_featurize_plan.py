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


def test_only_big_evaluation_splits_skip_the_shuffle():
    from pipeline.spark.placement import direct_splits
    rows = {"train": 900_000, "valid": 1_000_000, "test": 400_000}
    assert direct_splits(rows, 65536, 8, eligible=True) == ("valid",)
    assert direct_splits(rows, 65536, 8, eligible=False) == ()
    # ten full row groups are needed: 10 * 65536 = 655,360 rows
    assert direct_splits({**rows, "test": 655_360}, 65536, 8, eligible=True) == ("valid", "test")
    assert direct_splits({**rows, "test": 655_359}, 65536, 8, eligible=True) == ("valid",)
    assert direct_splits({"train": 10**9, "valid": 0, "test": 0}, 65536, 8, eligible=True) == ()


def test_the_observations_of_several_queries_add_up():
    from pipeline.spark.counts import merged
    a = {"lines": 3, "bad": 1, "bad_days": [1], "train_rows": 2, "train_pos": None}
    b = {"lines": 2, "bad": 0, "bad_days": [], "train_rows": 0, "train_pos": 4}
    c = {"lines": 5, "bad": 2, "bad_days": [2, 1], "train_rows": 1, "train_pos": 1}
    assert merged([a, b, c]) == {"lines": 10, "bad": 3, "bad_days": [1, 2], "train_rows": 3, "train_pos": 5}
    assert merged([a]) == {**a, "train_pos": 0}


@pytest.mark.slow
def test_big_evaluation_splits_are_written_unshuffled_with_the_same_rows(featurized: Path, raw_logs: Path,
                                                                           tmp_path: Path):
    """With row groups of 1,024 rows the 25,000-row valid and test days are big enough to skip the
    shuffle: their files are written by the tasks that read them, in the log's line order, and hold the
    same rows as the shuffled run's (the shared ``featurized`` output, row groups of 16,384). Malformed
    lines in the valid day are counted by its own query and quarantined as anywhere else."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline import manifest
    from pipeline.generate import read_truth
    conf = tmp_path / "small_groups.yaml"
    conf.write_text(f"base: {SMALL}\nname: criteo_small\noutput:\n  rows_per_row_group: 1024\n  min_row_groups: 8\n")
    raw = tmp_path / "raw"
    raw.mkdir()
    for d in range(4):
        (raw / f"day_{d}").write_bytes((raw_logs / f"day_{d}").read_bytes())
    with open(raw / "day_2", "ab") as fh:                       # the valid day: two malformed lines at its end
        fh.write(b"7" + (raw_logs / "day_2").read_bytes().split(b"\n", 1)[0][1:] + b"\n\x00\x01garbage\xff\n")
    out = tmp_path / "out"
    featurize.main(["--input", str(raw), "--output", str(out), "--config", str(conf), "--neg-sample-rate", "0.5"])
    m = manifest.read(out)
    assert m.rejects.total == 2 and {k: v for k, v in m.rejects.by_reason.items() if v} == {"bad_label": 1,
                                                                                            "binary": 1}
    assert pq.read_table(out / layout.REJECTS).column("day").to_pylist() == [2, 2]
    steps = set(m.seconds_by_step)
    assert {"parse, hash, bucket and write valid (no shuffle)", "parse, hash, bucket and write test (no shuffle)",
            "parse, hash, bucket, sample and write train"} <= steps, steps
    assert not (out / layout.DIRECT).exists() and not (out / layout.WRITTEN).exists()
    shuffled = manifest.read(featurized)
    for split, day in (("valid", 2), ("test", 3)):
        files = sorted((out / split).glob("*.parquet"))
        meta = [pq.ParquetFile(f).metadata for f in files]
        assert len(files) == m.splits[split].files >= 8
        assert all(x.num_row_groups == 1 and 0 < x.num_rows <= 1024 for x in meta)
        assert sum(x.num_rows for x in meta) == m.splits[split].rows == RAW_ROWS
        t = pq.read_table(files)           # the files in name order: task by task, each task's in order
        assert (t.column("label").to_numpy() == read_truth(raw_logs, day)[1]).all()   # the log's line order
        assert set(t.column("day").to_pylist()) == {day}
        assert m.splits[split].positives == shuffled.splits[split].positives
    for split in ("train", "valid", "test"):
        a = pq.read_table(sorted((out / split).glob("*.parquet"))).to_pandas()
        b = pq.read_table(sorted((featurized / split).glob("*.parquet"))).to_pandas()
        key = list(a.columns)
        assert list(b.columns) == key and len(a) == len(b), split
        a, b = (x.sort_values(key, kind="stable").reset_index(drop=True) for x in (a, b))
        assert np.array_equal(a.to_numpy(), b.to_numpy()), split
    train = pq.read_table(sorted((out / "train").glob("*.parquet"))[0], columns=["day"]).column("day").to_numpy()
    assert (train[1:] != train[:-1]).sum() > len(train) / 4      # train is still a random mix of its days
    assert m.splits["train"].rows == shuffled.splits["train"].rows and m.input.lines == shuffled.input.lines + 2
