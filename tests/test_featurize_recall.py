"""The featurize job for recall contracts and list-valued fields (docs/recall.md), on tiny hand-made
logs with exact expected outputs: positives and their dense key indexes, the catalogue and its log_q,
the seen pairs, users, list columns (empty, over-long, a bad element), the constant-per-item check,
and the random negatives; and a plain CTR contract with a list field end to end."""
from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import featurize
from jobs.featurize import FeaturizeError
from pipeline import layout
from pipeline import manifest as M
from pipeline.ids import categorical_id

CONTRACT = r"""
version: 1
name: recall_tiny
source:
  format: delimited
  delimiter: "\t"
  header: false
  columns: [click, user, age, item, cat, genres, price, hour]
  day_from: file_name
  file_pattern: 'day_(\d+)$'
label: click
continuous:
  fields:
    price: {bucketing: log_square, num_buckets: 16, embedding_dim: 4, side: item}
categorical:
  defaults: {embedding_dim: 4, min_count: 0}
  fields:
    user: {hash_buckets: 1000, side: user}
    age: {hash_buckets: 100, side: user}
    item: {hash_buckets: 1000, side: item}
    cat: {hash_buckets: 100, side: item}
    genres: {hash_buckets: 100, side: item, list: {delimiter: "|", pooling: mean, max_length: 3}}
    hour: {hash_buckets: 100}
recall: {user_key: user, item_key: item, random_negatives: 0}
sampling: {neg_sample_rate: 0.5, seed: 7}
splits: {valid_days: 1, test_days: 1}
output: {rows_per_row_group: 4, min_row_groups: 2}
quality: {max_reject_fraction: 0.5}
"""

# click, user, age, item, cat, genres, price, hour; days 0-1 train, 2 valid, 3 test
DAYS = {
    0: ["1\tu1\t20\ti1\tA\tComedy|Drama\t5\th1",
        "0\tu2\t30\ti2\tB\tDrama\t10\th2",
        "1\tu2\t30\ti3\tA\t\t1\th1",
        "0\tu3\t40\ti5\tC\t Action | |Comedy \t3\th3"],
    1: ["1\tu1\t20\ti2\tB\tDrama\t10\th2",
        "1\tu3\t40\ti1\tA\tComedy|Drama\t5\th1",
        "1\tu2\t30\ti1\tA\tComedy|Drama\t5\th4",
        "0\tu4\t50\ti2\tB\tDrama\t10\th2"],
    2: ["1\tu1\t20\ti3\tA\t\t1\th1",
        "0\tu1\t20\ti4\tB\ta|b|c|d|e\t2\th2",
        "1\tu3\t40\ti4\tB\ta|b|c|d|e\t2\th2",
        "1\tu3\t40\ti6\tB\tDrama|x\x00y\t2\th2"],
    3: ["1\tu2\t30\ti4\tB\ta|b|c|d|e\t2\th5",
        "1\tu1\t20\ti1\tA\tComedy|Drama\t5\th1",
        "1\t\t20\ti1\tA\tComedy|Drama\t5\th1"],
}


def write_raw(folder: Path, days: dict[int, list[str]]) -> Path:
    folder.mkdir(parents=True)
    for d, lines in days.items():
        (folder / f"day_{d}").write_bytes(("\n".join(lines) + "\n").encode())
    return folder


def run(tmp: Path, raw: Path, name: str, *args: str) -> tuple[M.Manifest, Path]:
    conf = tmp / f"{name}.yaml"
    conf.write_text(CONTRACT)
    out = tmp / name
    m = featurize.main(["--input", str(raw), "--output", str(out), "--config", str(conf), *args])
    return m, out


NEGATIVES = 2           # random negatives per train positive in the recall run


@pytest.fixture(scope="module")
def recall_run(spark, tmp_path_factory) -> tuple[M.Manifest, Path]:
    """One featurize run of the recall contract, with 2 random negatives per train positive."""
    tmp = tmp_path_factory.mktemp("recall")
    return run(tmp, write_raw(tmp / "raw", DAYS), "out", "--set", f"recall.random_negatives={NEGATIVES}")


def rows(path: Path) -> list[dict]:
    return pq.read_table(str(path)).to_pylist()


