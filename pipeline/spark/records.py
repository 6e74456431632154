"""Extract: the input's day files, their lines, their typed records, and which lines are malformed.

Two parses agree on which lines are good: the fast path (:func:`read_records`, Spark's CSV reader over
the files, which the job runs on every line) and the slow path (:func:`parse_lines`, ``from_csv`` over
text lines, which also says why a line is bad, for the quarantine). Both end in :func:`check_records`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from pipeline import layout
from pipeline.contract import FeatureContract
from pipeline.spark.errors import FeaturizeError, read_failure
from pipeline.spark.hadoopfs import HadoopFS
from pipeline.spark.sql import non_finite_sql, q, regex_quote, string_literal, utf8_escaped

# Reasons a line is rejected; each is counted in the manifest and written to DIR/rejects.
REASONS = ("binary", "column_count", "bad_label", "non_numeric", "bad_day")
# A recall contract's line without its user or item key (no index can be given to it).
MISSING_KEY = "missing_key"


def reasons_of(contract: FeatureContract) -> tuple[str, ...]:
    """The reject reasons of a contract's lines: :data:`REASONS`, and ``missing_key`` for a recall contract."""
    return (*REASONS, MISSING_KEY) if contract.recall is not None else REASONS


def missing_key_sql(contract: FeatureContract) -> str:
    """True when a recall contract's line has no user key or no item key (false for other contracts).

        recall user_key u, item_key i -> (`u` IS NULL OR `i` IS NULL)
    """
    r = contract.recall
    return f"({q(r.user_key)} IS NULL OR {q(r.item_key)} IS NULL)" if r is not None else "false"
# Binary garbage shows as NUL bytes or as U+FFFD, what Spark decodes invalid UTF-8 to. (Two substring
# searches: a regular expression over every line costs more than the rest of the parse.)
BINARY_MARKS = ("char(0)", "'\\uFFFD'")      # as Spark SQL
CORRUPT = "_corrupt"   # Spark's column for a line that does not fit the schema
# Lines Spark's CSV reader skips: Java's String.trim() leaves nothing, i.e. every character is at most
# U+0020 (tabs, form feeds, \x1a, NULs, not only spaces). The quarantine skips the same lines.
BLANK_LINE = "^[\\x00-\\x20]*$"

# (day, path) of each input file; day is None when days come from a column.
DayInputs = Sequence[tuple[int | None, str]]


@dataclass(frozen=True)
class DayFiles:
    """What the input folder holds for this run: the (day, path) inputs in day order, and the names of
    the entries that match no ``source.file_pattern`` (not read; hidden, ``_`` and ``.done`` names
    left out)."""

    inputs: list[tuple[int | None, str]]
    unmatched: tuple[str, ...]


def select_day_files(names: Sequence[str], contract: FeatureContract,
                     days: tuple[int, int] | None) -> tuple[list[tuple[int | None, str]], list[str]]:
    """Which entry names of the input folder are this run's day files: ((day, name) in day order, the
    names that match no pattern). Day is None when days come from a column. Names starting with ``.``
    or ``_`` and day files' ``.done`` markers are neither; a day outside ``days`` is skipped. Two
    entries for one day (``day_1`` beside ``day_1.gz``) are an error: both would be read as that day.

        day_0, day_1.gz, day_2.tsv, _SUCCESS, day_0.done -> [(0, "day_0"), (1, "day_1.gz")], ["day_2.tsv"]
    """
    rx = re.compile(contract.source.file_pattern)
    by_day = contract.source.day_from == "file_name"
    found: list[tuple[int | None, str]] = []
    unmatched: list[str] = []
    for name in sorted(names):
        if name.startswith((".", "_")):
            continue
        m = rx.search(name)
        if not m:
            base = name[:-len(layout.DONE_SUFFIX)] if name.endswith(layout.DONE_SUFFIX) else None
            if base is None or not rx.search(base):
                unmatched.append(name)
            continue
        day = int(m.group(1)) if by_day else None
        if day is not None and days and not (days[0] <= day <= days[1]):
            continue
        found.append((day, name))
    if by_day:
        names_of: dict[int | None, list[str]] = {}
        for day, name in found:
            names_of.setdefault(day, []).append(name)
        twice = sorted((d, ns) for d, ns in names_of.items() if d is not None and len(ns) > 1)
        if twice:
            raise FeaturizeError("; ".join(f"day {d} has {len(ns)} files: {' and '.join(ns)}" for d, ns in twice)
                                 + ": each would be read as that day; keep one file per day")
    found.sort(key=lambda x: (x[0] if x[0] is not None else -1, x[1]))
    return found, unmatched


