"""Recall metrics over the whole catalogue: the one definition for the trainer and the generator's ceiling.

docs/recall.md, "Evaluation definitions": for an evaluated day d, per user u with at least one relevant
item, R(u) = the distinct items u clicked on day d that u had not clicked before d; the ranking is over
the whole catalogue with the items u clicked before d removed (the *seen* items). Then

    recall@K    = |top-K ∩ R| / |R|
    hit rate@K  = 1[top-K ∩ R non-empty]
    NDCG@K      = DCG@K / IDCG@K,  DCG@K = Σ_{rank r <= K, item in R} 1 / log2(r + 1),
                  IDCG@K = Σ_{r = 1}^{min(|R|, K)} 1 / log2(r + 1)

each averaged over the users with R non-empty.

    >>> s = eval_sets(user=np.array([0, 0, 0]), item=np.array([2, 1, 3]), day=np.array([0, 1, 1]),
    ...               eval_day=1, n_items=5)
    >>> s.users.tolist(), s.relevant(0).tolist(), s.seen(0).tolist()
    ([0], [1, 3], [2])
    >>> evaluate(np.array([[3, 0, 1]]), s, ks=(1, 3))["recall@1"]     # item 3 at rank 1: 1 of 2 found
    0.5

Items and users are dense indices (the featurized splits' ``user_index`` / ``item_index``), never hash
ids (those may collide). The click records may be the positives of all days, or the featurize job's
``seen/`` table (distinct pairs with their ``first_day``): R(u) and the seen items come out the same.
numpy only (no torch): the trainer calls it on the top-K indices its chunked ``torch.topk`` found.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

DEFAULT_KS = (10, 50, 100)
METRICS = ("recall", "hit_rate", "ndcg")


@dataclass(frozen=True)
class EvalSets:
    """The relevant and seen items of one evaluated day, for the users with at least one relevant item.

    ``users``: sorted user indices ``[U]``; row j of the CSR pairs belongs to ``users[j]``:
    ``relevant_items[relevant_ptr[j]:relevant_ptr[j + 1]]`` (sorted, distinct), the same for ``seen``.
    """

    day: int
    n_items: int
    users: np.ndarray                   # int64 [U]
    relevant_ptr: np.ndarray            # int64 [U + 1]
    relevant_items: np.ndarray          # int64 [nnz]
    seen_ptr: np.ndarray                # int64 [U + 1]
    seen_items: np.ndarray              # int64 [nnz_seen]

    def __len__(self) -> int:
        return len(self.users)

    def relevant(self, j: int) -> np.ndarray:
        return self.relevant_items[self.relevant_ptr[j]:self.relevant_ptr[j + 1]]

    def seen(self, j: int) -> np.ndarray:
        return self.seen_items[self.seen_ptr[j]:self.seen_ptr[j + 1]]

    @property
    def relevant_counts(self) -> np.ndarray:
        """|R(u)| per row, int64 [U]."""
        return np.diff(self.relevant_ptr)

    @property
    def seen_counts(self) -> np.ndarray:
        return np.diff(self.seen_ptr)

    def seen_pairs(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """The seen items of rows ``rows`` (a slice of the users) as (row within the slice, item) pairs,
        to mask a score block: ``scores[r, i] = -inf`` (numpy or torch alike)."""
        start, stop, _ = rows.indices(len(self.users))
        lo, hi = self.seen_ptr[start], self.seen_ptr[stop]
        row = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(self.seen_ptr[start:stop + 1]))
        return row, self.seen_items[lo:hi]

    def seen_mask(self, rows: slice) -> np.ndarray:
        """bool ``[len(rows), n_items]``: True where the item was clicked before the day."""
        start, stop, _ = rows.indices(len(self.users))
        mask = np.zeros((stop - start, self.n_items), dtype=np.bool_)
        r, i = self.seen_pairs(rows)
        mask[r, i] = True
        return mask


def _csr(rows: np.ndarray, items: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (row, item) pairs -> (ptr [n_rows + 1], items sorted within each row)."""
    order = np.lexsort((items, rows))
    rows, items = rows[order], items[order]
    if len(rows):
        keep = np.concatenate([[True], (np.diff(rows) != 0) | (np.diff(items) != 0)])
        rows, items = rows[keep], items[keep]
    ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=ptr[1:])
    return ptr, items.astype(np.int64)