# The hashed ids (pipeline.ids.categorical_id, the single-value hash) of the values in DAYS.
GENRE = {"Comedy": 51, "Drama": 89, "Action": 37, "a": 43, "b": 4, "c": 29}
ITEM = {"i1": 86, "i2": 537, "i3": 250, "i4": 345, "i5": 188}
USER = {"u1": 255, "u2": 105, "u3": 856, "u4": 144}
CAT = {"A": 19, "B": 48, "C": 81}


def test_the_hand_computed_ids_are_the_single_value_hash():
    assert {g: categorical_id("genres", g, 100) for g in GENRE} == GENRE
    assert {i: categorical_id("item", i, 1000) for i in ITEM} == ITEM
    assert {u: categorical_id("user", u, 1000) for u in USER} == USER
    assert {k: categorical_id("cat", k, 100) for k in CAT} == CAT


def test_splits_hold_the_positives_with_their_indexes(recall_run):
    m, out = recall_run
    # users sorted u1 u2 u3 u4 -> 0..3; items i1..i5 -> 0..4 (i6 only on a rejected line)
    want = {"train": [(0, 0, 0), (0, 1, 2), (1, 0, 1), (1, 2, 0), (1, 1, 0)],
            "valid": [(2, 0, 2), (2, 2, 3)],
            "test": [(3, 1, 3), (3, 0, 0)]}
    for split, expected in want.items():
        got = rows(out / split)
        positives = [r for r in got if r["label"] == 1]
        assert sorted((r["day"], r["user_index"], r["item_index"]) for r in positives) == sorted(expected)
        for r in positives:
            assert r["user"] == USER[f"u{r['user_index'] + 1}"] and r["item"] == ITEM[f"i{r['item_index'] + 1}"]
            assert r["sample_prob"] == 1.0
        assert len(got) == len(expected) * (1 + NEGATIVES if split == "train" else 1)
        assert m.splits[split].rows == len(got) and m.splits[split].positives == len(expected)
        assert m.splits[split].neg_sample_rate == 0.0
        assert pq.read_schema(str(next((out / split).glob("*.parquet")))).names == list(m.columns)
    assert m.columns == ("label", "price", "user", "age", "item", "cat", "genres", "hour", "day",
                         "user_index", "item_index", "sample_prob")


def test_random_negatives_are_drawn_catalogue_items(recall_run):
    m, out = recall_run
    train = rows(out / "train")
    catalogue = {r["item_index"]: r for r in rows(out / "catalogue")}
    negatives = [r for r in train if r["label"] == 0]
    assert len(negatives) == NEGATIVES * 5 and m.recall is not None and m.recall.random_negatives == NEGATIVES
    positives = {(r["day"], r["user_index"], r["user"], r["age"], r["hour"]) for r in train if r["label"] == 1}
    for r in negatives:
        assert r["sample_prob"] == pytest.approx(1 / 5)
        item = catalogue[r["item_index"]]          # the item-side fields are the drawn item's
        assert (r["price"], r["item"], r["cat"], r["genres"]) == (item["price"], item["item"], item["cat"],
                                                                  item["genres"])
        assert (r["day"], r["user_index"], r["user"], r["age"], r["hour"]) in positives   # its positive's user
    # in valid and test: only the positives
    assert all(r["label"] == 1 for s in ("valid", "test") for r in rows(out / s))