def find_day_inputs(fs: HadoopFS, input_dir: str, contract: FeatureContract,
                    days: tuple[int, int] | None) -> DayFiles:
    """The input folder's day files (within ``days`` when given), by :func:`select_day_files`, with
    their full paths; :class:`FeaturizeError` when there is none.

        day_0, day_1.gz, _SUCCESS, notes.txt -> inputs [(0, .../day_0), (1, .../day_1.gz)], unmatched (notes.txt,)
    """
    if not fs.exists(input_dir):
        raise FeaturizeError(f"--input {input_dir}: no such folder")
    paths = {e.name: e.path for e in fs.list(input_dir)}
    try:
        selected, unmatched = select_day_files(list(paths), contract, days)
    except FeaturizeError as e:
        raise FeaturizeError(f"--input {input_dir}: {e}") from None
    if not selected:
        raise FeaturizeError(f"--input {input_dir}: no file matches {contract.source.file_pattern!r}"
                             + (f" within days {days[0]}-{days[1]}" if days else ""))
    return DayFiles(inputs=[(d, paths[n]) for d, n in selected], unmatched=tuple(unmatched))


def header_mismatch(line: str, contract: FeatureContract) -> str | None:
    """Why a file's first line is not the header that ``source.columns`` says, or None when it is.
    Columns are counted from 1.

        "id,click,hour,C1,banner_pos,app_id,..." (avazu) -> "header column 6 is 'app_id', the contract's
        source.columns says 'site_id'"
    """
    cols = contract.source.columns
    got = line.split(contract.source.delimiter)
    for i, want in enumerate(cols):
        if i >= len(got):
            return (f"header has {len(got)} column(s), the contract's source.columns has {len(cols)} "
                    f"(column {i + 1} would be {want!r})")
        if got[i] != want:
            return f"header column {i + 1} is {got[i]!r}, the contract's source.columns says {want!r}"
    if len(got) > len(cols):
        return (f"header column {len(cols) + 1} is {got[len(cols)]!r}, the contract's source.columns has only "
                f"{len(cols)} columns")
    return None


def check_headers(fs: HadoopFS, inputs: DayInputs, contract: FeatureContract) -> int:
    """With ``source.header``, the first line of every input file (each part of a folder; compressed
    files decompressed) must name ``source.columns`` in order: a swapped header would otherwise be
    featurized silently with the columns swapped. Reads one line per file on the driver; returns the
    number of files checked. Empty files have no header and are skipped.

        header "id,click,hour,C1,banner_pos,app_id,..." -> FeaturizeError("<file>: header column 6 is 'app_id', ...")
    """
    n = 0
    for _, path in inputs:
        for f in fs.data_files(path):
            line = read_first_line(fs, f)
            why = None if line is None else header_mismatch(line, contract)
            if why is not None:
                raise FeaturizeError(f"{f}: {why}; nothing was committed")
            n += 1
    return n


def read_first_line(fs: HadoopFS, path: str) -> str | None:
    """The first line of ``path`` (decompressed) or None when it is empty; a file that cannot be
    decompressed is a :class:`FeaturizeError` naming it."""
    try:
        return fs.first_line(path)
    except Exception as e:       # py4j's Py4JJavaError: a corrupt or truncated compressed file
        failure = read_failure(e, path)
        if failure is None:
            raise
        raise failure from None


