"""The scoring run: raw click logs -> the exported model's calibrated click probabilities, on Spark.

    spark-submit jobs/score.py --model model.pt2 --input RAW --output SCORES [--key COLUMN] [--with-ids]

The model file (deepfm.export) carries what its ids came from: the contract, the fitted boundaries and the
vocabulary. The driver reads them with pipeline.artifact (no torch) and featurizes the raw lines with the
featurize job's own expressions (pipeline.spark.records.parse_lines, pipeline.spark.transforms.to_ids and
map_rare: one implementation, so a line gets the ids it would have had in training); the executors score
the ids with the model's graph (deepfm.serving, imported there and only there), a few thousand rows at a
time, through ``mapPartitions`` (Arrow UDFs need a newer pyarrow than this project's: issue 14). :func:`run`
checks the folders and the model, then :func:`score` does the steps into a staging folder beside the
output, which is renamed into place (the output is complete or absent):

    list the input files -> count lines per file block -> number, parse, check, ids, rare ids
    -> score in the executors -> write -> count -> quarantine (when there are rejects)
    -> check the reject limit -> scores.json and _SUCCESS -> commit

Counts: the rows scored are the written files' (their footers); the executors count the malformed lines
they are handed (an accumulator: an Observation is never reported through ``df.rdd``), and only when
there are some is the text read again to quarantine them, whose files then give the count per reason.

The input is a file or a folder of files in the contract's layout; a file's day comes from its name
(``source.file_pattern``) when it matches, else it is null: the day is not needed to score, so a line is
not rejected for it, nor for an empty label (tomorrow's impressions have no clicks yet; the label is null
in the output). Everything else the featurize job rejects is rejected here, for the same reasons.

The row key is the ``--key`` column's raw text, or ``file`` and ``line``: the file's path and the line's
0-based number within it, exact (blank lines count as lines, and are neither scored nor rejected). The
numbers come from DataFrame operations: a first pass over the text counts each file block's lines and
notes its first row's ``monotonically_increasing_id`` (a block is one task's split of one file, whose
rows get consecutive ids); the second pass computes the same ids, and a line's number is its id minus its
block's first id plus the lines of the file's earlier blocks (a broadcast join of the small block table).

Output: SCORES/scores (Parquet: the key, ``label``, ``logit`` float32, ``probability`` float64 and with
``--with-ids`` the id columns), SCORES/rejects (``file``, ``line``, ``day``, ``reason``, ``line_text``,
``line_bytes``), SCORES/scores.json and SCORES/_SUCCESS.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import unquote

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (BinaryType, DoubleType, FloatType, IntegerType, LongType, StringType, StructField,
                               StructType)

from pipeline import artifact as A
from pipeline import layout
from pipeline import manifest as M
from pipeline.contract import CategoricalField, FeatureContract
from pipeline.layout import PathOverlapError, refuse_overlap
from pipeline.spark.errors import FeaturizeError
from pipeline.spark.featurize import Phases, refuse_over_reject_limit, staged
from pipeline.spark.hadoopfs import HadoopFS
from pipeline.spark.records import REASONS, _regex_quote, parse_lines, reject_columns
from pipeline.spark.sql import pack_ids_binary, q, string_literal, unpack_ids_binary
from pipeline.spark.transforms import map_rare, to_ids

log = logging.getLogger("jobs.score")

SCORES_VERSION = 1
BATCH_ROWS = 4096                   # rows per call of the graph in an executor
FILE_KEY = ("file", "line")         # the row key without --key
SCORE_COLUMNS = (M.LABEL_COLUMN, "logit", "probability")
# a day is not needed to score, so no line is rejected as bad_day
SCORE_REASONS = tuple(r for r in REASONS if r != "bad_day")
REJECT_TEXT = ("line_text", "line_bytes")     # records.reject_columns' names here: ``line`` is the number


class ScoreError(FeaturizeError):
    """The scoring job cannot go on; the message says why. Nothing is committed to the output."""


@dataclass(frozen=True)
class Options:
    """What one run is asked to do (jobs/score.py parses it from the command line)."""

    model: str
    input: str
    output: str
    key: str | None = None              # a source column whose raw text keys the rows (else file + line)
    with_ids: bool = False              # the id columns in the output too
    overwrite: bool = False
    max_reject_fraction: float | None = None    # None: the contract's quality.max_reject_fraction
    batch_rows: int = BATCH_ROWS


@dataclass(frozen=True)
class Model:
    """The model file as the driver sees it: its card and vocabulary (pipeline.artifact, no torch)."""

    path: str                           # local and absolute
    card: A.ModelCard
    vocabulary: Mapping[str, np.ndarray]

    @property
    def contract(self) -> FeatureContract:
        return self.card.manifest.contract

    @property
    def fingerprint(self) -> str:
        return self.card.model_fingerprint


@dataclass(frozen=True)
class InputFile:
    """One file the job reads: its qualified path and its day (from its name, or its folder's; None when
    neither matches ``source.file_pattern``)."""

    path: str
    day: int | None


@dataclass(frozen=True)
class ScoresManifest:
    """``SCORES/scores.json``: what was scored, with which model, and what was rejected."""

    model: str                          # the model file
    model_fingerprint: str
    feature_fingerprint: str
    contract: str
    input: str
    files: tuple[str, ...]
    key: tuple[str, ...]                # the row key's columns: ("file", "line") or (--key,)
    columns: tuple[str, ...]            # of SCORES/scores, in order
    lines: int                          # lines parsed: scored + rejected (blank and header lines not counted)
    rows: int                           # rows scored
    rejects: M.Rejects
    max_reject_fraction: float
    seconds: float
    seconds_by_step: Mapping[str, float]
    spark_version: str
    created: str
    version: int = SCORES_VERSION

    def dumps(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({"scores_version": d.pop("version"), **d}, indent=1)

    def summary_line(self) -> str:
        return (f"score: {self.rows} rows scored, {self.rejects.total} rejected, {self.lines} lines in, model "
                f"{self.model_fingerprint}, {self.seconds} s")


# --- before anything is read ---------------------------------------------------------------------------

def open_model(path: str) -> Model:
    """The model file's card and vocabulary; :class:`ScoreError` for a missing, foreign or truncated file."""
    local = layout.local_path(path)
    if local is None:
        raise ScoreError(f"--model {path}: a local file is needed (it is read on the driver and shipped to the "
                         "executors with the job)")
    if not os.path.isfile(local):
        raise ScoreError(f"--model {path}: " + ("not a file" if os.path.exists(local) else "no such file"))
    try:
        return Model(path=local, card=A.read_card(local), vocabulary=A.read_vocabulary(local))
    except A.ArtifactError as e:
        raise ScoreError(str(e)) from None


