"""Shared fixtures: one local[2] Spark session and one generated data set for the whole run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SMALL = str(CONF / "criteo_small.yaml")
# The shared generated logs: 4 days (train 0-1, valid 2, test 3).
RAW_DAYS = 4
RAW_ROWS = 25_000
RAW_SEED = 11


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    s = (SparkSession.builder.master("local[2]").appName("tests")
         .config("spark.sql.shuffle.partitions", "4")
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.driver.memory", "2g")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def raw_logs(tmp_path_factory) -> Path:
    """Generated Criteo-format logs shared by the tests (do not modify them)."""
    from pipeline.contract import load_contract
    from pipeline.generate import generate
    out = tmp_path_factory.mktemp("raw")
    generate(load_contract(SMALL), out, list(range(RAW_DAYS)), RAW_ROWS, RAW_SEED, workers=2,
             max_cardinality=30_000)
    return out


@pytest.fixture(scope="session")
def featurized(spark, raw_logs, tmp_path_factory) -> Path:
    """The shared logs featurized with negative sampling 0.5 (train days 0-1, valid 2, test 3)."""
    from jobs import featurize
    out = tmp_path_factory.mktemp("feat") / "out"
    featurize.main(["--input", str(raw_logs), "--output", str(out), "--config", SMALL,
                    "--neg-sample-rate", "0.5"])
    return out
