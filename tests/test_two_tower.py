"""deepfm.two_tower: the towers on DeepFM's tables, the identity with DeepFM's cross terms, the in-batch softmax
(logQ sign, accidental hits, labelled negatives, gathered across 2 gloo ranks), and two_tower trained and
evaluated by torchrun on a hand-written recall output (tests/recall_data.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from deepfm import inputs
from deepfm.evaluator import day_user_vectors
from deepfm.model import DeepFM, FMInteraction
from deepfm.train import check_model_data
from deepfm.trainconf import TrainConfigError, load_train_config
from deepfm.two_tower import TwoTower, TwoTowerTrain, in_batch_softmax_loss
from pipeline import layout
from tests.conftest import run_torchrun
from tests.recall_data import DIM, list_output, recall_output


@pytest.fixture(scope="module")
def recall_data(tmp_path_factory) -> Path:
    return recall_output(tmp_path_factory.mktemp("recall") / "out", seed=7)


def _kjt(rows: list[dict[str, list[int]]], keys: list[str]) -> KeyedJaggedTensor:
    """One dict of field -> ids per row -> a KJT key by key."""
    values = [i for k in keys for r in rows for i in r[k]]
    lengths = [len(r[k]) for k in keys for r in rows]
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths, dtype=torch.int32),
                             stride=len(rows))


KEYS = ["user_id", "hour", "item_id", "item_genres"]
ROWS = [{"user_id": [3], "hour": [5], "item_id": [10], "item_genres": [2, 7]},
        {"user_id": [4], "hour": [2], "item_id": [11], "item_genres": [3]},
        {"user_id": [3], "hour": [9], "item_id": [12], "item_genres": [4, 6]}]


def _model(ds: inputs.Dataset, tower_dim: int = 4) -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(ds.fields, tower_hidden=(8,), tower_dim=tower_dim, dropout=0.0, init_scale=0.3).eval()


def test_the_towers_read_their_sides_and_the_vectors_are_laid_out_as_documented(recall_data: Path):
    ds = inputs.open_dataset(recall_data)
    m = _model(ds)
    assert (m.user_fields, m.item_fields) == (["user_id", "hour"], ["item_id", "item_genres"])
    assert [f.pooling for f in ds.fields] == ["sum", "sum", "sum", "mean"]
    kjt = _kjt(ROWS, KEYS)
    v, w4 = m.sparse(kjt)
    u, i = m.user_vectors(kjt), m.item_vectors(kjt)
    assert u.shape == i.shape == (3, DIM + 1 + 4) and m.out_dim == DIM + 1 + 4
    assert_close(u[:, :DIM], v[:, 0] + v[:, 1])
    assert_close(u[:, DIM], torch.ones(3))
    assert_close(i[:, :DIM], v[:, 2] + v[:, 3])
    assert_close(i[:, DIM], w4[:, 2:].sum((1, 2)))
    assert_close(m(kjt), (u * i).sum(1))


def test_the_user_vector_does_not_depend_on_the_item_inputs_nor_the_item_vector_on_the_user_inputs(recall_data: Path):
    m = _model(inputs.open_dataset(recall_data))
    other_items = [{**r, "item_id": [20 + n], "item_genres": [5, 8, 2][:n + 1]} for n, r in enumerate(ROWS)]
    other_users = [{**r, "user_id": [40 + n], "hour": [n + 11]} for n, r in enumerate(ROWS)]
    base = _kjt(ROWS, KEYS)
    assert torch.equal(m.user_vectors(base), m.user_vectors(_kjt(other_items, KEYS)))
    assert torch.equal(m.item_vectors(base), m.item_vectors(_kjt(other_users, KEYS)))
    assert not torch.equal(m.item_vectors(base), m.item_vectors(_kjt(other_items, KEYS)))


def test_the_fm_part_of_the_score_is_deepfms_user_by_item_cross_terms(recall_data: Path):
    """On the same embeddings: <Vec_U, Vec_I> = FM over all fields - FM within the user side - FM within the
    item side; with no MLP the whole score adds the item's first-order weights."""
    ds = inputs.open_dataset(recall_data)
    m = _model(ds, tower_dim=0)
    d = DeepFM(ds.fields, "fm")
    d.sparse.load_state_dict(m.sparse.state_dict())
    kjt = _kjt(ROWS, KEYS)
    v, w4 = d.sparse(kjt)
    fm = FMInteraction()
    cross = fm(v) - fm(v[:, :2]) - fm(v[:, 2:])
    u, i = m.user_vectors(kjt), m.item_vectors(kjt)
    assert_close((u[:, :DIM] * i[:, :DIM]).sum(1), cross)
    assert_close(m(kjt), cross + w4[:, 2:].sum((1, 2)))


