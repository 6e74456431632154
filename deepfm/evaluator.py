"""Exact metrics of a sharded model over every row of a split, for training (valid, test) and
deepfm.evaluate alike: predictions are gathered from all ranks, not per-rank AUCs averaged.

Model two_tower is measured as a recall model (docs/recall.md, "Evaluation definitions";
pipeline.recall_metrics holds the one definition): the item vectors of the whole catalogue (each rank
computes a slice through the sharded model, in lockstep, then they are gathered), the user vectors of
the split's rows (a user's vector on a day is the mean of its rows' vectors: their context fields may
differ), and per evaluated day and user the exact top K over the catalogue by inner product
(deepfm.retrieval.exact_topk) with the items the user clicked before that day left out; recall@K, hit
rate@K and NDCG@K for each K of ``recall_k``, beside a random ranking's expected values.
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deepfm import inputs
from deepfm.cluster import Cluster
from deepfm.model import TOWERS, predict_proba
from deepfm.retrieval import exact_topk
from deepfm.sharded import Trainable
from deepfm.trainconf import TrainConfig
from pipeline import layout
from pipeline import metrics as M
from pipeline import recall_metrics as R


def in_lockstep(it: Any, dummy: Any, device: Any) -> Any:
    """The rank's batches moved to ``device``, then ``dummy`` until every rank has run out: the sharded
    tables' collectives need every rank in each call, and ranks' shards differ in length."""
    flag = torch.zeros(1, dtype=torch.int32)
    while True:
        b = next(it, None)
        flag.fill_(0 if b is None else 1)
        dist.all_reduce(flag)                      # every rank steps until all have run out
        if flag.item() == 0:
            return
        yield (b or dummy).to(device)


class Evaluator:
    """``evaluate(split) -> {auc, logloss, ne, calibration, rows}`` with the negative sampling undone; for
    model two_tower ``{recall@K, hit_rate@K, ndcg@K, random_recall@K, ..., users, rows}`` (:class:`RecallEvaluator`).
    :attr:`select` names the metric early stopping and keep_best follow (higher is better)."""

    def __init__(self, t: Trainable, ds: inputs.Dataset, cfg: TrainConfig, cluster: Cluster):
        self.t, self.ds, self.cfg, self.cluster = t, ds, cfg, cluster
        self.recall = RecallEvaluator(t, ds, cfg, cluster) if cfg.model in TOWERS else None

    @property
    def select(self) -> str:
        return f"recall@{self.cfg.recall_k[0]}" if self.recall is not None else "auc"

    @torch.no_grad()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(debiased probability, label) of every row of the split, on every rank."""
        c = self.cluster
        self.t.dmp.eval()
        it = inputs.eval_batches(self.ds, split, c.rank, c.world, self.cfg.batch_size, self.cfg.reader_workers,
                                 self.cfg.prefetch_batches)
        dummy = inputs.dummy_batch(self.ds, self.cfg.batch_size)
        preds, labels = [], []
        try:
            for batch in in_lockstep(it, dummy, c.device):
                # the model itself, outside the train wrapper's autocast: fp32 whatever the training precision,
                # so the metrics match deepfm.evaluate's exactly
                q = predict_proba(self.t.model(batch.kjt)).cpu().numpy()[:batch.valid]
                preds.append(q)
                labels.append(batch.labels.cpu().numpy()[:batch.valid])
        finally:
            it.close()                                     # its reader thread joined, whatever happened
        self.t.dmp.train()
        local = (np.concatenate(preds) if preds else np.zeros(0, np.float32),
                 np.concatenate(labels) if labels else np.zeros(0, np.float32))
        gathered: list[Any] = [None] * c.world
        dist.all_gather_object(gathered, local)
        q = np.concatenate([g[0] for g in gathered]).astype(np.float64)
        y = np.concatenate([g[1] for g in gathered])
        return M.debias(q, self.ds.neg_sample_rate), y   # the model saw a fraction r of the negatives

    def evaluate(self, split: str) -> dict[str, float]:
        return self.scored(split)[0]

    def scored(self, split: str) -> tuple[dict[str, float], np.ndarray | None, np.ndarray | None]:
        """The split's metrics and the (probability, label) of every row they are computed from (None, None
        for two_tower: its metrics are over rankings, not rows)."""
        if self.recall is not None:
            return self.recall.evaluate(split), None, None
        p, y = self.predict(split)
        if len(y) != self.ds.rows(split):
            raise RuntimeError(f"{split}: evaluated {len(y)} rows, the manifest says {self.ds.rows(split)}")
        return M.summary(p, y), p, y