def test_catalogue_rows_ids_and_log_q(recall_run):
    m, out = recall_run
    got = rows(out / "catalogue")
    # train positives: i1 3 (u1 day 0, u3 and u2 day 1), i2 1, i3 1 -> 5; 5 items: log_q = ln((n + 1) / 10)
    want = [(0, "i1", 4, ITEM["i1"], CAT["A"], [GENRE["Comedy"], GENRE["Drama"]], 3),
            (1, "i2", 7, ITEM["i2"], CAT["B"], [GENRE["Drama"]], 1),
            (2, "i3", 3, ITEM["i3"], CAT["A"], [0], 1),                                   # empty list
            (3, "i4", 4, ITEM["i4"], CAT["B"], [GENRE["a"], GENRE["b"], GENRE["c"]], 0),  # a|b|c|d|e, max 3
            (4, "i5", 3, ITEM["i5"], CAT["C"], [GENRE["Action"], GENRE["Comedy"]], 0)]    # " Action | |Comedy "
    assert [(r["item_index"], r["item_key"], r["price"], r["item"], r["cat"], r["genres"], r["train_count"])
            for r in got] == want
    assert [r["log_q"] for r in got] == pytest.approx([math.log(4 / 10), math.log(2 / 10), math.log(2 / 10),
                                                       math.log(1 / 10), math.log(1 / 10)])
    assert [r["genres"] for r in got] == [[51, 89], [89], [0], [43, 4, 29], [37, 51]]   # literal, for pipeline.rows
    assert tuple(pq.read_schema(str(next((out / "catalogue").glob("*.parquet")))).names) == \
        m.recall.catalogue_columns == ("item_index", "item_key", "price", "item", "cat", "genres", "train_count",
                                       "log_q")


def test_seen_pairs_and_users(recall_run):
    m, out = recall_run
    seen = sorted((r["user_index"], r["item_index"], r["first_day"]) for r in rows(out / "seen"))
    # u1 clicked i1 on days 0 and 3: its first day is 0; u4 clicked nothing
    assert seen == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 1), (1, 2, 0), (1, 3, 3), (2, 0, 1), (2, 3, 2)]
    assert [(r["user_index"], r["user_key"]) for r in rows(out / "users")] == [(0, "u1"), (1, "u2"), (2, "u3"),
                                                                              (3, "u4")]


def test_list_columns_are_parquet_lists_and_a_bad_element_rejects_the_line(recall_run):
    m, out = recall_run
    schema = pq.read_schema(str(next((out / "train").glob("*.parquet"))))
    assert str(schema.field("genres").type) == "list<element: int32>" and str(schema.field("cat").type) == "int32"
    rejects = sorted((r["day"], r["reason"], r["line"]) for r in rows(out / layout.REJECTS))
    assert rejects == [(2, "binary", "1\tu3\t40\ti6\tB\tDrama|x\x00y\t2\th2"),
                       (3, "missing_key", "1\t\t20\ti1\tA\tComedy|Drama\t5\th1")]
    assert m.rejects.by_reason == {"binary": 1, "column_count": 0, "bad_label": 0, "non_numeric": 0, "bad_day": 0,
                                   "missing_key": 1}


def test_the_manifest_records_the_recall_outputs(recall_run):
    m, out = recall_run
    assert m.recall == M.RecallInfo(user_key="user", item_key="item", items=5, users=4, train_positives=5,
                                    seen_rows=8, item_fields=("price", "item", "cat", "genres"),
                                    random_negatives=NEGATIVES, sample_prob="sample_prob")
    assert m.recall.columns == ("user_index", "item_index", "sample_prob")
    assert m.sampling.neg_sample_rate == 1.0 and m.sampling.correction == M.RECALL_SAMPLING
    assert [(f.name, f.side, f.pooling, f.max_length) for f in m.fields if f.is_list] == [("genres", "item", "mean", 3)]
    assert M.open_featurized(out) == m
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["_SUCCESS", "manifest.json", "train", "valid", "test", "catalogue", "seen", "users", "rejects"])


def test_an_item_field_that_changes_fails_before_writing(spark, tmp_path: Path):
    days = {d: list(v) for d, v in DAYS.items()}
    days[1] = [*days[1], "0\tu4\t50\ti3\tB\t\t1\th2"]          # i3 was cat A
    with pytest.raises(FeaturizeError, match=r"item-side field 'cat' is not constant per item key "
                                             r"\(recall.item_key 'item'\): item 'i3' has ids 19 and 48"):
        run(tmp_path, write_raw(tmp_path / "raw", days), "out")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["out.yaml", "raw"]    # no output, no staging folder