def eval_sets(user: np.ndarray, item: np.ndarray, day: np.ndarray, eval_day: int, n_items: int) -> EvalSets:
    """From click records (user index, item index, day), the relevant sets of day ``eval_day`` and the
    seen items (clicked on an earlier day). Clicks after ``eval_day`` are ignored.

        user [0, 0, 0, 1], item [2, 1, 2, 4], day [0, 1, 1, 0], eval_day 1 -> users [0],
        relevant(0) = [1] (item 2 was seen on day 0), seen(0) = [2]; user 1 has nothing on day 1.
    """
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    day = np.asarray(day, dtype=np.int64)
    if not (len(user) == len(item) == len(day)):
        raise ValueError(f"click records of unequal lengths: {len(user)}, {len(item)}, {len(day)}")
    if len(item) and (item.min() < 0 or item.max() >= n_items):
        raise ValueError(f"item index outside [0, {n_items})")
    before = day < eval_day
    on = day == eval_day
    n_users = int(user.max()) + 1 if len(user) else 0
    # R(u): items of day d minus the items seen before d (a pair code per (user, item)).
    code = user * n_items + item
    seen_codes = np.unique(code[before])
    day_codes = np.unique(code[on])
    rel_codes = day_codes[~np.isin(day_codes, seen_codes, assume_unique=True)]
    users = np.unique(rel_codes // n_items)
    pos = np.full(n_users, -1, dtype=np.int64)
    pos[users] = np.arange(len(users))
    rel_ptr, rel_items = _csr(pos[rel_codes // n_items], rel_codes % n_items, len(users))
    seen_rows = pos[seen_codes // n_items]
    keep = seen_rows >= 0
    seen_ptr, seen_items = _csr(seen_rows[keep], (seen_codes % n_items)[keep], len(users))
    return EvalSets(day=int(eval_day), n_items=int(n_items), users=users, relevant_ptr=rel_ptr,
                    relevant_items=rel_items, seen_ptr=seen_ptr, seen_items=seen_items)


def top_k(scores: np.ndarray, k: int, seen: np.ndarray | None = None) -> np.ndarray:
    """Per row the ``k`` highest-scoring items, best first, ties broken by the lower item index; items
    where ``seen`` is True are never taken before an unseen one (they score -inf).

        scores [[0.1, 0.9, 0.5, 0.9]], k 3 -> [[1, 3, 2]];  with seen [[F, T, F, F]] -> [[3, 2, 0]]
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [B, I], got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN")
    b, n = s.shape
    k = min(k, n)
    if seen is not None:
        s = np.where(seen, -np.inf, s)
    if k == 0 or b == 0:
        return np.zeros((b, k), dtype=np.int64)
    kth = np.partition(s, n - k, axis=1)[:, n - k]              # the k-th highest score per row
    above = s > kth[:, None]
    tie = s == kth[:, None]
    need = k - above.sum(1)                                      # how many of the ties to take
    more = np.flatnonzero(tie.sum(1) > need)                     # rows with more ties than places
    if len(more):
        tie[more] &= np.cumsum(tie[more], axis=1) <= need[more, None]
    take = above | tie
    idx = np.nonzero(take)[1].reshape(b, k)                      # exactly k per row, in index order
    val = np.take_along_axis(s, idx, axis=1)
    order = np.argsort(-val, axis=1, kind="stable")              # stable: ties stay in index order
    return np.take_along_axis(idx, order, axis=1)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def user_metrics(topk: np.ndarray, sets: EvalSets, ks: Sequence[int] = DEFAULT_KS,
                 rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Per user (rows ``rows`` of ``sets``, in order) recall@K, hit_rate@K and ndcg@K for each K:
    ``{"recall@10": float64 [len(rows)], ...}``. ``topk``: int ``[len(rows), >= max(ks)]``, the items
    ranked best first (seen items already left out, as :func:`top_k` does).

    Chunked evaluation: call per block of users and concatenate (or sum, then divide by len(sets)).
    """
    start, stop, _ = rows.indices(len(sets.users))
    topk = np.asarray(topk, dtype=np.int64)
    kmax = max(ks)
    if topk.shape[0] != stop - start or (topk.shape[1] < kmax and topk.shape[1] < sets.n_items):
        raise ValueError(f"topk has shape {topk.shape}; need [{stop - start}, >= {kmax}]")
    topk = topk[:, :kmax]
    n = sets.n_items
    rel_codes = sets.relevant_items[sets.relevant_ptr[start]:sets.relevant_ptr[stop]] + n * np.repeat(
        np.arange(stop - start, dtype=np.int64), np.diff(sets.relevant_ptr[start:stop + 1]))
    hit = np.isin(topk + n * np.arange(stop - start, dtype=np.int64)[:, None], rel_codes)   # [b, kmax]
    n_rel = np.diff(sets.relevant_ptr[start:stop + 1]).astype(np.float64)
    disc = _discounts(topk.shape[1])
    found = np.cumsum(hit, axis=1)
    dcg = np.cumsum(hit * disc[None, :], axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(_discounts(kmax))])
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(k, topk.shape[1])
        got = found[:, kk - 1] if kk else np.zeros(len(n_rel))
        out[f"recall@{k}"] = got / n_rel
        out[f"hit_rate@{k}"] = (got > 0).astype(np.float64)
        idcg = ideal[np.minimum(n_rel.astype(np.int64), k)]
        out[f"ndcg@{k}"] = (dcg[:, kk - 1] if kk else np.zeros(len(n_rel))) / idcg
    return out


def evaluate(topk: np.ndarray, sets: EvalSets, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """The metrics averaged over the users of ``sets`` (``topk`` one row per user of ``sets``), plus
    ``users``: how many were evaluated. ``{"recall@10": ..., "hit_rate@10": ..., "ndcg@10": ..., "users": U}``."""
    per = user_metrics(topk, sets, ks)
    out: dict[str, float] = {k: float(v.mean()) if len(v) else float("nan") for k, v in per.items()}
    out["users"] = float(len(sets))
    return out


def evaluate_scores(score_fn: Callable[[np.ndarray], np.ndarray], sets: EvalSets,
                    ks: Sequence[int] = DEFAULT_KS, block: int = 1024) -> dict[str, float]:
    """:func:`evaluate` of a scorer: ``score_fn(users int64 [b]) -> float [b, n_items]``, called on blocks
    of ``block`` users, seen items masked, ranked with :func:`top_k`."""
    kmax = min(max(ks), sets.n_items)
    parts = []
    for start in range(0, len(sets), block):
        rows = slice(start, min(start + block, len(sets)))
        scores = np.asarray(score_fn(sets.users[rows]))
        parts.append(top_k(scores, kmax, sets.seen_mask(rows)))
    topk = np.concatenate(parts) if parts else np.zeros((0, kmax), dtype=np.int64)
    return evaluate(topk, sets, ks)


def popularity_top_k(counts: np.ndarray, sets: EvalSets, k: int) -> np.ndarray:
    """The popularity ranking (most ``counts`` first, ties by the lower item index) per user of ``sets``
    with the user's seen items left out: int64 ``[len(sets), k]``. Cheap: one global order."""
    counts = np.asarray(counts)
    if len(counts) != sets.n_items:
        raise ValueError(f"counts has {len(counts)} items, the sets {sets.n_items}")
    order = np.lexsort((np.arange(sets.n_items), -counts.astype(np.float64)))
    k = min(k, sets.n_items)
    width = min(sets.n_items, k + int(sets.seen_counts.max(initial=0)))
    head = order[:width]                                # enough for k unseen items in every row
    pos = np.full(sets.n_items, width, dtype=np.int64)
    pos[head] = np.arange(width)
    rows, items = sets.seen_pairs(slice(None))
    masked = np.zeros((len(sets), width + 1), dtype=np.bool_)
    masked[rows, pos[items]] = True                     # seen items outside the head land in column width
    first = np.argsort(masked[:, :width], axis=1, kind="stable")[:, :k]    # unseen first, in popularity order
    return head[first]


def random_expected(sets: EvalSets, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """The expected metrics of a uniformly random ranking of each user's unseen items (exact, not
    sampled): with n = unseen items and r = |R|, E[hits in the top K] = min(K, n) r / n, P(a hit) =
    1 - C(n - r, K) / C(n, K), and every rank holds a relevant item with probability r / n."""
    n = (sets.n_items - sets.seen_counts).astype(np.float64)
    r = sets.relevant_counts.astype(np.float64)
    out: dict[str, float] = {}
    for k in ks:
        kk = np.minimum(k, n)
        # C(n - r, K) / C(n, K) = prod_{t < K} (n - r - t) / (n - t), as a product of at most K terms
        t = np.arange(k, dtype=np.float64)[None, :]
        ratio = np.where(t < kk[:, None], (n[:, None] - r[:, None] - t) / np.maximum(n[:, None] - t, 1), 1.0)
        miss = np.prod(np.clip(ratio, 0.0, 1.0), axis=1)
        disc = np.concatenate([[0.0], np.cumsum(_discounts(k))])
        ideal = disc[np.minimum(r.astype(np.int64), k)]
        edcg = (r / n) * disc[kk.astype(np.int64)]
        out[f"recall@{k}"] = float(np.mean(kk / n)) if len(n) else float("nan")
        out[f"hit_rate@{k}"] = float(np.mean(1.0 - miss)) if len(n) else float("nan")
        out[f"ndcg@{k}"] = float(np.mean(edcg / ideal)) if len(n) else float("nan")
    out["users"] = float(len(sets))
    return out
