"""python -m deepfm.compare as a user runs it, on the shared featurized data with three cheap models (lr,
and fnn, which brings its fm pre-training): comparison.json's entries are the runs' metrics.json, times
are relative to LR's, fnn started from the fm run's tables, the trainer left the report's files, the
report and Table 2 are written, and a second launch trains nothing. And the planning parts, without
torchrun."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfm import compare as C
from deepfm import runfiles
from pipeline import layout
from pipeline import manifest as M
from pipeline import metrics as PM
from pipeline.generate import read_truth
from tests.conftest import ROOT

TINY = ["--epochs", "1", "--set", "hidden=[16]", "--set", "batch_size=512", "--set", "dropout=0.1",
        "--set", "checkpoint_every_steps=0", "--set", "bf16=false", "--set", "train_pipeline=plain",
        "--set", "reader_workers=1"]


def run_compare(featurized: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepfm.compare", "--data", str(featurized), "--models", "lr,fnn",
                           "--out", str(out), "--nproc", "2", *TINY, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def compared(featurized: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    r = run_compare(featurized, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def metrics(run: Path) -> dict:
    return json.loads((run / layout.METRICS).read_text())


@pytest.mark.slow
def test_comparison_json_holds_each_models_runs_figures(compared: tuple[Path, str], featurized: Path,
                                                        raw_logs: Path):
    out, stdout = compared
    c = json.loads((out / "comparison.json").read_text())
    assert [e["model"] for e in c["models"]] == ["lr", "fm", "fnn"]            # fm added, before fnn
    assert [e["name"] for e in c["models"]] == ["LR", "FM", "FNN"]
    m = M.read(featurized)
    lr_seconds = metrics(out / "runs" / "lr-seed1234")["train"]["seconds"]
    for e in c["models"]:
        run = out / "runs" / f"{e['model']}-seed1234"
        mm = metrics(run)
        assert e["runs"][0]["run"] == str(run) and e["seeds"] == [1234]
        assert (e["auc"], e["logloss"], e["seconds"]) == (mm["test"]["auc"], mm["test"]["logloss"],
                                                          mm["train"]["seconds"])
        assert e["relative_time"] == mm["train"]["seconds"] / lr_seconds
        assert (e["train_rows"], e["test_rows"]) == (m.rows("train"), m.rows("test"))
        assert e["epochs"] == 1.0 and e["best_epoch"] == 1.0                   # one epoch, validated at its end
        assert e["paper_criteo"]["auc"] == C.PAPER_CRITEO[e["model"]][0]
        assert f"{e['model']} seed 1234: test AUC {e['auc']:.4f}" in stdout   # one line per model finished
    assert c["models"][0]["relative_time"] == 1.0
    # the oracle: the generator's true click probabilities of the test day
    p, y = read_truth(raw_logs, m.splits["test"].days[0])
    assert c["oracle"]["auc"] == PM.auc(p, y) and c["oracle"]["raw"] == str(raw_logs)
    lr_auc = c["models"][0]["auc"]
    fm = c["models"][1]
    assert fm["gap_closed"] == pytest.approx((fm["auc"] - lr_auc) / (c["oracle"]["auc"] - lr_auc))
    md = (out / "table2.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:] == [
        "LR", "FM", "FNN", "oracle (true click probabilities)"]
    assert (out / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_fnn_started_from_the_fm_runs_tables(compared: tuple[Path, str]):
    out, _ = compared
    fm, fnn = out / "runs" / "fm-seed1234", out / "runs" / "fnn-seed1234"
    c = json.loads((out / "comparison.json").read_text())
    assert c["models"][2]["init_embeddings_from"] == [str(fm)]
    meta = json.loads((layout.latest_checkpoint(fnn) / layout.CHECKPOINT_META).read_text())
    assert meta["config"]["model"] == "fnn" and meta["config"]["init_embeddings_from"] == str(fm)
    fm_ckpt = layout.latest_checkpoint(fm)
    log = (out / "logs" / "fnn-seed1234.log").read_text()
    assert f"embedding tables from {fm_ckpt} (init_embeddings_from)" in log    # deepfm.train's start, on each rank


@pytest.mark.slow
def test_the_trainer_left_the_reports_files_and_the_report_is_written(compared: tuple[Path, str],
                                                                      featurized: Path):
    out, _ = compared
    for model in ("lr", "fm", "fnn"):
        run = out / "runs" / f"{model}-seed1234"
        mm = metrics(run)
        assert mm["data"] == str(featurized.resolve())
        pred = runfiles.read_predictions(run)
        assert pred is not None and len(pred.y) == pred.rows == mm["test"]["rows"]
        got = PM.summary(pred.p.astype(np.float64), pred.y)
        assert got["auc"] == pytest.approx(mm["test"]["auc"], abs=1e-5)        # float32 probabilities
        assert got["logloss"] == pytest.approx(mm["test"]["logloss"], abs=1e-6)
        assert mm["test_predictions"] == {"path": "predictions/test.npz", "rows": pred.rows, "kept": pred.rows}
        curves = runfiles.read_curves(run)
        assert curves is not None
        loss = curves["train_loss"]
        assert [s for s, _ in loss["points"]] == list(range(loss["every"], mm["global_step"] + 1, loss["every"]))
        assert all(0 < v < 2 for _, v in loss["points"])
    text = (out / "report.html").read_text()
    for table in ('id="table2"', 'id="comparison"', 'id="test-metrics"', 'id="splits"'):
        assert table in text
    assert text.count('<img src="data:image/png;base64,') == 4                 # efficiency, ROC, calibration, curves


@pytest.mark.slow
def test_a_second_launch_trains_nothing(compared: tuple[Path, str], featurized: Path):
    out, _ = compared
    before = {m: (out / "runs" / f"{m}-seed1234" / layout.METRICS).stat().st_mtime_ns for m in ("lr", "fm", "fnn")}
    want = json.loads((out / "comparison.json").read_text())
    r = run_compare(featurized, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished before, not trained again") == 3 and "training ->" not in r.stdout
    after = {m: (out / "runs" / f"{m}-seed1234" / layout.METRICS).stat().st_mtime_ns for m in ("lr", "fm", "fnn")}
    assert after == before
    got = json.loads((out / "comparison.json").read_text())
    assert [(e["auc"], e["seconds"]) for e in got["models"]] == [(e["auc"], e["seconds"]) for e in want["models"]]


@pytest.mark.slow
def test_deepfm_crosses_default_to_the_fields_with_the_most_ids(featurized: Path):
    m = M.read(featurized)
    crosses, why = C.default_crosses(featurized, m)
    assert len(crosses) == 6 and len({f for p in crosses for f in p}) == 4
    assert why.startswith("every pair of the 4 categorical fields with the most distinct ids in the train split")


def test_models_are_planned_in_the_papers_order_with_fnns_pre_training():
    assert C.plan_models("fnn,lr") == ["lr", "fm", "fnn"]
    assert C.plan_models("deepfm, fm") == ["fm", "deepfm"]
    assert C.plan_models("all") == list(C.ORDER) and C.plan_models("all")[:9] == [
        "lr", "fm", "fnn", "ipnn", "opnn", "pnn_star", "wide_deep", "fm_dnn", "deepfm"]
    with pytest.raises(C.CompareError, match="--models: xgb is not a model"):
        C.plan_models("lr,xgb")


def test_settings_are_yaml_values_and_a_runs_own_keys_are_refused():
    assert C.parse_sets(["hidden=[16, 8]", "batch_size=512", "bf16=false", "sharding={C1: row_wise}"]) == {
        "hidden": [16, 8], "batch_size": 512, "bf16": False, "sharding": {"C1": "row_wise"}}
    with pytest.raises(C.CompareError, match="--set model: not a setting of the comparison; use --models"):
        C.parse_sets(["model=fm"])
    with pytest.raises(C.CompareError, match="expected KEY=VALUE"):
        C.parse_sets(["hidden"])


def test_a_bad_setting_is_refused_before_any_run(featurized_manifest_only: Path, tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "deepfm.compare", "--data", str(featurized_manifest_only), "--models",
                        "lr", "--out", str(tmp_path / "c"), "--set", "batch_sizes=3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and not (tmp_path / "c").exists()
    assert r.stderr.strip().splitlines()[-1].startswith("compare: error: settings: batch_sizes: unknown key")


@pytest.fixture
def featurized_manifest_only(tmp_path: Path) -> Path:
    from tests.test_manifest import make_manifest
    d = tmp_path / "feat"
    d.mkdir()
    M.write(d, make_manifest())
    (d / layout.SUCCESS).write_text("")
    return d