def check_key(key: str | None, contract: FeatureContract, with_ids: bool) -> None:
    """``--key`` must be one of the source's columns, and not the name of another output column."""
    if key is None:
        return
    cols = contract.source.columns
    if key not in cols:
        raise ScoreError(f"--key {key!r}: not a column of the model's contract ({contract.name}: "
                         f"{', '.join(cols)})")
    taken = {*SCORE_COLUMNS, *(contract.field_names if with_ids else ())}
    if key in taken:
        raise ScoreError(f"--key {key!r}: the output has a column of that name already "
                         f"({', '.join(sorted(taken & {key}))}); key the rows by another column, or by file and line")


def check_paths(output: str, input: str, model: str) -> None:
    """The output (and its staging folder beside it) must not be, hold or lie inside what the job reads:
    with --overwrite it would delete its own input or model."""
    try:
        refuse_overlap(("--output", output), ("--input", input), ("--model", model))
    except PathOverlapError as e:
        raise ScoreError(str(e)) from None


def check_local_paths(o: Options) -> None:
    """The checks that need no Spark session, for local paths: the input exists, the output does not
    (unless ``overwrite``). Run while parsing the arguments, so that a mistyped path fails in a moment;
    :func:`run` checks the qualified paths again (and those of other file systems)."""
    local_in = layout.local_path(o.input)
    if local_in is not None and not os.path.exists(local_in):
        raise ScoreError(f"--input {o.input}: no such file or folder")
    local_out = layout.local_path(o.output)
    if local_out is not None and os.path.exists(local_out) and not o.overwrite:
        raise ScoreError(f"--output {o.output} exists; pass --overwrite to replace it")


