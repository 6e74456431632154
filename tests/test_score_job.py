"""jobs/score.py end to end: raw lines -> the exported model's probabilities on Spark, the same ids and
probabilities as deepfm.serving.Predictor on the same lines, exact line numbers, rejects, refusals, and a
standalone master and worker on 127.0.0.1."""
from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import score
from jobs.score import RejectLimitError, ScoreError
from pipeline import artifact as A
from pipeline.ids import categorical_id
from pipeline.rows import split_line
from tests.conftest import DRIVER_JAVA_OPTIONS, ROOT, Standalone

pytestmark = pytest.mark.slow


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def rare_and_unseen(raw_logs: Path, exported: Path) -> tuple[tuple[str, str], tuple[str, str]]:
    """(field, value) seen in the train days (0 and 1) of the shared logs whose id occurs there only once,
    so min_count 2 makes it rare; and (another field, value) never seen whose hashed id the vocabulary does
    not keep (an unseen value can share the id of a kept one)."""
    c = A.read_card(exported).manifest.contract
    vocab = A.read_vocabulary(exported)
    cols = c.source.columns
    lines = [ln.rstrip("\n").split("\t") for d in (0, 1) for ln in open(raw_logs / f"day_{d}")]
    rare = None
    for f in c.categorical:
        k, buckets = cols.index(f.name), f.num_embeddings
        ids = Counter(categorical_id(f.name, ln[k], buckets) for ln in lines if ln[k])
        once = [ln[k] for ln in lines if ln[k] and ids[categorical_id(f.name, ln[k], buckets)] == 1]
        if once:
            rare = (f.name, once[0])
            break
    assert rare is not None, "no value of the train days is rare"
    other = next(f for f in c.categorical if f.name != rare[0])
    kept = set(vocab[other.name].tolist())
    unseen = next(v for v in (f"never-seen-{i}" for i in range(1000))
                  if categorical_id(other.name, v, other.num_embeddings) not in kept)
    return rare, (other.name, unseen)


