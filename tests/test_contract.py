from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.contract import ContractError, load_contract, parse_contract
from tests.conftest import CONF, ROOT


def criteo_raw() -> dict:
    return yaml.safe_load((CONF / "criteo.yaml").read_text())


def test_criteo_contract_loads_the_criteo_layout():
    c = load_contract(CONF / "criteo.yaml")
    assert c.source.columns[0] == "label" and len(c.source.columns) == 40
    assert [f.name for f in c.continuous] == [f"I{i}" for i in range(1, 14)]
    assert [f.name for f in c.categorical] == [f"C{i}" for i in range(1, 27)]
    assert c.field("C1").num_embeddings == 1_000_000
    assert c.field("I1").num_embeddings == 64 + 2          # 64 buckets + missing + negative
    assert all(f.embedding_dim % 4 == 0 for f in c.fields)
    assert c.sampling.neg_sample_rate == 1.0 and c.splits.valid_days == 1 and c.splits.test_days == 1


def test_avazu_layout_is_described_without_code_changes():
    c = load_contract(CONF / "avazu.yaml")
    assert c.source.delimiter == "," and c.source.header is True
    assert c.source.day_from == "column" and c.source.day_column == "hour"
    assert c.label == "click" and c.source.ignore == ("id",)
    assert len(c.categorical) == 21 and c.continuous == ()
    assert c.field("C1").num_embeddings == 64 and c.field("site_id").min_count == 2


def test_small_contract_inherits_from_its_base():
    small, full = load_contract(CONF / "criteo_small.yaml"), load_contract(CONF / "criteo.yaml")
    assert small.source == full.source and small.continuous == full.continuous
    assert small.field("C7").num_embeddings == 20_000
    assert small.fingerprint != full.fingerprint


def test_fingerprint_is_stable_and_tracks_what_ids_mean():
    a, b = load_contract(CONF / "criteo.yaml"), load_contract(CONF / "criteo.yaml")
    assert a.fingerprint == b.fingerprint == "dbdf2dba02d6a285"   # changes only if the contract does
    assert a.with_overrides(**{"sampling.neg_sample_rate": 0.1}).fingerprint == a.fingerprint
    assert a.with_overrides(**{"splits.test_days": 2}).fingerprint == a.fingerprint
    assert a.with_overrides(**{"categorical.fields.C3.hash_buckets": 999}).fingerprint != a.fingerprint
    assert a.with_overrides(**{"continuous.fields.I1.bucketing": "quantile"}).fingerprint != a.fingerprint
    # a default applies to every field of its kind; a per-field key given with it still wins
    b = a.with_overrides(**{"categorical.fields.C2.min_count": 7, "categorical.defaults.min_count": 5})
    assert [f.min_count for f in b.categorical[:3]] == [5, 7, 5] and all(f.min_count == 5 for f in b.categorical[2:])
    with pytest.raises(ContractError, match="categorical.defaults.min_cnt"):
        a.with_overrides(**{"categorical.defaults.min_cnt": 5})


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["sampling"].update(neg_rate=0.5), "sampling.neg_rate"),
    (lambda d: d["continuous"]["defaults"].update(buckets=3), "continuous.defaults.buckets"),
    (lambda d: d["source"].update(delim=","), "source.delim"),
])
def test_unknown_keys_are_rejected_by_name(edit, key):
    d = criteo_raw()
    edit(d)
    with pytest.raises(ContractError, match=rf"^{key}: unknown key"):
        parse_contract(d)


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d["categorical"]["defaults"].update(embedding_dim=10), r"categorical\.fields\.C1\.embedding_dim: 10 is not a multiple of 4"),
    (lambda d: d["categorical"]["defaults"].update(hash_buckets=2), r"categorical\.fields\.C1\.hash_buckets: 2 is out of range"),
    (lambda d: d["sampling"].update(neg_sample_rate=0), r"sampling\.neg_sample_rate: 0\.0 is out of range"),
    (lambda d: d["sampling"].update(neg_sample_rate=1.5), r"sampling\.neg_sample_rate"),
    (lambda d: d["continuous"]["defaults"].update(bucketing="equal"), r"continuous\.fields\.I1\.bucketing: 'equal'"),
    (lambda d: d.update(label="clicked"), r"label: column 'clicked' is not in source\.columns"),
    (lambda d: d["categorical"]["fields"].append("C1"), r"categorical\.fields\.C1: field declared twice"),
    (lambda d: d["categorical"]["fields"].remove("C26"), r"source\.columns: 'C26' is neither a field"),
    (lambda d: d["source"].update(file_pattern="day_\\d+"), r"source\.file_pattern: needs a capture group"),
    (lambda d: d["splits"].update(test_days=-1), r"splits\.test_days: -1 is out of range"),
    (lambda d: d["quality"].update(max_reject_fraction="lots"), r"quality\.max_reject_fraction: expected a number"),
])
def test_impossible_values_are_rejected_by_key(edit, msg):
    d = criteo_raw()
    edit(d)
    with pytest.raises(ContractError, match=msg):
        parse_contract(d)


def test_contract_objects_are_frozen():
    c = load_contract(CONF / "criteo.yaml")
    with pytest.raises(AttributeError):
        c.name = "x"  # type: ignore[misc]


def test_contract_module_imports_neither_spark_nor_torch():
    code = "import sys, pipeline.contract; print(any(m.split('.')[0] in ('pyspark', 'torch') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_bad_config_on_the_command_line_fails_clearly_and_writes_nothing(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    d = criteo_raw()
    d["categorical"]["defaults"]["embeding_dim"] = 16
    bad.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    for cmd in ([sys.executable, "-m", "pipeline.generate", "--config", str(bad), "--out", str(out)],
                [sys.executable, str(ROOT / "jobs" / "featurize.py"), "--config", str(bad), "--input",
                 str(tmp_path), "--output", str(out)]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode != 0
        assert "categorical.defaults.embeding_dim: unknown key" in r.stderr
        assert not out.exists()
