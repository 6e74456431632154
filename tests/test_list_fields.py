"""List-valued fields in the trainer (docs/recall.md): Parquet list<int32> columns become KJT bags with their
real lengths, and each field's table pools them as the manifest says (sum or mean), for every model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.testing import assert_close

from deepfm import inputs
from deepfm.model import DeepFM, DeepFMTrain, SparseArch, predict_proba
from pipeline.metrics import auc
from tests.recall_data import DIM, list_output


def test_pad_lists_keeps_the_first_ids_and_makes_an_empty_list_the_missing_id():
    padded, lengths = inputs.pad_lists([np.array([5, 7]), np.array([], np.int32), None, np.array([9, 8, 6, 4])], 3)
    assert padded.tolist() == [[5, 7, 0], [0, 0, 0], [0, 0, 0], [9, 8, 6]]
    assert lengths.tolist() == [2, 1, 1, 3]


def test_a_batch_lays_out_list_fields_with_their_lengths(tmp_path: Path):
    ds = inputs.open_dataset(list_output(tmp_path / "d", seed=1, pooling="sum", rows=8))
    cols = {"label": np.array([1, 0], np.int32), "a": np.array([3, 4], np.int32),
            "g": np.array([[5, 6, 0], [7, 0, 0]], np.int32), "g" + inputs.LENGTH_SUFFIX: np.array([2, 1], np.int32),
            "day": np.array([0, 0], np.int32)}
    b = inputs.columns_batch(cols, ds)
    assert b.kjt.keys() == ["a", "g"]
    assert b.kjt.values().tolist() == [3, 4, 5, 6, 7]
    assert b.kjt.lengths().tolist() == [1, 1, 2, 1]
    assert b.labels.tolist() == [1.0, 0.0] and b.valid == 2


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_the_pooled_vector_is_the_sum_or_mean_of_the_rows_read_from_parquet(tmp_path: Path, pooling: str):
    root = list_output(tmp_path / "d", seed=3, pooling=pooling, rows=64)
    ds = inputs.open_dataset(root)
    assert [f.pooling for f in ds.fields] == ["sum", pooling]
    it = inputs.eval_batches(ds, "train", 0, 1, batch_size=48, workers=1, depth=2)
    batches = list(it)
    it.close()
    assert [b.valid for b in batches] == [48, 16]          # 64 rows, the last batch padded
    torch.manual_seed(0)
    sparse = SparseArch(ds.fields)
    table = sparse.ebc.embedding_bags["t_g"].weight.detach()
    t = pq.read_table(root / "train")
    want_g, want_a = t.column("g").to_pylist(), t.column("a").to_pylist()
    got_g, got_a = [], []
    for b in batches:
        d = b.kjt.to_dict()
        got_g += [x.tolist() for x in d["g"].to_dense()][:b.valid]
        got_a += d["a"].values().tolist()[:b.valid]
        v, _ = sparse(b.kjt)
        rows = [table[ids] for ids in d["g"].to_dense()]
        pooled = torch.stack([r.sum(0) if pooling == "sum" else r.mean(0) for r in rows])
        assert_close(v[:, 1], pooled[:, :DIM])
    # every row once (petastorm reads the row groups in an order of its own)
    assert sorted(zip(got_a, got_g)) == sorted(zip(want_a, want_g))


def test_deepfm_trains_on_a_list_field(tmp_path: Path):
    """The label is "g holds id 2": one row of g's table decides it, through the mean of the row's ids. (The
    sharded tables pool list fields under torchrun in tests/test_two_tower.py.)"""
    ds = inputs.open_dataset(list_output(tmp_path / "d", seed=5, pooling="mean", rows=2048))
    torch.manual_seed(0)
    model = DeepFM(ds.fields, "deepfm", hidden=(16,), dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    it = inputs.train_batches(ds, 0, 1, batch_size=128, seed=1, workers=1, depth=2)
    try:
        for _ in range(48):
            loss, _ = DeepFMTrain(model)(next(it))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        it.close()
    model.eval()
    valid = inputs.eval_batches(ds, "valid", 0, 1, batch_size=512, workers=1, depth=2)
    with torch.no_grad():
        p, y = zip(*[(predict_proba(model(b.kjt))[:b.valid].numpy(), b.labels[:b.valid].numpy()) for b in valid])
    valid.close()
    assert auc(np.concatenate(p), np.concatenate(y)) > 0.9
