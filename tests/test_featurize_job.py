"""jobs/featurize.py end to end on generated logs, in the shared local[2] session."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import featurize
from jobs.featurize import FeaturizeError
from pipeline import manifest
from pipeline.contract import load_contract
from pipeline.manifest import Counts
from pipeline.spark.placement import row_group_plan
from pipeline.generate import read_truth
from tests.conftest import RAW_ROWS, SMALL

pytestmark = pytest.mark.slow
FIELDS = [f.name for f in load_contract(SMALL).fields]


def parquet_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.parquet"))


def test_splits_sampling_and_manifest(featurized: Path, raw_logs: Path):
    m = manifest.read(featurized)
    assert (featurized / "_SUCCESS").exists()
    assert m.contract_fingerprint == load_contract(SMALL).fingerprint
    s = m.splits
    assert (s["train"].days, s["valid"].days, s["test"].days) == ((0, 1), (2,), (3,))
    truth_pos = {d: int(read_truth(raw_logs, d)[1].sum()) for d in range(4)}
    # train: every positive kept, about half of the negatives
    assert s["train"].before_sampling == Counts(rows=2 * RAW_ROWS, positives=truth_pos[0] + truth_pos[1])
    assert s["train"].positives == truth_pos[0] + truth_pos[1]
    negs_before = 2 * RAW_ROWS - s["train"].positives
    negs_after = s["train"].rows - s["train"].positives
    assert abs(negs_after / negs_before - 0.5) < 0.02
    # valid and test are never sampled
    for split, day in (("valid", 2), ("test", 3)):
        assert s[split].rows == s[split].before_sampling.rows == RAW_ROWS
        assert s[split].positives == truth_pos[day]
    assert m.sampling.neg_sample_rate == 0.5
    assert m.rejects.total == 0 and m.input.lines == 4 * RAW_ROWS
    assert [f.name for f in m.fields] == FIELDS
    assert m.fields[0].num_embeddings == 66 and m.fields[13].num_embeddings == 20_000
    assert m.seconds > 0


def test_parquet_layout_serves_eight_ranks(featurized: Path):
    m = manifest.read(featurized)
    for split in ("train", "valid", "test"):
        files = parquet_files(featurized / split)
        groups = [pq.ParquetFile(f).metadata.num_row_groups for f in files]
        rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
        assert sum(groups) >= 8, split
        assert min(rows) > 0, split                         # no empty files
        # the files planned for the split, of even size: one shuffle partition each
        plan = row_group_plan(m.splits[split].rows, 16384, 8)
        assert len(files) == m.splits[split].files == plan[0], split
        assert max(rows) <= 16384 and max(rows) - min(rows) < 0.2 * plan[1] + 100, (split, rows)
        assert sum(rows) == m.splits[split].rows
        t = pq.read_table(files[0])
        assert t.column_names == ["label", *FIELDS, "day"]
        for f in m.fields:
            col = t.column(f.name).to_numpy()
            assert col.min() >= 0 and col.max() < f.num_embeddings


def test_train_rows_are_shuffled_across_days(featurized: Path):
    t = pq.read_table(parquet_files(featurized / "train")[0], columns=["day"]).column("day").to_numpy()
    assert set(t.tolist()) == {0, 1}
    switches = (t[1:] != t[:-1]).sum()
    assert switches > len(t) / 4                            # days interleaved, not two blocks


def test_petastorm_reads_the_output(featurized: Path):
    from petastorm import make_batch_reader
    m = manifest.read(featurized)
    total = 0
    for shard in range(2):
        with make_batch_reader(f"file://{featurized}/valid", cur_shard=shard, shard_count=2, num_epochs=1,
                               reader_pool_type="dummy", schema_fields=["label", "C1"]) as r:
            for batch in r:
                total += len(batch.label)
    assert total == m.splits["valid"].rows


def _with_bad_lines(raw: Path, dst: Path) -> dict[str, str]:
    dst.mkdir()
    for d in range(3):
        shutil.copy(raw / f"day_{d}", dst / f"day_{d}")
    good = (raw / "day_0").read_text().splitlines()[0]
    bad = {
        "column_count": good.rsplit("\t", 1)[0],
        "bad_label": "7" + good[1:],
        "non_numeric": good.split("\t", 2)[0] + "\tabc\t" + good.split("\t", 2)[2],
        "binary": "\x00\x01\x02garbage\xff",
    }
    with open(dst / "day_1", "a", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write("\n")                                           # a blank line: skipped, not a reject
        for line in bad.values():
            fh.write(line + "\n")
    return bad


def test_malformed_lines_are_quarantined_with_reasons(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    bad = _with_bad_lines(raw_logs, raw)
    out = tmp_path / "out"
    m = featurize.main(["--input", str(raw), "--output", str(out), "--config", SMALL, "--valid-days", "0"])
    assert m.rejects.by_reason == {"binary": 1, "column_count": 1, "bad_label": 1, "non_numeric": 1,
                                   "bad_day": 0}
    assert m.input.lines == 3 * RAW_ROWS + 4
    rejects = {r["reason"]: r["line"] for r in spark.read.parquet(str(out / "rejects")).collect()}
    for reason in ("column_count", "bad_label", "non_numeric"):
        assert rejects[reason] == bad[reason]
    assert rejects["binary"].startswith("\x00\x01\x02garbage")
    assert m.splits["train"].rows + m.splits["test"].rows == 3 * RAW_ROWS


def test_too_many_rejects_fail_and_leave_the_existing_output(spark, raw_logs: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    _with_bad_lines(raw_logs, raw)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}')
    (out / "_SUCCESS").write_text("")
    with pytest.raises(FeaturizeError, match=r"4 of 75004 lines .* more than quality.max_reject_fraction=1e-05"):
        featurize.main(["--input", str(raw), "--output", str(out), "--config", SMALL, "--valid-days", "0",
                        "--max-reject-fraction", "0.00001", "--overwrite"])
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "manifest.json"]
    # an existing output is never replaced without --overwrite
    with pytest.raises(FeaturizeError, match="exists; pass --overwrite"):
        featurize.main(["--input", str(raw), "--output", str(out), "--config", SMALL])


def test_quantile_boundaries_min_count_and_reuse(spark, raw_logs: Path, tmp_path: Path):
    # min_count on the field with the most distinct values (from the generator's ground truth)
    truth = json.loads((raw_logs / "truth" / "model.json").read_text())
    big = max((f for f in truth["fields"] if f["kind"] == "categorical"), key=lambda f: f["cardinality"])["name"]
    sets = ["--set", "continuous.fields.I2.bucketing=quantile", "--set", "continuous.fields.I2.num_buckets=8",
            "--set", f"categorical.fields.{big}.min_count=3"]
    first = tmp_path / "first"
    m1 = featurize.main(["--input", str(raw_logs), "--output", str(first), "--config", SMALL, "--days", "0-2",
                         "--valid-days", "0", *sets])
    b = m1.boundaries["I2"]
    assert 1 <= len(b) <= 7 and list(b) == sorted(b)
    assert m1.vocab is not None and m1.vocab.ids_kept[big] > 0
    train = spark.read.parquet(str(first / "train"))
    i2 = sorted(r[0] for r in train.select("I2").distinct().collect())
    assert set(i2) <= set(range(0, 2 + 8)) and len(i2) >= 3
    # ids seen fewer than 3 times in train became 1; every other id occurs at least 3 times
    counts = {r[big]: r["count"] for r in train.groupBy(big).count().collect()}
    assert counts[1] > 100 and all(n >= 3 for k, n in counts.items() if k > 1)
    # the next window reuses boundaries and vocabulary: same meaning of ids
    second = tmp_path / "second"
    m2 = featurize.main(["--input", str(raw_logs), "--output", str(second), "--config", SMALL, "--days", "1-3",
                         "--valid-days", "0", "--reuse", str(first), *sets])
    assert m2.boundaries == m1.boundaries
    assert m2.feature_fingerprint == m1.feature_fingerprint
    # reusing an output made under another contract is refused
    with pytest.raises(FeaturizeError, match="made under contract"):
        featurize.main(["--input", str(raw_logs), "--output", str(tmp_path / "third"), "--config", SMALL,
                        "--reuse", str(first)])
