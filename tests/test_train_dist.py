"""deepfm/train.py under real torchrun with gloo ranks, on the shared featurized data."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from deepfm import state
from deepfm.cluster import native_bf16
from deepfm.launch import LaunchError
from pipeline import layout
from pipeline import manifest as M
from tests.conftest import ROOT, SERVED_TRAIN

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FAST = ["--batch-size", "512", "--hidden", "64,64", "--dropout", "0.1", "--checkpoint-every-steps", "10"]


def torchrun(args: list[str], nproc: int = 2, extra: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *(extra or []),
           str(ROOT / "deepfm" / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: relative path -> (size, mtime_ns), to show that nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture
def in_process(monkeypatch, caplog):
    """deepfm.train.main in this process, for launches that are refused or done before any process group
    starts (a test that got further would start one here); its log in caplog."""
    from deepfm import train
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)      # keep pytest's handlers
    caplog.set_level(logging.INFO)
    return train.main


def manifest_only(featurized: Path, to: Path, **split_changes: dict) -> Path:
    """A featurized output of the manifest alone (all a refused launch reads), splits changed as given:
    ``test={"rows": 0}``."""
    to.mkdir()
    m = M.read(featurized)
    splits = {k: dataclasses.replace(v, **split_changes.get(k, {})) for k, v in m.splits.items()}
    M.write(to, dataclasses.replace(m, splits=splits))
    (to / layout.SUCCESS).write_text("")
    return to


@pytest.fixture(scope="module")
def featurized(featurized_sampled: Path) -> Path:
    """Here the shared data is the one the shared run was trained on (conftest's featurized_sampled: train
    days 0-1 with negative sampling 0.25, valid 2, test 3)."""
    return featurized_sampled


@pytest.fixture(scope="module")
def trained(trained_sampled: Path) -> Path:
    """The shared run (conftest's trained_sampled): torchrun with 2 gloo ranks, 2 epochs with FAST's settings,
    on :func:`featurized`; not modified here (the tests over it check that nothing was written)."""
    assert SERVED_TRAIN == ["--epochs", "2", *FAST]
    return trained_sampled


def test_two_ranks_beat_a_constant_predictor(trained: Path, featurized: Path):
    m = metrics(trained)
    manifest = M.read(featurized)
    assert m["world_size"] == 2
    assert m["test"]["rows"] == manifest.splits["test"].rows
    assert m["valid"]["rows"] == manifest.splits["valid"].rows
    assert m["test"]["auc"] > 0.62                     # a constant predictor has AUC 0.5
    assert m["test"]["ne"] < 1.0                       # and NE 1
    assert 0.7 < m["test"]["calibration"] < 1.3        # sampling correction applied
    steps = manifest.splits["train"].rows // (512 * 2)
    assert m["global_step"] == 2 * steps
    assert m["train"]["examples"] == 2 * steps * 1024 and m["train"]["examples_per_s"] > 0
    assert len(m["history"]) == 2
    native = native_bf16(torch.device("cpu"))[0]         # checked against /proc/cpuinfo in test_model.py
    # bf16: auto: fp32 where bf16 is not native; where it is, the faster of the two as measured at the
    # start (a timing: tests/test_precision.py checks the decision itself)
    assert m["precision"] in (("bf16", "fp32") if native else ("fp32",))
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))


def test_the_tested_weights_are_the_best_valid_ones(trained: Path):
    m = metrics(trained)
    best = max(m["history"], key=lambda h: h["auc"])
    assert m["weights_from_step"] == m["valid_best_step"] == best["step"]
    assert m["valid"] == best and m["valid_best_auc"] == best["auc"]
    assert state.read(layout.best_checkpoint_dir(trained)).global_step == best["step"]
    last = layout.latest_checkpoint(trained)       # what deepfm.evaluate and warm starts load
    assert last is not None and last == sorted((trained / "checkpoints").glob("step_*"))[-1]
    if best["step"] != m["global_step"]:
        assert state.read(last).weights_from_step == best["step"]


def test_evaluate_at_another_world_size_gives_the_same_metrics(trained: Path, featurized: Path):
    r = subprocess.run([sys.executable, "-m", "deepfm.evaluate", "--run", str(trained), "--data", str(featurized),
                        "--split", "test"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout[r.stdout.index("{"):])
    want = metrics(trained)["test"]
    assert got["rows"] == want["rows"]
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-6)
    assert got["logloss"] == pytest.approx(want["logloss"], abs=1e-6)


def test_a_killed_worker_is_restarted_and_resumes(featurized: Path, tmp_path: Path):
    run = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(ROOT / "deepfm" / "train.py"), "--data", str(featurized), "--out", str(run), "--epochs", "2", *FAST]
    log = open(tmp_path / "log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not list((run / "checkpoints").glob("step_*")) and time.time() < deadline:
            time.sleep(0.2)
        assert list((run / "checkpoints").glob("step_*")), "no checkpoint appeared"
        workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]
        assert len(workers) == 2
        os.kill(workers[-1].pid, signal.SIGKILL)
        assert p.wait(600) == 0
    finally:
        if p.poll() is None:
            p.kill()
    text = (tmp_path / "log").read_text()
    assert "resumed from" in text
    m = metrics(run)
    assert m["global_step"] == 2 * (M.read(featurized).splits["train"].rows // 1024)
    assert m["test"]["auc"] > 0.6


def test_resume_with_another_world_size(featurized: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = torchrun(["--data", str(featurized), "--out", str(run), "--epochs", "2", "--max-steps", "12", "--no-test",
                  *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    assert metrics(run)["global_step"] == 12
    # Issue 13.16: stopped mid-epoch with no test, the train stream's threads were still reading at exit
    assert "threads still running at exit" not in r.stderr
    r = torchrun(["--data", str(featurized), "--out", str(run), "--epochs", "1", *FAST], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    m = metrics(run)
    assert m["world_size"] == 1 and m["global_step"] > 12
    assert m["test"]["auc"] > 0.6


def test_two_nodes_on_one_machine(featurized: Path, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = lambda: [str(BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=twonodes", str(ROOT / "deepfm" / "train.py"),
                   "--data", str(featurized), "--out", str(run), "--epochs", "1", "--max-steps", "8", "--no-bf16", *FAST]
    procs = [subprocess.Popen(cmd(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    m = metrics(run)
    assert m["world_size"] == 2 and m["global_step"] == 8 and m["precision"] == "fp32"


def test_data_with_another_fingerprint_is_refused(trained: Path, featurized: Path, tmp_path: Path, in_process):
    other = tmp_path / "other"
    shutil.copytree(featurized, other)
    M.write(other, dataclasses.replace(M.read(other), feature_fingerprint="0000000000000000"))
    before = files(trained)
    with pytest.raises(LaunchError, match=rf"^--out {trained} already holds a run on {featurized.resolve()} \(features "
                                          rf"{M.read(featurized).feature_fingerprint}; .*\); this launch asks for "
                                          rf"{other.resolve()} \(features 0000000000000000; "):
        in_process(["--data", str(other), "--out", str(trained), *FAST])
    assert files(trained) == before
    r = subprocess.run([sys.executable, "-m", "deepfm.evaluate", "--run", str(trained), "--data", str(other)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "the ids mean different things" in r.stderr


def test_a_finished_run_is_not_run_again(trained: Path, featurized: Path, in_process, caplog):
    """Issue 13.7: the same launch again trains nothing and rewrote the test metrics; now it says so."""
    before = files(trained)
    got = in_process(["--data", str(featurized), "--out", str(trained), "--epochs", "2", *FAST])
    assert got == metrics(trained)
    assert files(trained) == before                     # metrics.json, checkpoints, tensorboard: untouched
    assert f"{trained} is finished (epoch 2 of 2); nothing to do" in caplog.text


def test_another_model_or_other_days_over_a_run_are_refused(trained: Path, featurized: Path, tmp_path: Path,
                                                            in_process):
    """Issue 13.7: --model fm over a deepfm run, or data featurized again over other days, was "resumed"."""
    before = files(trained)
    with pytest.raises(LaunchError) as e:
        in_process(["--data", str(featurized), "--out", str(trained), "--model", "fm", *FAST])
    assert str(e.value) == (f"--out {trained} already holds a run on model deepfm; this launch asks for model fm: use "
                            f"a new --out (add --warm-start {trained} to start from its weights)")
    moved = manifest_only(featurized, tmp_path / "days", test={"days": (4,)})
    with pytest.raises(LaunchError, match=rf"; test day 3, \d+ rows\); this launch asks for {moved.resolve()} "
                                          rf"\(.*; test day 4, \d+ rows\): use a new --out"):
        in_process(["--data", str(moved), "--out", str(trained), *FAST])
    assert files(trained) == before


def test_a_run_killed_before_its_metrics_is_finished_off(trained: Path, featurized: Path, tmp_path: Path):
    """A run whose last checkpoint has no step left but whose metrics.json is missing (killed in the
    test) is loaded and tested, not trained on; here at another world size."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("tensorboard"))
    want = metrics(run)
    (run / layout.METRICS).unlink()
    r = torchrun(["--data", str(featurized), "--out", str(run), "--epochs", "2", *FAST], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no step left (epoch 2 of 2), testing" in r.stderr
    m = metrics(run)
    assert (m["global_step"], m["weights_from_step"], m["history"]) == (want["global_step"], want["weights_from_step"],
                                                                         want["history"])
    assert m["test"]["rows"] == want["test"]["rows"]
    assert m["test"]["auc"] == pytest.approx(want["test"]["auc"], abs=1e-6)


def test_an_empty_test_day_is_refused_before_the_model(featurized: Path, tmp_path: Path, in_process):
    """Issue 13.8: a test split with days but no rows ended in exit 0 and no test metrics."""
    data = manifest_only(featurized, tmp_path / "data", test={"rows": 0, "positives": 0, "files": 0})
    with pytest.raises(LaunchError) as e:
        in_process(["--data", str(data), "--out", str(tmp_path / "run"), *FAST])
    assert str(e.value) == (f"{data / 'manifest.json'}: the test split (day 3) has 0 rows: nothing to test on; "
                            "featurize again, or pass --no-test")
    data = manifest_only(featurized, tmp_path / "valid", valid={"rows": 0, "positives": 0, "files": 0})
    with pytest.raises(LaunchError, match=r"the valid split \(day 2\) has 0 rows: validation"):
        in_process(["--data", str(data), "--out", str(tmp_path / "run"), "--no-test", *FAST])
    assert not (tmp_path / "run").exists()


def test_a_refusal_under_torchrun_is_said_once_at_the_end(tmp_path: Path):
    """Issue 13.14: each rank's one-line error was buried under torchrun's ChildFailedError report. Now
    local rank 0 puts it in its error file, which torchrun prints as the root cause, last."""
    r = torchrun(["--data", "/no/such", "--out", str(tmp_path / "x")])
    cause = "train: error: /no/such: not a complete featurized output (no _SUCCESS or manifest.json)"
    assert r.returncode == 1                            # torchrun's code for failed workers
    assert (r.stdout + r.stderr).count(cause) == 1
    tail = r.stderr.strip().splitlines()[-5:]
    assert any(line.strip() == f"traceback : {cause}; run jobs/featurize.py first" for line in tail), tail
    assert "exitcode  : 2" in r.stderr                  # (torchrun stops the other rank once one has failed)
    assert not (tmp_path / "x").exists()


def test_evaluate_names_a_missing_checkpoint(tmp_path: Path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    r = subprocess.run([sys.executable, "-m", "deepfm.evaluate", "--run", str(tmp_path), "--data", str(tmp_path),
                        "--checkpoint", str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"evaluate: error: {missing}: no complete checkpoint"