class Input:
    """A raw input folder written line by line, remembering each line's file and 0-based number."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.lines: dict[tuple[str, int], str] = {}         # (file name, line number) -> text
        self.expect_reject: dict[tuple[str, int], str] = {}  # -> reason

    def write(self, name: str, lines: list[str], rejects: dict[int, str] | None = None, gz: bool = False) -> None:
        data = "".join(ln + "\n" for ln in lines).encode("utf-8", "surrogateescape")
        (self.root / name).write_bytes(gzip.compress(data) if gz else data)
        for i, ln in enumerate(lines):
            self.lines[(name, i)] = ln
        for i, why in (rejects or {}).items():
            self.expect_reject[(name, i)] = why

    def good(self) -> dict[tuple[str, int], str]:
        """The lines that should be scored: not blank, not rejected."""
        return {k: v for k, v in self.lines.items() if v.strip() and k not in self.expect_reject}


@pytest.fixture(scope="module")
def made_input(raw_logs: Path, exported: Path, tmp_path_factory) -> Input:
    """day_3: the raw test day's first 300 lines with hand-made ones (edge values, a blank line, malformed
    lines) among them; extra.log (no day in its name; an empty label); day_4.gz (compressed)."""
    inp = Input(tmp_path_factory.mktemp("score_in") / "raw")
    head = (raw_logs / "day_3").read_text().splitlines()[:300]
    cols = head[0].split("\t")                     # label, I1..I13, C1..C26

    def line(**changes: str) -> str:
        c = list(cols)
        for k, v in changes.items():
            c[0 if k == "label" else (int(k[1:]) if k[0] == "I" else 13 + int(k[1:]))] = v
        return "\t".join(c)

    (rare_field, rare), (unseen_field, unseen) = rare_and_unseen(raw_logs, exported)
    edge = [
        "\t".join(["1"] + [""] * 39),                                           # every field missing
        line(I1="-3", I2="-1.5", I5="-0"),                                      # negatives (and minus zero)
        line(**{rare_field: rare, unseen_field: unseen}),                       # rare, unseen
        line(I1="1e300", I3="123456789012", I4="1.7976931348623157E308"),       # huge
        line(I1="0x1p3", I2="2.5d", I3="7f", I4="0X1.8P1", I6="+4D"),           # Java's number forms
        line(I1=" 5 ", I2="3 ", C1="a b", C2=" lead", C6="trail "),            # spaces
        line(label=""),                                                          # no label yet
    ]
    malformed = {
        "non_numeric": line(I1="NaN"),                   # not finite
        "non_numeric_inf": line(I7="Infinity"),
        "non_numeric_text": line(I2="abc"),              # an integer field that is not a number
        "column_count": "\t".join(cols[:-1]),
        "binary": "\x00\x01\x02garbage\udcff",           # NUL and an invalid UTF-8 byte
        "bad_label": line(label="7"),
    }
    lines = head[:120] + [""] + edge + list(malformed.values()) + head[120:]
    first_bad = 120 + 1 + len(edge)
    reasons = {first_bad + i: k.split("_inf")[0].split("_text")[0] for i, k in enumerate(malformed)}
    inp.write("day_3", lines, reasons)
    inp.write("extra.log", [line(label=""), "", "", line(label="0", C9="x"), line(label="1")])
    inp.write("day_4.gz", head[200:260], gz=True)
    inp.edge = edge                                 # type: ignore[attr-defined]
    inp.rare_fields = (rare_field, unseen_field)    # type: ignore[attr-defined]
    inp.malformed = malformed                       # type: ignore[attr-defined]
    inp.first_bad = first_bad                       # type: ignore[attr-defined]
    return inp


@pytest.fixture(scope="module")
def scored_local(spark, made_input: Input, exported: Path, tmp_path_factory) -> Path:
    """``made_input`` scored in the session's local[2] Spark with --with-ids, its files cut into 8 kB blocks
    (several blocks per file: the line numbers must still be exact)."""
    out = tmp_path_factory.mktemp("score_out") / "scores"
    spark.conf.set("spark.sql.files.maxPartitionBytes", "8192")
    try:
        score.main(["--model", str(exported), "--input", str(made_input.root), "--output", str(out), "--with-ids",
                    "--max-reject-fraction", "0.2"])
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    return out


def by_key(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["file"].rsplit("/", 1)[-1], r["line"]): r for r in rows}


def test_train_serve_parity_line_numbers_and_rejects(scored_local: Path, made_input: Input, exported: Path):
    from deepfm.serving import Predictor
    card = A.read_card(exported)
    c = card.manifest.contract
    rows = by_key(read_rows(scored_local / "scores"))
    good = made_input.good()
    # every line that is not blank or rejected is scored once, under its own file and line number
    assert sorted(rows) == sorted(good)
    assert Path(next(iter(read_rows(scored_local / "scores")))["file"].split(":", 1)[1]).parent == made_input.root
    keys = sorted(good)
    raw = [split_line(good[k], c) for k in keys]
    p = Predictor.load(exported)
    want_ids = p.ids(raw)
    got_ids = np.array([[rows[k][f] for f in c.field_names] for k in keys])
    np.testing.assert_array_equal(got_ids, want_ids)
    got = np.array([rows[k]["probability"] for k in keys])
    np.testing.assert_allclose(got, p.predict(raw), rtol=1e-6)
    # the logit is the calibrated one: its sigmoid is the probability
    logits = np.array([rows[k]["logit"] for k in keys], dtype=np.float64)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), got, rtol=1e-6)
    # the labels as in the lines; none (null) where the line has an empty label
    assert [rows[k]["label"] for k in keys] == [None if r["label"] == "" else int(r["label"]) for r in raw]
    assert rows[("extra.log", 0)]["label"] is None
    # the edges did reach their ids: missing 0, negative 1, rare and unseen 1 (min_count)
    edge = {k: rows[("day_3", 121 + i)] for i, k in enumerate(["missing", "negative", "rare", "huge"])}
    assert all(edge["missing"][f] == 0 for f in c.field_names)
    assert edge["negative"]["I1"] == 1 and edge["negative"]["I2"] == 1
    assert [edge["rare"][f] for f in made_input.rare_fields] == [1, 1]      # type: ignore[attr-defined]
    assert edge["huge"]["I1"] == c.field("I1").num_embeddings - 1

    # malformed lines: in rejects with their reason, file, line number, text and bytes
    rejects = read_rows(scored_local / "rejects")
    got_rejects = {(r["file"].rsplit("/", 1)[-1], r["line"]): r for r in rejects}
    assert {k: r["reason"] for k, r in got_rejects.items()} == made_input.expect_reject
    for k, r in got_rejects.items():
        text = made_input.lines[k]
        assert r["line_bytes"] == text.encode("utf-8", "surrogateescape")
        assert r["day"] == 3
        if r["reason"] != "binary":
            assert r["line_text"] == text
    # the online predictor refuses the same values, naming the field
    m = made_input.malformed                       # type: ignore[attr-defined]
    for name, field in (("non_numeric", "I1"), ("non_numeric_inf", "I7"), ("non_numeric_text", "I2")):
        with pytest.raises(ValueError, match=f"{field}: "):
            p.predict([split_line(m[name], c)])

    s = json.loads((scored_local / "scores.json").read_text())
    assert s["scores_version"] == 1
    assert s["model_fingerprint"] == card.model_fingerprint and s["model"] == os.path.realpath(exported)
    assert s["rows"] == len(good) and s["lines"] == len(good) + len(made_input.expect_reject)
    assert s["rejects"]["by_reason"] == {"binary": 1, "column_count": 1, "bad_label": 1, "non_numeric": 3}
    assert s["key"] == ["file", "line"] and s["columns"][:5] == ["file", "line", "label", "logit", "probability"]
    assert s["seconds"] > 0 and (scored_local / "_SUCCESS").exists()
    t = pq.read_table(scored_local / "scores")
    assert str(t.schema.field("logit").type) == "float" and str(t.schema.field("probability").type) == "double"


def test_key_column(spark, made_input: Input, scored_local: Path, exported: Path, tmp_path: Path):
    """--key C26: the rows keyed by that column's raw text, with the same scores as by file and line."""
    inp = tmp_path / "keyed"
    inp.mkdir()
    good = [v for (f, i), v in sorted(made_input.good().items()) if f == "day_3"][:50]
    keyed = ["\t".join(ln.split("\t")[:-1] + [f"req-{i}"]) for i, ln in enumerate(good)]
    (inp / "requests.tsv").write_text("\n".join(keyed) + "\n")
    out = tmp_path / "out"
    s = score.main(["--model", str(exported), "--input", str(inp / "requests.tsv"), "--output", str(out),
                    "--key", "C26"])
    rows = read_rows(out / "scores")
    assert list(rows[0]) == ["C26", "label", "logit", "probability"] and s.key == ("C26",)
    assert sorted(r["C26"] for r in rows) == sorted(f"req-{i}" for i in range(len(good)))
    # the same scores as the file+line run for the lines whose C26 was already this
    from deepfm.serving import Predictor
    c = A.read_card(exported).manifest.contract
    p = Predictor.load(exported)
    want = dict(zip((f"req-{i}" for i in range(len(keyed))), p.predict([split_line(k, c) for k in keyed])))
    np.testing.assert_allclose([r["probability"] for r in rows], [want[r["C26"]] for r in rows], rtol=1e-6)
    # the key must be a source column, and not an output column's name
    with pytest.raises(ScoreError, match="not a column of the model's contract"):
        score.parse_args(["--model", str(exported), "--input", str(inp), "--output", str(tmp_path / "o2"),
                          "--key", "request_id"])
    with pytest.raises(ScoreError, match="the output has a column of that name"):
        score.parse_args(["--model", str(exported), "--input", str(inp), "--output", str(tmp_path / "o2"),
                          "--key", "C26", "--with-ids"])


