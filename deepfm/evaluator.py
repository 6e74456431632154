"""Exact metrics of a sharded model over every row of a split, for training (valid, test) and
deepfm.evaluate alike: predictions are gathered from all ranks, not per-rank AUCs averaged.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deepfm import inputs
from deepfm.cluster import Cluster
from deepfm.model import predict_proba
from deepfm.sharded import Trainable
from deepfm.trainconf import TrainConfig
from pipeline import metrics as M


class Evaluator:
    """``evaluate(split) -> {auc, logloss, ne, calibration, rows}`` with the negative sampling undone."""

    def __init__(self, t: Trainable, ds: inputs.Dataset, cfg: TrainConfig, cluster: Cluster):
        self.t, self.ds, self.cfg, self.cluster = t, ds, cfg, cluster

    @torch.no_grad()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(debiased probability, label) of every row of the split, on every rank."""
        c = self.cluster
        self.t.dmp.eval()
        it = inputs.eval_batches(self.ds, split, c.rank, c.world, self.cfg.batch_size, self.cfg.reader_workers,
                                 self.cfg.prefetch_batches)
        dummy = inputs.dummy_batch(self.ds, self.cfg.batch_size)
        preds, labels = [], []
        flag = torch.zeros(1, dtype=torch.int32)
        try:
            while True:
                b = next(it, None)
                flag.fill_(0 if b is None else 1)
                dist.all_reduce(flag)                      # every rank steps until all have run out
                if flag.item() == 0:
                    break
                batch = (b or dummy).to(c.device)
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

    def scored(self, split: str) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """The split's metrics and the (probability, label) of every row they are computed from."""
        p, y = self.predict(split)
        if len(y) != self.ds.rows(split):
            raise RuntimeError(f"{split}: evaluated {len(y)} rows, the manifest says {self.ds.rows(split)}")
        return M.summary(p, y), p, y