def test_a_ctr_contract_with_a_list_field(spark, tmp_path: Path):
    """No recall key: every good line is a row (an empty user is the missing id), the list field hashed
    and rare-mapped element by element (min_count 2 over the train days' lines)."""
    conf = tmp_path / "ctr.yaml"
    conf.write_text(CONTRACT.replace("recall: {user_key: user, item_key: item, random_negatives: 0}\n", ""))
    out = tmp_path / "out"
    m = featurize.main(["--input", str(write_raw(tmp_path / "raw", DAYS)), "--output", str(out), "--config",
                        str(conf), "--neg-sample-rate", "1", "--set", "categorical.fields.genres.min_count=2"])
    assert m.recall is None and m.rejects.total == 1 and m.columns[-1] == "day"
    # train days' genres: Comedy 4 times, Drama 6, Action once: Action and a, b, c are rare (1)
    C, D = GENRE["Comedy"], GENRE["Drama"]
    want = {"train": [(0, 1, [C, D]), (0, 0, [D]), (0, 1, [0]), (0, 0, [1, C]),
                      (1, 1, [D]), (1, 1, [C, D]), (1, 1, [C, D]), (1, 0, [D])],
            "valid": [(2, 1, [0]), (2, 0, [1, 1, 1]), (2, 1, [1, 1, 1])],
            "test": [(3, 1, [1, 1, 1]), (3, 1, [C, D]), (3, 1, [C, D])]}
    for split, expected in want.items():
        assert sorted((r["day"], r["label"], r["genres"]) for r in rows(out / split)) == sorted(expected)
    assert m.vocab is not None and m.vocab.ids_kept == {"genres": 2}
    assert sum(r["user"] == 0 for r in rows(out / "test")) == 1                 # the line without a user


# Hand-computed list ids, for the online path (pipeline.rows) to compare with: field ``genres``, 100
# buckets, delimiter ".", max_length 3; text -> ids (None = the column missing).
LIST_CASES = [(None, [0]), ("", [0]), (" . .\t", [0]), ("a.b.c.d.e", [43, 4, 29]), ("\tComedy\x01.Drama ", [51, 89]),
              ("Comedy..Drama", [51, 89]), ("a|b", [categorical_id("genres", "a|b", 100)])]


def test_list_ids_on_a_tiny_frame(spark):
    """The list expression alone (pipeline.spark.sql.hash_list): Java's trim (characters <= U+0020, not
    only spaces), empty elements dropped, the first max_length kept, a regex character as the delimiter."""
    from pipeline.contract import CategoricalField, ListSpec
    from pipeline.spark.sql import hash_list
    f = CategoricalField("genres", hash_buckets=100, embedding_dim=4, list=ListSpec(delimiter=".", max_length=3))
    got = [r[0] for r in spark.createDataFrame([(t,) for t, _ in LIST_CASES], "genres string")
           .selectExpr(hash_list("genres", f)).collect()]
    assert got == [ids for _, ids in LIST_CASES]


def test_the_online_path_gives_the_same_lists():
    """pipeline.rows.list_ids (serving, no Spark) on the same cases as the job's expression."""
    from pipeline.contract import CategoricalField, ListSpec
    from pipeline.rows import list_ids
    f = CategoricalField("genres", hash_buckets=100, embedding_dim=4, list=ListSpec(delimiter=".", max_length=3))
    assert [list_ids(f, t) for t, _ in LIST_CASES] == [ids for _, ids in LIST_CASES]


def test_scoring_packs_list_fields_padded_as_the_graph_reads_them(spark):
    """jobs/score.py hands its workers a list field as max_length ids padded with -1
    (pipeline.artifact.InputLayout's example), and --with-ids unpacks it back to the list."""
    import numpy as np
    from pipeline.spark.sql import pack_ids_binary, unpack_ids_binary
    df = spark.createDataFrame([(4, [5, 6]), (7, [0])], "a int, g array<int>")
    packed = df.selectExpr(f"{pack_ids_binary(['a', 'g'], [1, 3])} AS `_ids`")
    blobs = [r[0] for r in packed.collect()]
    assert np.frombuffer(b"".join(blobs), ">i4").reshape(2, 4).tolist() == [[4, 5, 6, -1], [7, 0, -1, -1]]
    back = packed.selectExpr(*unpack_ids_binary("_ids", ["a", "g"], [1, 3])).collect()
    assert [(r["a"], r["g"]) for r in back] == [(4, [5, 6]), (7, [0])]
