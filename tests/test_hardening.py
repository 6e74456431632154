"""Bad inputs an operator meets: nothing the pipeline deletes can be its own input, no input line
can crash the featurize job (each bad line is quarantined with its reason), and a bad input file or
folder fails in one line that names it, before anything is committed."""
from __future__ import annotations

import gzip
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import featurize
from jobs.featurize import FeaturizeError
from pipeline import layout
from pipeline import retrain as R
from pipeline.contract import load_contract
from pipeline.spark import records as R_
from tests.conftest import CONF, DRIVER_JAVA_OPTIONS, RAW_DAYS, RAW_ROWS, ROOT, SMALL
from tests.test_retrain import write_conf

AVAZU = str(CONF / "avazu.yaml")


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



# --- featurize: bad input files and folders (issue 13) ------------------------------------------------

def _tiny_days(raw: Path, dst: Path, days: list[int], rows: int = 300) -> dict[int, bytes]:
    """The first ``rows`` lines of the shared logs' days as ``dst/day_<d>``; returns each day's bytes."""
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for d in days:
        with open(raw / f"day_{d % RAW_DAYS}", "rb") as fh:
            data = b"".join(fh.readline() for _ in range(rows))
        (dst / f"day_{d}").write_bytes(data)
        out[d] = data
    return out


def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("damage, java", [("truncated", "java.io.EOFException: Unexpected end of input stream"),
                                          ("not_gzip", "java.io.IOException: not a gzip file")])
