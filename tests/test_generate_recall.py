"""pipeline.generate_recall and pipeline.recall_truth: the recall generator's determinism, layout and truth."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline import generate as G
from pipeline.contract import load_contract, parse_contract
from pipeline.generate import read_truth
from pipeline.generate_recall import build_world, generate, PreferenceModel, read_day, read_world
from pipeline.recall_truth import baselines
from tests.conftest import CONF

RECALL = str(CONF / "recall.yaml")
SMALL = dict(users=600, items=200)


def lines(raw: Path, day: int) -> list[list[str]]:
    return [x.split("\t") for x in (raw / f"day_{day}").read_text().splitlines()]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recall_raw")
    generate(load_contract(RECALL), out, list(range(5)), 12_000, seed=5, chunk_rows=5_000, **SMALL)
    return out


def test_same_seed_same_bytes_whatever_the_workers_and_the_day_length(tmp_path):
    c = load_contract(RECALL)
    generate(c, tmp_path / "a", [3], 2_500, seed=1, chunk_rows=1_000, **SMALL)
    generate(c, tmp_path / "b", [3], 2_500, seed=1, workers=2, chunk_rows=1_000, **SMALL)
    generate(c, tmp_path / "c", [3], 1_000, seed=1, chunk_rows=1_000, **SMALL)     # the first chunk only
    generate(c, tmp_path / "d", [3], 2_500, seed=2, chunk_rows=1_000, **SMALL)
    a, b, first, other = ((tmp_path / x / "day_3").read_bytes() for x in "abcd")
    assert a == b and a != other
    assert len(a.splitlines()) == 2_500 and a.startswith(first) and len(first.splitlines()) == 1_000
    wa, wb = read_world(tmp_path / "a"), read_world(tmp_path / "b")     # (the .npz holds zip timestamps)
    for name in ("user_vec", "item_vec", "item_weight", "item_genres", "item_price", "user_city"):
        np.testing.assert_array_equal(getattr(wa, name), getattr(wb, name))
    assert wa.bias == wb.bias
    assert not list((tmp_path / "a").glob(".*")) and not list((tmp_path / "a" / "truth").glob(".*"))


def test_lines_follow_the_contract_and_the_truth_follows_the_lines(raw):
    c = load_contract(RECALL)
    world = read_world(raw)
    rows = lines(raw, 0)
    assert len(rows) == 12_000 and {len(r) for r in rows} == {len(c.source.columns)}
    col = {name: [r[j] for r in rows] for j, name in enumerate(c.source.columns)}
    t = read_day(raw, 0)
    prob, label = read_truth(raw, 0)                  # the click-log generator's reader works too
    assert [int(v) for v in col["click"]] == t["label"].tolist() == label.tolist()
    np.testing.assert_array_equal(prob, t["prob"])
    assert col["user_id"] == [k.decode() for k in world.user_keys[t["user"]]]
    assert col["item_id"] == [k.decode() for k in world.item_keys[t["item"]]]
    assert 0.07 < t["label"].mean() < 0.13                       # about 10% clicked
    assert {int(h) for h in col["hour"]} == set(range(24))
    genres = [g.split("|") for g in col["item_genres"] if g]
    assert max(map(len, genres)) == 4 and all(len(set(g)) == len(g) for g in genres)
    assert 0 < sum(g == "" for g in col["item_genres"]) < 0.2 * len(rows)     # some items have none
    assert all(float(p) > 0 for p in col["item_price"])


def test_side_fields_are_constant_per_key(raw):
    c = load_contract(RECALL)
    cols = list(c.source.columns)
    for key, side in (("item_id", "item"), ("user_id", "user")):
        names = [f.name for f in c.fields if f.side == side]
        seen: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        for day in range(5):
            for r in lines(raw, day):
                seen[r[cols.index(key)]].add(tuple(r[cols.index(n)] for n in names))
        assert len(seen) > 0.9 * SMALL[f"{side}s"]
        assert {len(v) for v in seen.values()} == {1}


def test_the_columns_are_written_in_the_contract_order(tmp_path):
    c = load_contract(RECALL)
    raw = c.to_raw()
    raw["source"]["columns"] = list(reversed(raw["source"]["columns"]))
    rev = parse_contract(raw)
    generate(c, tmp_path / "a", [0], 300, seed=4, **SMALL)
    generate(rev, tmp_path / "b", [0], 300, seed=4, **SMALL)
    assert [list(reversed(r)) for r in lines(tmp_path / "a", 0)] == lines(tmp_path / "b", 0)


def test_a_contract_of_another_layout_is_refused(tmp_path):
    raw = load_contract(RECALL).to_raw()
    raw["source"]["columns"].append("extra")
    raw["source"]["ignore"] = ["extra"]
    with pytest.raises(ValueError, match=r"extra: \['extra'\]"):
        generate(parse_contract(raw), tmp_path, [0], 10, seed=1)


def test_ceiling_beats_popularity_beats_random(raw):
    b = baselines(raw, heldout_day=4, train_days=[0, 1, 2])
    assert b["items"] == 200 and b["users"] == 297 and b["train_days"] == [0, 1, 2]
    for k in (10, 50):
        for m in ("recall", "ndcg", "hit_rate"):
            ceiling, pop, rnd = (b[x][f"{m}@{k}"] for x in ("ceiling", "popularity", "random"))
            assert ceiling > pop + 0.05 and pop > rnd + 0.05, (m, k, ceiling, pop, rnd)
        # the features explain most of the preferences: a model of them alone is near the ceiling
        assert b["features_only"][f"recall@{k}"] > 0.8 * b["ceiling"][f"recall@{k}"]
    assert b["random"]["recall@10"] == pytest.approx(10 / 200, rel=0.05)      # a few seen items aside
    with pytest.raises(ValueError, match="day 7 was not generated"):
        baselines(raw, heldout_day=7, train_days=[0])


def test_the_world_is_a_function_of_its_model():
    a, b = build_world(PreferenceModel(seed=3, n_users=50, n_items=20)), build_world(
        PreferenceModel(seed=3, n_users=50, n_items=20))
    np.testing.assert_array_equal(a.user_vec, b.user_vec)
    np.testing.assert_array_equal(a.item_weight, b.item_weight)
    assert a.item_weight.sum() == pytest.approx(1.0)
    assert a.user_keys[:2].tolist() == [b"u00000", b"u00001"] and sorted(a.item_keys.tolist()) == a.item_keys.tolist()
    s = a.expected_clicks(np.array([0, 3]))
    assert s.shape == (2, 20)
    np.testing.assert_allclose(s[1], a.item_weight / (1 + np.exp(-a.logits(np.full(20, 3), np.arange(20)))))


def test_the_command_line_picks_the_recall_mode(tmp_path):
    s = G.main(["--config", RECALL, "--out", str(tmp_path / "r"), "--days", "2", "--rows-per-day", "200",
                "--users", "50", "--items", "20", "--workers", "1"])
    assert s["users"] == 50 and sorted(p.name for p in (tmp_path / "r").iterdir()) == ["day_0", "day_1", "truth"]
    with pytest.raises(ValueError, match="--users / --items: only for a recall contract"):
        G.main(["--out", str(tmp_path / "c"), "--days", "1", "--rows-per-day", "10", "--users", "5"])


def test_the_baselines_command_holds_out_the_last_day(raw, capsys):
    from pipeline import recall_truth
    out = recall_truth.main([str(raw), "--ks", "10"])
    assert out["heldout_day"] == 4 and out["train_days"] == [0, 1, 2]
    assert out == baselines(raw, 4, [0, 1, 2], ks=(10,))
    assert '"ceiling"' in capsys.readouterr().out