def day_of(name: str, contract: FeatureContract) -> int | None:
    """The day in a file (or day folder) name by ``source.file_pattern``, or None (also when days come
    from a column: scoring does not need them)."""
    if contract.source.day_from != "file_name":
        return None
    m = re.search(contract.source.file_pattern, name)
    return int(m.group(1)) if m else None


def find_input_files(fs: HadoopFS, input_path: str, contract: FeatureContract) -> list[InputFile]:
    """The files of ``input_path``: itself when it is a file; for a folder, its files (names starting
    with ``.`` or ``_`` and ``.done`` markers left out) and the part files of its subfolders whose name
    matches ``source.file_pattern`` (a day written as a folder of parts). Other subfolders (such as the
    generator's ``truth/``) are named in a warning and not read.

        raw/{day_3, day_4.gz, notes.txt, day_5/part-0, truth/, _SUCCESS} -> day_3 (3), day_4.gz (4),
        notes.txt (None), day_5/part-0 (5); a warning names truth/
    """
    if not fs.exists(input_path):
        raise ScoreError(f"--input {input_path}: no such file or folder")
    if not fs.is_dir(input_path):
        path = fs.qualify(input_path)
        return [InputFile(path, day_of(path.rsplit("/", 1)[-1], contract))]
    out: list[InputFile] = []
    skipped: list[str] = []
    for e in sorted(fs.list(input_path), key=lambda e: e.name):
        if e.name.startswith((".", "_")) or e.name.endswith(layout.DONE_SUFFIX):
            continue
        if not fs.is_dir(e.path):
            out.append(InputFile(e.path, day_of(e.name, contract)))
        elif re.search(contract.source.file_pattern, e.name):
            out.extend(InputFile(p, day_of(e.name, contract)) for p in fs.data_files(e.path))
        else:
            skipped.append(e.name + "/")
    if skipped:
        log.warning("--input %s: %d folder(s) not read, matching no source.file_pattern %r: %s", input_path,
                    len(skipped), contract.source.file_pattern, ", ".join(skipped))
    if not out:
        raise ScoreError(f"--input {input_path}: no file to score in it")
    return out