def test_a_damaged_gz_day_fails_in_one_line_naming_the_file(spark, raw_logs: Path, tmp_path: Path, damage: str,
                                                            java: str):
    raw = tmp_path / "raw"
    data = _tiny_days(raw_logs, raw, [0, 1, 2], rows=2000)[1]
    (raw / "day_1").unlink()
    z = gzip.compress(data)
    (raw / "day_1.gz").write_bytes(z[: len(z) // 2] if damage == "truncated" else data)
    with pytest.raises(FeaturizeError) as e:
        featurize.main(["--input", str(raw), "--output", str(tmp_path / "out"), "--config", SMALL, "--valid-days", "0"])
    assert str(e.value) == f"file://{raw}/day_1.gz: truncated or corrupt gzip ({java}); nothing was committed"
    assert e.value.__cause__ is None and e.value.__suppress_context__     # no Java trace chained on
    assert _left(tmp_path) == ["raw"]                                     # no output, no staging folder


@pytest.mark.slow
def test_spark_submit_of_a_truncated_gz_ends_with_the_one_line_error(raw_logs: Path, tmp_path: Path):
    """What the operator sees: Spark's own log lines of the failed task may come first (log4j, on
    stderr), but the last line is the job's error and there is no Python traceback."""
    raw = tmp_path / "raw"
    data = _tiny_days(raw_logs, raw, [0, 1], rows=2000)[1]
    (raw / "day_1").unlink()
    z = gzip.compress(data)
    (raw / "day_1.gz").write_bytes(z[: len(z) // 2])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    r = subprocess.run(
        ["spark-submit", "--master", "local[1]", "--conf", "spark.ui.enabled=false",
         "--driver-java-options", DRIVER_JAVA_OPTIONS,
         str(ROOT / "jobs" / "featurize.py"), "--input", str(raw), "--output", str(tmp_path / "out"),
         "--config", SMALL, "--valid-days", "0", "--test-days", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    assert r.returncode == 2, r.stdout
    assert lines[-1] == (f"featurize: error: file://{raw}/day_1.gz: truncated or corrupt gzip (java.io.EOFException: "
                         "Unexpected end of input stream); nothing was committed"), r.stdout[-3000:]
    assert "Traceback" not in r.stdout and "Py4JJavaError" not in r.stdout
    assert _left(tmp_path) == ["raw"]


AVAZU_ROW = ["1000", "1", "14102100", "1005", "0", "1fbe01fe", "f3845767", "28905ebd", "ecad2386", "7801e8d9",
             "07d7df22", "a99f214a", "ddd2926e", "44956a24", "1", "2", "15706", "320", "50", "1722", "0", "35", "-1",
             "79"]


def test_header_mismatch_names_the_first_wrong_column():
    c = load_contract(AVAZU)
    cols = list(c.source.columns)
    assert R_.header_mismatch(",".join(cols), c) is None
    swapped = cols.copy()
    i, j = cols.index("site_id"), cols.index("app_id")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert R_.header_mismatch(",".join(swapped), c) == ("header column 6 is 'app_id', the contract's "
                                                        "source.columns says 'site_id'")
    assert R_.header_mismatch(",".join(cols[:-1]), c) == ("header has 23 column(s), the contract's source.columns "
                                                          "has 24 (column 24 would be 'C21')")
    assert R_.header_mismatch(",".join(cols + ["extra"]), c) == ("header column 25 is 'extra', the contract's "
                                                                 "source.columns has only 24 columns")
    assert R_.header_mismatch(",".join(AVAZU_ROW), c) == ("header column 1 is '1000', the contract's "
                                                          "source.columns says 'id'")


def test_a_swapped_csv_header_is_refused_naming_the_file_and_column(spark, tmp_path: Path):
    c = load_contract(AVAZU)
    cols = list(c.source.columns)
    swapped = cols.copy()
    i, j = cols.index("site_id"), cols.index("app_id")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    raw = tmp_path / "raw"
    raw.mkdir()
    body = "".join(",".join(AVAZU_ROW[:2] + [f"141021{h:02d}"] + AVAZU_ROW[3:]) + "\n" for h in range(3))
    (raw / "a.csv").write_text(",".join(cols) + "\n" + body)
    (raw / "b.csv.gz").write_bytes(gzip.compress((",".join(swapped) + "\n" + body).encode()))
    with pytest.raises(FeaturizeError) as e:
        featurize.main(["--input", str(raw), "--output", str(tmp_path / "out"), "--config", AVAZU])
    assert str(e.value) == (f"file:{raw}/b.csv.gz: header column 6 is 'app_id', the contract's source.columns says "
                            "'site_id'; nothing was committed")
    assert _left(tmp_path) == ["raw"]
    # the check reads each file's first line, decompressed, also inside a folder of parts
    from pipeline.spark.hadoopfs import HadoopFS
    (raw / "b.csv.gz").unlink()
    (raw / "parts.csv").mkdir()
    (raw / "parts.csv" / "part-0.csv.gz").write_bytes(gzip.compress((",".join(cols) + "\r\n" + body).encode()))
    (raw / "parts.csv" / "_SUCCESS").write_text("")
    fs = HadoopFS(spark, str(raw))
    assert R_.check_headers(fs, R_.find_day_inputs(fs, str(raw), c, None).inputs, c) == 2
    (raw / "parts.csv" / "part-1.csv").write_text(",".join(cols[:-1]) + "\n")
    with pytest.raises(FeaturizeError, match=r"parts.csv/part-1.csv: header has 23 column"):
        R_.check_headers(fs, R_.find_day_inputs(fs, str(raw), c, None).inputs, c)


def test_day_files_one_per_day_and_the_names_that_match_no_pattern():
    c = load_contract(SMALL)
    names = ["day_0", "day_1.gz", "day_2.tsv", "notes.txt", "_SUCCESS", ".hidden", "day_0.done", "day_1.gz.done",
             "day_3"]
    found, unmatched = R_.select_day_files(names, c, None)
    assert found == [(0, "day_0"), (1, "day_1.gz"), (3, "day_3")]
    assert unmatched == ["day_2.tsv", "notes.txt"]
    assert R_.select_day_files(names, c, (1, 2))[0] == [(1, "day_1.gz")]
    with pytest.raises(FeaturizeError, match=r"^day 1 has 2 files: day_1 and day_1.gz: each would be read as that day"):
        R_.select_day_files(["day_0", "day_1", "day_1.gz"], c, None)
    # outside the --days window a second file of a day is not this run's concern
    assert R_.select_day_files(["day_0", "day_1", "day_1.gz"], c, (0, 0))[0] == [(0, "day_0")]
    assert layout.missing_days([0, 1, 3, 6]) == (2, 4, 5) and layout.missing_days([4]) == ()
    assert layout.day_ranges([2, 4, 5, 6, 9]) == "2, 4-6, 9"


def test_two_files_for_one_day_are_refused(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    data = _tiny_days(raw_logs, raw, [0, 1, 2])
    (raw / "day_1.gz").write_bytes(gzip.compress(data[1]))      # the old code read day 1 twice
    with pytest.raises(FeaturizeError, match=r"--input .*/raw: day 1 has 2 files: day_1 and day_1.gz"):
        featurize.main(["--input", str(raw), "--output", str(tmp_path / "out"), "--config", SMALL])
    assert _left(tmp_path) == ["raw"]


@pytest.mark.slow
def test_a_gap_in_the_days_is_refused_unless_allowed(spark, raw_logs: Path, tmp_path: Path, caplog):
    raw = tmp_path / "raw"
    data = _tiny_days(raw_logs, raw, [0, 1, 2, 3])
    (raw / "day_2").rename(raw / "day_2.tsv")                 # matches no pattern: skipped with no word before
    (raw / "_SUCCESS").write_text("")
    args = ["--input", str(raw), "--output", str(tmp_path / "out"), "--config", SMALL, "--valid-days", "0"]
    with pytest.raises(FeaturizeError, match=r"^day\(s\) 2 missing between day 0 and day 3 \(1 of 4\).*"
                                             r"--allow-day-gaps"):
        featurize.main(args)
    assert _left(tmp_path) == ["raw"]
    with caplog.at_level(logging.WARNING, logger="jobs.featurize"):
        m = featurize.main(args + ["--allow-day-gaps"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "jobs.featurize"]
    unmatched = f"--input file:{raw}: 1 entry not read, matching no source.file_pattern 'day_(\\\\d+)(\\\\.gz)?$': day_2.tsv"
    assert unmatched in warnings, warnings
    assert any("day(s) 2 missing between day 0 and day 3" in w for w in warnings), warnings
    assert m.input.missing_days == (2,) and m.input.days == (0, 1, 3)
    assert m.splits["train"].days == (0, 1) and m.splits["test"].days == (3,)
    assert m.splits["test"].rows == data[3].count(b"\n")
    from pipeline import manifest
    assert manifest.read(tmp_path / "out").input.missing_days == (2,)


@pytest.mark.slow
def test_a_split_with_days_but_no_good_rows_is_refused(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    data = _tiny_days(raw_logs, raw, [0, 1, 2])
    good = data[2].split(b"\n")[0]
    (raw / "day_2").write_bytes(b"".join(b"7" + good[1:] + b"\n" for _ in range(3)))     # bad labels only
    with pytest.raises(FeaturizeError) as e:
        featurize.main(["--input", str(raw), "--output", str(tmp_path / "out"), "--config", SMALL,
                        "--valid-days", "0"])
    assert str(e.value) == "test: day(s) [2] gave 0 good rows (3 lines rejected); nothing was committed"
    assert _left(tmp_path) == ["raw"]


def test_utf8_escaped_is_the_line_or_pythons_backslashreplace(spark, tmp_path: Path):
    from pyspark.sql import functions as F
    from pipeline.spark.sql import utf8_escaped
    rng = random.Random(5)
    alphabet = [0x00, 0x09, 0x41, 0x5C, 0x7F, 0x80, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xA0, 0xED, 0x9F, 0xEF, 0xF0,
                0x90, 0xF4, 0x8F, 0xF5, 0xFF, 0xE2, 0x82, 0xAC]
    lines = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(400)]
    lines += ["é€😀".encode(), b"\\xff literal", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"x" * 5000 + b"\xff"]
    (tmp_path / "lines").write_bytes(b"\n".join(lines) + b"\n")
    df = spark.read.text(str(tmp_path / "lines")).select(F.monotonically_increasing_id().alias("i"),
                                                         F.expr(utf8_escaped("value")).alias("e"),
                                                         F.col("value").cast("binary").alias("b"))
    rows = sorted(df.collect(), key=lambda r: r["i"])
    assert [bytes(r["b"]) for r in rows] == lines                       # the cast keeps the bytes
    assert [r["e"] for r in rows] == [x.decode("utf-8", "backslashreplace") for x in lines]


@pytest.mark.slow
def test_rejects_with_binary_lines_are_readable_and_keep_the_bytes(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    data = _tiny_days(raw_logs, raw, [0, 1, 2])
    good = data[1].split(b"\n")[0]
    cols = good.split(b"\t")
    bad = [b"\x00\x01\xff\xfegarbage\xe2\x82",                          # NULs and invalid UTF-8
           b"\t".join(cols[:20] + [b"ab\xffcd"] + cols[21:]),            # one invalid byte in a categorical value
           b"7" + good[1:],                                              # text, a bad label
           b"7\t\\xff\t" + b"\t".join(cols[2:])]                         # a literal backslash: text as it is
    with open(raw / "day_1", "ab") as fh:
        fh.write(b"".join(x + b"\n" for x in bad))
    out = tmp_path / "out"
    m = featurize.main(["--input", str(raw), "--output", str(out), "--config", SMALL, "--valid-days", "0"])
    assert m.rejects.by_reason == {"binary": 2, "column_count": 0, "bad_label": 2, "non_numeric": 0, "bad_day": 0}
    t = pq.read_table(out / layout.REJECTS)
    assert t.schema.field("line").type == "string" and t.schema.field("line_bytes").type == "binary"
    df = t.to_pandas()                                                   # the old rejects failed here
    assert sorted(df["line_bytes"]) == sorted(bad)
    by_bytes = dict(zip(df["line_bytes"], zip(df["line"], df["reason"])))
    for x in bad:
        assert by_bytes[x][0] == x.decode("utf-8", "backslashreplace")
    assert by_bytes[bad[0]][1] == by_bytes[bad[1]][1] == "binary"
    assert set(df["day"]) == {1}


@pytest.mark.parametrize("case, msg", [
    ("output_exists", "--output {out} exists; pass --overwrite to replace it"),
    ("no_input", "--input {tmp}/nowhere: no such folder"),
    ("reuse_missing", "--reuse {tmp}/nowhere: no such folder"),
    ("reuse_incomplete", "--reuse {tmp}/half: not a complete featurized output (no _SUCCESS)")])
def test_local_path_errors_are_found_before_spark_starts(tmp_path: Path, case: str, msg: str):
    raw, out, half = tmp_path / "raw", tmp_path / "out", tmp_path / "half"
    for d in (raw, out, half):
        d.mkdir()
    args = {"output_exists": ["--input", str(raw), "--output", str(out)],
            "no_input": ["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "new")],
            "reuse_missing": ["--input", str(raw), "--output", str(tmp_path / "new"), "--reuse", str(tmp_path / "nowhere")],
            "reuse_incomplete": ["--input", str(raw), "--output", str(tmp_path / "new"), "--reuse", str(half)]}[case]
    with pytest.raises(FeaturizeError) as e:
        featurize.parse_args(args + ["--config", SMALL])
    assert str(e.value) == msg.format(out=out, tmp=tmp_path)


def test_an_existing_output_fails_in_a_moment_without_a_spark_session(tmp_path: Path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    (raw / "day_0").write_text("")
    out.mkdir()
    t = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "featurize.py"), "--input", str(raw), "--output", str(out),
                        "--config", SMALL], cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.time() - t
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"featurize: error: --output {out} exists; pass --overwrite to replace it"
    assert "Spark" not in r.stderr and seconds < 5, (seconds, r.stderr)


def test_the_output_folder_names_are_layouts():
    from pipeline import manifest
    from pipeline.spark import featurize as job
    assert manifest.Rejects(total=0, by_reason={}).path == layout.REJECTS == "rejects"
    assert (layout.VOCAB, layout.WRITTEN) == ("vocab", "_all")
    assert layout.staging_dir("/d/feat", "ab12") == "/d/feat.__staging-ab12"
    assert layout.old_dir("/d/feat", "ab12") == "/d/feat.__old-ab12"
    assert not {"VOCAB", "REJECTS", "WRITTEN"} & set(vars(job))           # stated once, in pipeline.layout
