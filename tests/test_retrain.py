"""python -m pipeline.retrain: config, day selection, gate, lock, and scheduled runs end to end.

The end-to-end tests share one raw folder, work folder and registry, as a scheduler would, over seven
days arriving one per run: the first candidate is rejected by a strict gate (no model to serve: the run
fails and is retried), then promoted; a run is killed during training and rerun; a rerun finds nothing
new; a day with shuffled labels is rejected by the gate and left out of the next windows; the next good
day promotes without it; a day with ten times the rows and a day with three times the positive rate are
held by the data checks before training; an operator re-admits one. Each test asks the shared schedule
for the stage it starts from (``sched.at``), so each passes alone or in any order; the plan and the data
checks themselves are tested on hand-made states in tests/test_retrain_plan.py.
"""
from __future__ import annotations

import ast
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from deepfm.trainconf import load_train_config
from pipeline import retrain as R
from tests.conftest import DRIVER_JAVA_OPTIONS, ROOT, SMALL

BIN = Path(sys.executable).parent
ROWS = 10_000
SEED = 23
COMMAND = "python -m pipeline.retrain --config conf/retrain.yaml"


def write_conf(tmp: Path, **over) -> Path:
    conf = {
        "raw_dir": "raw", "work_dir": "work", "registry_dir": "registry", "contract": SMALL,
        "completeness": "marker", "window_days": 2, "valid_days": 0, "keep_versions": 2,
        "spark": {"master": "local[2]", "featurize_args": ["--min-row-groups", "2"],
                  "submit_args": ["--driver-memory", "1g", "--conf", "spark.ui.enabled=false",
                                  "--conf", "spark.sql.shuffle.partitions=4",
                                  # the JIT's first tier only (conftest's QUICK_JIT)
                                  "--driver-java-options", DRIVER_JAVA_OPTIONS]},
        "train": {"nproc": 1, "epochs": 1, "batch_size": 512, "hidden": [32, 32], "dropout": 0.1,
                  "checkpoint_every_steps": 10},
        "gate": {"auc_tolerance": 0.02, "min_auc": 0.55, "calibration_min": 0.7, "calibration_max": 1.4,
                 "min_rows": 1000},
    }
    for k, v in over.items():
        conf[k] = v
    p = tmp / "retrain.yaml"
    p.write_text(yaml.safe_dump(conf))
    return p


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def retrain(conf: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.retrain", "--config", str(conf), *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=timeout)


def add_day(raw: Path, day: int, labels: str = "kept", copies: int = 1) -> None:
    """A generated day file, then its labels ``shuffled`` (the same positive rate, no signal left) or
    ``tripled`` (negatives turned positive until the positive rate is about three times as high), its lines
    written ``copies`` times, then its .done marker."""
    from pipeline.contract import load_contract
    from pipeline.generate import generate
    generate(load_contract(SMALL), raw, [day], ROWS, SEED, workers=1, max_cardinality=20_000)
    path = raw / f"day_{day}"
    lines = path.read_bytes().split(b"\n")[:-1]
    label = np.array([ln[:1] == b"1" for ln in lines])
    rng = np.random.default_rng(day)
    if labels == "shuffled":
        label = rng.permutation(label)
    elif labels == "tripled":
        p = label.mean()
        label = label | (rng.random(len(lines)) < 2 * p / (1 - p))
    path.write_bytes(b"".join((b"1" if y else b"0") + ln[ln.index(b"\t"):] + b"\n"
                              for y, ln in zip(label, lines)) * copies)
    (raw / f"day_{day}.done").write_text("")


def positive_rate(path: Path) -> float:
    lines = path.read_bytes().split(b"\n")[:-1]
    return sum(ln[:1] == b"1" for ln in lines) / len(lines)


def excluded(reg: Path) -> dict:
    return json.loads((reg / "excluded.json").read_text())


def current(reg: Path) -> str | None:
    link = reg / "current"
    return os.readlink(link) if link.is_symlink() else None


def record_of(out: str) -> dict:
    line = next(ln for ln in out.splitlines() if ln.startswith("retrain: run record "))
    return json.loads(Path(line.split("retrain: run record ", 1)[1]).read_text())


def assert_serves(version: Path) -> str:
    """The version's model.pt2 is a file of its own that loads (its golden set checked), made from the
    version's featurized data, with the fingerprint its lineage records; that fingerprint."""
    from deepfm.serving import Predictor
    from pipeline.manifest import open_featurized
    lin = json.loads((version / "lineage.json").read_text())
    model = version / "model.pt2"
    assert model.is_file() and not model.is_symlink()
    p = Predictor.load(model)
    fp = p.card.feature_fingerprint
    assert fp == open_featurized(Path(lin["featurized"])).feature_fingerprint == lin["feature_fingerprint"]
    assert fp == json.loads((version / "manifest.json").read_text())["feature_fingerprint"]
    assert p.fingerprint == lin["model_fingerprint"] and len(p.fingerprint) == 16
    assert Path(p.card.checkpoint) == Path(lin["checkpoint_source"]).resolve()
    assert p.card.global_step == lin["global_step"]
    return p.fingerprint


# --- fast: config, selection, gate, registry, lock, deploy files ---------------------------------

def test_config_paths_resolve_against_the_file_and_defaults_apply(tmp_path: Path):
    conf = tmp_path / "c.yaml"
    conf.write_text("raw_dir: r\nwork_dir: /abs/w\nregistry_dir: ../reg\ngate: {min_rows: 5}\n")
    c = R.load_config(conf)
    assert c.raw_dir == tmp_path / "r" and c.work_dir == Path("/abs/w") and c.registry_dir == tmp_path.parent / "reg"
    assert c.contract == ROOT / "conf" / "criteo_small.yaml"
    assert c.gate.min_rows == 5 and c.gate.auc_tolerance == R.GateSettings().auc_tolerance
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.window_days = 3  # type: ignore[misc]
    shipped = R.load_config(ROOT / "conf" / "retrain.yaml")
    assert shipped.contract == ROOT / "conf" / "criteo_small.yaml" and shipped.train.config == ROOT / "conf" / "train.yaml"


@pytest.mark.parametrize("text,key", [("windw_days: 3\n", "windw_days"), ("gate: {auc_tol: 0.1}\n", "gate.auc_tol"),
                                      ("train: {nprocs: 2}\n", "train.nprocs")])
def test_an_unknown_config_key_is_named(tmp_path: Path, text: str, key: str):
    conf = tmp_path / "c.yaml"
    conf.write_text("raw_dir: r\nwork_dir: w\nregistry_dir: g\n" + text)
    r = retrain(conf)
    assert r.returncode == 2
    assert f"{key}: unknown key" in r.stderr, r.stderr
    assert not (tmp_path / "g").exists()


def test_bad_config_values_are_refused(tmp_path: Path):
    conf = tmp_path / "c.yaml"
    for text, msg in [("window_days: 0\n", "window_days: 0 must be at least 1"),
                      ("completeness: size\n", "completeness"), ("work_dir: null\n", "work_dir"),
                      ("gate: {calibration_min: 2.0}\n", "calibration_min must be below")]:
        conf.write_text("raw_dir: r\nwork_dir: w\nregistry_dir: g\n" + text)
        with pytest.raises(R.RetrainConfigError, match=msg):
            R.load_config(conf)


# conf/retrain.yaml's keys that are this deployment's own rather than restated defaults: where the data
# lives, the machine's size, and the trainer setting retraining sets on purpose (one epoch a run)
DEPLOYMENT = {"raw_dir", "work_dir", "registry_dir", "spark.submit_args", "train.nproc", "train.epochs"}


def _keys(raw: dict, prefix: str = "") -> list[str]:
    return [k for key, v in raw.items()
            for k in (_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


def _default(obj: object, name: str):
    f = next(f for f in dataclasses.fields(obj) if f.name == name)  # type: ignore[arg-type]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def test_the_shipped_config_restates_no_default_differently():
    path = ROOT / "conf" / "retrain.yaml"
    keys = _keys(yaml.safe_load(path.read_text()))
    assert DEPLOYMENT <= set(keys)
    shipped, trainer = R.load_config(path), load_train_config(None)
    for key in set(keys) - DEPLOYMENT:
        section, _, name = key.rpartition(".")
        obj = getattr(shipped, section) if section else shipped
        if section == "train" and name in shipped.train.settings:        # a trainer setting: conf/train.yaml's
            assert shipped.train.settings[name] == getattr(trainer, name), key
        else:
            assert getattr(obj, name) == _default(obj, name), key


@pytest.mark.parametrize("train, msg", [
    ({"dropout": 1.5}, "train.dropout: 1.5 is not in [0.0, 1.0)"),
    ({"extra_args": ["--modle", "fm"]}, "train.extra_args: torchrun deepfm/train.py: unrecognized arguments: --modle fm"),
    ({"extra_args": ["--dropout", "2"]}, "train.extra_args: dropout: 2.0 is not in [0.0, 1.0)"),
    ({"weight_decay": 0.1}, "train.weight_decay: deepfm/train.py takes no flag for it"),
    ({"extra_args": ["--out", "x"]}, "train.extra_args: --data, --out, --warm-start are set by retraining")])
def test_bad_train_settings_are_refused_by_the_trainer_before_any_step(tmp_path: Path, train: dict, msg: str):
    conf = write_conf(tmp_path, train=train)
    (tmp_path / "raw").mkdir()
    r = retrain(conf)
    assert r.returncode == R.EXIT_CONFIG and msg in r.stderr, r.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "registry").exists()


def test_the_trainer_settings_come_from_the_trainers_own_parser(tmp_path: Path):
    c = R.load_config(write_conf(tmp_path, train={"hidden": [32, 32], "extra_args": ["--model", "fm"]}))
    assert (c.trainer.model, c.trainer.hidden) == ("fm", (32, 32))
    assert c.trainer.dropout == load_train_config(None).dropout
    assert dict(c.train.settings) == {"hidden": (32, 32)} and c.train.extra_args == ("--model", "fm")


def test_scan_days_by_marker_and_by_stable_size(tmp_path: Path):
    for d in (0, 1, 2):
        (tmp_path / f"day_{d}").write_text("x\n")
    (tmp_path / "day_0.done").write_text("")
    (tmp_path / "day_1.done").write_text("")
    (tmp_path / ".day_3.inprogress").write_text("x")
    (tmp_path / "truth").mkdir()
    s = R.scan_days(tmp_path, r"day_(\d+)(\.gz)?$", "marker", 0)
    assert s.complete == (0, 1) and set(s.incomplete) == {2}
    now = time.time()
    os.utime(tmp_path / "day_0", (now - 100, now - 100))
    s = R.scan_days(tmp_path, r"day_(\d+)(\.gz)?$", "stable_seconds", 60, now=now)
    assert s.complete == (0,) and set(s.incomplete) == {1, 2}


def test_scan_days_names_markers_from_the_contract_pattern(tmp_path: Path):
    for d in (3, 12):
        (tmp_path / f"log-{d}.tsv").write_text("x\n")
    (tmp_path / "log-12.tsv.done").write_text("")
    s = R.scan_days(tmp_path, r"^log-(\d+)\.tsv$", "marker", 0)
    assert s.complete == (12,) and s.incomplete == {3: "no marker log-3.tsv.done"}


def test_gate_checks():
    g = R.GateSettings(auc_tolerance=0.01, min_auc=0.55, calibration_min=0.8, calibration_max=1.25, min_rows=100)
    good = {"auc": 0.70, "logloss": 0.5, "calibration": 1.0, "rows": 1000}
    assert R.gate(good, None, g)[0]
    assert R.gate(good, {"auc": 0.705}, g)[0]
    ok, checks = R.gate(good, {"auc": 0.72}, g)
    assert not ok and [c["check"] for c in checks if not c["passed"]] == ["vs_current"]
    for bad, name in [({"logloss": None}, "logloss_finite"), ({"calibration": 1.5}, "calibration"),
                      ({"rows": 10}, "min_rows"), ({"auc": float("nan")}, "min_auc")]:
        ok, checks = R.gate({**good, **bad}, None, g)
        assert not ok and [c["check"] for c in checks if not c["passed"]] == [name]


def test_registry_pointer_and_pruning(tmp_path: Path):
    reg = R.Registry(tmp_path)
    for n in range(1, 5):
        (tmp_path / f"v{n:06d}").mkdir()
        (tmp_path / f"v{n:06d}" / "lineage.json").write_text(json.dumps({"run_key": f"k{n}"}))
    (tmp_path / ".v000005.tmp-1").mkdir()
    assert reg.next_name() == "v000006"
    reg.remove_partial()
    assert reg.next_name() == "v000005"
    reg.set_current("v000001")
    assert os.readlink(tmp_path / "current") == "v000001" and reg.current().name == "v000001"
    assert reg.prune(2) == ["v000002"]            # the newest two and the current one stay
    assert reg.versions() == ["v000001", "v000003", "v000004"]
    assert reg.find_by_run_key("k3").name == "v000003"


def test_a_version_holds_a_copy_of_its_exported_model_and_is_pruned_with_it(tmp_path: Path):
    work, reg_dir = tmp_path / "work", tmp_path / "registry"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "COMPLETE").write_text("")
    (work / "featurized").mkdir()
    (work / "featurized" / "manifest.json").write_text("{}")
    no_vocab = type("M", (), {"vocab": None})()
    reg = R.Registry(reg_dir)
    with pytest.raises(R.RegistryError, match="no exported model to publish"):
        reg.publish("k1", work / "ckpt", work / "model.pt2", work / "featurized", no_vocab, {}, {})
    assert reg.versions() == [] and reg.current_name() is None
    names = []
    for n in range(1, 4):
        (work / "model.pt2").write_bytes(b"model %d" % n)
        v = reg.publish(f"k{n}", work / "ckpt", work / "model.pt2", work / "featurized", no_vocab, {},
                        {"model_fingerprint": f"fp{n}"})
        names.append(v.name)
        assert reg.current_name() == v.name and v.model.read_bytes() == b"model %d" % n
        assert not v.model.is_symlink() and v.model_fingerprint == f"fp{n}" and v.label == f"{v.name} (model fp{n})"
    (work / "model.pt2").unlink()                   # a copy: the work folder's file may go
    assert reg.version(names[-1]).model.read_bytes() == b"model 3"
    assert reg.prune(1) == names[:2] and not (reg_dir / names[0]).exists() and reg.versions() == names[2:]
    # a version published under the same key before versions held a model gets it before current moves
    (reg_dir / "v000009").mkdir()
    (reg_dir / "v000009" / "lineage.json").write_text(json.dumps({"run_key": "old"}))
    (work / "model.pt2").write_bytes(b"late")
    v = reg.publish("old", work / "ckpt", work / "model.pt2", work / "featurized", no_vocab, {},
                    {"model_fingerprint": "fp9"})
    assert v.name == reg.current_name() == "v000009" and v.model.read_bytes() == b"late"
    assert v.model_fingerprint == "fp9"


def test_excluded_days_are_kept_in_the_registry_with_their_history(tmp_path: Path):
    reg = R.Registry(tmp_path)
    assert reg.excluded() == {} and reg.state([1]).excluded == {}
    e = R.Exclusion(day=3, by="gate", checks=("min_auc",), reason="AUC 0.4987 (min 0.55)", run_id="r1", since="t")
    reg.exclude(e)
    reg.exclude(R.Exclusion(day=5, by="data_checks", checks=("max_rows_ratio",), reason="rows ...", run_id="r2",
                            since="t"))
    assert reg.excluded() == {3: e, 5: reg.excluded()[5]}
    st = reg.state([1, 2], {1: "fp"})
    assert st.excluded == {3: "rejected by the gate (min_auc): AUC 0.4987 (min 0.55)",
                           5: "held by data checks (max_rows_ratio): rows ..."}
    assert st.processed_days == {1, 2} and st.day_stats == {1: "fp"} and st.readmitted == frozenset()
    assert reg.readmit(3, "r3") == e
    assert set(reg.excluded()) == {5} and reg.readmitted() == {3}
    with pytest.raises(R.RegistryError, match=r"day 3 is not excluded \(excluded: \[5\]\)"):
        reg.readmit(3, "r4")
    assert [h["event"] for h in excluded(tmp_path)["history"]] == ["excluded", "excluded", "readmitted"]
    reg.exclude(e)                                   # excluded again: no longer counted as re-admitted
    assert reg.readmitted() == set()


def test_featurize_reads_links_to_the_windows_day_files(tmp_path: Path):
    from pipeline.retrain.days import link_days
    raw = tmp_path / "raw"
    (raw / "day_4").mkdir(parents=True)              # a folder of parts
    for name in ("day_1", "day_1.done", "day_2.gz", "day_3", "_day_5", "notes"):
        (raw / name).write_text(name)
    dest = tmp_path / "work" / "input"
    assert link_days(raw, r"day_(\d+)(\.gz)?$", [1, 2, 4], dest) == ["day_1", "day_2.gz", "day_4"]
    assert sorted(x.name for x in dest.iterdir()) == ["day_1", "day_2.gz", "day_4"]
    assert os.readlink(dest / "day_2.gz") == str(raw / "day_2.gz") and (dest / "day_4").is_dir()
    assert link_days(raw, r"day_(\d+)(\.gz)?$", [3], dest) == ["day_3"]          # made afresh
    assert sorted(x.name for x in dest.iterdir()) == ["day_3"] and (raw / "day_1").exists() and (raw / "day_4").is_dir()


def test_readmit_of_a_day_that_is_not_excluded_is_refused(tmp_path: Path):
    conf = write_conf(tmp_path)
    (tmp_path / "raw").mkdir()
    r = retrain(conf, "--readmit", "4")
    assert r.returncode == R.EXIT_CONFIG and "--readmit 4: day 4 is not excluded (excluded: none)" in r.stderr
    r = retrain(conf, "--readmit", "4", "--dry-run")
    assert r.returncode == 2 and "--readmit N goes alone" in r.stderr


def test_a_second_run_is_refused_while_the_lock_is_held(tmp_path: Path):
    conf = write_conf(tmp_path)
    (tmp_path / "raw").mkdir()
    (tmp_path / "registry").mkdir()
    with open(tmp_path / "registry" / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = retrain(conf)
    assert r.returncode == R.EXIT_LOCKED
    assert "another retrain run holds the lock" in r.stderr
    assert not (tmp_path / "work").exists()
    r = retrain(conf)                             # released: this run goes on, and finds no day yet
    assert r.returncode == 0 and "nothing new" in r.stdout, r.stderr


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path: Path):
    conf = write_conf(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    for d in (0, 1, 2):
        (raw / f"day_{d}").write_text("1\t2\n")
    (raw / "day_0.done").write_text("")
    (raw / "day_1.done").write_text("")
    r = retrain(conf, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would process day 1: window 0-1 (train [0], valid [], test [1]); cold start: first run" in r.stdout
    assert "jobs/featurize.py" in r.stdout and "--days 0-1" in r.stdout and "deepfm/train.py" in r.stdout
    assert "--allow-day-gaps" not in r.stdout and "2. data checks of day 1 no trailing days yet" in r.stdout
    assert "6. if it passes: export it: " in r.stdout and " -m deepfm.export --run " in r.stdout
    assert "(its checkpoint and model.pt2), then " in r.stdout
    assert not (tmp_path / "registry").exists() and not (tmp_path / "work").exists()


def test_deploy_files_call_the_same_command():
    cron = [ln for ln in (ROOT / "deploy" / "crontab").read_text().splitlines()
            if ln.strip() and not ln.startswith("#") and not ln.split()[0].count("=")]
    assert len(cron) == 1 and len(cron[0].split()) > 5 and COMMAND in cron[0]
    dag = (ROOT / "deploy" / "airflow_retrain_dag.py").read_text()
    tree = ast.parse(dag)
    assert COMMAND in dag and "BashOperator" in dag
    assert sum(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "BashOperator" for n in ast.walk(tree)) == 1
    for py in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("jobs/*.py"), *ROOT.glob("deepfm/*.py"),
               *ROOT.glob("benchmarks/*.py")]:       # Airflow is for the DAG file alone
        assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "airflow" in ast.dump(n)
                       for n in ast.walk(ast.parse(py.read_text()))), py
    assert COMMAND in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_a_failed_step_is_named_and_recorded(tmp_path: Path):
    conf = write_conf(tmp_path, spark={"master": "local[1]", "submit_args": ["--no-such-spark-flag"]})
    raw = tmp_path / "raw"
    raw.mkdir()
    for d in (0, 1):
        (raw / f"day_{d}").write_text("1\t2\n")
        (raw / f"day_{d}.done").write_text("")
    r = retrain(conf, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "retrain: error: step 'featurize' failed: exit code" in r.stderr and "no-such-spark-flag" in r.stderr
    rec = json.loads(next((tmp_path / "work" / "runs").glob("*-day1.json")).read_text())
    assert rec["status"] == "failed" and rec["failed_step"] == "featurize" and "no-such-spark-flag" in rec["error"]
    assert current(tmp_path / "registry") is None and not list((tmp_path / "registry").glob("v*"))


# --- slow: scheduled runs end to end (sharing one registry) ----------------------------------------

class Schedule:
    """The scheduled runs' raw folder, work folder and registry, and the stage the schedule has reached:
    0 nothing yet; 1 v000001 promoted from day 1 (trained on day 0); 2 v000002 promoted from day 2;
    3 day 3 (shuffled labels) rejected; 4 v000003 promoted from day 4 (trained on days 1, 2); 5 day 5 (ten
    times the rows) held; 6 day 6 (three times the positive rate) held. A test asks for the stage it
    starts from (:meth:`at`); the stages before it are run first, and a schedule past it (or left by a
    test that failed half-way) is started afresh in a new folder. A test that completes says which stage
    it leaves (:meth:`reached`)."""

    # stage -> the day it adds (how it is made) and what its run prints
    STAGES = {1: ({}, "promoted v000001"), 2: ({}, "promoted v000002"), 3: ({"labels": "shuffled"}, "kept current"),
              4: ({}, "promoted v000003"), 5: ({"copies": 10}, "held day 5"), 6: ({"labels": "tripled"}, "held day 6")}

    def __init__(self, factory: pytest.TempPathFactory):
        self.factory = factory
        self.stage = -1
        self.paths: dict[str, Path] = {}

    def __getitem__(self, key: str) -> Path:
        return self.paths[key]

    def at(self, stage: int) -> None:
        if not 0 <= self.stage <= stage:
            base = self.factory.mktemp("sched")
            (base / "raw").mkdir()
            self.paths = {"base": base, "conf": write_conf(base), "raw": base / "raw", "reg": base / "registry",
                          "work": base / "work"}
            self.stage = 0
        while self.stage < stage:
            self._advance()
        self.stage = -1                          # until the test says where it left the schedule

    def reached(self, stage: int) -> None:
        self.stage = stage

    def _advance(self) -> None:
        """What the tests of the next stage do, without their checks."""
        day = self.stage + 1
        how, says = self.STAGES[day]
        if day == 1:
            add_day(self["raw"], 0)
        add_day(self["raw"], day, **how)
        r = retrain(self["conf"])
        assert r.returncode == 0 and says in r.stdout, r.stdout + r.stderr
        self.stage = day


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory) -> Schedule:
    return Schedule(tmp_path_factory)


@pytest.mark.slow
def test_first_run_trains_from_scratch_and_promotes(sched: Schedule):
    sched.at(0)
    add_day(sched["raw"], 0)
    r = retrain(sched["conf"])
    assert r.returncode == 0 and "nothing new" in r.stdout and "at least one train day" in r.stdout, r.stderr
    add_day(sched["raw"], 1)
    # a first candidate the gate rejects leaves nothing to serve: the run fails, the day stays unprocessed
    strict = sched["base"] / "strict.yaml"
    conf = yaml.safe_load(sched["conf"].read_text())
    strict.write_text(yaml.safe_dump({**conf, "gate": {**conf["gate"], "min_auc": 0.99}}))
    r = retrain(strict)
    assert r.returncode == R.EXIT_FAILED, r.stdout + r.stderr
    assert "retrain: error: no model to serve: the first candidate was rejected (AUC " in r.stderr
    assert "(min 0.99)); day 1 is not marked processed: the next run tries again" in r.stderr
    rec = record_of(r.stdout)
    assert rec["status"] == "no_model" and rec["failed_step"] == "gate" and "(min 0.99)" in rec["reason"]
    assert rec["steps"]["featurize"]["linked"] == ["day_0", "day_1"]
    assert current(sched["reg"]) is None and not list(sched["reg"].glob("v*"))
    assert not (sched["reg"] / "excluded.json").exists()          # the day is not judged: nothing was served
    r = retrain(strict)                                           # tried again (its steps reused)
    assert r.returncode == R.EXIT_FAILED and "no model to serve" in r.stderr, r.stdout + r.stderr
    again = record_of(r.stdout)
    assert again["day"] == 1 and again["steps"]["train"]["status"] == "reused"
    r = retrain(sched["conf"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "promoted v000001" in r.stdout
    assert current(sched["reg"]) == "v000001"
    v1 = sched["reg"] / "v000001"
    fp = assert_serves(sched["reg"] / "current")
    assert f"promoted v000001 (model {fp}; cold start; test AUC" in r.stdout
    lin = json.loads((v1 / "lineage.json").read_text())
    assert lin["parent"] is None and lin["warm_start"] is False and lin["day"] == 1 and lin["days_trained"] == [0]
    assert (v1 / "checkpoint" / "COMPLETE").exists() and (v1 / "features" / "_SUCCESS").exists()
    assert json.loads((v1 / "manifest.json").read_text())["splits"]["test"]["days"] == [1]
    assert json.loads((v1 / "metrics.json").read_text())["test"]["rows"] == ROWS
    rec = record_of(r.stdout)
    assert rec["status"] == "promoted" and rec["start"] == "cold" and rec["version"] == "v000001"
    assert rec["steps"]["evaluate_current"]["status"] == "skipped"
    assert all(c["passed"] for c in rec["gate"]["checks"])
    assert rec["steps"]["featurize"]["status"] == "reused" and rec["steps"]["train"]["status"] == "reused"
    assert rec["steps"]["export"]["status"] == "done" and rec["model_fingerprint"] == fp
    assert Path(rec["steps"]["export"]["log"]) == sched["work"] / "runs" / rec["run_id"] / "export.log"
    assert f"-m deepfm.export --run {lin['run_dir']} --checkpoint {lin['checkpoint_source']}" in rec["steps"][
        "export"]["command"]
    assert rec["data_checks"]["skipped"].startswith("0 trailing day(s)") and not rec["data_checks"]["held"]
    kept = json.loads((sched["work"] / "stats" / "day_1.json").read_text())
    assert kept["rows"] == ROWS and kept["day"] == 1 and set(kept["missing"]) == set(kept["distinct"])
    sched.reached(1)


@pytest.mark.slow
def test_a_run_killed_in_training_leaves_current_and_the_rerun_resumes_warm(sched: Schedule, tmp_path: Path):
    sched.at(1)
    add_day(sched["raw"], 2)
    log = open(tmp_path / "log", "w")
    p = subprocess.Popen([sys.executable, "-m", "pipeline.retrain", "--config", str(sched["conf"])], cwd=ROOT,
                         env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and p.poll() is None:
            if list(sched["work"].glob("days/day_2-*/train/checkpoints/step_*/COMPLETE")):
                break
            time.sleep(0.05)
        assert p.poll() is None, (tmp_path / "log").read_text()[-3000:]
        assert not list(sched["work"].glob("days/day_2-*/train.done"))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    run_dir = next(sched["work"].glob("days/day_2-*/train"))
    # its trainer dies with it (no orphan keeps writing into the run folder)
    deadline = time.time() + 90
    while time.time() < deadline and R.stale_processes(["--out", str(run_dir)]):
        time.sleep(0.5)
    assert not R.stale_processes(["--out", str(run_dir)])
    assert current(sched["reg"]) == "v000001" and sorted(x.name for x in sched["reg"].glob("v*")) == ["v000001"]
    killed = [json.loads(x.read_text()) for x in (sched["work"] / "runs").glob("*-day2.json")]
    assert [k["status"] for k in killed] == ["running"] and killed[0]["current_step"] == "train"

    r = retrain(sched["conf"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "promoted v000002" in r.stdout and current(sched["reg"]) == "v000002"
    rec = record_of(r.stdout)
    assert rec["start"] == "warm" and rec["warm_start"] is True and rec["parent"] == "v000001"
    assert rec["resumed_work_dir"] is True
    assert rec["steps"]["featurize"]["status"] == "reused"
    assert rec["steps"]["train"]["resumed"] is True
    assert "resumed from" in Path(rec["steps"]["train"]["log"]).read_text()
    assert rec["steps"]["evaluate_current"]["status"] == "done"
    assert rec["current_metrics"]["rows"] == rec["candidate_metrics"]["rows"] == ROWS
    lin = json.loads((sched["reg"] / "v000002" / "lineage.json").read_text())
    assert lin["parent"] == "v000001" and lin["warm_start"] is True and lin["days_trained"] == [0, 1]
    assert lin["feature_fingerprint"] == json.loads((sched["reg"] / "v000001" / "lineage.json").read_text())[
        "feature_fingerprint"]
    killed = [json.loads(x.read_text()) for x in (sched["work"] / "runs").glob("*-day2.json")]
    assert sorted(k["status"] for k in killed) == ["interrupted", "promoted"]
    sched.reached(2)


@pytest.mark.slow
def test_a_rerun_after_success_finds_nothing_new(sched: Schedule):
    sched.at(2)
    before = sorted(x.name for x in sched["reg"].glob("v*"))
    r = retrain(sched["conf"])
    assert r.returncode == 0 and "nothing new" in r.stdout, r.stdout + r.stderr
    assert sorted(x.name for x in sched["reg"].glob("v*")) == before and current(sched["reg"]) == "v000002"
    r = retrain(sched["conf"], "--day", "2")
    assert r.returncode == 0 and "already processed" in r.stdout
    # what a forced redo would do: warm from the current model with its features; cold on --refit or
    # when the feature contract changed
    r = retrain(sched["conf"], "--day", "2", "--force", "--dry-run")
    assert r.returncode == 0 and "warm start from v000002" in r.stdout, r.stdout + r.stderr
    assert f"--reuse {sched['reg']}/v000002/features" in r.stdout
    assert f"--warm-start {sched['reg']}/v000002/checkpoint" in r.stdout
    r = retrain(sched["conf"], "--day", "2", "--force", "--refit", "--dry-run")
    assert "cold start: refit requested" in r.stdout and "--reuse" not in r.stdout and "--warm-start" not in r.stdout
    other = sched["base"] / "other_contract.yaml"
    other.write_text(f"base: {SMALL}\ncategorical:\n  defaults: {{hash_buckets: 30000}}\n")
    conf = sched["base"] / "other.yaml"
    conf.write_text(sched["conf"].read_text().replace(f"contract: {SMALL}", f"contract: {other}"))
    r = retrain(conf, "--day", "2", "--force", "--dry-run")
    assert "cold start: the feature contract changed" in r.stdout and "--reuse" not in r.stdout
    assert sorted(x.name for x in sched["reg"].glob("v*")) == before
    sched.reached(2)


@pytest.mark.slow
def test_a_day_with_shuffled_labels_is_rejected_and_excluded(sched: Schedule):
    sched.at(2)
    add_day(sched["raw"], 3, labels="shuffled")
    r = retrain(sched["conf"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept current v000002" in r.stdout
    assert "day 3 is left out of later windows (min_auc; --readmit 3 to let it in)" in r.stdout
    assert current(sched["reg"]) == "v000002"
    assert sorted(x.name for x in sched["reg"].glob("v*")) == ["v000001", "v000002"]
    rec = record_of(r.stdout)
    assert rec["status"] == "kept_current" and rec["start"] == "warm" and rec["reason"] and rec["excluded"] is True
    failed = {c["check"] for c in rec["gate"]["checks"] if not c["passed"]}
    assert "min_auc" in failed, rec["gate"]
    # the data checks passed it: the same rows, positive rate and ids as days 1 and 2, only no signal
    assert rec["steps"]["data_checks"]["status"] == "passed" and rec["data_checks"]["trailing_days"] == [1, 2]
    # no signal left: the candidate ranks at chance, and the exclusion names its AUC
    auc = rec["candidate_metrics"]["auc"]
    assert abs(auc - 0.5) < 0.03, auc
    (ex,) = excluded(sched["reg"])["excluded"]
    assert ex["day"] == 3 and ex["by"] == "gate" and "min_auc" in ex["checks"]
    assert f"AUC {auc:.4f} (min 0.55)" in ex["reason"], ex
    # the day counts as processed: the next run does not try it again
    r = retrain(sched["conf"])
    assert r.returncode == 0 and "nothing new" in r.stdout
    sched.reached(3)


@pytest.mark.slow
def test_the_next_good_day_trains_without_the_rejected_one_and_promotes(sched: Schedule):
    sched.at(3)
    add_day(sched["raw"], 4)
    # the candidate passes the gate but its export fails (it cannot finish in 1 s): the run fails at that
    # step and nothing is published
    slow = sched["base"] / "export_timeout.yaml"
    conf = yaml.safe_load(sched["conf"].read_text())
    slow.write_text(yaml.safe_dump({**conf, "timeouts": {"export": 1}}))
    r = retrain(slow)
    assert r.returncode == R.EXIT_FAILED, r.stdout + r.stderr
    assert "retrain: error: step 'export' failed: timed out after 1 s (timeouts.export)" in r.stderr
    assert "window 1-4 (train [1, 2], valid [], test [4]; left out 3 (rejected by the gate (min_auc): AUC" in r.stdout
    failed = json.loads(next((sched["work"] / "runs").glob("*-day4.json")).read_text())
    assert failed["status"] == "failed" and failed["failed_step"] == "export" and failed["gate"]["passed"]
    assert failed["steps"]["export"]["status"] == "running" and "publish" not in failed["steps"]
    assert Path(failed["steps"]["export"]["log"]).is_file()
    (ex,) = excluded(sched["reg"])["excluded"]                 # day 3's, by the gate, naming its AUC
    assert [x["day"] for x in failed["left_out"]] == [3]
    assert failed["left_out"][0]["reason"] == f"rejected by the gate (min_auc): {ex['reason']}"
    assert failed["steps"]["featurize"]["linked"] == ["day_1", "day_2", "day_4"]
    assert "--allow-day-gaps" in failed["steps"]["featurize"]["command"]
    assert current(sched["reg"]) == "v000002" and sorted(x.name for x in sched["reg"].glob("*v0*")) == [
        "v000001", "v000002"]
    # the rerun of the same plan reuses the finished steps and exports, then publishes
    r = retrain(sched["conf"])
    assert r.returncode == 0 and "promoted v000003" in r.stdout, r.stdout + r.stderr
    rec = record_of(r.stdout)
    assert rec["run_key"] == failed["run_key"] and rec["resumed_work_dir"] is True
    assert [rec["steps"][s]["status"] for s in ("featurize", "train", "evaluate_current", "export", "publish")] == [
        "reused", "reused", "reused", "done", "done"]
    fp = assert_serves(sched["reg"] / "current")
    assert current(sched["reg"]) == "v000003" and rec["model_fingerprint"] == fp
    assert f"promoted v000003 (model {fp}; warm start from v000002;" in r.stdout
    # keep_versions 2: v000001 is pruned, its whole folder (model.pt2 with it); v000002 keeps its own
    assert rec["pruned_versions"] == ["v000001"] and not (sched["reg"] / "v000001").exists()
    assert_serves(sched["reg"] / "v000002")
    lin = json.loads((sched["reg"] / "v000003" / "lineage.json").read_text())
    assert lin["days_trained"] == [1, 2] and lin["valid_days"] == [] and lin["test_days"] == [4]
    assert lin["window"] == [1, 4] and lin["warm_started_from"] == "v000002"
    assert json.loads((sched["reg"] / "v000003" / "manifest.json").read_text())["input"]["days"] == [1, 2, 4]
    assert rec["data_checks"]["trailing_days"] == [1, 2] and not rec["data_checks"]["held"]
    sched.reached(4)


@pytest.mark.slow
def test_a_day_with_ten_times_the_rows_is_held_before_training(sched: Schedule):
    sched.at(4)
    add_day(sched["raw"], 5, copies=10)
    r = retrain(sched["conf"])
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert f"retrain: held day 5: rows {10 * ROWS} are 10.00x the trailing {ROWS} (max 3.0x)" in lines, r.stdout
    rec = record_of(r.stdout)
    assert rec["status"] == "held" and rec["version"] == "v000003" and "train" not in rec["steps"]
    assert rec["data_checks"]["trailing_days"] == [1, 2, 4] and rec["data_checks"]["failed"] == ["max_rows_ratio"]
    assert rec["day_stats"]["rows"] == 10 * ROWS and [x["day"] for x in rec["left_out"]] == [3]
    assert current(sched["reg"]) == "v000003" and (sched["work"] / "stats" / "day_5.json").exists()
    assert sorted(x["day"] for x in excluded(sched["reg"])["excluded"]) == [3, 5]
    r = retrain(sched["conf"])                                    # held counts as processed
    assert r.returncode == 0 and "nothing new" in r.stdout and "already processed (last: day 5)" in r.stdout
    fp = json.loads((sched["reg"] / "v000003" / "lineage.json").read_text())["model_fingerprint"]
    assert f"(current model: v000003 (model {fp}); excluded days: [3, 5] (--readmit N lets one in))" in r.stdout
    sched.reached(5)


@pytest.mark.slow
def test_a_day_with_three_times_the_positive_rate_is_held(sched: Schedule):
    sched.at(5)
    add_day(sched["raw"], 6, labels="tripled")
    rate = positive_rate(sched["raw"] / "day_6")
    r = retrain(sched["conf"])
    assert r.returncode == 0, r.stdout + r.stderr
    rec = record_of(r.stdout)
    trailing = np.median([json.loads((sched["work"] / "stats" / f"day_{d}.json").read_text())["positive_rate"]
                          for d in (1, 2, 4)])
    assert 2.8 < rate / trailing < 3.2
    want = (f"retrain: held day 6: positive rate {rate:.4f} is {rate / trailing:.2f}x the trailing {trailing:.4f} "
            "(max 2.0x)")
    assert want in r.stdout.splitlines(), r.stdout
    assert rec["status"] == "held" and rec["data_checks"]["failed"] == ["max_positive_rate_ratio"]
    assert [x["day"] for x in rec["left_out"]] == [3, 5] and rec["window"]["days"] == [2, 4, 6]
    assert current(sched["reg"]) == "v000003"
    sched.reached(6)


@pytest.mark.slow
def test_excluded_days_stay_out_of_later_windows_until_readmitted(sched: Schedule):
    sched.at(6)
    add_day(sched["raw"], 7)
    r = retrain(sched["conf"], "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would process day 7: window 2-7 (train [2, 4], valid [], test [7]; left out 3 (rejected by the gate" \
        in r.stdout
    assert "), 5 (held by data checks (max_rows_ratio): rows" in r.stdout
    assert "), 6 (held by data checks (max_positive_rate_ratio): positive rate" in r.stdout
    assert "--days 2-7" in r.stdout and "--allow-day-gaps" in r.stdout
    assert "2. data checks of day 7 against trailing day(s) [1, 2, 4]" in r.stdout
    r = retrain(sched["conf"], "--readmit", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"retrain: readmitted day 5 (it was held by data checks (max_rows_ratio): rows {10 * ROWS} are 10.00x" \
        in r.stdout
    assert record_of(r.stdout)["status"] == "readmitted"
    assert excluded(sched["reg"])["history"][-1]["event"] == "readmitted"
    r = retrain(sched["conf"], "--dry-run")
    assert "would process day 7: window 4-7 (train [4, 5], valid [], test [7]; left out 6 (held by" in r.stdout
    assert "against trailing day(s) [1, 2, 4, 5]" in r.stdout
    r = retrain(sched["conf"], "--readmit", "5")
    assert r.returncode == 2 and "day 5 is not excluded (excluded: [3, 6])" in r.stderr
