"""The featurize job on a real standalone Spark master and worker on 127.0.0.1 (not local mode)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark
import pytest

from pipeline import manifest
from tests.conftest import ROOT, SMALL

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what: str, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def standalone(tmp_path: Path):
    home = os.path.dirname(pyspark.__file__)
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "SPARK_HOME": home, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYSPARK_PYTHON": sys.executable, "SPARK_LOG_DIR": str(tmp_path), "SPARK_WORKER_DIR": str(tmp_path / "w")}
    port, ui, wui = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([f"{bin_dir}/spark-class", "org.apache.spark.deploy.master.Master", "--host",
                               "127.0.0.1", "--port", str(port), "--webui-port", str(ui)],
                              env=env, stdout=open(tmp_path / "master.log", "w"), stderr=subprocess.STDOUT)]
    try:
        wait_for(lambda: port_open(port), "spark master")
        procs.append(subprocess.Popen([f"{bin_dir}/spark-class", "org.apache.spark.deploy.worker.Worker",
                                       f"spark://127.0.0.1:{port}", "--host", "127.0.0.1", "--cores", "2",
                                       "--memory", "2g", "--webui-port", str(wui)],
                                      env=env, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT))
        wait_for(lambda: "Successfully registered with master" in (tmp_path / "worker.log").read_text(), "worker")
        yield f"spark://127.0.0.1:{port}", env
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_featurize_on_a_standalone_cluster(standalone, raw_logs: Path, tmp_path: Path):
    master, env = standalone
    out = tmp_path / "out"
    r = subprocess.run([f"{os.path.dirname(sys.executable)}/spark-submit", "--master", master,
                        "--conf", "spark.ui.enabled=false", "--executor-memory", "1g",
                        str(ROOT / "jobs" / "featurize.py"), "--input", str(raw_logs), "--output", str(out),
                        "--config", SMALL, "--days", "1-3"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.read(out)
    assert "featurize: train 25000->25000 rows, valid 25000->25000 rows, test 25000->25000 rows" in r.stdout
    assert (m.splits["train"].days, m.splits["valid"].days, m.splits["test"].days) == ((1,), (2,), (3,))
    # the job really ran on the cluster's executors, not in local mode: the worker made a folder for the
    # application, and its executor's log shows tasks
    apps = list((tmp_path / "w").glob("app-*/*/stderr"))
    assert apps
    log = apps[0].read_text()
    assert "Running task" in log or "Finished task" in log