def _ce(logits: list[float], own: int) -> float:
    return -logits[own] + math.log(sum(math.exp(x) for x in logits))


def test_the_in_batch_softmax_subtracts_log_q_and_masks_accidental_hits_and_labelled_negatives():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    items = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0], [1.0, 2.0]])
    item_index = torch.tensor([5, 7, 5, 9])             # rows 0 and 2 hold the same item: an accidental hit each
    a, b, c = math.log(0.5), math.log(0.25), math.log(0.1)
    log_q = torch.tensor([a, b, a, c])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0])         # row 3 is a labelled negative: not a row, not a column
    t = 0.5
    # scores u_r . item_j: row 0 [2, 0, 1], row 1 [0, 1, -1], row 2 [2, 1, 0]; logit = score / t - log_q(j)
    want = (_ce([2 / t - a, 0 / t - b], 0)                  # row 0: column 2 (item 5 again) masked
            + _ce([0 / t - a, 1 / t - b, -1 / t - a], 1)    # row 1: nothing masked
            + _ce([1 / t - b, 0 / t - a], 1)) / 3           # row 2: column 0 (item 5 again) masked
    got = in_batch_softmax_loss(u, items, item_index, log_q, labels, t)
    assert_close(got, torch.tensor(want))
    # the sign: a more frequent negative (higher log q) is pushed down less, so the loss is lower
    popular = in_batch_softmax_loss(u, items, item_index, torch.tensor([a, 0.0, a, c]), labels, t)
    assert popular < got


def test_pointwise_is_bce_on_the_scores(recall_data: Path):
    ds = inputs.open_dataset(recall_data)
    m = _model(ds)
    kjt = _kjt(ROWS, KEYS)
    labels = torch.tensor([1.0, 0.0, 1.0])
    from deepfm.inputs import Batch
    loss, (_, scores, _) = TwoTowerTrain(m, loss="pointwise")(Batch(kjt, labels, 3))
    assert_close(scores, m(kjt))
    assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(m(kjt), labels))


def test_the_two_tower_settings_are_checked_by_name():
    cfg = load_train_config(None, {"model": "two_tower", "loss": "pointwise", "recall_k": [10, 5]})
    assert (cfg.loss, cfg.recall_k, cfg.temperature) == ("pointwise", (10, 5), 0.05)
    with pytest.raises(TrainConfigError, match=r"^loss: 'listwise' is not one of softmax, pointwise"):
        load_train_config(None, {"loss": "listwise"})
    with pytest.raises(TrainConfigError, match=r"^temperature: "):
        load_train_config(None, {"temperature": 0})
    with pytest.raises(TrainConfigError, match=r"^recall_k: \[10, 10\] names a K twice"):
        load_train_config(None, {"recall_k": [10, 10]})


def test_two_tower_refuses_data_without_a_recall_output_or_pointwise_without_negatives(recall_data: Path,
                                                                                      tmp_path: Path):
    plain = inputs.open_dataset(list_output(tmp_path / "plain", seed=1, pooling="sum", rows=16))
    with pytest.raises(inputs.DataError, match="model two_tower needs a recall output"):
        check_model_data(load_train_config(None, {"model": "two_tower"}), plain)
    with pytest.raises(inputs.DataError, match=r"loss pointwise trains on the featurize job's random negatives"):
        check_model_data(load_train_config(None, {"model": "two_tower", "loss": "pointwise"}),
                         inputs.open_dataset(recall_data))
    check_model_data(load_train_config(None, {"model": "deepfm"}), plain)


