"""The featurize job on a real standalone Spark master and worker on 127.0.0.1 (not local mode)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import manifest
from tests.conftest import DRIVER_JAVA_OPTIONS, ROOT, SMALL, Standalone

pytestmark = pytest.mark.slow


def test_featurize_on_a_standalone_cluster(standalone: Standalone, raw_logs: Path, tmp_path: Path):
    out = tmp_path / "out"
    r, executors = standalone.submit(["--conf", "spark.ui.enabled=false", "--executor-memory", "1g",
                                      "--driver-java-options", DRIVER_JAVA_OPTIONS,
                                      str(ROOT / "jobs" / "featurize.py"), "--input", str(raw_logs),
                                      "--output", str(out), "--config", SMALL, "--days", "1-3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.read(out)
    assert "featurize: train 25000->25000 rows, valid 25000->25000 rows, test 25000->25000 rows" in r.stdout
    assert (m.splits["train"].days, m.splits["valid"].days, m.splits["test"].days) == ((1,), (2,), (3,))
    # the job really ran on the cluster's executors, not in local mode: the worker made a folder for this
    # application, and its executor's log shows tasks
    assert executors
    log = (executors[0] / "stderr").read_text()
    assert "Running task" in log or "Finished task" in log
