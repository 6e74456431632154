"""python -m deepfm.report on run folders made here (no Spark, no torchrun): its numbers are metrics.json's
and the manifest's, its images decode, it references nothing outside itself, several runs get a
comparison table, and it runs where torch cannot be imported. And deepfm.runfiles, what the trainer
keeps for it."""
from __future__ import annotations

import base64
import dataclasses
import html.parser
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfm import report as R
from deepfm import runfiles
from pipeline import layout
from pipeline import manifest as M
from pipeline import metrics as PM
from tests.conftest import ROOT
from tests.test_manifest import make_manifest

TEST_ROWS = 3000


class Tables(html.parser.HTMLParser):
    """Every <table id=...>: its rows of cells, each (text, data-value or None); and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.links: list[tuple[str, str, str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.links.append((tag, k, a[k] or ""))
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell, self._value = [], a.get("data-value")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._table:
            self.tables[self._table][-1].append(("".join(self._cell), self._value))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Tables:
    t = Tables()
    t.feed(path.read_text())
    return t


def rows_of(t: Tables, table: str) -> dict[str, list[tuple[str, str | None]]]:
    return {r[0][0]: r for r in t.tables[table] if r}


def value(cell: tuple[str, str | None]) -> float:
    assert cell[1] is not None, cell
    return float(cell[1])


# --- run folders made by hand ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A featurized output of the manifest alone, plus a train file (for the fill) and the generator's
    truth files of its test day (for the oracle) beside the raw day files it names."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("report_data")
    raw, feat = root / "raw", root / "feat"
    (raw / "truth").mkdir(parents=True)
    rng = np.random.default_rng(5)
    prob = rng.uniform(0.05, 0.6, TEST_ROWS).astype(np.float32)
    label = (rng.random(TEST_ROWS) < prob).astype(np.uint8)
    prob.tofile(raw / "truth" / "day_3.prob")
    label.tofile(raw / "truth" / "day_3.label")
    m = make_manifest()
    m = dataclasses.replace(
        m, input=dataclasses.replace(m.input, path=str(raw), files=tuple(f"file:{raw}/day_{d}" for d in range(4))),
        splits={**m.splits, "test": dataclasses.replace(m.splits["test"], rows=TEST_ROWS, positives=int(label.sum()),
                                                       before_sampling=M.Counts(TEST_ROWS, int(label.sum())))})
    (feat / "train").mkdir(parents=True)
    cols = {"label": pa.array([0, 1, 0, 1], pa.int32())}
    for i, f in enumerate(m.fields):
        cols[f.name] = pa.array([0, 1, 1, 2] if i == 0 else [0, 0, 0, 0], pa.int32())
    pq.write_table(pa.table(cols), feat / "train" / "part-0.parquet")
    M.write(feat, m)
    (feat / layout.SUCCESS).write_text("")
    return feat


def fake_run(folder: Path, data: Path, model: str, seconds: float, quality: float, seed: int = 0,
             files: bool = True) -> Path:
    """A run folder as deepfm/train.py leaves it: metrics.json (test metrics computed from the stored
    predictions, as the trainer does), curves.json and predictions/test.npz."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    y = (rng.random(TEST_ROWS) < 0.25).astype(np.uint8)
    p = np.clip(0.25 + quality * (y - 0.25) + rng.normal(0, 0.3, TEST_ROWS), 0.01, 0.99)
    test = PM.summary(p, y)
    hist = [{"step": 30 * k, "epoch": k, **PM.summary(np.clip(p + rng.normal(0, 0.05, TEST_ROWS), 0.01, 0.99), y)}
            for k in (1, 2)]
    best = max(hist, key=lambda h: h["auc"])
    metrics = {"model": model, "world_size": 2, "device": "cpu", "precision": "fp32", "train_pipeline": "plain",
               "feature_fingerprint": "0123456789abcdef", "data": str(data), "global_step": 60,
               "train": {"examples": 60 * 1024, "seconds": seconds, "examples_per_s": 60 * 1024 / seconds},
               "valid": best, "valid_best_auc": best["auc"], "valid_best_step": best["step"],
               "weights_from_step": best["step"], "history": hist, "plan": {}, "test": test}
    if files:
        metrics["test_predictions"] = runfiles.write_predictions(folder, "test", p, y)
        runfiles.write_curves(folder, [[s, 0.7 - s / 1000] for s in range(10, 61, 10)], 10)
    (folder / layout.METRICS).write_text(json.dumps(metrics, indent=1))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_runs")
    return {"lr": fake_run(root / "lr", data, "lr", 10.0, 0.2, seed=1),
            "deepfm": fake_run(root / "deepfm", data, "deepfm", 25.0, 0.4, seed=2),
            "old": fake_run(root / "old", data, "fm", 12.0, 0.3, seed=3, files=False)}


