"""The featurize run: raw click logs -> hashed, bucketed, negatively-sampled Parquet and its Manifest.

:func:`run` checks the folders, reads ``--reuse`` and finds the day files (:func:`find_inputs`: one
file per day, no day missing, each header line as the contract says), then has :func:`featurize` write
everything into a staging folder beside the output and renames it into place (so the output is
complete or absent; a file Spark cannot read, such as a truncated ``.gz``, becomes one FeaturizeError
line naming it). :func:`featurize` is the list of steps, each a function below:

    plan days -> fit boundaries -> fit vocabulary -> (recall: keys, catalogue, seen) -> the one pass
    -> place files -> verify counts -> quarantine -> check the reject limit -> check no split is empty
    -> commit the manifest

A recall contract (docs/recall.md) keeps only the positives in every split, with the dense
``user_index`` / ``item_index`` of their raw keys (and, in train, random negatives drawn from the
catalogue); one aggregation per (user key, item key) before the pass (:func:`write_recall_tables`,
pipeline.spark.recall) checks that item-side fields are constant per item and writes ``catalogue/``,
``users/`` and ``seen/``.

One pass over the input does the work: Spark's CSV reader parses each line once, every id is a JVM
expression, one shuffle places each split's rows in the files planned for them (train rows in a seeded
random order), and one write makes the files, which are then moved into train/valid/test by their
partition number. A valid or test split big enough for whole row groups (placement.direct_splits)
is not shuffled: its day files are read by a query of their own whose tasks write its files. Counts
ride along (``observe``) and are checked against the files' footers; the text is read again only to plan file counts (a line count), to fit quantiles or a vocabulary when the
contract asks for them, and to quarantine malformed lines when there are any (only the day files that
held them). The projection of the checks and ids is planned once above the union of the day files
(records.keep_projections_above_union), not once per day.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from pipeline import layout
from pipeline import manifest as M
from pipeline.contract import CategoricalField, FeatureContract
from pipeline.layout import PathOverlapError, refuse_overlap
from pipeline.manifest import DAY_COLUMN, LABEL_COLUMN, SPLITS, Counts, Manifest, ManifestError
from pipeline.spark.counts import count_split, merged, observed, recount, split_counts
from pipeline.spark.errors import FeaturizeError, RejectLimitError, read_failure
from pipeline.spark.hadoopfs import HadoopFS
from pipeline.spark.placement import (FilePlan, direct_splits, place_direct, place_files, plan_files, write_direct,
                                      write_files)
from pipeline.spark import recall as R
from pipeline.spark.records import (DayInputs, check_headers, check_records, count_lines, estimate_lines,
                                    find_day_inputs, keep_projections_above_union, parse_lines, read_lines,
                                    read_records, reasons_of, reject_columns)
from pipeline.spark.sql import quantile_probabilities
from pipeline.spark.transforms import frequent_ids, map_rare, sample_negatives, to_ids, with_split, within_days

log = logging.getLogger("jobs.featurize")       # the job's logger, by the name its log lines have always had


@dataclass(frozen=True)
class Options:
    """What one run is asked to do (jobs/featurize.py parses it from the command line)."""

    input: str
    output: str
    contract: FeatureContract
    overwrite: bool
    reuse: str | None
    days: tuple[int, int] | None
    allow_day_gaps: bool = False      # featurize although days are missing between the first and last


def check_paths(output: str, input: str, reuse: str | None) -> None:
    """The output (and its staging folder beside it) must not be, hold or lie inside what the job reads:
    with --overwrite it would delete its own input."""
    try:
        refuse_overlap(("--output", output), ("--input", input), ("--reuse", reuse))
    except PathOverlapError as e:
        raise FeaturizeError(str(e)) from None


def check_local_paths(input: str, output: str, overwrite: bool, reuse: str | None) -> None:
    """The folder checks that need no Spark session, for local paths (no scheme, or ``file:``): the
    input folder exists, the output does not (unless ``overwrite``), ``reuse`` is a complete output.
    Run while parsing the arguments, so that a mistyped path fails in a moment rather than after the
    session starts; :func:`run` checks the qualified paths again (and those of other file systems).

        check_local_paths("/d/raw", "/d/feat", overwrite=False, reuse=None), /d/feat exists
        -> FeaturizeError("--output /d/feat exists; pass --overwrite to replace it")
    """
    local_in = layout.local_path(input)
    if local_in is not None and not os.path.isdir(local_in):
        raise FeaturizeError(f"--input {input}: " + ("not a folder" if os.path.exists(local_in) else "no such folder"))
    local_out = layout.local_path(output)
    if local_out is not None and os.path.exists(local_out) and not overwrite:
        raise FeaturizeError(f"--output {output} exists; pass --overwrite to replace it")
    local_reuse = layout.local_path(reuse) if reuse else None
    if local_reuse is not None:
        if not os.path.isdir(local_reuse):
            raise FeaturizeError(f"--reuse {reuse}: no such folder")
        if not os.path.exists(os.path.join(local_reuse, layout.SUCCESS)):
            raise FeaturizeError(f"--reuse {reuse}: not a complete featurized output (no {layout.SUCCESS})")


def check_day_gaps(days: Sequence[int], allow: bool) -> tuple[int, ...]:
    """The days missing between the first and last day found; a :class:`FeaturizeError` naming them
    unless ``allow`` (then a warning, and the manifest records them).

        [0, 1, 3], allow=False -> FeaturizeError("day(s) 2 missing between day 0 and day 3 ...")
        [0, 1, 3], allow=True -> (2,)
    """
    missing = layout.missing_days(days)
    if missing:
        what = (f"day(s) {layout.day_ranges(missing)} missing between day {min(days)} and day {max(days)} "
                f"({len(missing)} of {max(days) - min(days) + 1})")
        if not allow:
            raise FeaturizeError(f"{what}: the splits would silently skip them; add the missing days, choose "
                                 "--days without the gap, or pass --allow-day-gaps")
        log.warning("%s; featurizing anyway (--allow-day-gaps), the manifest records them", what)
    return missing


def assign_splits(days: Sequence[int], valid_days: int, test_days: int) -> dict[str, list[int]]:
    """The day split rule (pipeline.layout.split_days), refusing with :class:`FeaturizeError`.

        ([0, 1, 2, 3], 1, 1) -> train [0, 1], valid [2], test [3]
    """
    try:
        return layout.split_days(days, valid_days, test_days)
    except ValueError as e:
        raise FeaturizeError(str(e)) from None


class Phases:
    """Names each step of the job in Spark's UI (job description) and in the log, and keeps its seconds
    for the manifest: where the time of a run went. ``job`` and ``logger``: whose steps (the scoring
    job's are ``score: ...`` in its own log)."""

    def __init__(self, spark: SparkSession, job: str = "featurize", logger: logging.Logger | None = None):
        self.sc = spark.sparkContext
        self.seconds: dict[str, float] = {}
        self.job = job
        self.log = logger or log

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sc.setJobDescription(f"{self.job}: {name}")
        t = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t, 2)
        self.log.info("%s: %.1f s", name, self.seconds[name])