def union_days(inputs: DayInputs, read: Callable[[str], DataFrame]) -> DataFrame:
    """``read(path)`` of every (day, path) input with a ``day`` column (null when days come from a
    column), as one DataFrame."""
    frames = [read(path).withColumn("day", F.lit(day).cast("int")) for day, path in inputs]
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    return df


PUSH_PROJECTION_THROUGH_UNION = "org.apache.spark.sql.catalyst.optimizer.PushProjectionThroughUnion"


def keep_projections_above_union(spark: SparkSession) -> None:
    """Stop Spark's optimizer from copying the projections over a :func:`union_days` into every day's
    branch (its PushProjectionThroughUnion rule; the session's ``spark.sql.optimizer.excludedRules``,
    kept). Featurize's projection is some 280 expressions (the checks, hashing, bucketing); copied into
    each of N days it is optimized and compiled N times: planning took 4.1 s for 3 days of 100k lines,
    and grew with the days. Excluding an optimizer rule never changes a result."""
    key = "spark.sql.optimizer.excludedRules"
    rules = [r for r in (spark.conf.get(key, "") or "").split(",") if r.strip()]
    if PUSH_PROJECTION_THROUGH_UNION not in rules:
        spark.conf.set(key, ",".join([*rules, PUSH_PROJECTION_THROUGH_UNION]))


def read_lines(spark: SparkSession, inputs: DayInputs) -> DataFrame:
    """All input lines as ``value`` with their ``day`` (from the file name; null when it comes from a column)."""
    return union_days(inputs, spark.read.text)


def count_lines(spark: SparkSession, inputs: DayInputs, c: FeatureContract) -> dict[int, tuple[int, int]]:
    """day -> (lines, lines whose label field reads "1"): the text only, no parsing (to size the files)."""
    src = c.source
    k = src.columns.index(c.label)
    token = F.substring_index(F.substring_index(F.col("value"), src.delimiter, k + 1), src.delimiter, -1)
    counts = (read_lines(spark, inputs).groupBy("day")
              .agg(F.count(F.lit(1)).alias("n"), F.count_if(token == "1").alias("pos")).collect())
    return {r["day"]: (int(r["n"]), int(r["pos"])) for r in counts}


SAMPLE_BYTES = 1 << 18     # read from the start of each input file to estimate its lines


def estimate_lines(fs: HadoopFS, inputs: DayInputs, c: FeatureContract) -> dict[int, tuple[int, int]] | None:
    """day -> about (lines, positives), from each file's size and its first ``SAMPLE_BYTES`` (bytes per
    line and the share of lines whose label reads "1" there), with no pass over the data; exact for a
    file no larger than the sample. None when an input is compressed (then only a count says how many
    lines it holds). Used to plan the output files, which needs sizes, not exact counts.

        a 10 MB day file whose first 256 kB hold 1,000 lines, 250 positive -> (40,960, 10,240)
    """
    k = c.source.columns.index(c.label)
    sep = c.source.delimiter.encode()
    out: dict[int, tuple[int, int]] = {}
    for day, path in inputs:
        assert day is not None                       # only for days from file names
        rows, pos = out.get(day, (0, 0))
        for f in fs.data_files(path):
            head = fs.head(f, SAMPLE_BYTES)
            if head is None:
                return None
            sample, size = head
            whole = len(sample) == size
            lines = sample.splitlines() if whole else sample.splitlines()[:-1]   # the last may be cut
            lines = [ln for ln in lines if ln.strip()]
            if not lines:
                continue
            ones = sum(1 for ln in lines if ln.split(sep, k + 1)[k:k + 1] == [b"1"])
            scale = 1.0 if whole else size / sum(len(ln) + 1 for ln in lines)
            rows += round(len(lines) * scale)
            pos += round(ones * scale)
        out[day] = (rows, pos)
    return out


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


