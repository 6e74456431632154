"""spark-submit jobs/featurize.py: raw click logs -> hashed, bucketed, negatively-sampled Parquet.

    spark-submit jobs/featurize.py --input data/raw --output data/featurized [--config conf/criteo.yaml]
        [--neg-sample-rate R] [--valid-days N] [--test-days N] [--reuse PREVIOUS_OUTPUT] [--overwrite]

Writes OUTPUT/{train,valid,test} (Parquet, one row group per file), OUTPUT/rejects (malformed lines
with their reason), OUTPUT/vocab (frequent ids, when a field has min_count > 0), OUTPUT/manifest.json
and OUTPUT/_SUCCESS. Everything is written to a staging folder beside OUTPUT and renamed into place at
the end, so OUTPUT is complete or absent.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import logging
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from pipeline.contract import ContinuousField, ContractError, FeatureContract, load_contract
from pipeline import features as T
from pipeline.hadoopfs import HadoopFS
from pipeline.layout import PathOverlapError, refuse_overlap

log = logging.getLogger("jobs.featurize")
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "conf" / "criteo.yaml")
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
MANIFEST_VERSION = 1


class FeaturizeError(RuntimeError):
    """The job cannot go on; the message says why. Nothing is committed to the output."""


class RejectLimitError(FeaturizeError):
    """More lines are malformed than the contract allows. The staging folder is kept with the rejected
    lines and their reasons, for inspection; nothing is committed."""


@dataclass(frozen=True)
class Options:
    input: str
    output: str
    contract: FeatureContract
    overwrite: bool
    reuse: str | None
    days: tuple[int, int] | None


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="spark-submit jobs/featurize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="folder of day files day_<N> (plain, .gz, or folders of parts)")
    p.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="feature contract (default conf/criteo.yaml)")
    p.add_argument("--neg-sample-rate", type=float, help="fraction of train negatives kept (contract's sampling)")
    p.add_argument("--seed", type=int, help="sampling and shuffling seed (contract's sampling.seed)")
    p.add_argument("--valid-days", type=int, help="days before the test days used for validation")
    p.add_argument("--test-days", type=int, help="last days used for test")
    p.add_argument("--max-reject-fraction", type=float, help="fail when more input lines than this are malformed")
    p.add_argument("--rows-per-row-group", type=int, help="rows per Parquet row group (contract's output)")
    p.add_argument("--min-row-groups", type=int, help="at least this many row groups per split")
    p.add_argument("--days", help="only days FIRST-LAST (inclusive), e.g. 3-9, for a training window")
    p.add_argument("--reuse", help="an earlier output whose fitted boundaries and vocabulary to reuse, so that "
                                   "ids mean the same as there (scheduled retraining)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any contract key, e.g. --set categorical.fields.C3.min_count=5 (YAML value)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a = p.parse_args(argv)
    contract = load_contract(a.config)
    overrides: dict[str, Any] = {}
    for flag, key in (("neg_sample_rate", "sampling.neg_sample_rate"), ("seed", "sampling.seed"),
                      ("valid_days", "splits.valid_days"), ("test_days", "splits.test_days"),
                      ("max_reject_fraction", "quality.max_reject_fraction"),
                      ("rows_per_row_group", "output.rows_per_row_group"),
                      ("min_row_groups", "output.min_row_groups")):
        if getattr(a, flag) is not None:
            overrides[key] = getattr(a, flag)
    import yaml
    for kv in a.set:
        if "=" not in kv:
            raise ContractError(f"--set {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    if overrides:
        contract = contract.with_overrides(**overrides)
    days = None
    if a.days:
        m = re.fullmatch(r"(\d+)-(\d+)", a.days)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise FeaturizeError(f"--days {a.days!r}: expected FIRST-LAST, e.g. 3-9")
        days = (int(m.group(1)), int(m.group(2)))
    o = Options(input=a.input, output=a.output.rstrip("/"), contract=contract, overwrite=a.overwrite,
                reuse=a.reuse, days=days)
    check_paths(o.output, o.input, o.reuse)      # before Spark starts (run() checks the qualified paths again)
    return o


def check_paths(output: str, input: str, reuse: str | None) -> None:
    """The output (and its staging folder beside it) must not be, hold or lie inside what the job reads:
    with --overwrite it would delete its own input."""
    try:
        refuse_overlap(("--output", output), ("--input", input), ("--reuse", reuse))
    except PathOverlapError as e:
        raise FeaturizeError(str(e)) from None


def get_spark() -> SparkSession:
    """The session: spark-submit's (its --master and --conf), an active one (tests), or local[*] when
    run as plain ``python jobs/featurize.py``."""
    from pyspark import SparkContext
    b = SparkSession.builder.appName("featurize").config("spark.ui.showConsoleProgress", "true")
    if "PYSPARK_GATEWAY_PORT" not in os.environ and SparkContext._active_spark_context is None:
        b = b.master("local[*]").config("spark.driver.memory", "4g")
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


class Phases:
    """Names each step of the job in Spark's UI (job description) and in the log, and keeps its seconds
    for the manifest: where the time of a run went."""

    def __init__(self, spark: SparkSession):
        self.sc = spark.sparkContext
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sc.setJobDescription(f"featurize: {name}")
        t = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t, 2)
        log.info("%s: %.1f s", name, self.seconds[name])


# --- extract -------------------------------------------------------------------------------------

def find_day_inputs(fs: HadoopFS, input_dir: str, contract: FeatureContract,
                    days: tuple[int, int] | None) -> list[tuple[int | None, str]]:
    """(day, path) of each input matching the contract's file pattern, in day order. Day is None when
    days come from a column."""
    if not fs.exists(input_dir):
        raise FeaturizeError(f"--input {input_dir}: no such folder")
    rx = re.compile(contract.source.file_pattern)
    found: list[tuple[int | None, str]] = []
    for e in fs.list(input_dir):
        if e.name.startswith((".", "_")):
            continue
        m = rx.search(e.name)
        if not m:
            continue
        day = int(m.group(1)) if contract.source.day_from == "file_name" else None
        if day is not None and days and not (days[0] <= day <= days[1]):
            continue
        found.append((day, e.path))
    if not found:
        raise FeaturizeError(f"--input {input_dir}: no file matches {contract.source.file_pattern!r}"
                             + (f" within days {days[0]}-{days[1]}" if days else ""))
    return sorted(found, key=lambda x: (x[0] if x[0] is not None else -1, x[1]))


def read_lines(spark: SparkSession, inputs: list[tuple[int | None, str]]) -> DataFrame:
    """All input lines with their day (from the file name; null when it comes from a column)."""
    return T.union_days(inputs, spark.read.text)


def assign_splits(days: list[int], valid_days: int, test_days: int) -> dict[str, list[int]]:
    """The last test_days days are test, the valid_days before them valid, the rest train.

        ([0, 1, 2, 3], 1, 1) -> train [0, 1], valid [2], test [3]
    """
    days = sorted(days)
    if len(days) <= valid_days + test_days:
        raise FeaturizeError(f"{len(days)} day(s) found ({days}) but {valid_days} valid + {test_days} test day(s) "
                             "leave none to train on")
    n_test_start = len(days) - test_days
    n_valid_start = n_test_start - valid_days
    return {"train": days[:n_valid_start], "valid": days[n_valid_start:n_test_start], "test": days[n_test_start:]}


# --- the job -------------------------------------------------------------------------------------

def run(spark: SparkSession, o: Options) -> dict:
    t0 = time.time()
    c = o.contract
    fs = HadoopFS(spark, o.output)
    out = fs.qualify(o.output)
    in_fs = HadoopFS(spark, o.input)
    check_paths(out, in_fs.qualify(o.input), HadoopFS(spark, o.reuse).qualify(o.reuse) if o.reuse else None)
    if fs.exists(out) and not o.overwrite:
        raise FeaturizeError(f"--output {o.output} exists; pass --overwrite to replace it")
    reused = load_reuse(spark, o.reuse, c) if o.reuse else None
    inputs = find_day_inputs(in_fs, in_fs.qualify(o.input), c, o.days)
    log.info("%s: %d input(s) %s", c.name, len(inputs), ", ".join(p.rsplit("/", 1)[-1] for _, p in inputs))

    staging = f"{out}.__staging-{uuid.uuid4().hex[:8]}"
    try:
        manifest = _featurize(spark, o, fs, inputs, staging, reused, t0)
        _commit(fs, staging, out, o.overwrite)
    except RejectLimitError:
        raise                                  # its staging folder holds the rejects; the message names it
    except BaseException:
        if fs.exists(staging):
            fs.delete(staging)
        raise
    return manifest


def _featurize(spark: SparkSession, o: Options, fs: HadoopFS, inputs: list[tuple[int | None, str]],
               staging: str, reused: dict | None, t0: float) -> dict:
    """One pass over the input does the work: Spark's CSV reader parses each line once, every id is a
    JVM expression, one shuffle places each split's rows in the files planned for them (train rows in a
    seeded random order), and one write makes the files, which are then moved into train/valid/test
    by their partition number. Counts ride along (``observe``) and are checked against the files'
    footers; the text is read again only to plan file counts (a line count), to fit quantiles or
    a vocabulary when the contract asks for them, and to quarantine malformed lines when there are any."""
    c = o.contract
    phase = Phases(spark)
    # Wide rows make big generated methods; the JVM does not compile methods over 8 kB of bytecode and
    # would interpret them (3x slower here). At this limit Spark splits such a stage into small methods.
    spark.conf.set("spark.sql.codegen.hugeMethodLimit", "8000")
    checked = T.check_records(T.read_records(spark, inputs, c), c)
    if c.source.day_from == "column" and o.days:
        checked = checked.filter(F.col("day").isNull() | F.col("day").between(*o.days))
    good = ~F.col("_bad")

    # 1. Which days, which split each belongs to, and about how many rows each split will have.
    if c.source.day_from == "file_name":
        days = sorted({d for d, _ in inputs if d is not None})
        with phase("count lines (to plan files)"):
            plan = count_lines(spark, inputs, c)
    else:
        with phase("find days"):
            plan = {r["day"]: (int(r["rows"]), int(r["positives"] or 0)) for r in checked.filter(good).groupBy("day")
                    .agg(F.count(F.lit(1)).alias("rows"), F.sum("label").alias("positives")).collect()}
        days = sorted(plan)
        if not days:
            raise FeaturizeError("no good rows in the input")
    split_days = assign_splits(days, c.splits.valid_days, c.splits.test_days)
    split_of = F.create_map(*[x for s, ds in split_days.items() for d in ds for x in (F.lit(d), F.lit(s))])
    train_rows = good & F.col("day").isin(split_days["train"])

    # 2. Bucket boundaries: reused, or fitted on the train days only (approximate quantiles).
    boundaries: dict[str, list[float]] = {}
    qfields = [f for f in c.continuous if f.bucketing == "quantile"]
    if reused is not None:
        boundaries = {k: list(v) for k, v in reused["boundaries"].items()}
    elif qfields:
        nonneg = checked.filter(train_rows).select(*[F.when(F.col(f.name) >= 0, F.col(f.name)).alias(f.name)
                                                     for f in qfields])
        probs = sorted({p for f in qfields for p in T.quantile_probabilities(f)})
        with phase("fit quantile boundaries"):
            qs = nonneg.approxQuantile([f.name for f in qfields], probs, 1e-4)
        for f, q in zip(qfields, qs):
            want = set(T.quantile_probabilities(f))
            boundaries[f.name] = sorted({float(v) for p, v in zip(probs, q) if p in want})
        log.info("fitted boundaries for %d field(s) on train days %s", len(qfields), split_days["train"])
    all_ids = T.to_ids(checked, c, boundaries, c.sampling.seed, keep=["_bad"]).withColumn("_split", split_of[F.col("day")])

    # 3. Rare values: ids seen fewer than min_count times in the train days -> 1.
    rare_fields = [f for f in c.categorical if f.min_count > 0]
    vocab_info: dict[str, Any] = {}
    vocab = None
    if rare_fields:
        with phase("vocabulary (min_count)"):
            if reused is not None:
                vocab = spark.read.parquet(reused["vocab_path"])
            else:
                counts = T.count_ids(all_ids.filter(train_rows), rare_fields)
                mins = F.create_map(*[x for f in rare_fields for x in (F.lit(f.name), F.lit(f.min_count))])
                vocab = counts.filter(F.col("count") >= mins[F.col("field")])
            vocab.repartition(max(1, len(rare_fields) // 4)).write.parquet(f"{staging}/vocab")
            vocab = spark.read.parquet(f"{staging}/vocab")
            sizes = {r["field"]: r["n"] for r in vocab.groupBy("field").agg(F.count(F.lit(1)).alias("n")).collect()}
            digest = vocab.agg(F.bit_xor(F.xxhash64("field", "id")).alias("d")).collect()[0]["d"] or 0
        vocab_info = {"path": "vocab", "ids_kept": {f.name: sizes.get(f.name, 0) for f in rare_fields},
                      "digest": str(digest)}

    # 4. The one pass: count, drop malformed lines, map rare ids, sample train negatives, send each row to
    #    a planned file of its split, write. (Observations are built here, after the fitting passes above,
    #    so that they see this pass only.)
    counted = Observation("featurize: input")
    ids = all_ids.observe(counted, F.count(F.lit(1)).alias("lines"), F.count_if(F.col("_bad")).alias("bad"),
                          *split_counts(good))
    ids = ids.filter(good).drop("_bad")
    if vocab is not None:
        ids = T.map_rare(ids, vocab, rare_fields)
    rates = {s: (c.sampling.neg_sample_rate if s == "train" else 1.0) for s in SPLITS}
    ids = T.sample_negatives(ids, rates["train"], c.sampling.seed, only=F.col("_split") == "train")
    kept = Observation("featurize: output")
    ids = ids.observe(kept, *split_counts(F.lit(True)))
    plan_files = {}
    for s in SPLITS:
        rows = sum(plan.get(d, (0, 0))[0] for d in split_days[s])
        pos = sum(plan.get(d, (0, 0))[1] for d in split_days[s])
        plan_files[s] = T.row_group_plan(pos + round((rows - pos) * rates[s]), c.output.rows_per_row_group,
                                         c.output.min_row_groups)[0]
    n_parts = max(1, sum(plan_files.values()))
    offsets, at = {}, 0
    for s in SPLITS:
        offsets[s], at = at, at + plan_files[s]
    keys = T.partition_keys(n_parts)
    k = f"xxhash64(`_h`, {c.sampling.seed + 1})"

    def per_split(d: dict[str, int]) -> str:
        return "CASE `_split` " + " ".join(f"WHEN '{s}' THEN {v}" for s, v in d.items()) + " END"
    target = f"{per_split(offsets)} + pmod({k}, greatest({per_split(plan_files)}, 1))"
    columns = ["label", *c.field_names, "day"]
    placed = ids.selectExpr(*T.pack_ints(columns), f"{k} AS `_k`",
                            f"element_at(array({', '.join(map(str, keys))}), CAST({target} + 1 AS INT)) AS `_pk`")
    # Shuffle partition p is file p: files [offsets[s], offsets[s] + plan_files[s]) are split s's. One
    # flat write (the partition's number is in its file's name), sorted by one random long per file.
    # The ints travel two to a long (half the shuffled bytes) and are unpacked for the write.
    with phase("parse, hash, bucket, sample and write train/valid/test"):
        (placed.repartition(n_parts, "_pk").sortWithinPartitions("_k").selectExpr(*T.unpack_ints(columns))
         .write.option("maxRecordsPerFile", c.output.rows_per_row_group)
         .option("compression", "snappy").parquet(f"{staging}/_all"))
    obs = counted.get
    total, n_bad = int(obs["lines"]), int(obs["bad"])
    before = {s: {"rows": int(obs[f"{s}_rows"]), "positives": int(obs[f"{s}_pos"] or 0)} for s in SPLITS}

    # 5. Each split's files into place; their rows (Parquet footers) must match the observed counts.
    n_files = place_files(fs, f"{staging}/_all", staging,
                          {s: range(offsets[s], offsets[s] + plan_files[s]) for s in SPLITS})
    obs = kept.get
    after = {s: (int(obs[f"{s}_rows"]), int(obs[f"{s}_pos"] or 0)) for s in SPLITS}
    with phase("check the output"):
        on_disk = {s: fs.parquet_rows(f"{staging}/{s}") if n_files[s] else 0 for s in SPLITS}
    if any(on_disk[s] != after[s][0] or before[s]["positives"] != after[s][1]
           or (rates[s] >= 1.0 and before[s]["rows"] != after[s][0]) for s in SPLITS):
        # observed metrics count twice when Spark re-runs a stage after a lost executor: count again
        log.warning("observed counts %s disagree with the written files' %s (a retried stage?); counting again",
                    after, on_disk)
        with phase("recount the input and output"):
            total, n_bad, before = recount(all_ids)
            after = {s: count_split(spark, f"{staging}/{s}") if n_files[s] else (0, 0) for s in SPLITS}
    split_stats: dict[str, dict[str, Any]] = {}
    for s in SPLITS:
        split_stats[s] = {"days": split_days[s], "before_sampling": before[s], "rows": after[s][0],
                          "positives": after[s][1], "files": n_files[s], "neg_sample_rate": rates[s]}

    # 6. Malformed lines, with their reason: the text is read again only when there are any.
    with phase("quarantine malformed lines"):
        rejects = quarantine(spark, o, inputs, f"{staging}/rejects", n_bad)
    n_rejects = sum(rejects.values())
    if n_rejects != n_bad:
        raise FeaturizeError(f"the parse counted {n_bad} malformed lines but the quarantine found {n_rejects}; "
                             "nothing was committed")
    for s in SPLITS:
        log.info("%s: days %s, %d rows (%d before sampling), %d positives, %d file(s)", s, split_days[s],
                 split_stats[s]["rows"], split_stats[s]["before_sampling"]["rows"], split_stats[s]["positives"],
                 split_stats[s]["files"])
    log.info("parsed %d lines: %d good, %d rejected %s", total, total - n_rejects, n_rejects,
             {k: v for k, v in rejects.items() if v})
    if total and n_rejects / total > c.quality.max_reject_fraction:
        for s in (*SPLITS, "vocab"):
            if fs.exists(f"{staging}/{s}"):
                fs.delete(f"{staging}/{s}")
        raise RejectLimitError(
            f"{n_rejects} of {total} lines ({100 * n_rejects / total:.2f}%) are malformed, more than "
            f"quality.max_reject_fraction={c.quality.max_reject_fraction}; nothing was committed. "
            f"The rejected lines and reasons are in {staging}/rejects")
    seconds = round(time.time() - t0, 2)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "contract": c.to_dict(),
        "contract_fingerprint": c.fingerprint,
        "feature_fingerprint": feature_fingerprint(c.fingerprint, boundaries, vocab_info.get("digest")),
        "label": c.label,
        "fields": [{"name": f.name, "kind": f.kind, "num_embeddings": f.num_embeddings,
                    "embedding_dim": f.embedding_dim,
                    **({"bucketing": f.bucketing} if isinstance(f, ContinuousField) else {"min_count": f.min_count})}
                   for f in c.fields],
        "columns": {"label": "int32", **{f: "int32" for f in c.field_names}, "day": "int32"},
        "boundaries": boundaries,
        "vocab": vocab_info or None,
        "sampling": {"neg_sample_rate": c.sampling.neg_sample_rate, "seed": c.sampling.seed,
                     "correction": "p = q / (q + (1 - q) / neg_sample_rate)"},
        "splits": split_stats,
        "rejects": {"total": n_rejects, "by_reason": rejects, "path": "rejects"},
        "input": {"path": o.input, "files": [p for _, p in inputs], "days": days, "lines": total,
                  "reused_from": o.reuse},
        "seconds": seconds,
        "seconds_by_step": phase.seconds,
        "spark_version": spark.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fs.write_text(f"{staging}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=False))
    fs.write_text(f"{staging}/{SUCCESS}", "")
    return manifest

def split_counts(where: Column) -> list[Column]:
    """Aggregates ``<split>_rows`` and ``<split>_pos`` (rows and positives of each split) over the rows
    where ``where`` holds, for an ``observe``."""
    return [a for s in SPLITS for a in (F.count_if(where & (F.col("_split") == s)).alias(f"{s}_rows"),
                                        F.sum(F.when(where & (F.col("_split") == s), F.col("label"))).alias(f"{s}_pos"))]


def count_lines(spark: SparkSession, inputs: list[tuple[int | None, str]], c: FeatureContract) -> dict[int, tuple[int, int]]:
    """day -> (lines, lines whose label field reads "1"): the text only, no parsing (to size the files)."""
    src = c.source
    k = src.columns.index(c.label)
    token = F.substring_index(F.substring_index(F.col("value"), src.delimiter, k + 1), src.delimiter, -1)
    counts = (read_lines(spark, inputs).groupBy("day")
              .agg(F.count(F.lit(1)).alias("n"), F.count_if(token == "1").alias("pos")).collect())
    return {r["day"]: (int(r["n"]), int(r["pos"])) for r in counts}


PART_FILE = re.compile(r"^part-(\d+)-.*\.parquet$")


def place_files(fs: HadoopFS, written: str, staging: str, parts: dict[str, range]) -> dict[str, int]:
    """Move each Parquet file of ``written`` (Spark's part-<partition>-... names) into ``staging/<split>``
    by the split that owns its partition; returns the file count per split. A file that fits no split
    (a name Spark did not give) stops the job rather than being lost."""
    moved = {s: 0 for s in parts}
    for e in fs.list(written):
        if e.name.startswith(("_", ".")):
            continue
        m = PART_FILE.match(e.name)
        owner = [s for s, r in parts.items() if m and int(m.group(1)) in r]
        if not owner:
            raise FeaturizeError(f"{e.path}: not a part file of a planned partition; nothing was committed")
        if not moved[owner[0]]:
            fs.mkdirs(f"{staging}/{owner[0]}")
        fs.rename(e.path, f"{staging}/{owner[0]}/{e.name}")
        moved[owner[0]] += 1
    fs.delete(written)
    return moved


def count_split(spark: SparkSession, path: str) -> tuple[int, int]:
    """(rows, positives) of the Parquet files under ``path``, read back."""
    r = spark.read.parquet(path).agg(F.count(F.lit(1)).alias("rows"), F.sum("label").alias("pos")).collect()[0]
    return int(r["rows"]), int(r["pos"] or 0)


def recount(ids: DataFrame) -> tuple[int, int, dict[str, dict[str, int]]]:
    """(lines, malformed lines, rows and positives per split before sampling), by a pass of its own."""
    rows = ids.groupBy("_split", "_bad").agg(F.count(F.lit(1)).alias("n"), F.sum("label").alias("pos")).collect()
    before = {s: {"rows": 0, "positives": 0} for s in SPLITS}
    for r in rows:
        if not r["_bad"] and r["_split"] in before:
            before[r["_split"]]["rows"] += int(r["n"])
            before[r["_split"]]["positives"] += int(r["pos"] or 0)
    return sum(int(r["n"]) for r in rows), sum(int(r["n"]) for r in rows if r["_bad"]), before


def quarantine(spark: SparkSession, o: Options, inputs: list[tuple[int | None, str]], path: str,
               expected: int) -> dict[str, int]:
    """Write the malformed lines with their day and reason to ``path``; return the count per reason.
    With none expected, writes an empty dataset without reading the input again."""
    out = {r: 0 for r in T.REASONS}
    if expected == 0:
        spark.createDataFrame([], "day int, reason string, line string").write.parquet(path)
        return out
    c = o.contract
    parsed = T.parse_lines(read_lines(spark, inputs), c)
    if c.source.day_from == "column" and o.days:
        parsed = parsed.filter(F.col("day").isNull() | F.col("day").between(*o.days))
    bad = parsed.filter(F.col("_reason").isNotNull()).select("day", F.col("_reason").alias("reason"),
                                                               F.col("_line").alias("line"))
    bad.repartition(max(1, math.ceil(expected / 1_000_000))).write.parquet(path)
    for r in spark.read.parquet(path).groupBy("reason").count().collect():
        out[r["reason"]] = int(r["count"])
    return out


def feature_fingerprint(contract_fp: str, boundaries: dict[str, list[float]], vocab_digest: str | None) -> str:
    """What the ids of this output mean: the contract, the fitted boundaries and the vocabulary."""
    blob = json.dumps({"c": contract_fp, "b": boundaries, "v": vocab_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_reuse(spark: SparkSession, path: str, c: FeatureContract) -> dict:
    """An earlier output's boundaries and vocabulary; refuses one made under another contract."""
    fs = HadoopFS(spark, path)
    base = fs.qualify(path.rstrip("/"))
    if not fs.exists(f"{base}/{SUCCESS}"):
        raise FeaturizeError(f"--reuse {path}: not a complete featurized output (no {SUCCESS})")
    m = json.loads(fs.read_text(f"{base}/{MANIFEST}"))
    if m["contract_fingerprint"] != c.fingerprint:
        raise FeaturizeError(f"--reuse {path}: made under contract {m['contract_fingerprint']}, this run's is "
                             f"{c.fingerprint}; ids would not mean the same (refit without --reuse)")
    return {"boundaries": m["boundaries"], "vocab_path": f"{base}/vocab" if m.get("vocab") else None}


def _commit(fs: HadoopFS, staging: str, out: str, overwrite: bool) -> None:
    """Move the complete staging folder into place (a rename: atomic on local file systems and HDFS)."""
    old = None
    if fs.exists(out):
        if not overwrite:
            raise FeaturizeError(f"{out} appeared while the job ran; not replacing it without --overwrite")
        old = f"{out}.__old-{uuid.uuid4().hex[:8]}"
        fs.rename(out, old)
    fs.rename(staging, out)
    if old:
        fs.delete(old)


def summary_line(m: dict) -> str:
    s = m["splits"]
    return ("featurize: " + ", ".join(f"{k} {v['before_sampling']['rows']}->{v['rows']} rows" for k, v in s.items())
            + f", {m['rejects']['total']} rejected, {m['input']['lines']} lines in, {m['seconds']} s")


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    o = parse_args(argv)
    spark = get_spark()
    manifest = run(spark, o)
    print(summary_line(manifest))
    return manifest


if __name__ == "__main__":
    try:
        main()
    except (ContractError, FeaturizeError) as e:
        print(f"featurize: error: {e}", file=sys.stderr)
        sys.exit(2)