# --- line numbers -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One block of one input file as a task reads it: Spark's (URL-encoded) path and the block's start,
    its first row's ``monotonically_increasing_id``, the number of its first line in the file, and the
    file (an index into the run's file list) and its day."""

    spark_path: str
    start: int
    first_id: int
    first_line: int
    file: int
    day: int | None


def text_lines(spark: SparkSession, files: Sequence[InputFile]) -> DataFrame:
    """Every line of ``files`` (blank ones too) as ``value``, with the file's path as Spark names it
    (``_path``, URL-encoded), the start of the block it was read in (``_start``) and ``_id``: the
    ``monotonically_increasing_id`` of the line, taken right above the scan so that every line gets one,
    consecutive within a block. Two reads of the same files plan the same tasks, so they get the same ids."""
    return spark.read.text([f.path for f in files]).select(
        "value", F.col("_metadata.file_path").alias("_path"), F.col("_metadata.file_block_start").alias("_start"),
        F.monotonically_increasing_id().alias("_id"))


def count_blocks(spark: SparkSession, files: list[InputFile]) -> tuple[list[Block], list[int]]:
    """The first pass: the lines of each file block -> the blocks (each with the number of its first line
    in its file) and the lines per file. A file Spark names otherwise than the listing did is added to
    ``files`` (with no day)."""
    rows = (text_lines(spark, files).groupBy("_path", "_start")
            .agg(F.count(F.lit(1)).alias("n"), F.min("_id").alias("first")).collect())
    index = {f.path: i for i, f in enumerate(files)}
    by_file: dict[int, list[tuple[int, int, int, str]]] = {}
    for r in rows:
        path = unquote(r["_path"])
        if path not in index:
            index[path] = len(files)
            files.append(InputFile(path, None))
        by_file.setdefault(index[path], []).append((int(r["_start"]), int(r["first"]), int(r["n"]), r["_path"]))
    blocks: list[Block] = []
    lines = [0] * len(files)
    for i, bs in by_file.items():
        for start, first, n, spark_path in sorted(bs):
            blocks.append(Block(spark_path, start, first, lines[i], i, files[i].day))
            lines[i] += n
    return blocks, lines


def numbered_lines(spark: SparkSession, files: Sequence[InputFile], blocks: Sequence[Block]) -> DataFrame:
    """The second pass: every line as ``value`` with ``_file`` (its file's index), ``line`` (its 0-based
    number in the file) and ``day``."""
    schema = StructType([StructField("_path", StringType()), StructField("_start", LongType()),
                         StructField("_first", LongType()), StructField("_offset", LongType()),
                         StructField("_file", IntegerType()), StructField("day", IntegerType())])
    table = spark.createDataFrame([(b.spark_path, b.start, b.first_id, b.first_line, b.file, b.day) for b in blocks],
                                  schema)
    return (text_lines(spark, files).join(F.broadcast(table), ["_path", "_start"])
            .select("value", "_file", (F.col("_id") - F.col("_first") + F.col("_offset")).alias("line"), "day"))


def file_name_sql(files: Sequence[InputFile]) -> str:
    """The ``file`` column from ``_file``: the path of the file at that index (a literal array)."""
    return f"element_at(array({', '.join(string_literal(f.path) for f in files)}), `_file` + 1) AS `file`"


# --- features ----------------------------------------------------------------------------------------------

def vocabulary_frame(spark: SparkSession, vocabulary: Mapping[str, np.ndarray], fields: Sequence[str]) -> DataFrame:
    """The model's vocabulary as the (field, id) DataFrame that transforms.map_rare joins: one row per
    field from the driver (its ids as text), exploded in the JVM and cached (a DataFrame made from
    Python rows reads them from a Python worker each time it is computed; map_rare reads it once per
    field). The caller unpersists it."""
    rows = [(f, ",".join(str(int(x)) for x in vocabulary[f])) for f in fields]
    df = spark.createDataFrame(rows, "field string, ids string")
    return (df.select("field", F.explode(F.split("ids", ",")).alias("id")).filter(F.col("id") != "")
            .select("field", F.col("id").cast("int").alias("id")).cache())


def rare_fields(model: Model) -> tuple[CategoricalField, ...]:
    """The fields whose rare ids map to 1 (``min_count`` > 0); :class:`ScoreError` when the model file has
    no vocabulary for one of them."""
    rare = tuple(f for f in model.contract.categorical if f.min_count > 0)
    missing = [f.name for f in rare if f.name not in model.vocabulary]
    if missing:
        raise ScoreError(f"--model {model.path}: min_count fields without a vocabulary: {', '.join(missing)}")
    return rare


def featurize_lines(lines: DataFrame, model: Model, vocab: DataFrame | None, keep: Sequence[str]) -> DataFrame:
    """Lines (``value``, ``day`` and ``keep``) -> ``keep``, ``label`` and ``_ids`` (the ids of a good line
    packed 4 bytes each, sql.pack_ids_binary; null for a malformed line), by the featurize job's parse,
    checks and id expressions with the model's boundaries and ``vocab`` (:func:`vocabulary_frame`)."""
    c = model.contract
    m = model.card.manifest
    parsed = parse_lines(lines, c, keep=keep, require_day=False, require_label=False)
    try:
        ids = to_ids(parsed, c, m.boundaries, c.sampling.seed, keep=["_reason", *keep])
    except ValueError as e:
        raise ScoreError(f"--model {model.path}: {e}") from None
    rare = rare_fields(model)
    if rare:
        assert vocab is not None
        ids = map_rare(ids, vocab, rare, broadcast=True)
    return ids.selectExpr(*[q(k) for k in keep], q(M.LABEL_COLUMN),
                          f"CASE WHEN `_reason` IS NULL THEN {pack_ids_binary(c.field_names, list_widths(m))} END "
                          "AS `_ids`")


def list_widths(m: M.Manifest) -> tuple[int, ...] | None:
    """The graph's columns per field when a field is list-valued (pipeline.artifact.InputLayout: its
    ``max_length`` ids, padded), else None (one id a field)."""
    lay = A.InputLayout.of(m)
    return lay.widths if lay.has_lists else None


# --- in the executors ----------------------------------------------------------------------------------------

_PREDICTORS: dict[str, Any] = {}          # per Python worker: fingerprint -> deepfm.serving.Predictor


def load_predictor(name: str, fingerprint: str) -> Any:
    """The shipped model file ``name`` (SparkFiles) loaded once per Python worker (workers are reused
    across tasks), refused unless it is the model the driver read."""
    p = _PREDICTORS.get(fingerprint)
    if p is None:
        from pyspark import SparkFiles
        from deepfm.serving import Predictor       # torch: in the executors only
        p = Predictor.load(SparkFiles.get(name), check=False)
        if p.fingerprint != fingerprint:
            raise RuntimeError(f"{name}: the shipped model's fingerprint is {p.fingerprint}, the driver read "
                               f"{fingerprint}")
        _PREDICTORS[fingerprint] = p
    return p


def score_partition(rows: Iterable[Any], name: str, fingerprint: str, n_fields: int, batch_rows: int,
                    with_ids: bool, rejected: Any, scored: Any) -> Iterator[tuple[Any, ...]]:
    """One partition's rows (the key columns, the label, ``_ids``) -> (the key columns, label, logit,
    probability[, _ids]), scored ``batch_rows`` at a time. A row without ids (a malformed line) is
    counted in the ``rejected`` accumulator and left out; ``scored`` counts the others."""
    predictor = load_predictor(name, fingerprint)
    from deepfm.serving import probability
    batch: list[Any] = []
    n_rejected = n_scored = 0
    for r in rows:
        if r[-1] is None:
            n_rejected += 1
            continue
        batch.append(r)
        if len(batch) >= batch_rows:
            yield from _score_batch(predictor, probability, batch, n_fields, with_ids)
            n_scored += len(batch)
            batch = []
    if batch:
        yield from _score_batch(predictor, probability, batch, n_fields, with_ids)
        n_scored += len(batch)
    rejected.add(n_rejected)
    scored.add(n_scored)


def _score_batch(predictor: Any, probability: Any, batch: Sequence[Any], n_fields: int,
                 with_ids: bool) -> Iterator[tuple[Any, ...]]:
    ids = np.frombuffer(b"".join(r[-1] for r in batch), dtype=">i4").reshape(len(batch), n_fields)
    logits = predictor.logits_of_ids(ids.astype(np.int64))
    probs = probability(logits)
    for r, lg, pr in zip(batch, logits.tolist(), probs.tolist()):
        yield (*r[:-1], lg, pr, r[-1]) if with_ids else (*r[:-1], lg, pr)


_SHIPPED: dict[str, tuple[str, str]] = {}   # "<application id>/<name>" -> (path, fingerprint) added under it


def ship_model(spark: SparkSession, model: Model) -> str:
    """``sc.addFile`` the model file; returns its name for ``SparkFiles.get``. Spark keys the files of a
    context by their names (and keeps the first of a name): when this context already has another model
    file of this name (or one of another fingerprint at this path, since replaced), a copy under a name
    of its own (the fingerprint's) is shipped instead."""
    sc = spark.sparkContext
    name = os.path.basename(model.path)
    have = _SHIPPED.get(f"{sc.applicationId}/{name}")
    if have is not None and have != (model.path, model.fingerprint):
        stem = name[:-4] if name.endswith(".pt2") else name
        name = f"{stem}-{model.fingerprint}-{uuid.uuid4().hex[:8]}.pt2"
        folder = tempfile.mkdtemp(prefix="clickpipe-score-")
        atexit.register(shutil.rmtree, folder, True)
        shutil.copyfile(model.path, os.path.join(folder, name))
        sc.addFile(os.path.join(folder, name))
    else:
        sc.addFile(model.path)
    _SHIPPED[f"{sc.applicationId}/{name}"] = (model.path, model.fingerprint)
    return name


# --- the run -------------------------------------------------------------------------------------------------

def run(spark: SparkSession, o: Options) -> ScoresManifest:
    """Score ``o.input`` with ``o.model`` into ``o.output`` (committed atomically); returns its scores.json."""
    t0 = time.time()
    model = open_model(o.model)
    c = model.contract
    check_key(o.key, c, o.with_ids)
    fs = HadoopFS(spark, o.output)
    out = fs.qualify(o.output.rstrip("/"))
    in_fs = HadoopFS(spark, o.input)
    check_paths(out, in_fs.qualify(o.input), model.path)
    if fs.exists(out) and not o.overwrite:
        raise ScoreError(f"--output {o.output} exists; pass --overwrite to replace it")
    files = find_input_files(in_fs, o.input, c)
    names = [f.path.rsplit("/", 1)[-1] for f in files]
    log.info("model %s (%s, contract %s, trained with negative sampling %g: logits corrected by %+.4f): %s",
             model.fingerprint, model.card.model, c.name, model.card.neg_sample_rate, model.card.logit_offset,
             model.path)
    log.info("%d input file(s): %s", len(files), ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)"
                                                                          if len(names) > 10 else ""))
    s = staged(fs, out, o.overwrite, lambda staging: score(spark, o, model, fs, files, staging, t0))
    log.info("%s -> %s", s.summary_line(), out)
    if s.rejects.total:
        log.info("the rejected lines, their reasons, files and line numbers: %s/%s", out, layout.REJECTS)
    return s


