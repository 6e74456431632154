"""Bad inputs an operator meets: nothing the pipeline deletes can be its own input, and no input line
can crash the featurize job (each bad line is quarantined with its reason)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import featurize
from jobs.featurize import FeaturizeError
from pipeline import layout
from pipeline import retrain as R
from tests.conftest import RAW_ROWS, SMALL
from tests.test_retrain import write_conf


def _copy_days(raw: Path, dst: Path, days: range = range(3)) -> None:
    dst.mkdir(parents=True)
    for d in days:
        shutil.copy(raw / f"day_{d}", dst / f"day_{d}")


@pytest.mark.parametrize("a, b, expected", [
    ("/d/raw", "/d/raw", True), ("/d/raw/", "/d/raw", True), ("/d", "/d/raw", True), ("/d/raw/x", "/d/raw", True),
    ("/d/raw", "/d/raw2", False), ("/d/a/../raw", "/d/raw", True), ("file:/d/raw", "/d/raw", True),
    ("hdfs://nn/d/raw", "hdfs://nn/d", True), ("hdfs://nn/d/raw", "hdfs://other/d/raw", False),
    ("hdfs://nn/d/raw", "/d/raw", False)])
def test_overlap(a: str, b: str, expected: bool):
    assert layout.overlap(a, b) is expected


def test_overlap_follows_symlinks(tmp_path: Path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "raw")
    assert layout.overlap(str(tmp_path / "link" / "out"), str(tmp_path / "raw"))


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_featurize_refuses_an_output_that_overlaps_its_input(raw_logs: Path, tmp_path: Path, where: str):
    raw = tmp_path / "logs" / "raw"
    _copy_days(raw_logs, raw, range(1))
    out = {"same": raw, "parent": raw.parent, "inside": raw / "feat"}[where]
    before = sorted(p.name for p in raw.iterdir())
    # refused while parsing the arguments: before Spark starts, before anything is written or deleted
    with pytest.raises(FeaturizeError, match=r"--output .* overlaps --input"):
        featurize.main(["--input", str(raw), "--output", str(out), "--config", SMALL, "--overwrite"])
    assert sorted(p.name for p in raw.iterdir()) == before
    assert (raw / "day_0").stat().st_size == (raw_logs / "day_0").stat().st_size


def test_featurize_refuses_an_output_that_overlaps_reuse(tmp_path: Path):
    with pytest.raises(FeaturizeError, match=r"--output .* overlaps --reuse"):
        featurize.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "old"), "--config", SMALL,
                        "--reuse", str(tmp_path / "old"), "--overwrite"])


@pytest.mark.parametrize("over, msg", [
    ({"work_dir": "raw"}, "work_dir .* overlaps raw_dir"),
    ({"work_dir": "raw/work"}, "work_dir .* overlaps raw_dir"),
    ({"raw_dir": "data", "work_dir": "data/work"}, "work_dir .* overlaps raw_dir"),
    ({"registry_dir": "work/registry"}, "registry_dir .* overlaps work_dir"),
    ({"registry_dir": "."}, "registry_dir .* overlaps raw_dir")])
def test_retrain_refuses_overlapping_folders(tmp_path: Path, over: dict, msg: str):
    with pytest.raises(R.RetrainConfigError, match=msg):
        R.load_config(write_conf(tmp_path, **over))


# Every kind of malformed line, after a good line of day 1 as a template. Values are what a line's field
# holds; I1 is the first integer field, C1 the first categorical one.
def _bad_lines(good: str) -> dict[str, tuple[str, str | None]]:
    cols = good.split("\t")

    def with_i1(v: str) -> str:
        return "\t".join([cols[0], v, *cols[2:]])
    return {
        "too_few_columns": ("\t".join(cols[:-1]), "column_count"),
        "too_many_columns": (good + "\tx", "column_count"),
        "non_numeric": (with_i1("abc"), "non_numeric"),
        "plus_huge": (with_i1("1e999"), "non_numeric"),
        "minus_huge": (with_i1("-1e999"), "non_numeric"),
        "nan": (with_i1("NaN"), "non_numeric"),
        "inf": (with_i1("inf"), "non_numeric"),
        "Infinity": (with_i1("Infinity"), "non_numeric"),
        "label_beyond_int64": ("\t".join(["99999999999999999999", *cols[1:]]), "bad_label"),
        "bad_label": ("\t".join(["2", *cols[1:]]), "bad_label"),
        "binary": ("\x00\x01\x02garbage\udcff", "binary"),
        "bom": ("\ufeff" + good, "bad_label"),
        # not rejects: blank to Spark's reader (every character <= U+0020) and skipped, or good lines
        "tab": ("\t", None), "space_tab": (" \t ", None), "form_feed": ("\x0c", None), "sub": ("\x1a", None),
        "empty": ("", None),
        "crlf": (good + "\r", "good"),
        "i1_beyond_int64": (with_i1("99999999999999999999"), "good"),
    }


def test_featurize_quarantines_every_kind_of_malformed_line(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    _copy_days(raw_logs, raw)
    good = (raw / "day_1").read_text().splitlines()[0]
    bad = _bad_lines(good)
    with open(raw / "day_1", "a", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        for line, _ in bad.values():
            fh.write(line + "\n")
    out = tmp_path / "out"
    m = featurize.main(["--input", str(raw), "--output", str(out), "--config", SMALL, "--valid-days", "0"])
    want: dict[str, int] = {r: 0 for r in ("binary", "column_count", "bad_label", "non_numeric", "bad_day")}
    for _, reason in bad.values():
        if reason not in (None, "good"):
            want[reason] += 1
    assert m.rejects.by_reason == want
    n_good = sum(1 for _, r in bad.values() if r == "good")
    assert m.input.lines == 3 * RAW_ROWS + sum(want.values()) + n_good
    assert m.splits["train"].before_sampling.rows == 2 * RAW_ROWS + n_good
    lines = sorted(r["line"] for r in spark.read.parquet(str(out / "rejects")).collect())
    expect = sorted(line for line, r in bad.values() if r not in (None, "good") and r != "binary")
    assert [x for x in lines if not x.startswith("\x00")] == expect
    # the huge integer value is a value: bucketed into the last log-square bucket, not an error
    ids = pq.read_table(out / "train", columns=["I1"]).column("I1").to_numpy()
    assert ids.max() < m.fields[0].num_embeddings


def test_whitespace_lines_beside_a_bad_line_commit_and_leave_no_staging(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    _copy_days(raw_logs, raw)
    good = (raw / "day_0").read_text().splitlines()[0]
    with open(raw / "day_0", "a") as fh:
        fh.write("\t\n \t \n\x0c\n\x1a\n" + "7" + good[1:] + "\n")
    out = tmp_path / "out"
    m = featurize.main(["--input", str(raw), "--output", str(out), "--config", SMALL, "--valid-days", "0"])
    assert m.rejects.by_reason["bad_label"] == 1 and m.rejects.total == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_a_failure_other_than_the_reject_limit_leaves_no_staging(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    _copy_days(raw_logs, raw, range(2))
    with pytest.raises(FeaturizeError, match="leave none to train on"):
        featurize.main(["--input", str(raw), "--output", str(tmp_path / "out"), "--config", SMALL,
                        "--valid-days", "1", "--test-days", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