def test_refusals_and_atomic_output(spark, made_input: Input, exported: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.json").write_text('{"old": true}')
    args = ["--model", str(exported), "--input", str(made_input.root), "--output", str(out)]
    with pytest.raises(ScoreError, match="exists; pass --overwrite"):
        score.main(args)
    # more rejects than allowed: nothing committed, the old output untouched, the rejects kept beside it
    with pytest.raises(RejectLimitError, match=r"6 of \d+ lines .* more than the allowed fraction 0.001"):
        score.main([*args, "--overwrite", "--max-reject-fraction", "0.001"])
    assert sorted(p.name for p in out.iterdir()) == ["scores.json"]
    kept = [p for p in tmp_path.iterdir() if ".__staging-" in p.name]
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["rejects"]
    # an input Spark cannot read (a truncated .gz): one line naming it, no staging folder left
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "day_5.gz").write_bytes(gzip.compress(("\n".join(made_input.good().values()) + "\n").encode())[:300])
    with pytest.raises(score.FeaturizeError, match=r"day_5.gz: truncated or corrupt gzip"):
        score.main(["--model", str(exported), "--input", str(bad), "--output", str(tmp_path / "o3")])
    assert not (tmp_path / "o3").exists() and not list(tmp_path.glob("o3.__staging-*"))
    # the output must not overlap the input or hold the model
    with pytest.raises(ScoreError, match="--output .* overlaps --input"):
        score.parse_args(["--model", str(exported), "--input", str(made_input.root),
                          "--output", str(made_input.root / "scores")])
    with pytest.raises(ScoreError, match="--output .* overlaps --model"):
        score.parse_args(["--model", str(exported), "--input", str(made_input.root),
                          "--output", str(exported.parent), "--overwrite"])
    with pytest.raises(ScoreError, match="--model .*: no such file"):
        score.parse_args(["--model", str(tmp_path / "none.pt2"), "--input", str(made_input.root),
                          "--output", str(tmp_path / "o4")])
    (tmp_path / "cut.pt2").write_bytes(exported.read_bytes()[:4096])
    with pytest.raises(ScoreError, match="not a readable model archive"):
        score.parse_args(["--model", str(tmp_path / "cut.pt2"), "--input", str(made_input.root),
                          "--output", str(tmp_path / "o4")])
    # the command line: exit 2 and one line
    assert score.cli(args) == 2


