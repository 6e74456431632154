"""pipeline.rows: the featurize job's parse and id rules in plain Python (no Spark here; tests/test_score_job.py
runs the same rows through the Spark job)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.contract import load_contract
from pipeline.ids import categorical_id
from pipeline.rows import RowFeaturizer, java_trim, list_elements, list_ids, parse_double, split_line
from tests.conftest import SMALL


@pytest.mark.parametrize("text, value", [
    ("5", 5.0), (" 5", 5.0), ("5\t", 5.0), ("\x1f5\x00", 5.0), ("+5", 5.0), ("-0", -0.0), ("1.", 1.0), (".5", 0.5),
    ("2.5d", 2.5), ("2.5F", 2.5), ("1e3", 1000.0), ("1E-400", 0.0), ("0x1p3", 8.0), ("0X1.8P1d", 3.0),
    ("", None),
])
def test_numbers_read_as_java_reads_them(text, value):
    got = parse_double(text)
    assert got == value and (value is None or math.copysign(1, got) == math.copysign(1, value))


@pytest.mark.parametrize("text", ["1_000", "٣", "\u00a05", " ", ".", "1e", "+", "0x10", "1 2", "five", "inf",
                                  "Inf", "nan"])
def test_what_java_refuses_is_refused(text):
    with pytest.raises(ValueError):
        parse_double(text)


def test_non_finite_is_read_and_then_refused_by_the_row_rules():
    assert math.isinf(parse_double("1e400")) and math.isnan(parse_double("NaN"))
    f = RowFeaturizer(load_contract(SMALL), {}, {})
    for v in ("1e400", "NaN", "-Infinity", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="row 0: I3: .*not finite"):
            f.ids([{"I3": v}])


def test_java_trim_strips_control_characters_too():
    assert java_trim("\x00\t a b \x1f") == "a b"


def test_ids_by_hand():
    c = load_contract(SMALL)
    f = RowFeaturizer(c, {}, {})
    ids = f.ids([{"I1": "5", "I2": "-3", "I3": 1e9, "C1": "68fd1e64", "C2": ""}, {}])
    names = list(c.field_names)
    row = dict(zip(names, ids[0].tolist()))
    assert row["I1"] == 2 + 2            # floor(ln(5)^2) = floor(2.59) = 2
    assert row["I2"] == 1                # negative
    assert row["I3"] == 2 + 63           # capped at num_buckets - 1
    assert row["I4"] == 0                # absent = missing
    assert row["C1"] == categorical_id("C1", "68fd1e64", 20000)
    assert row["C2"] == 0                # empty = missing
    assert ids[1].tolist() == [0] * len(names)


def test_the_vocabulary_makes_unknown_ids_rare_and_keeps_missing():
    c = load_contract(SMALL).with_overrides(**{"categorical.fields.C1.min_count": 2})
    seen = categorical_id("C1", "a", 20000)
    f = RowFeaturizer(c, {}, {"C1": np.array([seen])})
    j = list(c.field_names).index("C1")
    assert f.ids([{"C1": "a"}, {"C1": "b"}, {"C1": ""}])[:, j].tolist() == [seen, 1, 0]


def test_quantile_fields_use_the_fitted_boundaries():
    c = load_contract(SMALL).with_overrides(**{"continuous.fields.I2.bucketing": "quantile"})
    f = RowFeaturizer(c, {"I2": [1.0, 10.0]}, {})
    j = list(c.field_names).index("I2")
    assert f.ids([{"I2": "0"}, {"I2": "1"}, {"I2": "50"}, {"I2": "-1"}, {}])[:, j].tolist() == [2, 3, 4, 1, 0]
    with pytest.raises(ValueError, match="I2: quantile bucketing but no fitted boundaries"):
        RowFeaturizer(c, {}, {})


@pytest.mark.parametrize("row, message", [
    ({"I5": "five"}, "row 0: I5: 'five' is not a number"),
    ({"I5": True}, "row 0: I5: True is a boolean"),
    ({"C3": 1.5}, "row 0: C3: a float is not a categorical value"),
    ({"C3": "a\x00b"}, "row 0: C3: holds a NUL or U\\+FFFD"),
    ({"C3": "a\ufffd"}, "row 0: C3: holds a NUL or U\\+FFFD"),
])
def test_values_the_job_rejects_name_the_field(row, message):
    with pytest.raises(ValueError, match=message):
        RowFeaturizer(load_contract(SMALL), {}, {}).ids([row])


def test_categorical_text_is_taken_as_it_is():
    c = load_contract(SMALL)
    f = RowFeaturizer(c, {}, {})
    j = list(c.field_names).index("C1")
    got = f.ids([{"C1": " a"}, {"C1": "a"}, {"C1": 7}, {"C1": "7"}])[:, j].tolist()
    assert got[0] != got[1] and got[2] == got[3]


def test_split_line_checks_the_column_count():
    c = load_contract(SMALL)
    line = "\t".join(["1"] + [""] * 39)
    assert split_line(line, c)["label"] == "1"
    with pytest.raises(ValueError, match="39 columns, the contract's source.columns has 40"):
        split_line("\t".join(["1"] + [""] * 38), c)


def test_cached_ids_equal_fresh_ones_and_errors_are_not_cached():
    c = load_contract(SMALL)
    rows = [{"I1": str(i % 7), "C1": f"v{i % 5}", "C2": i % 3} for i in range(50)]
    warm = RowFeaturizer(c, {}, {})
    warm.ids(rows)
    fresh = [RowFeaturizer(c, {}, {}).ids([r])[0] for r in rows]
    np.testing.assert_array_equal(warm.ids(rows), np.array(fresh))
    for _ in range(2):                               # the second time too: a rejected text is not remembered
        with pytest.raises(ValueError, match="row 0: I1: 'x' is not a number"):
            warm.ids([{"I1": "x"}])
    with pytest.raises(ValueError, match="C1: a float"):     # 1.0 == 1: numbers are not looked up
        warm.ids([{"C1": 1}, {"C1": 1.0}])


# --- list-valued fields (conf/recall.yaml's item_genres: delimiter "|", mean, max_length 4) -------------

RECALL = str(Path(SMALL).parent / "recall.yaml")


def genre_id(text):
    return categorical_id("item_genres", text, 1024)


def test_list_elements_split_trim_drop_empties_and_keep_the_first_max_length():
    g = load_contract(RECALL).field("item_genres")
    assert list_elements(g, " Drama||Comedy |\x01War\t") == ["Drama", "Comedy", "War"]
    assert list_elements(g, "a|b|c|d|e|f") == ["a", "b", "c", "d"]                # max_length 4
    assert list_elements(g, ["Drama", " War", 7]) == ["Drama", "War", "7"]       # a list: its text joined
    assert list_elements(g, "| |") == list_elements(g, "") == list_elements(g, None) == []
    assert list_elements(g, "Sci Fi") == ["Sci Fi"]                              # inner spaces stay
    assert list_ids(g, "| |") == [0] and list_ids(g, "War|War") == [genre_id("War")] * 2   # duplicates kept
    with pytest.raises(ValueError, match="item_genres: holds a NUL"):
        list_elements(g, "Drama|\x00")


def test_ids_jagged_by_hand():
    c = load_contract(RECALL)
    f = RowFeaturizer(c, {}, {})
    got = f.ids_jagged([{"item_genres": " Drama||Comedy", "user_age": "25-34", "item_price": "12.99"},
                        {"item_genres": ""}])
    assert list(got) == list(c.field_names)                                      # contract order
    values, lengths = got["item_genres"]
    assert values.tolist() == [genre_id("Drama"), genre_id("Comedy"), 0] and lengths.tolist() == [2, 1]
    assert [x.tolist() for x in got["user_age"]] == [[categorical_id("user_age", "25-34", 1024), 0], [1, 1]]
    assert [x.tolist() for x in got["item_price"]] == [[2 + 6, 0], [1, 1]]      # floor(ln(12.99)^2) = 6
    assert got["item_genres"][0].dtype == np.int64 and got["item_genres"][1].dtype == np.int64
    again = f.ids_jagged([{"item_genres": " Drama||Comedy"}])["item_genres"]     # from the cache
    assert again[0].tolist() == [genre_id("Drama"), genre_id("Comedy")]
    with pytest.raises(ValueError, match="row 1: item_genres: holds a NUL"):
        f.ids_jagged([{}, {"item_genres": "a\x00"}])
    with pytest.raises(ValueError, match="list-valued field.*item_genres.*use ids_jagged"):
        f.ids([{}])


def test_the_rare_rule_applies_to_each_element():
    c = load_contract(RECALL).with_overrides(**{"categorical.fields.item_genres.min_count": 2})
    f = RowFeaturizer(c, {}, {"item_genres": np.array([genre_id("Drama")])})
    values, lengths = f.ids_jagged([{"item_genres": "Drama|Comedy"}, {"item_genres": None}])["item_genres"]
    assert values.tolist() == [genre_id("Drama"), 1, 0] and lengths.tolist() == [2, 1]


def test_ids_jagged_without_list_fields_is_ids_column_by_column():
    c = load_contract(SMALL)
    rows = [{"I1": str(i % 7), "C1": f"v{i % 5}", "C2": i % 3} for i in range(20)]
    ids = RowFeaturizer(c, {}, {}).ids(rows)
    jag = RowFeaturizer(c, {}, {}).ids_jagged(rows)
    for j, name in enumerate(c.field_names):
        assert jag[name][0].tolist() == ids[:, j].tolist() and jag[name][1].tolist() == [1] * 20


def test_generated_recall_lines_give_each_item_its_genres(tmp_path):
    from pipeline.generate_recall import generate, read_day, read_world
    c = load_contract(RECALL)
    generate(c, tmp_path, [0], 200, seed=3, users=40, items=30)
    rows = [split_line(x, c) for x in (tmp_path / "day_0").read_text().splitlines()]
    values, lengths = RowFeaturizer(c, {}, {}).ids_jagged(rows)["item_genres"]
    n_genres = (read_world(tmp_path).item_genres >= 0).sum(1)[read_day(tmp_path, 0)["item"]]
    assert lengths.tolist() == np.maximum(n_genres, 1).tolist()
    assert (values[np.cumsum(lengths) - 1][n_genres == 0] == 0).all()