@dataclass(frozen=True)
class RowKey:
    """How the rows are keyed: the columns handed to the executors with the ids (``cols``, typed as
    ``fields``), and the output's key columns made of them (``out``, Spark SQL; named ``names``)."""

    cols: tuple[str, ...]
    fields: tuple[StructField, ...]
    out: tuple[str, ...]
    names: tuple[str, ...]


def keyed_lines(spark: SparkSession, files: Sequence[InputFile], c: FeatureContract,
                key: str) -> tuple[DataFrame, RowKey]:
    """Lines keyed by the raw text of source column ``key`` (no line numbers needed: one pass fewer)."""
    parts = f"split(`value`, {string_literal(_regex_quote(c.source.delimiter))}, -1)"
    k = c.source.columns.index(key) + 1
    lines = text_lines(spark, files).selectExpr("value", "CAST(NULL AS INT) AS `day`",
                                                f"try_element_at({parts}, {k}) AS `_key`")
    return lines, RowKey(cols=("_key",), fields=(StructField("_key", StringType()),), out=(f"`_key` AS {q(key)}",),
                         names=(key,))


def file_line_key(files: Sequence[InputFile]) -> RowKey:
    """Rows keyed by ``file`` and ``line`` (:func:`numbered_lines`)."""
    return RowKey(cols=("_file", "line"), fields=(StructField("_file", IntegerType()), StructField("line", LongType())),
                  out=(file_name_sql(files), "`line`"), names=FILE_KEY)