# --- what one step hands the next ------------------------------------------------------------------

@dataclass(frozen=True)
class Reused:
    """What ``--reuse`` takes from an earlier output: its fitted boundaries and its vocabulary's folder."""

    boundaries: Mapping[str, tuple[float, ...]]
    vocab_path: str | None


@dataclass(frozen=True)
class DayPlan:
    """The days found, the split of each, and each day's (rows, positives) to size the files."""

    days: tuple[int, ...]
    split_days: Mapping[str, list[int]]
    rows_by_day: Mapping[int, tuple[int, int]]
    missing_days: tuple[int, ...] = ()          # between the first and last day (--allow-day-gaps)

    def expected_rows(self, split: str, neg_sample_rate: float) -> int:
        """The rows ``split`` should have after sampling: every positive and the rate of negatives."""
        rows = sum(self.rows_by_day.get(d, (0, 0))[0] for d in self.split_days[split])
        pos = sum(self.rows_by_day.get(d, (0, 0))[1] for d in self.split_days[split])
        return pos + round((rows - pos) * neg_sample_rate)

    def train_rows(self) -> Column:
        """True for a good row of a train day."""
        return ~F.col("_bad") & F.col("day").isin(self.split_days["train"])


@dataclass(frozen=True)
class FittedVocabulary:
    """The frequent ids of the ``min_count`` fields, as written to the staging folder, and their summary."""

    frame: DataFrame                    # field, id, count
    fields: tuple[CategoricalField, ...]
    info: M.Vocabulary


@dataclass(frozen=True)
class RecallTables:
    """What :func:`write_recall_tables` hands the one pass (read back from the staging folder) and the
    manifest: the key indexes, the catalogue's ids, and the counts."""

    user_index: DataFrame               # _user_key, user_index
    item_index: DataFrame               # _item_key, item_index
    catalogue_ids: DataFrame            # item_index and the item-side fields' ids (rare ids mapped)
    info: M.RecallInfo


@dataclass(frozen=True)
class Written:
    """What the one pass hands on (the shuffled write and each direct split's): the observations of its
    queries, the files it planned, the splits written without the shuffle, and the sampling rates."""

    counted: tuple[Observation, ...]    # lines, malformed lines, rows and positives per split before sampling
    kept: tuple[Observation, ...]       # rows and positives per split as written
    files: FilePlan                     # the shuffled write's files (none for a direct split)
    rates: Mapping[str, float]
    direct: tuple[str, ...] = ()        # splits written by their read tasks (staging/_direct/<split>)
    drawn: int | None = None            # a recall contract: random negatives per train positive (else None)

    def counted_metrics(self) -> dict:
        return merged([o.get for o in self.counted])

    def kept_metrics(self) -> dict:
        return merged([o.get for o in self.kept])


@dataclass(frozen=True)
class RunCounts:
    """The checked counts of a run: input lines, malformed lines, and per split the good rows before
    sampling, the rows written, and the files."""

    lines: int
    bad: int
    before: Mapping[str, Counts]
    after: Mapping[str, Counts]
    files: Mapping[str, int]
    bad_days: frozenset[int]     # the days of the malformed lines (a day read from a bad line's column can be
                                 # missing: then it is not here)


# --- the run ---------------------------------------------------------------------------------------