@pytest.fixture(scope="module")
def one(runs: dict[str, Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_one") / "report.html"
    R.main(["--run", str(runs["deepfm"]), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def several(runs: dict[str, Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_several") / "report.html"
    R.main(["--run", str(runs["lr"]), "--run", str(runs["deepfm"]), "--run", str(runs["old"]), "--out", str(out)])
    return out


def metrics(run: Path) -> dict:
    return json.loads((run / layout.METRICS).read_text())


# --- the tests -------------------------------------------------------------------------------------

def test_the_reports_numbers_are_metrics_jsons(one: Path, runs: dict[str, Path]):
    t = parse(one)
    m = metrics(runs["deepfm"])
    row = rows_of(t, "test-metrics")["deepfm"]
    got = {k: value(c) for k, c in zip(("auc", "logloss", "ne", "calibration", "rows"), row[2:7])}
    assert got == {k: m["test"][k] for k in got}                       # exactly: data-value holds repr()
    assert row[2][0] == f"{m['test']['auc']:.4f}" and row[3][0] == f"{m['test']['logloss']:.5f}"
    assert (value(row[7]), value(row[8]), value(row[9])) == (m["weights_from_step"], m["global_step"],
                                                              m["valid_best_auc"])
    history = [r for r in t.tables["history-0"] if r]
    assert [[value(c) for c in r] for r in history] == [
        [h[k] for k in ("step", "epoch", "auc", "logloss", "ne", "calibration", "rows")] for h in m["history"]]


def test_the_data_summary_is_the_manifests(one: Path, data: Path):
    t = parse(one)
    m = M.read(data)
    splits = rows_of(t, "splits")
    for name, s in m.splits.items():
        r = splits[name]
        assert [value(r[i]) for i in (2, 3, 6, 7)] == [s.before_sampling.rows, s.before_sampling.positives, s.rows,
                                                        s.positives], name
    rejects = rows_of(t, "rejects")
    assert {k: value(v[1]) for k, v in rejects.items()} == {**m.rejects.by_reason, "total": m.rejects.total}
    tables = rows_of(t, "tables")
    assert {k: value(v[3]) for k, v in tables.items()} == m.table_sizes()
    first = m.fields[0].name
    assert value(tables[first][6]) == 3 and value(tables["C3"][5]) == 812   # ids used in train; kept by the vocabulary
    # the oracle: the generator's truth files beside the raw day files the manifest names
    oracle = rows_of(t, "test-metrics")["oracle (true click probabilities)"]
    p = np.fromfile(Path(m.input.path) / "truth" / "day_3.prob", dtype=np.float32)
    y = np.fromfile(Path(m.input.path) / "truth" / "day_3.label", dtype=np.uint8)
    assert value(oracle[2]) == PM.auc(p.astype(np.float64), y)


def test_its_images_decode_and_it_references_nothing_outside_itself(one: Path, several: Path):
    from PIL import Image
    for path in (one, several):
        text = path.read_text()
        t = parse(path)
        assert [tag for tag, _, _ in t.links] == ["img"] * 3         # ROC, calibration, curves, and nothing else
        for _, attr, link in t.links:
            assert attr == "src" and link.startswith("data:image/png;base64,"), link[:60]
            png = base64.b64decode(link.split(",", 1)[1], validate=True)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(io.BytesIO(png)) as im:
                im.verify()
            with Image.open(io.BytesIO(png)) as im:
                assert im.size[0] > 300 and im.size[1] > 200
        outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
        assert "http" not in outside.lower() and "data:" not in outside
        assert not re.search(r"<(script|link|iframe|object|embed)\b|url\(|@import", outside, re.I)


def test_several_runs_get_a_comparison_table(several: Path, runs: dict[str, Path]):
    t = parse(several)
    rows = rows_of(t, "comparison")
    assert list(rows) == ["lr", "deepfm", "fm"]
    aucs = {k: metrics(runs[r])["test"]["auc"] for k, r in (("lr", "lr"), ("deepfm", "deepfm"), ("fm", "old"))}
    best = max(aucs.values())
    for k, r in rows.items():
        assert value(r[1]) == aucs[k]
        assert value(r[2]) == pytest.approx(aucs[k] - best, abs=1e-15)
    # training time relative to LR's run
    secs = {"lr": 10.0, "deepfm": 25.0, "fm": 12.0}
    assert {k: value(r[7]) for k, r in rows.items()} == {k: s / 10.0 for k, s in secs.items()}
    assert "time / LR" in several.read_text()
    # the LR -> oracle gap closed, with the oracle of the data
    oracle_auc = value(rows_of(t, "test-metrics")["oracle (true click probabilities)"][2])
    assert value(rows["deepfm"][5]) == pytest.approx(100 * (aucs["deepfm"] - aucs["lr"]) / (oracle_auc - aucs["lr"]))
    # the run of an older trainer: its tables, a note instead of its figures
    assert "fm: no curves.json (a run of an older trainer)" in several.read_text()


def test_it_runs_where_torch_cannot_be_imported(runs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "r.html"
    code = ("import sys; sys.modules['torch'] = None; from deepfm import report; "
            f"report.main(['--run', {str(runs['lr'])!r}, '--out', {str(out)!r}]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchrec', 'pyspark')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "['torch']" and out.stat().st_size > 10_000   # only the blocked name


def test_a_folder_without_metrics_is_refused_in_one_line(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "deepfm.report", "--run", str(tmp_path), "--out", str(tmp_path / "x.html")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"report: error: {tmp_path}: no readable metrics.json (No such file or "
                                             "directory); is it a finished run folder?"]


def test_roc_points_and_reliability_bins_by_hand():
    fpr, tpr = R.roc_points(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    fpr, tpr = R.roc_points(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0]))     # a tie is one step
    assert fpr.tolist() == [0, 0.5, 1] and tpr.tolist() == [0, 1, 1]
    b = R.reliability(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1]), bins=2)
    assert b["predicted"].tolist() == pytest.approx([0.15, 0.35]) and b["observed"].tolist() == [0, 1]
    assert b["rows"].tolist() == [2, 2]


def test_runfiles_predictions_round_trip_and_subsample_deterministically(tmp_path: Path):
    p, y = np.linspace(0, 1, 50), (np.arange(50) % 3 == 0).astype(np.float32)
    info = runfiles.write_predictions(tmp_path, "test", p, y)
    assert info == {"path": "predictions/test.npz", "rows": 50, "kept": 50}
    got = runfiles.read_predictions(tmp_path)
    assert got is not None and not got.subsampled
    assert got.p.dtype == np.float32 and got.y.dtype == np.uint8
    assert np.array_equal(got.p, p.astype(np.float32)) and np.array_equal(got.y, y.astype(np.uint8))
    info = runfiles.write_predictions(tmp_path, "test", p, y, limit=20)
    got = runfiles.read_predictions(tmp_path)
    assert info["kept"] == 20 and got is not None and got.subsampled and got.rows == 50
    keep = runfiles.subsample(50, 20)
    assert keep is not None and np.array_equal(keep, runfiles.subsample(50, 20))       # the same rows every time
    assert np.array_equal(got.p, p[keep].astype(np.float32))
    assert runfiles.subsample(20, 20) is None
    assert not list(tmp_path.rglob(".*.tmp"))
    assert runfiles.read_predictions(tmp_path, "valid") is None and runfiles.read_curves(tmp_path) is None


def test_loss_points_every_ten_steps_then_about_five_hundred():
    assert [runfiles.loss_every(n) for n in (1, 60, 5000, 5001, 33_000, 1_000_000)] == [10, 10, 10, 20, 70, 2000]


# --- a recall run (model two_tower) ----------------------------------------------------------------

def test_a_recall_run_gets_its_metrics_beside_the_generators_popularity_and_ceiling(tmp_path: Path):
    from pipeline.contract import load_contract
    from pipeline.generate_recall import generate
    from pipeline.recall_truth import baselines
    from tests.recall_data import recall_output
    raw = tmp_path / "raw"
    generate(load_contract(ROOT / "conf" / "recall.yaml"), raw, list(range(5)), 3000, seed=4, users=150, items=80)
    feat = recall_output(tmp_path / "feat", seed=1)             # train days 0-2, valid 3, test 4; a list field
    m = M.read(feat)
    M.write(feat, dataclasses.replace(m, input=dataclasses.replace(
        m.input, path=str(raw), files=tuple(f"file:{raw}/day_{d}" for d in range(5)))))
    test = {"recall@10": 0.25, "hit_rate@10": 0.5, "ndcg@10": 0.125, "recall@50": 0.625, "hit_rate@50": 0.75,
            "ndcg@50": 0.375, "random_recall@10": 0.0625, "random_hit_rate@10": 0.1, "random_ndcg@10": 0.03,
            "users": 40.0, "rows": 300.0}
    hist = [{"step": 10, "epoch": 1, **{k: v / 2 for k, v in test.items() if "@" in k}, "users": 41.0},
            {"step": 20, "epoch": 2, **test}]
    run = tmp_path / "run"
    run.mkdir()
    (run / layout.METRICS).write_text(json.dumps({
        "model": "two_tower", "world_size": 2, "device": "cpu", "precision": "fp32", "data": str(feat),
        "global_step": 20, "train": {"examples": 20 * 256, "seconds": 2.0, "examples_per_s": 2560.0},
        "valid": test, "valid_best_step": 20, "weights_from_step": 20, "history": hist, "test": test}))
    runfiles.write_curves(run, [[s, 3.0 - s / 10] for s in range(1, 21)], 1)
    out = R.main(["--run", str(run), "--out", str(tmp_path / "report.html")])
    t = parse(out)
    assert "test-metrics" not in t.tables                            # no AUC table for rankings
    rows = rows_of(t, "recall")
    heads = ["recall@10", "hit_rate@10", "ndcg@10", "recall@50", "hit_rate@50", "ndcg@50"]
    assert [value(c) for c in rows["two_tower"][1:7]] == [test[k] for k in heads]
    assert value(rows["two_tower"][7]) == 0.0625 and value(rows["two_tower"][8]) == 40
    truth = baselines(raw, heldout_day=4, train_days=[0, 1, 2], ks=(10, 50))
    for kind in ("popularity", "ceiling", "random"):
        row = next(r for name, r in rows.items() if name.startswith(kind))
        assert [value(c) for c in row[1:7]] == [truth[kind][k] for k in heads], kind
        assert value(row[8]) == truth["users"]
    assert value(rows["two_tower"][9]) == pytest.approx(0.25 / truth["ceiling"]["recall@10"])
    assert truth["ceiling"]["recall@10"] > truth["popularity"]["recall@10"] > truth["random"]["recall@10"]
    hist_rows = t.tables["history-0"]
    assert [value(c) for c in hist_rows[1][2:8]] == [test[k] / 2 for k in heads] and value(hist_rows[1][8]) == 41
    fill = rows_of(t, "tables")
    assert value(fill["item_genres"][6]) == 7                      # a list field's ids: 4 groups + 3 extra genres
