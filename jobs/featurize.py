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
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.contract import ContinuousField, ContractError, FeatureContract, load_contract
from pipeline import features as T
from pipeline.hadoopfs import HadoopFS

log = logging.getLogger("jobs.featurize")
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "conf" / "criteo.yaml")
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
MANIFEST_VERSION = 1


class FeaturizeError(RuntimeError):
    """The job cannot go on; the message says why. Nothing is committed to the output."""


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
    return Options(input=a.input, output=a.output.rstrip("/"), contract=contract, overwrite=a.overwrite,
                   reuse=a.reuse, days=days)


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
    frames = [spark.read.text(path).withColumn("day", F.lit(day).cast("int")) for day, path in inputs]
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    return df


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
    if fs.exists(out) and not o.overwrite:
        raise FeaturizeError(f"--output {o.output} exists; pass --overwrite to replace it")
    reused = load_reuse(spark, o.reuse, c) if o.reuse else None
    in_fs = HadoopFS(spark, o.input)
    inputs = find_day_inputs(in_fs, in_fs.qualify(o.input), c, o.days)
    log.info("%s: %d input(s) %s", c.name, len(inputs), ", ".join(p.rsplit("/", 1)[-1] for _, p in inputs))

    staging = f"{out}.__staging-{uuid.uuid4().hex[:8]}"
    try:
        manifest = _featurize(spark, o, fs, inputs, staging, reused, t0)
        _commit(fs, staging, out, o.overwrite)
    except FeaturizeError:
        raise
    except BaseException:
        if fs.exists(staging):
            fs.delete(staging)
        raise
    return manifest


