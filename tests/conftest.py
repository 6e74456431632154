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


# --- a model to use: featurized with negative sampling 0.25, trained on 2 gloo ranks, exported -------------
# Shared by the export, scoring and serving tests (tests/test_export.py, test_score*.py, test_serve.py).
SERVED_SETTINGS = ["--neg-sample-rate", "0.25", "--set", "categorical.defaults.min_count=2",
                   "--set", "continuous.fields.I2.bucketing=quantile"]
SERVED_TRAIN = ["--epochs", "2", "--batch-size", "512", "--hidden", "64,64", "--dropout", "0.1",
                "--checkpoint-every-steps", "10"]


def run_torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 600):
    """``torchrun --standalone --nproc_per_node=N ROOT/script args`` as a user runs it."""
    import subprocess
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def featurized_sampled(spark, raw_logs, tmp_path_factory) -> Path:
    """The shared logs featurized with negative sampling 0.25 (valid and test unsampled), a vocabulary
    (min_count 2 on every categorical field) and one quantile field (I2)."""
    from jobs import featurize
    out = tmp_path_factory.mktemp("feat_sampled") / "out"
    featurize.main(["--input", str(raw_logs), "--output", str(out), "--config", SMALL, *SERVED_SETTINGS])
    return out


@pytest.fixture(scope="session")
def trained_sampled(featurized_sampled, tmp_path_factory) -> Path:
    """DeepFM trained on :func:`featurized_sampled` by torchrun with 2 gloo ranks (its run folder)."""
    run = tmp_path_factory.mktemp("run_sampled") / "deepfm"
    r = run_torchrun("deepfm/train.py", ["--data", str(featurized_sampled), "--out", str(run), *SERVED_TRAIN])
    assert r.returncode == 0, r.stderr[-4000:]
    return run


@pytest.fixture(scope="session")
def exported(trained_sampled, tmp_path_factory) -> Path:
    """:func:`trained_sampled` exported by ``python -m deepfm.export`` (a model.pt2; do not modify it)."""
    import subprocess
    out = tmp_path_factory.mktemp("model") / "model.pt2"
    r = subprocess.run([sys.executable, "-m", "deepfm.export", "--run", str(trained_sampled), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out
