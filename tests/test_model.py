"""DeepFM parts against hand-computed values (unsharded, one process)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from deepfm.inputs import to_batch
from deepfm.model import FIRST_ORDER_DIM, DeepFM, FieldSpec, FMInteraction, predict_proba

FIELDS = [FieldSpec("a", 10, 4), FieldSpec("b", 20, 4), FieldSpec("c", 5, 4)]


def test_fm_sum_of_squares_equals_explicit_pairwise_sum():
    torch.manual_seed(0)
    v = torch.randn(6, 5, 8, dtype=torch.float64)
    explicit = sum((v[:, i] * v[:, j]).sum(1) for i, j in itertools.combinations(range(5), 2))
    assert_close(FMInteraction()(v), explicit)


def test_fm_on_a_hand_computed_example():
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]]])       # B=1, F=3, D=2
    # <v1,v2> + <v1,v3> + <v2,v3> = 11 + (-1.5) + (-2.5) = 7
    assert_close(FMInteraction()(v), torch.tensor([7.0]))


def test_to_batch_lays_out_the_kjt_key_by_key():
    b = to_batch(np.array([[3, 7], [4, 8]], dtype=np.int32), np.array([1, 0]), ["a", "b"])
    assert b.kjt.keys() == ["a", "b"]
    assert b.kjt.values().tolist() == [3, 4, 7, 8]
    assert b.kjt.lengths().tolist() == [1, 1, 1, 1]
    assert b.labels.tolist() == [1.0, 0.0] and b.valid == 2


def _model(kind: str) -> DeepFM:
    torch.manual_seed(1)
    m = DeepFM(FIELDS, kind, hidden=(8, 8), dropout=0.0)
    with torch.no_grad():
        for p in m.sparse.ebc.parameters():
            p.copy_(torch.randn_like(p))
    return m.eval()


def _batch_and_rows(m):
    """A batch of two rows, and the table rows [B, F, D+4] that the model looks up for it."""
    ids = np.array([[1, 2, 3], [0, 19, 4]], dtype=np.int32)
    b = to_batch(ids, np.zeros(2), [f.name for f in FIELDS])
    tables = [m.sparse.ebc.embedding_bags[f"t_{f.name}"].weight for f in FIELDS]
    return b, torch.stack([torch.stack([tables[j][ids[i, j]] for j in range(3)]) for i in range(2)])


@pytest.mark.parametrize("kind", ["lr", "fm", "dnn", "deepfm"])
def test_parts_add_up_to_the_paper_formula(kind):
    m = _model(kind)
    b, rows = _batch_and_rows(m)
    v, w = rows[:, :, :4], rows[:, :, 4:].sum(-1)
    first = w.sum(1)
    pair = sum((v[:, i] * v[:, j]).sum(1) for i, j in itertools.combinations(range(3), 2))
    deep = m.deep(v) if m.deep is not None else 0
    expected = {"lr": m.bias + first, "fm": m.bias + first + pair, "dnn": m.bias + deep,
                "deepfm": m.bias + first + pair + deep}[kind]
    with torch.no_grad():
        assert_close(m(b.kjt), expected.detach())


def test_one_table_per_field_shared_by_fm_and_deep():
    m = _model("deepfm")
    names = sorted(n for n, _ in m.sparse.ebc.named_parameters())
    assert names == ["embedding_bags.t_a.weight", "embedding_bags.t_b.weight", "embedding_bags.t_c.weight"]
    assert m.sparse.ebc.embedding_bags["t_b"].weight.shape == (20, 4 + FIRST_ORDER_DIM)
    # the deep part reads the same V as the FM part: its input width is F * D
    assert m.deep.mlp[0].in_features == 3 * 4


def test_paper_defaults_and_one_sigmoid():
    m = DeepFM(FIELDS)
    linears = [x for x in m.deep.mlp if isinstance(x, torch.nn.Linear)]
    assert [l.out_features for l in linears] == [400, 400, 400, 1]
    assert [x.p for x in m.deep.mlp if isinstance(x, torch.nn.Dropout)] == [0.5, 0.5, 0.5]
    assert_close(predict_proba(torch.tensor([0.0, 2.0])), torch.sigmoid(torch.tensor([0.0, 2.0])))


def test_fields_must_share_one_dim():
    with pytest.raises(ValueError, match="one embedding dim"):
        DeepFM([FieldSpec("a", 10, 4), FieldSpec("b", 10, 8)])


@pytest.mark.parametrize("kind", ["lr", "fm", "dnn", "deepfm"])
def test_l2_penalty_is_the_squared_norm_of_the_rows_the_model_uses(kind):
    m = _model(kind)
    b, rows = _batch_and_rows(m)
    v_sq, w_sq = (rows[:, :, :4] ** 2).sum((1, 2)), (rows[:, :, 4:] ** 2).sum((1, 2))
    expected = {"lr": w_sq, "fm": v_sq + w_sq, "dnn": v_sq, "deepfm": v_sq + w_sq}[kind]
    with torch.no_grad():
        logit, l2 = m(b.kjt, with_l2=True)
        assert_close(l2, expected)
        assert_close(logit, m(b.kjt))