def _featurize(spark: SparkSession, o: Options, fs: HadoopFS, inputs: list[tuple[int | None, str]],
               staging: str, reused: dict | None, t0: float) -> dict:
    c = o.contract
    parsed = T.parse_lines(read_lines(spark, inputs), c, c.sampling.seed)
    if c.source.day_from == "column" and o.days:
        parsed = parsed.filter(F.col("day").isNull() | F.col("day").between(*o.days))
    good_rows = F.col("_reason").isNull()

    # 1. Which days, and which split each belongs to (from file names, or a pass over the day column).
    if c.source.day_from == "file_name":
        days = sorted({d for d, _ in inputs if d is not None})
    else:
        spark.sparkContext.setJobDescription("featurize: find days")
        days = sorted(r["day"] for r in parsed.filter(good_rows).select("day").distinct().collect())
        if not days:
            raise FeaturizeError("no good rows in the input")
    split_days = assign_splits(days, c.splits.valid_days, c.splits.test_days)
    split_of = F.create_map(*[x for s, ds in split_days.items() for d in ds for x in (F.lit(d), F.lit(s))])
    is_train = good_rows & F.col("day").isin(split_days["train"])

    # 2. Bucket boundaries: reused, or fitted on the train days only (approximate quantiles).
    boundaries: dict[str, list[float]] = {}
    qfields = [f for f in c.continuous if f.bucketing == "quantile"]
    if reused is not None:
        boundaries = {k: list(v) for k, v in reused["boundaries"].items()}
    elif qfields:
        spark.sparkContext.setJobDescription("featurize: fit quantile boundaries")
        nonneg = parsed.filter(is_train).select(*[F.when(F.col(f.name) >= 0, F.col(f.name)).alias(f.name)
                                                  for f in qfields])
        probs = sorted({p for f in qfields for p in T.quantile_probabilities(f)})
        qs = nonneg.approxQuantile([f.name for f in qfields], probs, 1e-4)
        for f, q in zip(qfields, qs):
            want = set(T.quantile_probabilities(f))
            boundaries[f.name] = sorted({float(v) for p, v in zip(probs, q) if p in want})
        log.info("fitted boundaries for %d field(s) on train days %s", len(qfields), split_days["train"])

    # 3. Every line as ids (ints) with its reason; cached: the passes below read this, not the text.
    coded = T.to_ids(parsed, c, boundaries, keep=["_reason", "_line"]).withColumn("_split", split_of[F.col("day")])
    coded = coded.persist(StorageLevel.MEMORY_AND_DISK)
    spark.sparkContext.setJobDescription("featurize: parse, hash, bucket and count")
    stats = coded.groupBy("day", "_reason").agg(F.count(F.lit(1)).alias("rows"),
                                                F.sum("label").alias("positives")).collect()
    total = sum(r["rows"] for r in stats)
    rejects = {r: 0 for r in T.REASONS}
    per_day: dict[int, dict[str, int]] = {d: {"rows": 0, "positives": 0} for d in days}
    for r in stats:
        if r["_reason"] is not None:
            rejects[r["_reason"]] += r["rows"]
        elif r["day"] in per_day:
            per_day[r["day"]]["rows"] += r["rows"]
            per_day[r["day"]]["positives"] += r["positives"] or 0
    n_rejects = sum(rejects.values())
    log.info("parsed %d lines: %d good, %d rejected %s", total, total - n_rejects, n_rejects,
             {k: v for k, v in rejects.items() if v})

    # 4. Rejects, with their reason, before anything can fail on them.
    spark.sparkContext.setJobDescription("featurize: write rejects")
    (coded.filter(~good_rows).select("day", F.col("_reason").alias("reason"), F.col("_line").alias("line"))
     .coalesce(1).write.mode("overwrite").parquet(f"{staging}/rejects"))
    if total and n_rejects / total > c.quality.max_reject_fraction:
        coded.unpersist()
        raise FeaturizeError(
            f"{n_rejects} of {total} lines ({100 * n_rejects / total:.2f}%) are malformed, more than "
            f"quality.max_reject_fraction={c.quality.max_reject_fraction}; nothing was committed. "
            f"The rejected lines and reasons are in {staging}/rejects")
    ids = coded.filter(good_rows).drop("_reason", "_line")

    # 5. Rare values: ids seen fewer than min_count times in the train days -> 1.
    rare_fields = [f for f in c.categorical if f.min_count > 0]
    vocab_info: dict[str, Any] = {}
    if rare_fields:
        spark.sparkContext.setJobDescription("featurize: count ids for min_count")
        if reused is not None:
            vocab = spark.read.parquet(reused["vocab_path"])
        else:
            counts = T.count_ids(ids.filter(F.col("_split") == "train"), rare_fields)
            mins = F.create_map(*[x for f in rare_fields for x in (F.lit(f.name), F.lit(f.min_count))])
            vocab = counts.filter(F.col("count") >= mins[F.col("field")])
        vocab.repartition(max(1, len(rare_fields) // 4)).write.parquet(f"{staging}/vocab")
        vocab = spark.read.parquet(f"{staging}/vocab")
        sizes = {r["field"]: r["n"] for r in vocab.groupBy("field").agg(F.count(F.lit(1)).alias("n")).collect()}
        digest = vocab.agg(F.bit_xor(F.xxhash64("field", "id")).alias("d")).collect()[0]["d"] or 0
        vocab_info = {"path": "vocab", "ids_kept": {f.name: sizes.get(f.name, 0) for f in rare_fields},
                      "digest": str(digest)}
        ids = T.map_rare(ids, vocab, rare_fields)

    # 5. Write the splits: sampled (train only), shuffled by a seeded hash, sized for petastorm.
    fields = list(c.field_names)
    split_stats: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        before = {"rows": sum(per_day[d]["rows"] for d in split_days[split]),
                  "positives": sum(per_day[d]["positives"] for d in split_days[split])}
        part = ids.filter(F.col("_split") == split)
        rate = c.sampling.neg_sample_rate if split == "train" else 1.0
        part = T.sample_negatives(part, rate, c.sampling.seed)
        expected = before["positives"] + round((before["rows"] - before["positives"]) * rate)
        files, _ = T.row_group_plan(expected, c.output.rows_per_row_group, c.output.min_row_groups)
        path = f"{staging}/{split}"
        if files:
            spark.sparkContext.setJobDescription(f"featurize: write {split}")
            key = F.xxhash64(F.col("_h"), F.lit(c.sampling.seed + 1))
            rows = part.select("label", *fields, "day", key.alias("_k"))
            # hash partitioning needs no sampling pass; with few rows per file, range partitioning keeps
            # every file non-empty
            rows = rows.repartition(files, "_k") if expected >= 1000 * files else rows.repartitionByRange(files, "_k")
            (rows.sortWithinPartitions("_k").drop("_k")
             .write.option("compression", "snappy").parquet(path))
            agg = spark.read.parquet(path).agg(F.count(F.lit(1)).alias("rows"), F.sum("label").alias("pos")).collect()[0]
            after = {"rows": int(agg["rows"]), "positives": int(agg["pos"] or 0)}
            n_files = len([e for e in fs.list(path) if e.name.endswith(".parquet")])
        else:
            after, n_files = {"rows": 0, "positives": 0}, 0
        split_stats[split] = {"days": split_days[split], "before_sampling": before, "rows": after["rows"],
                              "positives": after["positives"], "files": n_files,
                              "neg_sample_rate": rate}
        log.info("%s: days %s, %d rows (%d before sampling), %d positives, %d file(s)", split, split_days[split],
                 after["rows"], before["rows"], after["positives"], n_files)
    coded.unpersist()

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
        "columns": {"label": "int32", **{f: "int32" for f in fields}, "day": "int32"},
        "boundaries": boundaries,
        "vocab": vocab_info or None,
        "sampling": {"neg_sample_rate": c.sampling.neg_sample_rate, "seed": c.sampling.seed,
                     "correction": "p = q / (q + (1 - q) / neg_sample_rate)"},
        "splits": split_stats,
        "rejects": {"total": n_rejects, "by_reason": rejects, "path": "rejects"},
        "input": {"path": o.input, "files": [p for _, p in inputs], "days": days, "lines": total,
                  "reused_from": o.reuse},
        "seconds": seconds,
        "spark_version": spark.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fs.write_text(f"{staging}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=False))
    fs.write_text(f"{staging}/{SUCCESS}", "")
    return manifest


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