def score(spark: SparkSession, o: Options, model: Model, fs: HadoopFS, files: list[InputFile], staging: str,
          t0: float) -> ScoresManifest:
    """Every step of the run, in order, into ``staging`` (see the module's docstring)."""
    c = model.contract
    phase = Phases(spark, job="score", logger=log)
    # Spark's default, stated because the featurize job lowers it (to 8000: its wide projections then run
    # as small compiled methods, not one huge interpreted one) and a session may run both. Here the same
    # projections feed map_rare's per-field broadcast joins, which the lowered limit makes Spark run row
    # by row: 32.5 s of CPU against 23.6 s for the whole job on 200,000 lines.
    spark.conf.set("spark.sql.codegen.hugeMethodLimit", "65535")
    blocks: list[Block] | None = None
    if o.key is None:
        with phase("count lines per file block"):
            blocks, per_file = count_blocks(spark, files)
        log.info("%d lines (blank ones too) in %d block(s) of %d file(s)", sum(per_file), len(blocks), len(files))
        lines, key = numbered_lines(spark, files, blocks), file_line_key(files)
    else:
        lines, key = keyed_lines(spark, files, c, o.key)
    scores_dir = f"{staging}/{layout.SCORED}"
    with phase("parse, featurize, score and write"):
        rows, rejected = score_lines(spark, o, model, lines, key, scores_dir)
    rejects = {r: 0 for r in SCORE_REASONS}
    if rejected:                              # the text is read again only when there are rejects
        with phase("quarantine malformed lines"):
            if blocks is None:
                blocks, _ = count_blocks(spark, files)
            rejects = quarantine(spark, model, files, blocks, f"{staging}/{layout.REJECTS}")
        if sum(rejects.values()) != rejected:
            log.warning("the executors counted %d malformed lines, the quarantine found %d (a retried task?)",
                        rejected, sum(rejects.values()))
    n_rejects = sum(rejects.values())
    lines_in = rows + n_rejects
    log.info("parsed %d lines: %d scored, %d rejected %s", lines_in, rows, n_rejects,
             {k: v for k, v in rejects.items() if v})
    if rows == 0:
        log.warning("no row was scored (%d lines rejected)", n_rejects)
    limit = c.quality.max_reject_fraction if o.max_reject_fraction is None else o.max_reject_fraction
    check_reject_limit(fs, staging, lines_in, n_rejects, limit)
    s = ScoresManifest(
        model=model.path, model_fingerprint=model.fingerprint, feature_fingerprint=model.card.feature_fingerprint,
        contract=c.name, input=o.input, files=tuple(f.path for f in files), key=key.names,
        columns=(*key.names, *SCORE_COLUMNS, *(c.field_names if o.with_ids else ())),
        lines=lines_in, rows=rows, rejects=M.Rejects(total=n_rejects, by_reason=rejects, path=layout.REJECTS),
        max_reject_fraction=limit, seconds=round(time.time() - t0, 2), seconds_by_step=dict(phase.seconds),
        spark_version=spark.version, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    fs.write_text(f"{staging}/{layout.SCORES_MANIFEST}", s.dumps())
    fs.write_text(f"{staging}/{layout.SUCCESS}", "")
    return s


def score_lines(spark: SparkSession, o: Options, model: Model, lines: DataFrame, key: RowKey,
                path: str) -> tuple[int, int]:
    """The one pass: featurize ``lines``, score them in the executors, write the scores to ``path``;
    returns (rows written, from the files' footers; malformed lines, as the executors counted them)."""
    c = model.contract
    rare = rare_fields(model)
    vocab = vocabulary_frame(spark, model.vocabulary, [f.name for f in rare]) if rare else None
    try:
        packed = featurize_lines(lines, model, vocab, key.cols)
        sc = spark.sparkContext
        rejected, scored = sc.accumulator(0), sc.accumulator(0)
        fn = partial(score_partition, name=ship_model(spark, model), fingerprint=model.fingerprint,
                     n_fields=A.InputLayout.of(model.card.manifest).width, batch_rows=o.batch_rows,
                     with_ids=o.with_ids, rejected=rejected,
                     scored=scored)
        schema = StructType([*key.fields, StructField(M.LABEL_COLUMN, IntegerType()),
                             StructField("logit", FloatType()), StructField("probability", DoubleType()),
                             *([StructField("_ids", BinaryType())] if o.with_ids else [])])
        result = spark.createDataFrame(packed.rdd.mapPartitions(fn), schema, verifySchema=False)
        ids = unpack_ids_binary("_ids", c.field_names, list_widths(model.card.manifest)) if o.with_ids else []
        result.selectExpr(*key.out, *SCORE_COLUMNS, *ids).write.parquet(path)
    finally:
        if vocab is not None:
            vocab.unpersist()
    rows = HadoopFS(spark, path).parquet_rows(path)
    if rows != scored.value:
        log.warning("the executors counted %d rows scored, the written files hold %d (a retried task?)",
                    scored.value, rows)
    return rows, int(rejected.value)


def quarantine(spark: SparkSession, model: Model, files: Sequence[InputFile], blocks: Sequence[Block],
               path: str) -> dict[str, int]:
    """Write the malformed lines to ``path`` (``file, line, day, reason, line_text, line_bytes``: the line
    as valid UTF-8 text and as its exact bytes, records.reject_columns) and return the count per reason."""
    c = model.contract
    parsed = parse_lines(numbered_lines(spark, files, blocks), c, keep=["_file", "line"], require_day=False,
                         require_label=False)
    bad = parsed.filter(F.col("_reason").isNotNull()).select(
        F.expr(file_name_sql(files)), "line", "day", F.col("_reason").alias("reason"),
        *reject_columns("_line", REJECT_TEXT))
    bad.coalesce(1).write.parquet(path)
    out = {r: 0 for r in SCORE_REASONS}
    for r in spark.read.parquet(path).groupBy("reason").count().collect():
        out[r["reason"]] = int(r["count"])
    return out


def check_reject_limit(fs: HadoopFS, staging: str, lines: int, n_rejects: int, limit: float) -> None:
    """More malformed lines than ``limit`` allows: ``RejectLimitError``, with the staging folder kept
    holding only the rejects (and their reasons) for inspection."""
    refuse_over_reject_limit(fs, staging, lines, n_rejects, limit, (layout.SCORED,),
                             f"the allowed fraction {limit} (--max-reject-fraction, or the model's contract's "
                             "quality.max_reject_fraction)")