def test_score_on_a_standalone_cluster(standalone: Standalone, made_input: Input, scored_local: Path,
                                       exported: Path, tmp_path: Path):
    """spark-submit --master spark://127.0.0.1:PORT jobs/score.py: the executors load the shipped model;
    the same keys, ids and probabilities as in local mode (whose files were cut into other blocks)."""
    out = tmp_path / "out"
    r, executors = standalone.submit(
        ["--conf", "spark.ui.enabled=false", "--executor-memory", "1g",
         "--driver-java-options", DRIVER_JAVA_OPTIONS,
         str(ROOT / "jobs" / "score.py"), "--model", str(exported), "--input", str(made_input.root),
         "--output", str(out), "--with-ids", "--max-reject-fraction", "0.2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "score: " in r.stdout and " rows scored, 6 rejected" in r.stdout
    assert "jobs.score INFO parsed" in r.stdout      # the job's log (spark-submit joins Python's stderr to stdout)
    cluster, local = by_key(read_rows(out / "scores")), by_key(read_rows(scored_local / "scores"))
    assert sorted(cluster) == sorted(local)
    c = A.read_card(exported).manifest.contract
    for k in local:
        assert [cluster[k][f] for f in c.field_names] == [local[k][f] for f in c.field_names]
    np.testing.assert_allclose([cluster[k]["probability"] for k in local], [local[k]["probability"] for k in local],
                               rtol=1e-6)
    assert sorted(r["line"] for r in read_rows(out / "rejects")) == sorted(i for _, i in made_input.expect_reject)
    # the executors were the worker's: the folder it made for this application has their logs, showing tasks
    logs = [e / "stderr" for e in executors]
    assert logs and any("Finished task" in p.read_text() or "Running task" in p.read_text() for p in logs)
