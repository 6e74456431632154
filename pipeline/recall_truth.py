"""The recall baselines from the generator's truth: the ceiling, popularity, random (docs/recall.md).

On a held-out day d, with the relevant sets and seen masking of pipeline.recall_metrics over the
catalogue (every item that appears in some day file, as the featurize job's catalogue holds them; the
zero-padded raw keys keep the generator's order, so the job's dense ``item_index`` is this order too):

* ``ceiling``: each user's unseen items ranked by the true score w_i sigmoid(logit(u, i)), proportional
  to the expected clicks of (u, i) on day d: the best ranking in expectation;
* ``popularity``: ranked by the clicks in the train days (ties by the lower index, as everywhere);
* ``random``: the exact expectation of a uniformly random ranking;
* ``features_only``: the ceiling's ranking with the per-id residuals left out, a diagnostic: what a
  model that learned the side features perfectly, and no id, would reach.

    >>> baselines(Path("data/raw_recall"), heldout_day=9, train_days=range(8))["ceiling"]["recall@50"]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline import recall_metrics as RM
from pipeline.generate_recall import World, read_day, read_world


def click_records(raw_dir: Path, days: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, day) of every click of ``days`` (generator indices), and per item the impressions
    over those days (int64 [n_items])."""
    users, items, ds = [], [], []
    shown: np.ndarray | None = None
    for d in days:
        r = read_day(raw_dir, d)
        hit = r["label"] == 1
        users.append(r["user"][hit].astype(np.int64))
        items.append(r["item"][hit].astype(np.int64))
        ds.append(np.full(int(hit.sum()), d, dtype=np.int64))
        counts = np.bincount(r["item"], minlength=0)
        if shown is None:
            shown = counts
        else:
            n = max(len(shown), len(counts))
            shown = np.pad(shown, (0, n - len(shown))) + np.pad(counts, (0, n - len(counts)))
    assert shown is not None, "no days"
    return np.concatenate(users), np.concatenate(items), np.concatenate(ds), shown


def baselines(raw_dir: Path | str, heldout_day: int, train_days: Sequence[int],
              ks: Sequence[int] = RM.DEFAULT_KS) -> dict[str, Any]:
    """``{"ceiling": {...}, "popularity": {...}, "random": {...}, "features_only": {...}, "users": U,
    "items": I, "heldout_day": d, "train_days": [...]}``, each inner dict as
    :func:`pipeline.recall_metrics.evaluate` returns it. ``train_days``: the days before the valid and
    test days (whose clicks rank the popularity baseline)."""
    import json
    raw_dir = Path(raw_dir)
    world = read_world(raw_dir)
    days = json.loads((raw_dir / "truth" / "recall_model.json").read_text())["days"]
    if heldout_day not in days:
        raise ValueError(f"day {heldout_day} was not generated (days {days})")
    user, item, day, shown = click_records(raw_dir, days)
    shown = np.pad(shown, (0, world.model.n_items - len(shown)))
    catalogue = np.flatnonzero(shown > 0)                       # the items of the featurize job's catalogue
    dense = np.full(world.model.n_items, -1, dtype=np.int64)
    dense[catalogue] = np.arange(len(catalogue))
    sets = RM.eval_sets(user, dense[item], day, heldout_day, len(catalogue))
    train = np.isin(day, np.asarray(list(train_days), dtype=np.int64))
    counts = np.bincount(dense[item[train]], minlength=len(catalogue))
    kmax = max(ks)
    return {
        "ceiling": RM.evaluate_scores(_scorer(world, catalogue, False), sets, ks),
        "popularity": RM.evaluate(RM.popularity_top_k(counts, sets, kmax), sets, ks),
        "random": RM.random_expected(sets, ks),
        "features_only": RM.evaluate_scores(_scorer(world, catalogue, True), sets, ks),
        "users": len(sets), "items": int(len(catalogue)), "heldout_day": int(heldout_day),
        "train_days": [int(d) for d in train_days],
    }


def _scorer(world: World, catalogue: np.ndarray, feature_only: bool) -> Any:
    return lambda users: world.expected_clicks(users, catalogue, feature_only)
