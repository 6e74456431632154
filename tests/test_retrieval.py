"""deepfm.retrieval: exact chunked top-K by inner product, the faiss indexes, item vectors on disk."""
from __future__ import annotations

import numpy as np
import pytest

from deepfm.retrieval import ItemVectors, ann_recall, build_index, exact_topk, search


def _data(seed: int = 3, n: int = 1000, q: int = 37, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(q, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def test_exact_topk_on_a_hand_made_case():
    items = np.array([[1, 0], [0, 1], [2, 0], [-1, 0], [1, 1]], np.float32)
    users = np.array([[1, 0], [0, 2]], np.float32)
    s, i = exact_topk(users, items, k=3)
    # user 0 scores [1, 0, 2, -1, 1]: item 2 (2), then items 0 and 4 (1 each, either order)
    assert i[0, 0] == 2 and set(i[0, 1:]) == {0, 4}
    np.testing.assert_array_equal(s[0], [2, 1, 1])
    # user 1 scores [0, 2, 0, 0, 2]
    assert set(i[1, :2]) == {1, 4} and s[1, 2] == 0
    # exclusions: user 0 has seen item 2, user 1 items 1 and 4
    s, i = exact_topk(users, items, k=2, exclude=[np.array([2]), np.array([4, 1])])
    assert set(i[0]) == {0, 4}
    assert s[1, 0] == 0 and 1 not in i[1] and 4 not in i[1]


@pytest.mark.parametrize("chunks", [(1 << 16, 1024), (97, 5), (3, 4)])
def test_exact_topk_is_numpy_argsort_whatever_the_chunks(chunks):
    users, items = _data()
    k = 20
    exclude = [np.arange(u, 1000, 37) for u in range(len(users))]    # user u has seen u, u+37, ...
    s, i = exact_topk(users, items, k, exclude=exclude, chunk_items=chunks[0], chunk_queries=chunks[1])
    scores = users @ items.T
    for u, ex in enumerate(exclude):
        scores[u, ex] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(i, want)           # continuous random scores: no ties
    np.testing.assert_allclose(s, np.take_along_axis(scores, want, 1), rtol=1e-5)


def test_a_user_who_has_seen_almost_everything_gets_minus_infinity_after_the_rest():
    items = np.eye(4, dtype=np.float32)
    s, i = exact_topk(np.ones((1, 4), np.float32), items, k=3, exclude=[np.array([0, 1, 3])])
    assert i[0, 0] == 2 and s[0, 0] == 1 and np.isneginf(s[0, 1:]).all()


def test_faiss_flat_agrees_with_exact_and_hnsw_reports_its_recall():
    users, items = _data(n=5000, q=50, d=16)
    _, exact = exact_topk(users, items, 50)
    fs, fi = search(build_index(items, "flat"), users, 50)
    np.testing.assert_array_equal(fi, exact)
    assert ann_recall(fi, exact) == 1.0
    _, hi = search(build_index(items, "hnsw", hnsw_m=16, ef_search=64), users, 50)
    r = ann_recall(hi, exact)
    assert 0.8 < r <= 1.0


def test_ann_recall_counts_the_shared_positions():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert ann_recall(approx, exact) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_item_vectors_round_trip_through_parquet(tmp_path):
    v = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    items = ItemVectors(keys=np.array(["a", "b\tc", "é"], dtype=object), index=np.array([2, 0, 1]), vectors=v)
    items.write(tmp_path / "items.parquet")
    back = ItemVectors.read(tmp_path / "items.parquet")
    assert back.keys.tolist() == ["a", "b\tc", "é"] and back.index.tolist() == [2, 0, 1]
    np.testing.assert_array_equal(back.vectors, v)
    assert not list(tmp_path.glob(".*"))            # no temporary file left
    with pytest.raises(ValueError, match="3 keys, 2 indexes"):
        ItemVectors(keys=items.keys, index=np.array([0, 1]), vectors=v)
