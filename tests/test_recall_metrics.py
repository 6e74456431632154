"""pipeline.recall_metrics: the definitions of docs/recall.md on hand-made clicks and rankings."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipeline.recall_metrics import (EvalSets, eval_sets, evaluate, evaluate_scores, popularity_top_k, random_expected,
                                     top_k, user_metrics)

# (user, item, day). n_items 6, evaluated day 1.
#   user 0: item 2 on day 0; items 1, 3, 2 (seen), 1 (again) on day 1 -> R = {1, 3}, seen {2}
#   user 1: item 5 on day 0, nothing on day 1                           -> not evaluated
#   user 2: item 0 on day 1                                             -> R = {0}, seen {}
#   user 3: item 1 on day 0, item 4 on day 2 (after the day: ignored)   -> not evaluated
CLICKS = np.array([(0, 2, 0), (0, 1, 1), (0, 3, 1), (0, 2, 1), (0, 1, 1), (1, 5, 0), (2, 0, 1), (3, 1, 0),
                   (3, 4, 2)])


def sets():
    return eval_sets(CLICKS[:, 0], CLICKS[:, 1], CLICKS[:, 2], eval_day=1, n_items=6)


def test_relevant_and_seen_sets():
    s = sets()
    assert s.users.tolist() == [0, 2]
    assert [s.relevant(j).tolist() for j in range(2)] == [[1, 3], [0]]
    assert [s.seen(j).tolist() for j in range(2)] == [[2], []]
    assert s.relevant_counts.tolist() == [2, 1]
    rows, items = s.seen_pairs(slice(0, 2))
    assert rows.tolist() == [0] and items.tolist() == [2]
    assert s.seen_mask(slice(1, 2)).tolist() == [[False] * 6]
    assert s.seen_mask(slice(0, 1)).tolist() == [[False, False, True, False, False, False]]


def test_the_seen_table_gives_the_same_sets():
    # the featurize job's seen/: distinct (user, item, first_day)
    first = np.array([(0, 2, 0), (0, 1, 1), (0, 3, 1), (1, 5, 0), (2, 0, 1), (3, 1, 0), (3, 4, 2)])
    a, b = sets(), eval_sets(first[:, 0], first[:, 1], first[:, 2], eval_day=1, n_items=6)
    for name in ("users", "relevant_ptr", "relevant_items", "seen_ptr", "seen_items"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist()


def test_metrics_by_hand():
    # user 0 (R = {1, 3}): ranking 3, 0, 1 -> hits at ranks 1 and 3; user 2 (R = {0}): 4, 5, 0 -> rank 3
    got = evaluate(np.array([[3, 0, 1], [4, 5, 0]]), sets(), ks=(1, 2, 3))
    inv = [1 / math.log2(r + 1) for r in (1, 2, 3)]          # 1, 0.6309, 0.5
    want = {
        "recall@1": (1 / 2 + 0) / 2, "recall@2": (1 / 2 + 0) / 2, "recall@3": (1 + 1) / 2,
        "hit_rate@1": 0.5, "hit_rate@2": 0.5, "hit_rate@3": 1.0,
        "ndcg@1": (1 / 1 + 0) / 2,
        "ndcg@2": (1 / (inv[0] + inv[1]) + 0) / 2,                          # IDCG from min(|R|, 2) = 2 hits
        "ndcg@3": ((inv[0] + inv[2]) / (inv[0] + inv[1]) + inv[2] / inv[0]) / 2,
        "users": 2.0,
    }
    assert got == pytest.approx(want, rel=1e-12)
    per = user_metrics(np.array([[4, 5, 0]]), sets(), ks=(3,), rows=slice(1, 2))
    assert per["recall@3"].tolist() == [1.0] and per["ndcg@3"].tolist() == [0.5]


def test_top_k_ties_and_seen():
    s = np.array([[0.1, 0.9, 0.5, 0.9]])
    assert top_k(s, 3).tolist() == [[1, 3, 2]]
    assert top_k(s, 3, seen=np.array([[False, True, False, False]])).tolist() == [[3, 2, 0]]
    assert top_k(np.ones((2, 4)), 2).tolist() == [[0, 1], [0, 1]]
    assert top_k(np.array([[3.0, 1.0, 2.0]]), 10).tolist() == [[0, 2, 1]]      # k > items: all of them
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([[np.nan, 1.0]]), 1)


def test_top_k_matches_a_full_sort():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=(50, 40)).astype(np.float64)        # many ties
    seen = rng.random((50, 40)) < 0.2
    full = np.lexsort((np.broadcast_to(np.arange(40), s.shape), -np.where(seen, -np.inf, s)), axis=1)
    assert top_k(s, 7, seen).tolist() == full[:, :7].tolist()


def test_evaluate_scores_masks_the_seen_items():
    scores = np.array([[0.0, 0.5, 9.0, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    by_user = {0: scores[0], 2: scores[1]}
    got = evaluate_scores(lambda u: np.stack([by_user[int(x)] for x in u]), sets(), ks=(2,), block=1)
    # user 0: item 2 (seen) masked -> 1, 3: both relevant; user 2: all tied -> 0, 1: item 0 at rank 1
    assert got["recall@2"] == 1.0 and got["ndcg@2"] == 1.0


def test_popularity_ranking_leaves_out_the_seen_items():
    counts = np.array([5, 1, 5, 0, 3, 2])             # order 0, 2 (tie: lower index first), 4, 5, 1, 3
    assert popularity_top_k(counts, sets(), 3).tolist() == [[0, 4, 5], [0, 2, 4]]


def test_random_expected_by_hand_and_by_enumeration():
    s = sets()                                         # user 0: 5 unseen, |R| 2; user 2: 6 unseen, |R| 1
    got = random_expected(s, ks=(1, 2))
    assert got["recall@1"] == pytest.approx((1 / 5 + 1 / 6) / 2)
    assert got["hit_rate@2"] == pytest.approx(((1 - (3 * 2) / (5 * 4)) + (1 - (5 * 4) / (6 * 5))) / 2)
    # the mean over every ordering of each user's unseen items: one row per ordering, the same sets
    means = {k: 0.0 for k in got if k != "users"}
    for j in range(len(s)):
        rel, seen = s.relevant(j), s.seen(j)
        perms = np.array(list(itertools.permutations(sorted(set(range(6)) - set(seen.tolist())))))
        p = len(perms)
        rows = EvalSets(day=1, n_items=6, users=np.arange(p), relevant_ptr=np.arange(p + 1) * len(rel),
                        relevant_items=np.tile(rel, p), seen_ptr=np.arange(p + 1) * len(seen),
                        seen_items=np.tile(seen, p))
        m = evaluate(perms, rows, ks=(1, 2))
        for k in means:
            means[k] += m[k] / len(s)
    assert {k: got[k] for k in means} == pytest.approx(means, rel=1e-12)


def test_popularity_ranking_is_top_k_of_the_counts():
    rng = np.random.default_rng(1)
    clicks = rng.integers(0, [30, 40, 3], size=(400, 3))
    s = eval_sets(clicks[:, 0], clicks[:, 1], clicks[:, 2], eval_day=2, n_items=40)
    counts = rng.integers(0, 4, 40)                           # many ties
    want = top_k(np.broadcast_to(counts, (len(s), 40)), 5, s.seen_mask(slice(None)))
    assert popularity_top_k(counts, s, 5).tolist() == want.tolist()
