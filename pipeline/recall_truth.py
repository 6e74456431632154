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

    python -m pipeline.recall_truth RAW [--heldout-day N] [--train-days 8]   # prints the JSON

On the generator's default set (``python -m pipeline.generate --config conf/recall.yaml --seed 7``: 20,000
users, 5,000 items, 10 days x 300,000 impressions, 8 train days, 12,741 users evaluated on day 9)
recall@50 is 0.410 for the ceiling, 0.373 features-only, 0.241 popularity and 0.010 random. A plain
PyTorch two-tower (each side's field embeddings summed, an MLP, in-batch softmax with logQ) reached 0.370
(0.90x the ceiling) after 2 epochs over the 242,589 train clicks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline import recall_metrics as RM
from pipeline.generate_recall import World, read_day, read_world


def click_records(raw_dir: Path, days: Iterable[int], n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    """(user, item, day) of every click of ``days`` (generator indices), and per item its impressions
    over those days (int64 [n_items])."""
    users, items, ds = [], [], []
    shown = np.zeros(n_items, dtype=np.int64)
    for d in days:
        r = read_day(raw_dir, d)
        hit = r["label"] == 1
        users.append(r["user"][hit].astype(np.int64))
        items.append(r["item"][hit].astype(np.int64))
        ds.append(np.full(int(hit.sum()), d, dtype=np.int64))
        shown += np.bincount(r["item"], minlength=n_items)
    if not users:
        raise ValueError("no days")
    return np.concatenate(users), np.concatenate(items), np.concatenate(ds), shown


def baselines(raw_dir: Path | str, heldout_day: int, train_days: Sequence[int],
              ks: Sequence[int] = RM.DEFAULT_KS) -> dict[str, Any]:
    """``{"ceiling": {...}, "popularity": {...}, "random": {...}, "features_only": {...}, "users": U,
    "items": I, "heldout_day": d, "train_days": [...]}``, each inner dict as
    :func:`pipeline.recall_metrics.evaluate` returns it. ``train_days``: the days before the valid and
    test days (whose clicks rank the popularity baseline)."""
    raw_dir = Path(raw_dir)
    world = read_world(raw_dir)
    days = json.loads((raw_dir / "truth" / "recall_model.json").read_text())["days"]
    if heldout_day not in days:
        raise ValueError(f"day {heldout_day} was not generated (days {days})")
    user, item, day, shown = click_records(raw_dir, days, world.model.n_items)
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The baselines as JSON on stdout; by default the last day held out and the days before the last
    two (valid, test) as train days."""
    p = argparse.ArgumentParser(prog="python -m pipeline.recall_truth", description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path, help="a recall generation's folder (with truth/)")
    p.add_argument("--heldout-day", type=int, default=None, help="default: the last day")
    p.add_argument("--train-days", type=int, default=None,
                   help="how many first days are train days (default: all but the last two)")
    p.add_argument("--ks", default="10,50,100")
    a = p.parse_args(argv)
    days = json.loads((a.raw / "truth" / "recall_model.json").read_text())["days"]
    heldout = days[-1] if a.heldout_day is None else a.heldout_day
    train = days[:len(days) - 2 if a.train_days is None else a.train_days]
    out = baselines(a.raw, heldout, train, tuple(int(k) for k in a.ks.split(",")))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a clear one-line error and a non-zero exit for scripts
        print(f"recall_truth: error: {e}", file=sys.stderr)
        sys.exit(1)
