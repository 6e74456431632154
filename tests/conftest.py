"""Shared fixtures: one local[2] Spark session and one generated data set for the whole run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


# The JVM option for a test's short-lived Spark processes (spark-submit drivers, the standalone cluster's
# daemons and executors): the JIT's first tier only, so a job of seconds spends less time compiling
# (a featurize of a 3-day window: 22-27 s instead of 35-38 s). Not for the session's local Spark, which
# runs for the whole suite.
QUICK_JIT = "-XX:TieredStopAtLevel=1"
DRIVER_JAVA_OPTIONS = f"-Dlog4j2.configurationFile=file:{ROOT}/tools/log4j2.properties {QUICK_JIT}"

# --- one standalone Spark master and worker on 127.0.0.1 for the whole run (not local mode) -------------
# Shared by tests/test_spark_cluster.py and tests/test_score_job.py: each submits its own application and
# checks, by the folder the worker made for that application, that its executors ran the job.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Standalone:
    """A running master (``master``: spark://127.0.0.1:PORT) and one worker (2 cores, 2g) whose
    application folders are under ``work_dir``; ``env`` runs spark-submit against them."""

    master: str
    env: dict[str, str]
    work_dir: Path

    def submit(self, args: list[str], cwd: Path, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[Path]]:
        """``spark-submit --master MASTER ARGS``; its result and the executor folders the worker made for
        this application (``work_dir/app-*/N``: none when it did not run on the cluster)."""
        before = set(self.work_dir.glob("app-*"))
        # the executors of a job of seconds: the JIT's first tier only (see QUICK_JIT)
        r = subprocess.run([str(Path(sys.executable).parent / "spark-submit"), "--master", self.master,
                            "--conf", f"spark.executor.extraJavaOptions={QUICK_JIT}", *args],
                           env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        apps = sorted(set(self.work_dir.glob("app-*")) - before)
        return r, [e for a in apps for e in sorted(a.iterdir())]


@pytest.fixture(scope="session")
def standalone(tmp_path_factory) -> Iterator[Standalone]:
    import pyspark
    logs = tmp_path_factory.mktemp("standalone")
    home = os.path.dirname(pyspark.__file__)
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "SPARK_HOME": home, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYSPARK_PYTHON": sys.executable, "SPARK_LOG_DIR": str(logs), "SPARK_WORKER_DIR": str(logs / "w"),
           "SPARK_DAEMON_JAVA_OPTS": QUICK_JIT}
    port, ui, wui = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([f"{bin_dir}/spark-class", "org.apache.spark.deploy.master.Master", "--host",
                               "127.0.0.1", "--port", str(port), "--webui-port", str(ui)],
                              env=env, stdout=open(logs / "master.log", "w"), stderr=subprocess.STDOUT)]
    try:
        wait_for(lambda: port_open(port), "spark master")
        procs.append(subprocess.Popen([f"{bin_dir}/spark-class", "org.apache.spark.deploy.worker.Worker",
                                       f"spark://127.0.0.1:{port}", "--host", "127.0.0.1", "--cores", "2",
                                       "--memory", "2g", "--webui-port", str(wui)],
                                      env=env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT))
        wait_for(lambda: "Successfully registered with master" in (logs / "worker.log").read_text(), "worker")
        yield Standalone(f"spark://127.0.0.1:{port}", env, logs / "w")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
