"""DeepFM parts against hand-computed values (unsharded, one process)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from deepfm.cluster import native_bf16, resolve_bf16
from deepfm.inputs import to_batch
from deepfm.model import FIRST_ORDER_DIM, ByteDropout, DeepFM, DeepFMTrain, FieldSpec, FMInteraction, predict_proba
from deepfm.trainconf import DEFAULT_TRAIN_CONFIG, TrainConfigError, load_train_config

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
    assert [x.p for x in m.deep.mlp if isinstance(x, ByteDropout)] == [0.5, 0.5, 0.5]
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
        l2 = m.embedding_l2(*m.sparse(b.kjt))
        assert_close(l2, expected)
        # the train wrapper adds its mean to the log loss of the model's logits
        loss, (detached, logit, labels) = DeepFMTrain(m, embedding_l2=0.25)(b)
        assert_close(logit, m(b.kjt))
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, b.labels)
        assert_close(loss, bce + 0.25 * expected.mean())
        assert_close(detached, loss)
        assert labels is b.labels


_ONE_STEP = """
import json, sys
import torch
from deepfm.cluster import init_cluster
from deepfm.inputs import to_batch
from deepfm.model import FieldSpec
from deepfm.sharded import build
from deepfm.trainconf import load_train_config
import numpy as np
cluster = init_cluster(force_cpu=True)
out = {}
for eps in sys.argv[1:]:
    t = build([FieldSpec("a", 10, 4), FieldSpec("b", 6, 4)], load_train_config(None, dict(model="lr", sparse_lr=0.1, sparse_eps=float(eps))), cluster)
    b = to_batch(np.array([[3, 5]]), np.array([1.0]), ["a", "b"])
    sparse = t.model.sparse
    with torch.no_grad():
        w_before = sparse(b.kjt)[1]
    loss, (_, logit, _) = t.dmp(b)      # the train wrapper: log loss of the logits (embedding_l2 0)
    t.optimizer.zero_grad()
    loss.backward()
    t.optimizer.step()
    with torch.no_grad():
        w_after = sparse(b.kjt)[1]
    out[eps] = {"g": (torch.sigmoid(logit) - 1).item(), "delta": (w_after - w_before).flatten().tolist()}
print(json.dumps(out))
"""
EPS = [1e-8, 0.5]


@pytest.fixture(scope="module")
def one_steps(tmp_path_factory) -> dict:
    """One fused step per eps of EPS, each on a model of its own, in one process of their own (a world of
    one, gloo): {str(eps): {"g": dloss/dlogit, "delta": the first-order values' change}}."""
    script = tmp_path_factory.mktemp("one_step") / "one_step.py"
    script.write_text(_ONE_STEP)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    r = subprocess.run([sys.executable, str(script), *map(str, EPS)], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("eps", EPS)
def test_the_fused_sparse_adagrad_takes_its_eps_from_the_config(eps, one_steps):
    """One step of the fused (FBGEMM) Adagrad on a row seen once moves each value by
    -lr * g / (sqrt(g^2) + eps): eps near 0 makes it a step of lr whatever the gradient, a larger eps
    scales it with the gradient."""
    out = one_steps[str(eps)]
    g = out["g"]                   # dloss/dlogit, the gradient of each first-order value of both rows
    assert g < 0
    expected = -0.1 * g / (abs(g) + eps)
    assert len(out["delta"]) == 2 * FIRST_ORDER_DIM
    for d in out["delta"]:
        assert d == pytest.approx(expected, rel=1e-4)


def test_the_shipped_training_config_loads_and_bad_keys_and_values_are_named(tmp_path):
    cfg = load_train_config(DEFAULT_TRAIN_CONFIG)
    assert (cfg.model, cfg.hidden, cfg.dropout, cfg.bf16) == ("deepfm", (400, 400, 400), 0.5, "auto")
    assert load_train_config(DEFAULT_TRAIN_CONFIG, {"bf16": False, "epochs": None}).bf16 is False
    bad = tmp_path / "train.yaml"
    bad.write_text("model: deepfm\nbatchsize: 512\n")
    with pytest.raises(TrainConfigError, match=r"^batchsize: unknown key"):
        load_train_config(bad)
    bad.write_text("bf16: sometimes\n")
    with pytest.raises(TrainConfigError, match=r"^bf16: 'sometimes' is not one of true, false, auto"):
        load_train_config(bad)


def test_bf16_auto_follows_the_cpu_flags_and_a_setting_forces_it():
    flags = set(open("/proc/cpuinfo").read().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    cpu = torch.device("cpu")
    assert native_bf16(cpu)[0] is native
    use, why = resolve_bf16("auto", cpu)             # a world of one: no process group, no vote
    assert use is native and why.startswith("bf16: auto, the CPU has")
    assert resolve_bf16(True, cpu) == (True, "bf16: true in the config")
    assert resolve_bf16(False, cpu) == (False, "bf16: false in the config")