def run(spark: SparkSession, o: Options) -> Manifest:
    """Featurize ``o.input`` into ``o.output`` (committed atomically) and return the output's manifest."""
    t0 = time.time()
    c = o.contract
    fs = HadoopFS(spark, o.output)
    out = fs.qualify(o.output)
    in_fs = HadoopFS(spark, o.input)
    check_paths(out, in_fs.qualify(o.input), HadoopFS(spark, o.reuse).qualify(o.reuse) if o.reuse else None)
    if fs.exists(out) and not o.overwrite:
        raise FeaturizeError(f"--output {o.output} exists; pass --overwrite to replace it")
    reused = load_reuse(spark, o.reuse, c) if o.reuse else None
    inputs = find_inputs(in_fs, in_fs.qualify(o.input), o)

    return staged(fs, out, o.overwrite, lambda staging: featurize(spark, o, fs, inputs, staging, reused, t0))


T = TypeVar("T")


def staged(fs: HadoopFS, out: str, overwrite: bool, build: Callable[[str], T]) -> T:
    """``build(staging)`` writes a whole output into a staging folder beside ``out``, which is then renamed
    into place (:func:`commit`): the output is complete or absent. On a failure the staging folder is
    deleted, except after a :class:`RejectLimitError` (it then holds the rejects, and the message names
    it); a file Spark cannot read (a truncated ``.gz``) becomes one FeaturizeError line naming it. The
    featurize and scoring jobs both end this way."""
    staging = layout.staging_dir(out, uuid.uuid4().hex[:8])
    try:
        result = build(staging)
        commit(fs, staging, out, overwrite)
    except RejectLimitError:
        raise                                  # its staging folder holds the rejects; the message names it
    except BaseException as e:
        if fs.exists(staging):
            fs.delete(staging)
        failure = read_failure(e)              # an unreadable input file (a truncated .gz): one line, no trace
        if failure is not None:
            raise failure from None
        raise
    return result


def find_inputs(fs: HadoopFS, input_dir: str, o: Options) -> DayInputs:
    """The day files of this run, checked before anything is written: one file per day, no day missing
    between the first and last (unless ``--allow-day-gaps``), and with ``source.header`` each file's
    header line naming ``source.columns``. Entries that match no file pattern are named in one warning."""
    c = o.contract
    found = find_day_inputs(fs, input_dir, c, o.days)
    inputs = found.inputs
    log.info("%s: %d input(s) %s", c.name, len(inputs), ", ".join(p.rsplit("/", 1)[-1] for _, p in inputs))
    if found.unmatched:
        log.warning("--input %s: %d entr%s not read, matching no source.file_pattern %r: %s", input_dir,
                    len(found.unmatched), "y" if len(found.unmatched) == 1 else "ies", c.source.file_pattern,
                    ", ".join(found.unmatched))
    if c.source.day_from == "file_name":
        check_day_gaps([d for d, _ in inputs if d is not None], o.allow_day_gaps)
    if c.source.header:
        log.info("checked the header line of %d file(s)", check_headers(fs, inputs, c))
    return inputs


def featurize(spark: SparkSession, o: Options, fs: HadoopFS, inputs: DayInputs, staging: str,
              reused: Reused | None, t0: float) -> Manifest:
    """Every step of the run, in order, into ``staging`` (see the module's docstring)."""
    c = o.contract
    phase = Phases(spark)
    # Wide rows make big generated methods; the JVM does not compile methods over 8 kB of bytecode and
    # would interpret them (3x slower here). At this limit Spark splits such a stage into small methods.
    spark.conf.set("spark.sql.codegen.hugeMethodLimit", "8000")
    keep_projections_above_union(spark)
    keys = R.key_columns(c) if c.recall else []

    def checked_of(files: DayInputs) -> DataFrame:
        rows = check_records(read_records(spark, files, c), c, keep=keys)
        return within_days(rows, o.days) if c.source.day_from == "column" else rows

    checked = checked_of(inputs)
    plan = plan_days(spark, c, inputs, checked, phase, o.allow_day_gaps)
    boundaries = fit_boundaries(checked, c, plan, reused, phase)
    kept = ["_bad", *([R.USER_KEY, R.ITEM_KEY] if c.recall else [])]

    def ids_of(rows: DataFrame) -> DataFrame:
        return with_split(to_ids(rows, c, boundaries, c.sampling.seed, keep=kept), plan.split_days)

    def ids_of_days(days: Sequence[int]) -> DataFrame:
        """The ids of the day files of ``days`` only (a query that reads no other file)."""
        return ids_of(checked_of([(d, p) for d, p in inputs if d in days]))

    ids = ids_of(checked)
    vocab = fit_vocabulary(spark, ids, c, plan, reused, staging, phase)
    tables = write_recall_tables(spark, fs, ids, c, vocab, staging, phase) if c.recall else None
    written = write_splits(ids, c, plan, vocab, staging, phase, tables,
                           ids_of_days if c.source.day_from == "file_name" else None)
    n_files = place_files(fs, f"{staging}/{layout.WRITTEN}", staging, written.files.parts())
    for s in written.direct:
        n_files[s] = place_direct(fs, f"{staging}/{layout.DIRECT}/{s}", f"{staging}/{s}")
    if written.direct:
        fs.delete(f"{staging}/{layout.DIRECT}")
    counts = verify_counts(spark, fs, ids, staging, written, n_files, phase)
    splits = split_infos(plan, counts, written.rates)
    rejects = {r: 0 for r in reasons_of(c)}
    if counts.bad:                             # the text is read again only when there are rejects
        with phase("quarantine malformed lines"):
            rejects = quarantine(spark, o, inputs_with_rejects(inputs, counts.bad_days), f"{staging}/{layout.REJECTS}",
                                 counts.bad)
    log_counts(plan, splits, counts.lines, rejects)
    check_reject_limit(fs, c, staging, counts.lines, rejects)
    check_splits_have_rows(spark, plan, splits, f"{staging}/{layout.REJECTS}", sum(rejects.values()))
    m = build_manifest(spark, o, inputs, plan, boundaries, vocab, splits, rejects, counts.lines, phase.seconds, t0,
                       tables.info if tables else None)
    commit_manifest(fs, staging, m)
    return m