class RecallEvaluator:
    """The two-tower model's recall metrics of a split (the module's docstring), the same on every rank."""

    def __init__(self, t: Trainable, ds: inputs.Dataset, cfg: TrainConfig, cluster: Cluster):
        self.t, self.ds, self.cfg, self.cluster = t, ds, cfg, cluster

    @cached_property
    def seen(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The featurize job's ``seen/``: (user_index, item_index, first_day) of every distinct positive pair."""
        import pyarrow.parquet as pq
        r = self.ds.manifest.recall
        assert r is not None
        t = pq.read_table(self.ds.root / r.seen, columns=[layout.USER_INDEX, layout.ITEM_INDEX, layout.FIRST_DAY])
        return tuple(t.column(c).to_numpy().astype(np.int64) for c in t.column_names)     # type: ignore[return-value]

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """[items, K]: every catalogue item's vector, row = item_index. Rank r computes items [r P, (r + 1) P)
        (P = ceil(items / world)) in the same number of batches as every other rank (a rank past its slice
        runs all-missing batches), then the slices are gathered."""
        c, bs = self.cluster, self.cfg.batch_size
        n = self.ds.catalogue.items
        per = math.ceil(n / c.world)
        start, stop = min(c.rank * per, n), min((c.rank + 1) * per, n)
        it = inputs.catalogue_batches(self.ds, start, stop, bs)
        dummy = inputs.dummy_batch(self.ds, bs)
        towers = self.t.towers
        out = []
        for _ in range(math.ceil(per / bs)):
            b = next(it, None) or dummy
            out.append(towers.item_vectors(b.to(c.device).kjt)[:b.valid].float())
        local = torch.cat(out) if out else torch.zeros(0, towers.out_dim, device=c.device)
        local = torch.cat([local, local.new_zeros(per - len(local), local.shape[1])])
        parts = [torch.empty_like(local) for _ in range(c.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts)[:n].cpu()

    @torch.no_grad()
    def user_rows(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user_index [N], day [N], user vector [N, K]) of every row of the split, gathered from all ranks."""
        c = self.cluster
        it = inputs.eval_batches(self.ds, split, c.rank, c.world, self.cfg.batch_size, self.cfg.reader_workers,
                                 self.cfg.prefetch_batches)
        dummy = inputs.dummy_batch(self.ds, self.cfg.batch_size)
        towers = self.t.towers
        users, days, vecs = [], [], []
        try:
            for batch in in_lockstep(it, dummy, c.device):
                vecs.append(towers.user_vectors(batch.kjt)[:batch.valid].float().cpu().numpy())
                users.append(batch.recall[layout.USER_INDEX][:batch.valid].cpu().numpy())
                days.append(batch.recall[self.ds.day_column][:batch.valid].cpu().numpy())
        finally:
            it.close()
        local = (np.concatenate(users), np.concatenate(days), np.concatenate(vecs))
        gathered: list[Any] = [None] * c.world
        dist.all_gather_object(gathered, local)
        return (np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]),
                np.concatenate([g[2] for g in gathered]))

    def evaluate(self, split: str) -> dict[str, float]:
        """Per day of the split and user with a relevant item that day, the top max(recall_k) of the whole
        catalogue (seen items left out); each rank ranks a slice of the users, the per-user metrics are
        gathered and averaged over every (user, day)."""
        c, ks = self.cluster, tuple(self.cfg.recall_k)
        self.t.dmp.eval()
        try:
            items = self.item_vectors()
            users, days, vecs = self.user_rows(split)
        finally:
            self.t.dmp.train()
        seen_user, seen_item, first_day = self.seen
        per: list[dict[str, np.ndarray]] = []
        random: list[dict[str, float]] = []
        for d in self.ds.manifest.splits[split].days:
            sets = R.eval_sets(seen_user, seen_item, first_day, eval_day=d, n_items=len(items))
            if not len(sets):
                continue
            queries = day_user_vectors(users, days, vecs, d, sets.users)
            share = math.ceil(len(sets) / c.world)
            rows = slice(min(c.rank * share, len(sets)), min((c.rank + 1) * share, len(sets)))
            mine: dict[str, np.ndarray] = {}
            if rows.stop > rows.start:
                _, top = exact_topk(queries[rows], items, max(ks),
                                    exclude=[sets.seen(j) for j in range(rows.start, rows.stop)])
                mine = R.user_metrics(top, sets, ks, rows)
            gathered: list[Any] = [None] * c.world
            dist.all_gather_object(gathered, mine)
            per.extend(g for g in gathered if g)
            random.append({**R.random_expected(sets, ks)})
        out: dict[str, float] = {}
        names = [f"{m}@{k}" for k in ks for m in R.METRICS]
        n_users = sum(len(next(iter(p.values()))) for p in per)
        for name in names:
            out[name] = float(np.concatenate([p[name] for p in per]).mean()) if per else float("nan")
        for name in names:      # the expectation of a random ranking, weighted by each day's users like the above
            out[f"random_{name}"] = (float(sum(r[name] * r["users"] for r in random) / n_users) if n_users
                                     else float("nan"))
        out["users"] = float(n_users)
        out["rows"] = float(len(users))
        return out


def day_user_vectors(users: np.ndarray, days: np.ndarray, vecs: np.ndarray, day: int,
                     wanted: np.ndarray) -> np.ndarray:
    """The vector of each user of ``wanted`` on ``day``: the mean of that user's rows of the day [len(wanted), K].

        users [3, 3, 5], days [1, 1, 1], vecs [[1, 0], [3, 2], [7, 7]], day 1, wanted [3] -> [[2, 1]]
    """
    on = days == day
    u, v = users[on], vecs[on]
    ids, inverse = np.unique(u, return_inverse=True)
    sums = np.zeros((len(ids), vecs.shape[1]), np.float64)
    np.add.at(sums, inverse, v)
    means = (sums / np.bincount(inverse, minlength=len(ids))[:, None]).astype(np.float32)
    pos = np.searchsorted(ids, wanted)
    if len(wanted) and (pos.max(initial=0) >= len(ids) or not np.array_equal(ids[np.minimum(pos, len(ids) - 1)], wanted)):
        raise RuntimeError(f"day {day}: users with relevant items have no row in the split")
    return means[pos]