def read_records(spark: SparkSession, inputs: DayInputs, contract: FeatureContract) -> DataFrame:
    """The input files through Spark's CSV reader with :func:`csv_schema`: typed columns, ``day`` (from
    the file name; null when it comes from a column) and ``_corrupt``. This is the job's fast path: the
    native parser splits and converts each line once. Blank lines are skipped; a header line (when the
    contract has one) is dropped in :func:`check_records`."""
    reader = spark.read.schema(csv_schema(contract)).options(**csv_options(contract))
    return union_days(inputs, reader.csv)


def check_records(records: DataFrame, contract: FeatureContract, keep: Sequence[str] = (),
                  require_day: bool = True, require_label: bool = True) -> DataFrame:
    """Typed records -> ``day``, ``label``, the contract's fields, ``_bad`` (true for a malformed line)
    and ``keep``.

    A line is malformed when Spark's parser could not fit it to the schema (wrong column count,
    a non-numeric value in a continuous field), its label is not 0 or 1, a continuous value is not
    finite, a string holds binary garbage (NUL, or U+FFFD: what invalid UTF-8 decodes to; for a
    list-valued field the whole text, so any bad element rejects the line), its day cannot be read, or
    (a recall contract) it has no user or item key. The same rule runs in the fast path and in :func:`parse_lines`, so both agree on
    which lines are good. ``keep``: more columns, as Spark SQL (a name, or ``expr AS name``).

    Scoring (pipeline.spark.scoring) needs neither a day nor a label: with ``require_day=False`` a day
    that cannot be read is null rather than a reject, and with ``require_label=False`` an empty label
    is null (tomorrow's impressions have no clicks yet); a label other than 0, 1 or empty is still bad.

        label=1, I1=5.0, C1="a1", _corrupt=null -> _bad=false;  label=2 -> _bad=true
        label=null -> _bad=true; with require_label=False -> _bad=false
    """
    src = contract.source
    if src.header:   # the header does not fit the schema (its label is a name): drop it wherever it is
        header = src.delimiter.join(src.columns)
        records = records.filter(F.col(CORRUPT).isNull() | (F.col(CORRUPT) != header))
    if src.day_from == "column":
        assert src.day_column and src.day_format      # load_contract requires both with day_from: column
        day = (f"CAST(datediff(to_date(try_to_timestamp({q(src.day_column)}, {string_literal(src.day_format)})), "
               "DATE'1970-01-01') AS INT)")
    else:
        day = "`day`"
    label = q(contract.label)
    cont = {f.name for f in contract.continuous}
    # every string column, the ignored ones too, so both paths parse them all; joined once and searched
    # once per mark (52 searches of short values: 16.4 s against 13.9 s for 2M rows, parse to ids)
    text = "concat_ws(''" + "".join(f", {q(n)}" for n in src.columns if n != contract.label and n not in cont) + ")"
    label_bad = ([f"{label} IS NULL", f"NOT ({label} IN (0, 1))"] if require_label
                 else [f"coalesce(NOT ({label} IN (0, 1)), false)"])
    bad = " OR ".join([f"{q(CORRUPT)} IS NOT NULL", *label_bad,
                       non_finite_sql(contract), *[f"contains({text}, {m})" for m in BINARY_MARKS],
                       *([f"({day}) IS NULL"] if require_day else []),
                       *([missing_key_sql(contract)] if contract.recall is not None else [])])
    return records.selectExpr(f"{day} AS `day`", f"{label} AS `label`", *[q(f.name) for f in contract.fields],
                              f"{bad} AS `_bad`", *keep)