def test_the_catalogue_is_read_by_item_index_and_its_batches_hold_the_item_fields_alone(recall_data: Path):
    ds = inputs.open_dataset(recall_data)
    cat = ds.catalogue
    assert cat.items == 200
    assert cat.columns["item_id"][:3].tolist() == [2, 3, 4]
    assert cat.columns["item_genres"][:2].tolist() == [[2, 6], [3, 0]]
    assert cat.columns["item_genres" + inputs.LENGTH_SUFFIX][:2].tolist() == [2, 1]
    b = list(inputs.catalogue_batches(ds, 198, 200, batch_size=4))
    assert len(b) == 1 and b[0].valid == 2
    d = b[0].kjt.to_dict()
    assert d["item_id"].values().tolist() == [200, 201, 0, 0]
    assert d["item_genres"].lengths().tolist() == [2, 1, 1, 1]
    assert d["user_id"].values().tolist() == [0, 0, 0, 0]
    assert b[0].recall[layout.ITEM_INDEX].tolist() == [198, 199, 0, 0]


def test_a_train_batch_of_recall_data_holds_the_indexes_and_log_q(recall_data: Path):
    ds = inputs.open_dataset(recall_data)
    it = inputs.train_batches(ds, 0, 1, batch_size=32, seed=1, workers=1, depth=2)
    b = next(it)
    it.close()
    item = b.recall[layout.ITEM_INDEX].numpy()
    assert_close(b.recall[layout.LOG_Q], torch.from_numpy(ds.catalogue.log_q[item]))
    assert torch.equal(b.kjt.to_dict()["item_id"].values(), torch.from_numpy(item + 2))


def test_a_users_vector_of_a_day_is_the_mean_of_its_rows():
    got = day_user_vectors(np.array([3, 3, 5, 3]), np.array([1, 1, 1, 2]),
                           np.array([[1, 0], [3, 2], [7, 7], [9, 9]], np.float32), 1, np.array([3, 5]))
    assert got.tolist() == [[2, 1], [7, 7]]


def test_the_gathered_softmax_on_two_ranks_is_the_whole_batchs_and_its_gradients_reach_the_other_ranks_items():
    r = run_torchrun("tests/two_tower_dist.py", [], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("two_tower_dist ok") == 2, r.stdout


@pytest.mark.slow
def test_two_tower_trains_on_two_ranks_resumes_and_beats_a_random_ranking(tmp_path: Path):
    data = recall_output(tmp_path / "data", seed=11)
    run = tmp_path / "run"
    args = ["--data", str(data), "--out", str(run), "--model", "two_tower", "--batch-size", "64", "--epochs", "3",
            "--tower-hidden", "16", "--tower-dim", "8", "--dropout", "0", "--sparse-lr", "0.1", "--dense-lr", "0.01",
            "--temperature", "0.2", "--checkpoint-every-steps", "10", "--no-bf16", "--config", str(_config(tmp_path))]
    first = run_torchrun("deepfm/train.py", [*args, "--max-steps", "15", "--no-test"])
    assert first.returncode == 0, first.stderr[-4000:]
    again = run_torchrun("deepfm/train.py", args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stderr
    m = json.loads((run / "metrics.json").read_text())
    steps = 3 * (len(_rows(data, "train")) // 128)
    assert m["model"] == "two_tower" and m["global_step"] == steps
    for split, day in (("valid", 3), ("test", 4)):
        assert m[split]["users"] == _users_with_new_items(data, day)
        assert m[split]["recall@10"] > 3 * m[split]["random_recall@10"], m[split]
        assert set(m[split]) >= {"recall@10", "hit_rate@10", "ndcg@10", "recall@50", "ndcg@100"}
    assert m["valid_best_recall@10"] == max(h["recall@10"] for h in m["history"])


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text("recall_k: [10, 50, 100]\n")
    return p


def _users_with_new_items(data: Path, day: int) -> int:
    """The users who clicked on ``day`` an item they had not clicked before (from the splits' rows)."""
    import pyarrow.parquet as pq
    clicks = [(u, i, d) for split in ("train", "valid", "test")
              for u, i, d in zip(*(pq.read_table(data / split).column(c).to_pylist() for c in
                                   (layout.USER_INDEX, layout.ITEM_INDEX, "day")))]
    before = {(u, i) for u, i, d in clicks if d < day}
    return len({u for u, i, d in clicks if d == day and (u, i) not in before})


def _rows(data: Path, split: str) -> list[int]:
    import pyarrow.parquet as pq
    return pq.read_table(data / split, columns=["label"]).column("label").to_pylist()
