"""pipeline.manifest without Spark: a Manifest made in code is written and read back whole, and the
reader refuses what it cannot trust (another version, an edited contract, an incomplete output)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import layout, manifest
from pipeline.contract import load_contract
from pipeline.manifest import (Counts, InputInfo, Manifest, ManifestError, Rejects, SamplingInfo, SplitInfo,
                               Vocabulary)
from tests.conftest import SMALL


def make_manifest() -> Manifest:
    c = load_contract(SMALL).with_overrides(**{"continuous.fields.I2.bucketing": "quantile",
                                               "continuous.fields.I2.num_buckets": 8,
                                               "categorical.fields.C3.min_count": 3})
    days = {"train": (0, 1), "valid": (2,), "test": (3,)}
    return Manifest(
        contract=c, contract_fingerprint=c.fingerprint, feature_fingerprint="0123456789abcdef",
        source_label=c.label, fields=manifest.fields_of(c),
        boundaries={"I2": (0.0, 1e-05, 0.30000000000000004, 7.0, 123456.789)},
        vocab=Vocabulary(path="vocab", ids_kept={"C3": 812}, digest="-4242424242"),
        sampling=SamplingInfo(neg_sample_rate=0.5, seed=7),
        splits={s: SplitInfo(days=d, before_sampling=Counts(rows=1000 * len(d), positives=30 * len(d)),
                             rows=(600 if s == "train" else 1000) * len(d), positives=30 * len(d), files=8,
                             neg_sample_rate=0.5 if s == "train" else 1.0) for s, d in days.items()},
        rejects=Rejects(total=2, by_reason={"binary": 1, "column_count": 0, "bad_label": 1, "non_numeric": 0,
                                            "bad_day": 0}),
        input=InputInfo(path="data/raw", files=tuple(f"file:/data/raw/day_{d}" for d in range(4)),
                        days=(0, 1, 2, 3), lines=4002, reused_from=None),
        seconds=12.34, seconds_by_step={"count lines (to plan files)": 1.5, "check the output": 0.25},
        spark_version="4.3.0", created="2026-12-01T10:00:00Z")


def test_a_manifest_round_trips_through_write_and_read(tmp_path: Path):
    m = make_manifest()
    manifest.write(tmp_path, m)
    back = manifest.read(tmp_path)
    assert back == m
    assert back.boundaries["I2"] == (0.0, 1e-05, 0.30000000000000004, 7.0, 123456.789)
    assert back.columns == ("label", *m.contract.field_names, "day")
    assert back.summary_line() == ("featurize: train 2000->1200 rows, valid 1000->1000 rows, test 1000->1000 rows, "
                                   "2 rejected, 4002 lines in, 12.34 s")
    assert Manifest.loads(m.dumps()) == m


@pytest.mark.parametrize("version", [1, 99])
def test_an_unknown_manifest_version_is_refused(tmp_path: Path, version: int):
    d = make_manifest().to_json()
    d["manifest_version"] = version
    (tmp_path / layout.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=rf"manifest_version {version} is not {manifest.MANIFEST_VERSION}"):
        manifest.read(tmp_path)


def test_a_manifest_whose_contract_was_edited_is_refused(tmp_path: Path):
    d = make_manifest().to_json()
    d["contract"]["categorical"]["fields"]["C1"]["hash_buckets"] += 1
    (tmp_path / layout.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="the file was edited"):
        manifest.read(tmp_path)


def test_open_featurized_needs_success(tmp_path: Path):
    m = make_manifest()
    manifest.write(tmp_path, m)
    with pytest.raises(ManifestError, match=f"not a complete featurized output \\(no {layout.SUCCESS}"):
        manifest.open_featurized(tmp_path)
    (tmp_path / layout.SUCCESS).write_text("")
    assert manifest.open_featurized(tmp_path) == m