def parse_lines(lines: DataFrame, contract: FeatureContract, keep: Sequence[str] = (),
                require_day: bool = True, require_label: bool = True) -> DataFrame:
    """Raw text lines -> the rows of :func:`check_records` with a reject reason and the line itself.

    The slow path, for the lines a run has to quarantine (the job reads the text again only when the
    fast path counted malformed lines) and for tests. It parses with the same CSV parser, schema and
    options as :func:`read_records` (``from_csv``), applies the same :func:`check_records` rule, and
    says why: ``binary``, ``column_count``, ``bad_label``, ``non_numeric``, ``bad_day`` (and, for a
    recall contract, ``missing_key``).

    Input columns: ``value`` (the line) and ``day`` (int, or null when the day comes from a column),
    and the ``keep`` columns (names), passed through. Output: ``day``, ``label``, each field, ``_reason``
    (null for good rows), ``_line`` (the raw line, for rejects only: its bytes as read, which need not
    be UTF-8; see :func:`reject_columns`) and ``keep``. ``require_day`` and ``require_label``: as in
    :func:`check_records` (scoring passes False for both; then an empty label is not ``bad_label``).

        "1\\t5\\t\\ta1" -> label=1, I1=5.0, I2=null, C1="a1", _reason=null
        "x\\t5\\t\\ta1" -> _reason="bad_label"
    """
    src = contract.source
    schema = csv_schema(contract)
    lines = lines.filter(~F.col("value").rlike(BLANK_LINE))
    parsed = lines.select("day", *keep, F.col("value").alias("_line"),
                          F.from_csv(F.col("value"), schema.simpleString(), csv_options(contract)).alias("_p"))
    records = parsed.select("day", *keep, "_line", *[F.col("_p")[n].alias(n) for n in schema.names])
    checked = check_records(records, contract, keep=["_line", CORRUPT, f"{non_finite_sql(contract)} AS `_nf`",
                                                     f"{missing_key_sql(contract)} AS `_nk`",
                                                     *[q(k) for k in keep]],
                            require_day=require_day, require_label=require_label)
    parts = F.split(F.col("_line"), _regex_quote(src.delimiter), -1)
    label_raw = F.try_element_at(parts, F.lit(src.columns.index(contract.label) + 1))
    good_labels = ("0", "1") if require_label else ("0", "1", "")
    # the raw line's bytes: invalid UTF-8 (which the CSV parser read as U+FFFD), or a mark
    binary = F.expr(" OR ".join(["NOT is_valid_utf8(`_line`)", *[f"contains(`_line`, {m})" for m in BINARY_MARKS]]))
    reason = (F.when(~F.col("_bad"), F.lit(None).cast("string"))
              .when(binary, "binary")
              .when(F.size(parts) != len(src.columns), "column_count")
              .when(~label_raw.isin(*good_labels) | label_raw.isNull(), "bad_label")
              .when(F.col(CORRUPT).isNotNull() | F.col("_nf"), "non_numeric")
              .when(F.col("_nk"), MISSING_KEY)
              .otherwise("bad_day"))
    return checked.select("day", "label", *[F.col(f.name) for f in contract.fields], reason.alias("_reason"),
                          F.when(F.col("_bad"), F.col("_line")).alias("_line"), *keep)


_regex_quote = regex_quote     # the scoring job's name for it


def reject_columns(line: str = "_line", names: tuple[str, str] = ("line", "line_bytes")) -> list[Column]:
    """The quarantine's view of a raw line: ``line`` (valid UTF-8 text: the line itself, or with each
    byte that is not UTF-8 written as ``\\xNN``) and ``line_bytes`` (binary: the line's bytes exactly as
    in the file, without its line terminator); ``names``: the two output columns' names (the scoring
    job's rejects call them ``line_text`` and ``line_bytes``: its ``line`` is the line's number).

    Spark's text reader keeps a line's bytes as they are (its strings are UTF-8 bytes, not checked), so
    the cast to binary is lossless, where ``encode(value, 'UTF-8')`` would first decode invalid bytes to
    U+FFFD. Written as a string column unchanged, a binary line makes the rejects unreadable by pyarrow
    and pandas (invalid UTF-8 in a string column).

        b"1\\tx" -> line "1\\tx", line_bytes b"1\\tx";  b"\\x00\\xff" -> line "\\x00\\\\xff", line_bytes b"\\x00\\xff"
    """
    return [F.expr(utf8_escaped(line)).alias(names[0]), F.col(line).cast("binary").alias(names[1])]