# --- the steps -------------------------------------------------------------------------------------

def load_reuse(spark: SparkSession, path: str, c: FeatureContract) -> Reused:
    """An earlier output's boundaries and vocabulary; refuses an incomplete one, an unreadable manifest,
    and one made under another contract."""
    fs = HadoopFS(spark, path)
    base = fs.qualify(path.rstrip("/"))
    if not fs.exists(f"{base}/{layout.SUCCESS}"):
        raise FeaturizeError(f"--reuse {path}: not a complete featurized output (no {layout.SUCCESS})")
    try:
        m = Manifest.loads(fs.read_text(f"{base}/{layout.MANIFEST}"), f"--reuse {path}")
    except ManifestError as e:
        raise FeaturizeError(str(e)) from None
    if m.contract_fingerprint != c.fingerprint:
        raise FeaturizeError(f"--reuse {path}: made under contract {m.contract_fingerprint}, this run's is "
                             f"{c.fingerprint}; ids would not mean the same (refit without --reuse)")
    return Reused(boundaries=m.boundaries, vocab_path=f"{base}/{m.vocab.path}" if m.vocab else None)


def plan_days(spark: SparkSession, c: FeatureContract, inputs: DayInputs, checked: DataFrame,
              phase: Phases, allow_day_gaps: bool = False) -> DayPlan:
    """Which days there are, which split each belongs to, and about how many rows each has: from the
    file names and the files' sizes (a line count for compressed files), or (days from a column) from a
    pass over the checked records. Days
    missing between the first and last are refused unless ``allow_day_gaps`` (:func:`check_day_gaps`)."""
    if c.source.day_from == "file_name":
        days = sorted({d for d, _ in inputs if d is not None})
        # the file plan needs sizes, not counts: estimated from file sizes and a sample of each file's
        # start; only compressed inputs need a pass that counts their lines
        estimate = estimate_lines(HadoopFS(spark, inputs[0][1]), inputs, c)
        if estimate is None:
            with phase("count lines (to plan files)"):
                rows_by_day = count_lines(spark, inputs, c)
        else:
            rows_by_day = estimate
    else:
        with phase("find days"):
            found = (checked.filter(~F.col("_bad")).groupBy("day")
                     .agg(F.count(F.lit(1)).alias("rows"), F.sum(LABEL_COLUMN).alias("positives")).collect())
            rows_by_day = {r["day"]: (int(r["rows"]), int(r["positives"] or 0)) for r in found}
        days = sorted(rows_by_day)
        if not days:
            raise FeaturizeError("no good rows in the input")
    # days from file names were checked with the file names (find_inputs), before anything was read
    missing = layout.missing_days(days) if c.source.day_from == "file_name" else check_day_gaps(days, allow_day_gaps)
    return DayPlan(days=tuple(days), split_days=assign_splits(days, c.splits.valid_days, c.splits.test_days),
                   rows_by_day=rows_by_day, missing_days=missing)


def fit_boundaries(checked: DataFrame, c: FeatureContract, plan: DayPlan, reused: Reused | None,
                   phase: Phases) -> dict[str, tuple[float, ...]]:
    """Bucket boundaries of the quantile fields: reused, or fitted on the train days only (approximate
    quantiles of the non-negative values)."""
    if reused is not None:
        return dict(reused.boundaries)
    qfields = [f for f in c.continuous if f.bucketing == "quantile"]
    if not qfields:
        return {}
    nonneg = checked.filter(plan.train_rows()).select(*[F.when(F.col(f.name) >= 0, F.col(f.name)).alias(f.name)
                                                        for f in qfields])
    probs = sorted({p for f in qfields for p in quantile_probabilities(f)})
    with phase("fit quantile boundaries"):
        qs = nonneg.approxQuantile([f.name for f in qfields], probs, 1e-4)
    boundaries = {}
    for f, q in zip(qfields, qs):
        want = set(quantile_probabilities(f))
        boundaries[f.name] = tuple(sorted({float(v) for p, v in zip(probs, q) if p in want}))
    log.info("fitted boundaries for %d field(s) on train days %s", len(qfields), plan.split_days["train"])
    return boundaries


