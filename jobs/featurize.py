"""spark-submit jobs/featurize.py: raw click logs -> hashed, bucketed, negatively-sampled Parquet.

    spark-submit jobs/featurize.py --input data/raw --output data/featurized [--config conf/criteo.yaml]
        [--neg-sample-rate R] [--valid-days N] [--test-days N] [--reuse PREVIOUS_OUTPUT] [--allow-day-gaps]
        [--overwrite]

Writes OUTPUT/{train,valid,test} (Parquet, one row group per file), OUTPUT/rejects (malformed lines
with their reason, as text and as their exact bytes), OUTPUT/vocab (frequent ids, when a field has min_count > 0), OUTPUT/manifest.json
and OUTPUT/_SUCCESS. Everything is written to a staging folder beside OUTPUT and renamed into place at
the end, so OUTPUT is complete or absent.

A recall contract (its ``recall`` key; docs/recall.md) keeps only the positives in every split, with
their ``user_index`` and ``item_index`` (and in train ``recall.random_negatives`` drawn items per
positive, with ``sample_prob``), and also writes OUTPUT/catalogue (one featurized row per item, its
train count and log_q), OUTPUT/seen (each clicked user-item pair and its first day) and OUTPUT/users;
``--neg-sample-rate`` does not apply to it. A list-valued field is written as Parquet list<int32>.

The entry point only: the arguments become :class:`Options`, and pipeline.spark.featurize does the work.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pyspark.sql import SparkSession

from pipeline.config import ConfigError, parse_yaml
from pipeline.contract import ContractError, FeatureContract, load_contract
from pipeline.manifest import Manifest
from pipeline.spark.errors import FeaturizeError, RejectLimitError
from pipeline.spark.featurize import Options, check_local_paths, check_paths, run

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "conf" / "criteo.yaml")
# flag -> the contract key it overrides
OVERRIDES = (("neg_sample_rate", "sampling.neg_sample_rate"), ("seed", "sampling.seed"),
             ("valid_days", "splits.valid_days"), ("test_days", "splits.test_days"),
             ("max_reject_fraction", "quality.max_reject_fraction"),
             ("rows_per_row_group", "output.rows_per_row_group"), ("min_row_groups", "output.min_row_groups"))


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--allow-day-gaps", action="store_true",
                   help="featurize although days are missing between the first and last day (a warning, and the "
                        "manifest's input.missing_days), instead of refusing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def _contract(a: argparse.Namespace) -> FeatureContract:
    """The contract file with the flags' and ``--set``'s overrides applied."""
    contract = load_contract(a.config)
    overrides: dict[str, Any] = {key: getattr(a, flag) for flag, key in OVERRIDES if getattr(a, flag) is not None}
    for kv in a.set:
        if "=" not in kv:
            raise ContractError(f"--set {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        try:
            overrides[k] = parse_yaml(v, f"--set {k}")
        except ConfigError as e:
            raise ContractError(str(e)) from None
    return contract.with_overrides(**overrides) if overrides else contract


def _days(text: str | None) -> tuple[int, int] | None:
    """``--days 3-9`` -> (3, 9)."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise FeaturizeError(f"--days {text!r}: expected FIRST-LAST, e.g. 3-9")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv: Sequence[str] | None) -> Options:
    a = _parser().parse_args(argv)
    o = Options(input=a.input, output=a.output.rstrip("/"), contract=_contract(a), overwrite=a.overwrite,
                reuse=a.reuse, days=_days(a.days), allow_day_gaps=a.allow_day_gaps)
    # before Spark starts, so that a wrong path fails in a moment (run() checks the qualified paths again)
    check_paths(o.output, o.input, o.reuse)
    check_local_paths(o.input, o.output, o.overwrite, o.reuse)
    return o


def get_spark(app: str = "featurize", defaults: Mapping[str, str] | None = None) -> SparkSession:
    """The session: spark-submit's (its --master and --conf), an active one (tests), or local[*] when
    run as plain ``python jobs/featurize.py``. ``app``: the application's name (jobs/score.py's is score);
    ``defaults``: settings for a new context, each unless the launcher set it (``--conf``)."""
    from pyspark import SparkConf, SparkContext
    b = SparkSession.builder.appName(app).config("spark.ui.showConsoleProgress", "true")
    if "PYSPARK_GATEWAY_PORT" not in os.environ and SparkContext._active_spark_context is None:
        b = b.master("local[*]").config("spark.driver.memory", "4g")
    if defaults and SparkContext._active_spark_context is None:
        if "PYSPARK_GATEWAY_PORT" in os.environ:
            SparkContext._ensure_initialized()      # spark-submit's JVM, whose properties hold its --conf
        launched = SparkConf()
        for k, v in defaults.items():
            if not launched.contains(k):
                b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def main(argv: Sequence[str] | None = None) -> Manifest:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)     # its INFO lines at shutdown would follow an error line
    o = parse_args(argv)
    m = run(get_spark(), o)
    print(m.summary_line())
    return m


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for the command line: 0, or 2 with ``featurize: error: ...`` on stderr for a contract
    or featurize error."""
    try:
        main(argv)
    except (ContractError, FeaturizeError) as e:
        print(f"featurize: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["FeaturizeError", "RejectLimitError", "Options", "parse_args", "run", "get_spark", "main", "cli"]

if __name__ == "__main__":
    sys.exit(cli())