def fit_vocabulary(spark: SparkSession, ids: DataFrame, c: FeatureContract, plan: DayPlan, reused: Reused | None,
                   staging: str, phase: Phases) -> FittedVocabulary | None:
    """The frequent ids (seen at least ``min_count`` times in the train days; the others become the rare
    id), reused or counted, written to ``staging/vocab``; None when no field has a ``min_count``."""
    rare_fields = tuple(f for f in c.categorical if f.min_count > 0)
    if not rare_fields:
        return None
    with phase("vocabulary (min_count)"):
        if reused is None:
            vocab = frequent_ids(ids.filter(plan.train_rows()), rare_fields)
        elif reused.vocab_path is None:
            raise FeaturizeError("--reuse: the earlier output has no vocabulary, but this contract has min_count")
        else:
            vocab = spark.read.parquet(reused.vocab_path)
        vocab.repartition(max(1, len(rare_fields) // 4)).write.parquet(f"{staging}/{layout.VOCAB}")
        vocab = spark.read.parquet(f"{staging}/{layout.VOCAB}")
        sizes = {r["field"]: r["n"] for r in vocab.groupBy("field").agg(F.count(F.lit(1)).alias("n")).collect()}
        digest = vocab.agg(F.bit_xor(F.xxhash64("field", "id")).alias("d")).collect()[0]["d"] or 0
    info = M.Vocabulary(path=layout.VOCAB, ids_kept={f.name: sizes.get(f.name, 0) for f in rare_fields}, digest=str(digest))
    return FittedVocabulary(frame=vocab, fields=rare_fields, info=info)


def sampling_rates(c: FeatureContract) -> dict[str, float]:
    """The fraction of the logs' negatives kept per split: the contract's rate in train, all of valid and
    test; none in any split of a recall contract (its splits hold the positives, and drawn negatives)."""
    if c.recall is not None:
        return {s: 0.0 for s in SPLITS}
    return {s: (c.sampling.neg_sample_rate if s == "train" else 1.0) for s in SPLITS}


def write_recall_tables(spark: SparkSession, fs: HadoopFS, ids: DataFrame, c: FeatureContract,
                        vocab: FittedVocabulary | None, staging: str, phase: Phases) -> RecallTables:
    """A recall contract's pass before the one pass: aggregate the good rows per (user key, item key)
    (written to ``staging/recall_pairs``, deleted at the end), check that every item-side field is constant
    per item key (:class:`FeaturizeError` naming the field and a key, before any output is written),
    then write ``catalogue/`` (its ids rare-mapped as the splits' are), ``users/`` and ``seen/``, and
    read the indexes back for the pass's joins."""
    r = R.recall_of(c)
    per_file = c.output.rows_per_row_group

    def write(df: DataFrame, name: str, order: str) -> DataFrame:
        # one task, in ``order``: the files hold the rows by index (a catalogue's row is its item_index)
        (df.coalesce(1).sortWithinPartitions(order).write.option("maxRecordsPerFile", per_file)
         .parquet(f"{staging}/{name}"))
        return spark.read.parquet(f"{staging}/{name}")

    with phase("recall: keys, catalogue and seen items"):
        R.pair_aggregates(ids.filter(~F.col("_bad")), c).write.parquet(f"{staging}/{layout.PAIRS}")
        pairs = spark.read.parquet(f"{staging}/{layout.PAIRS}")
        items = R.item_aggregates(pairs, c).cache()
        n_items, train_positives = R.check_constant_items(items, c)
        users = R.dense_index(pairs.select(R.USER_KEY).distinct(), R.USER_KEY, layout.USER_INDEX)
        users = write(users.select(layout.USER_INDEX, F.col(R.USER_KEY).alias(layout.USER_KEY)), layout.USERS,
                      layout.USER_INDEX)
        cat = R.catalogue(R.dense_index(items, R.ITEM_KEY, layout.ITEM_INDEX), c, train_positives, n_items)
        rare = [f for f in R.item_fields(c) if isinstance(f, CategoricalField) and f.min_count > 0]
        if vocab is not None and rare:
            cat = map_rare(cat, vocab.frame, rare).select(*cat.columns)
        cat = write(cat, layout.CATALOGUE, layout.ITEM_INDEX)
        items.unpersist()
        user_index = users.select(F.col(layout.USER_KEY).alias(R.USER_KEY), layout.USER_INDEX)
        item_index = cat.select(F.col(layout.ITEM_KEY).alias(R.ITEM_KEY), layout.ITEM_INDEX)
        n_seen_files = max(1, math.ceil(fs.parquet_rows(f"{staging}/{layout.PAIRS}") / per_file))
        R.seen_pairs(pairs, user_index, item_index).repartition(n_seen_files).write.parquet(f"{staging}/{layout.SEEN}")
        n_users = fs.parquet_rows(f"{staging}/{layout.USERS}")
        n_seen = fs.parquet_rows(f"{staging}/{layout.SEEN}")
        if fs.parquet_rows(f"{staging}/{layout.CATALOGUE}") != n_items:
            raise FeaturizeError(f"{layout.CATALOGUE}: the written rows are not the {n_items} items counted; "
                                 "nothing was committed")
        fs.delete(f"{staging}/{layout.PAIRS}")
    log.info("recall: %d items, %d users, %d train positives, %d seen pairs", n_items, n_users, train_positives,
             n_seen)
    info = M.RecallInfo(user_key=r.user_key, item_key=r.item_key, items=n_items, users=n_users,
                        train_positives=train_positives, seen_rows=n_seen,
                        item_fields=tuple(f.name for f in R.item_fields(c)),
                        random_negatives=r.random_negatives,
                        sample_prob=layout.SAMPLE_PROB if r.random_negatives else None)
    return RecallTables(user_index=user_index, item_index=item_index,
                        catalogue_ids=cat.select(layout.ITEM_INDEX, *info.item_fields), info=info)


def expected_rows(c: FeatureContract, plan: DayPlan, rates: Mapping[str, float]) -> dict[str, int]:
    """The rows each split should have as written (to plan its files): after negative sampling, and for
    a recall contract its positives, with ``random_negatives`` more per train positive."""
    k = c.recall.random_negatives if c.recall else 0
    return {s: plan.expected_rows(s, rates[s]) * (1 + k if s == "train" else 1) for s in SPLITS}


def write_splits(ids: DataFrame, c: FeatureContract, plan: DayPlan, vocab: FittedVocabulary | None, staging: str,
                 phase: Phases, tables: RecallTables | None = None,
                 ids_of_days: Callable[[Sequence[int]], DataFrame] | None = None) -> Written:
    """The one pass: count, drop malformed lines, map rare ids, sample train negatives (a recall
    contract: keep the positives, join their key indexes and draw random negatives), send each row to
    a planned file of its split, write (to ``staging/_all``, layout.WRITTEN). The observations are made here, after
    the fitting passes, so that they see this pass only.

    With ``ids_of_days`` (days from file names: the ids of some days' files only), a valid or test split
    big enough for whole row groups (placement.direct_splits) is written by a query of its own over its
    day files, without the shuffle (to ``staging/_direct/<split>``), and the shuffled write reads only
    the other days' files: each file is still read once."""
    rates = sampling_rates(c)
    columns = [LABEL_COLUMN, *c.field_names, DAY_COLUMN]
    if tables is not None:
        columns += tables.info.columns
    expected = expected_rows(c, plan, rates)
    direct = direct_splits(expected, c.output.rows_per_row_group, c.output.min_row_groups,
                           eligible=ids_of_days is not None and tables is None)
    shuffled_days = [d for s in SPLITS if s not in direct for d in plan.split_days[s]]
    if not shuffled_days:                       # nothing left to shuffle: one query as usual
        direct = ()
    files = plan_files({s: 0 if s in direct else n for s, n in expected.items()}, c.output.rows_per_row_group,
                       c.output.min_row_groups)
    counted: list[Observation] = []
    kept: list[Observation] = []

    def one_pass(rows: DataFrame, name: str) -> DataFrame:
        seen = Observation(f"featurize: input {name}")
        rows = rows.observe(seen, F.count(F.lit(1)).alias("lines"), F.count_if(F.col("_bad")).alias("bad"),
                            F.collect_set(F.when(F.col("_bad"), F.col("day"))).alias("bad_days"),
                            *split_counts(~F.col("_bad")))
        rows = rows.filter(~F.col("_bad")).drop("_bad")
        if vocab is not None:
            rows = map_rare(rows, vocab.frame, vocab.fields)
        if tables is not None:
            rows = R.with_indexes(rows.filter(F.col(LABEL_COLUMN) == 1), tables.user_index, tables.item_index)
            if tables.info.random_negatives:
                rows = R.with_random_negatives(rows, tables.catalogue_ids, c, tables.info.items, c.sampling.seed)
        else:
            rows = sample_negatives(rows, rates["train"], c.sampling.seed, only=F.col("_split") == "train")
        out = Observation(f"featurize: output {name}")
        counted.append(seen)
        kept.append(out)
        return rows.observe(out, *split_counts(F.lit(True)))

    for s in direct:
        assert ids_of_days is not None                  # direct_splits is () without it
        with phase(f"parse, hash, bucket and write {s} (no shuffle)"):
            write_direct(one_pass(ids_of_days(plan.split_days[s]), s), columns, c.output.rows_per_row_group,
                         f"{staging}/{layout.DIRECT}/{s}")
    rest = [s for s in SPLITS if s not in direct]
    with phase(f"parse, hash, bucket, sample and write {'/'.join(rest)}"):
        frame = ids_of_days(shuffled_days) if ids_of_days is not None and direct else ids
        write_files(one_pass(frame, "/".join(rest)), files, columns, c.sampling.seed, c.output.rows_per_row_group,
                    f"{staging}/{layout.WRITTEN}")
    return Written(counted=tuple(counted), kept=tuple(kept), files=files, rates=rates, direct=direct,
                   drawn=tables.info.random_negatives if tables is not None else None)


def verify_counts(spark: SparkSession, fs: HadoopFS, ids: DataFrame, staging: str, written: Written,
                  n_files: Mapping[str, int], phase: Phases) -> RunCounts:
    """The observed counts, checked: each split's rows on disk (Parquet footers) must be the rows
    observed written, sampling must keep every positive, and an unsampled split every row. When they
    disagree the input and output are counted again by passes of their own. A recall split must hold
    its positives and (train) ``random_negatives`` rows more per positive."""
    obs = written.counted_metrics()
    lines, bad, before = int(obs["lines"]), int(obs["bad"]), observed(obs)
    after = observed(written.kept_metrics())
    with phase("check the output"):
        on_disk = {s: fs.parquet_rows(f"{staging}/{s}") if n_files[s] else 0 for s in SPLITS}
    if any(on_disk[s] != after[s].rows or before[s].positives != after[s].positives
           or (written.rates[s] >= 1.0 and before[s].rows != after[s].rows) for s in SPLITS):
        # observed metrics count twice when Spark re-runs a stage after a lost executor: count again
        log.warning("observed counts %s disagree with the written files' %s (a retried stage?); counting again",
                    {s: (a.rows, a.positives) for s, a in after.items()}, on_disk)
        with phase("recount the input and output"):
            lines, bad, before = recount(ids)
            after = {s: count_split(spark, f"{staging}/{s}") if n_files[s] else Counts(0, 0) for s in SPLITS}
    if written.drawn is not None:      # a recall split: its positives, and in train the draws of each
        for s in SPLITS:
            want = after[s].positives * (1 + written.drawn if s == "train" else 1)
            if after[s].rows != want:
                raise FeaturizeError(f"{s}: {after[s].rows} rows written, not the {after[s].positives} positives"
                                     + (f" and {written.drawn} random negatives each" if s == "train" else "")
                                     + "; nothing was committed")
    return RunCounts(lines=lines, bad=bad, before=before, after=after, files=dict(n_files),
                     bad_days=frozenset(int(d) for d in obs["bad_days"]))


def split_infos(plan: DayPlan, counts: RunCounts, rates: Mapping[str, float]) -> dict[str, M.SplitInfo]:
    """Each split as the manifest records it."""
    return {s: M.SplitInfo(days=tuple(plan.split_days[s]), before_sampling=counts.before[s],
                           rows=counts.after[s].rows, positives=counts.after[s].positives, files=counts.files[s],
                           neg_sample_rate=rates[s]) for s in SPLITS}


def inputs_with_rejects(inputs: DayInputs, bad_days: frozenset[int]) -> DayInputs:
    """The inputs the quarantine has to read again: the day files of the days that held malformed lines
    (the main pass observed them), every input when days come from a column (a bad line's day may be
    unreadable).

        [(0, day_0), (1, day_1), (2, day_2)], {0} -> [(0, day_0)];  [(None, logs)], {} -> [(None, logs)]
    """
    some = [(d, p) for d, p in inputs if d is None or d in bad_days]
    return some or list(inputs)


def quarantine(spark: SparkSession, o: Options, inputs: DayInputs, path: str, expected: int) -> dict[str, int]:
    """Write the malformed lines of ``inputs`` with their day and reason to ``path`` (``day, reason,
    line, line_bytes``: the line as valid UTF-8 text and as its exact bytes, records.reject_columns);
    return the count per reason (observed as they are written). Finding another number than the parse
    counted stops the job."""
    c = o.contract
    reasons = reasons_of(c)
    log.info("quarantine: reading %d input(s) again for their %d malformed line(s): %s", len(inputs), expected,
             ", ".join(os.path.basename(p.rstrip("/")) for _, p in inputs))
    parsed = parse_lines(read_lines(spark, inputs), c)
    if c.source.day_from == "column":
        parsed = within_days(parsed, o.days)
    bad = parsed.filter(F.col("_reason").isNotNull()).select("day", F.col("_reason").alias("reason"),
                                                               *reject_columns("_line"))
    seen = Observation("featurize: rejects")
    bad = bad.observe(seen, *[F.count_if(F.col("reason") == r).alias(r) for r in reasons])
    bad.repartition(max(1, math.ceil(expected / 1_000_000))).write.parquet(path)
    out = {r: int(seen.get[r]) for r in reasons}
    if sum(out.values()) != expected:
        # observed counts would count twice after a retried stage: the files decide
        out = {r: 0 for r in reasons}
        for row in spark.read.parquet(path).groupBy("reason").count().collect():
            out[row["reason"]] = int(row["count"])
    if sum(out.values()) != expected:
        raise FeaturizeError(f"the parse counted {expected} malformed lines but the quarantine found "
                             f"{sum(out.values())}; nothing was committed")
    return out


def log_counts(plan: DayPlan, splits: Mapping[str, M.SplitInfo], lines: int, rejects: Mapping[str, int]) -> None:
    """One log line per split (days, rows before and after sampling, positives, files) and one for the input."""
    for s in SPLITS:
        log.info("%s: days %s, %d rows (%d before sampling), %d positives, %d file(s)", s, plan.split_days[s],
                 splits[s].rows, splits[s].before_sampling.rows, splits[s].positives, splits[s].files)
    n_rejects = sum(rejects.values())
    log.info("parsed %d lines: %d good, %d rejected %s", lines, lines - n_rejects, n_rejects,
             {k: v for k, v in rejects.items() if v})


def check_reject_limit(fs: HadoopFS, c: FeatureContract, staging: str, lines: int, rejects: Mapping[str, int]) -> None:
    """More malformed lines than ``quality.max_reject_fraction`` allows: :class:`RejectLimitError`, with
    the staging folder kept holding only the rejects (and their reasons) for inspection."""
    limit = c.quality.max_reject_fraction
    refuse_over_reject_limit(fs, staging, lines, sum(rejects.values()), limit,
                             (*SPLITS, layout.VOCAB, layout.CATALOGUE, layout.USERS, layout.SEEN, layout.PAIRS),
                             f"quality.max_reject_fraction={limit}")


def refuse_over_reject_limit(fs: HadoopFS, staging: str, lines: int, n_rejects: int, limit: float,
                             written: Sequence[str], allowed: str) -> None:
    """When ``n_rejects / lines`` is over ``limit``: delete the ``written`` folders of ``staging``, so that
    it holds only the rejects, and raise :class:`RejectLimitError` naming the setting (``allowed``) and the
    rejects' folder. The featurize and scoring jobs' limit."""
    if lines and n_rejects / lines > limit:
        for s in written:
            if fs.exists(f"{staging}/{s}"):
                fs.delete(f"{staging}/{s}")
        raise RejectLimitError(
            f"{n_rejects} of {lines} lines ({100 * n_rejects / lines:.2f}%) are malformed, more than "
            f"{allowed}; nothing was committed. "
            f"The rejected lines and reasons are in {staging}/{layout.REJECTS}")


def check_splits_have_rows(spark: SparkSession, plan: DayPlan, splits: Mapping[str, M.SplitInfo],
                           rejects_path: str, n_rejects: int) -> None:
    """A split that has days but ended with no rows: :class:`FeaturizeError` (nothing is committed),
    naming its days and how many of their lines were rejected. A run that trains or evaluates on
    nothing is a broken input, not a result (a test day of only malformed lines would report
    ``test 0->0 rows`` and exit 0).

        test: days [3], 0 rows -> "test: day(s) [3] gave 0 good rows (25000 lines rejected); nothing was committed"
    """
    for s in SPLITS:
        days = plan.split_days[s]
        if not days or splits[s].rows > 0:
            continue
        good = splits[s].before_sampling.rows
        if good and splits[s].neg_sample_rate == 0.0:
            raise FeaturizeError(f"{s}: day(s) {days} gave {good} good rows but no positive, and a recall "
                                 "contract's splits hold only the positives; nothing was committed")
        if good:
            raise FeaturizeError(f"{s}: day(s) {days} gave {good} good rows but none were kept by negative "
                                 f"sampling at rate {splits[s].neg_sample_rate}; nothing was committed")
        rejected = (spark.read.parquet(rejects_path).filter(F.col("day").isin(days)).count()
                    if n_rejects else 0)
        raise FeaturizeError(f"{s}: day(s) {days} gave 0 good rows ({rejected} lines rejected); nothing was committed")


def feature_fingerprint(contract_fp: str, boundaries: Mapping[str, Sequence[float]], vocab_digest: str | None) -> str:
    """What the ids of this output mean: the contract, the fitted boundaries and the vocabulary."""
    blob = json.dumps({"c": contract_fp, "b": {k: list(v) for k, v in boundaries.items()}, "v": vocab_digest},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_manifest(spark: SparkSession, o: Options, inputs: DayInputs, plan: DayPlan,
                   boundaries: Mapping[str, tuple[float, ...]], vocab: FittedVocabulary | None,
                   splits: Mapping[str, M.SplitInfo], rejects: Mapping[str, int], lines: int,
                   seconds_by_step: Mapping[str, float], t0: float, recall: M.RecallInfo | None = None) -> Manifest:
    """What this run made, as the typed manifest. A recall contract's sampling is recorded as rate 1 with
    no correction (pipeline.manifest.RECALL_SAMPLING): no negative of the logs is kept, so there is none to
    correct for; each split's ``neg_sample_rate`` is 0."""
    c = o.contract
    info = vocab.info if vocab is not None else None
    sampling = (M.SamplingInfo(neg_sample_rate=1.0, seed=c.sampling.seed, correction=M.RECALL_SAMPLING) if recall
                else M.SamplingInfo(neg_sample_rate=c.sampling.neg_sample_rate, seed=c.sampling.seed))
    return Manifest(
        contract=c, contract_fingerprint=c.fingerprint,
        feature_fingerprint=feature_fingerprint(c.fingerprint, boundaries, info.digest if info else None),
        source_label=c.label, fields=M.fields_of(c), boundaries=dict(boundaries), vocab=info,
        sampling=sampling, splits=dict(splits), recall=recall,
        rejects=M.Rejects(total=sum(rejects.values()), by_reason=dict(rejects), path=layout.REJECTS),
        input=M.InputInfo(path=o.input, files=tuple(p for _, p in inputs), days=plan.days, lines=lines,
                          reused_from=o.reuse, missing_days=plan.missing_days),
        seconds=round(time.time() - t0, 2), seconds_by_step=dict(seconds_by_step), spark_version=spark.version,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def commit_manifest(fs: HadoopFS, staging: str, m: Manifest) -> None:
    """The manifest, then ``_SUCCESS``: the staging folder is complete."""
    fs.write_text(f"{staging}/{layout.MANIFEST}", m.dumps())
    fs.write_text(f"{staging}/{layout.SUCCESS}", "")


def commit(fs: HadoopFS, staging: str, out: str, overwrite: bool) -> None:
    """Move the complete staging folder into place (a rename: atomic on local file systems and HDFS)."""
    old = None
    if fs.exists(out):
        if not overwrite:
            raise FeaturizeError(f"{out} appeared while the job ran; not replacing it without --overwrite")
        old = layout.old_dir(out, uuid.uuid4().hex[:8])
        fs.rename(out, old)
    fs.rename(staging, out)
    if old:
        fs.delete(old)
