"""deepfm.zoo's layers and kinds against hand-computed values (unsharded, one process); the settings the
kinds take (deepfm.trainconf) and the starts and refusals they bring (deepfm.launch), on hand-made states."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from deepfm import launch as L
from deepfm.inputs import to_batch
from deepfm.launch import LaunchError, Start
from deepfm.model import KINDS, PARTS, TOWERS, ZOO, DeepFM, FieldSpec, FMInteraction, cross_indices, has_hidden
from deepfm.state import SplitData, TrainState
from deepfm.trainconf import MODELS, TrainConfigError, load_train_config, parse_args, to_overrides
from deepfm.zoo import (BiInteraction, CrossDeepArch, FieldCrosses, InnerProduct, LatentSlice, NFMArch, OuterProduct,
                        ProductNet)

V3 = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]]])          # B=1, F=3, D=2
FIELDS = [FieldSpec("a", 10, 4), FieldSpec("b", 20, 4), FieldSpec("c", 5, 4)]
CROSSES = [["a", "c"], ["b", "c"]]


def _v(b: int = 5, f: int = 4, d: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(b, f, d, dtype=torch.float64)


# --- the layers ------------------------------------------------------------------------------------

def test_inner_product_is_the_pairwise_dots_in_row_major_order():
    assert_close(InnerProduct()(V3), torch.tensor([[11.0, -1.5, -2.5]]))      # <1,2>, <1,3>, <2,3>
    v = _v()
    explicit = torch.stack([(v[:, i] * v[:, j]).sum(1) for i, j in itertools.combinations(range(4), 2)], 1)
    assert_close(InnerProduct()(v), explicit)


def test_outer_product_is_every_pairs_outer_product_summed():
    assert_close(OuterProduct()(V3[:, :2]), torch.tensor([[16.0, 24.0, 24.0, 36.0]]))   # f = [4, 6]
    v = _v()
    explicit = sum(torch.einsum("bd,be->bde", v[:, i], v[:, j]) for i in range(4) for j in range(4))
    assert_close(OuterProduct()(v), explicit.flatten(1))


def test_bi_interaction_is_the_pairwise_elementwise_sum_and_sums_to_the_fm_term():
    assert_close(BiInteraction()(V3), torch.tensor([[5.0, 2.0]]))
    v = _v()
    explicit = sum(v[:, i] * v[:, j] for i, j in itertools.combinations(range(4), 2))
    assert_close(BiInteraction()(v), explicit)
    assert_close(BiInteraction()(v).sum(1), FMInteraction()(v))


def test_field_crosses_are_the_named_pairs_dots():
    assert_close(FieldCrosses([(0, 2)])(V3), torch.tensor([[-1.5]]))
    v = _v()
    pairs = [(3, 0), (1, 2)]
    assert_close(FieldCrosses(pairs)(v), torch.stack([(v[:, a] * v[:, b]).sum(1) for a, b in pairs], 1))
    assert cross_indices(["I1", "C1", "C2"], [["C1", "C2"], ["C2", "I1"]]) == [(1, 2), (2, 0)]
    with pytest.raises(ValueError, match=r"crosses\[0\]: \['C1', 'C9'\] is not a pair of the data's fields"):
        cross_indices(["I1", "C1"], [["C1", "C9"]])


@pytest.mark.parametrize("inner,outer", [(True, False), (False, True), (True, True)])
def test_the_product_layer_feeds_the_first_hidden_layer_beside_z(inner, outer):
    v = _v().float()
    net = ProductNet(4, 3, inner, outer, hidden=(6, 5), dropout=0.0).eval()
    x = [v.flatten(1)]
    if inner:
        x.append(torch.stack([(v[:, i] * v[:, j]).sum(1) for i, j in itertools.combinations(range(4), 2)], 1))
    if outer:
        x.append((v.sum(1)[:, :, None] * v.sum(1)[:, None, :]).flatten(1))
    x_all = torch.cat(x, 1)
    assert net.mlp[0].in_features == 12 + 6 * inner + 9 * outer
    w1, w2, w3 = (layer for layer in net.mlp if isinstance(layer, nn.Linear))
    expected = torch.relu(torch.relu(x_all @ w1.weight.T + w1.bias) @ w2.weight.T + w2.bias) @ w3.weight.T + w3.bias
    with torch.no_grad():
        assert_close(net(v), expected.squeeze(1))


def _bn(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """Batch normalization in eval mode, by hand: (x - running mean) / sqrt(running var + eps) * weight + bias."""
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_nfm_is_an_mlp_over_the_batch_normalized_bi_interaction_vector():
    v = _v().float()
    net = NFMArch(3, hidden=(4,), dropout=0.0).eval()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        net.bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        net.bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        net.bn.bias.copy_(torch.tensor([0.0, 0.5, 1.0]))
    bi = sum(v[:, i] * v[:, j] for i, j in itertools.combinations(range(4), 2))
    w1, w2 = net.mlp[0], net.mlp[3]
    with torch.no_grad():
        h = _bn(net.bn, bi)
        assert_close(net(v), (torch.relu(h @ w1.weight.T + w1.bias) @ w2.weight.T + w2.bias).squeeze(1))


def test_nfms_normalization_gives_embeddings_started_small_a_gradient_of_unit_scale():
    """Rows at +-0.01 make BI(V) ~1e-4; in training mode the batch normalization scales it (and the gradient
    back to V) by 1 / its batch std, so the embeddings learn at the speed of the rest."""
    torch.manual_seed(0)
    v = (torch.rand(256, 6, 3) * 0.02 - 0.01).requires_grad_()
    y = (torch.rand(256) < 0.25).float()
    net = NFMArch(3, hidden=(8,), dropout=0.0).train()
    nn.functional.binary_cross_entropy_with_logits(net(v), y).backward()
    plain = NFMArch(3, hidden=(8,), dropout=0.0).train()
    plain.load_state_dict(net.state_dict())
    plain.bn = nn.Identity()                  # the same weights without the normalization
    v2 = v.detach().clone().requires_grad_()
    nn.functional.binary_cross_entropy_with_logits(plain(v2), y).backward()
    assert v.grad.abs().mean() > 100 * v2.grad.abs().mean()       # 2.8e-4 against 1.1e-6


def test_crosses_join_the_last_hidden_layer_before_the_output_unit():
    v = _v().float()
    net = CrossDeepArch(4, 3, [(0, 1), (2, 3)], hidden=(6, 5), dropout=0.0).eval()
    assert net.out.in_features == 5 + 2
    w1, w2 = net.mlp[0], net.mlp[3]
    last = torch.relu(torch.relu(v.flatten(1) @ w1.weight.T + w1.bias) @ w2.weight.T + w2.bias)
    dots = torch.stack([(v[:, 0] * v[:, 1]).sum(1), (v[:, 2] * v[:, 3]).sum(1)], 1)
    with torch.no_grad():
        assert_close(net(v), (torch.cat([last, dots], 1) @ net.out.weight.T + net.out.bias).squeeze(1))


def test_a_latent_slice_gives_its_part_its_own_vectors():
    v = _v(d=6)
    assert_close(LatentSlice(FMInteraction(), 3, 6)(v), FMInteraction()(v[:, :, 3:]))


# --- the kinds, assembled --------------------------------------------------------------------------

def _model(kind: str) -> DeepFM:
    torch.manual_seed(1)
    m = DeepFM(FIELDS, kind, hidden=(8, 8), dropout=0.0, crosses=CROSSES)
    with torch.no_grad():
        for p in m.sparse.ebc.parameters():
            p.copy_(torch.randn_like(p))
    return m.eval()


def _rows(m: DeepFM) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits for two rows, and the table rows [B, F, width] it looks up for them."""
    ids = np.array([[1, 2, 3], [0, 19, 4]], dtype=np.int32)
    b = to_batch(ids, np.zeros(2), [f.name for f in FIELDS])
    tables = [m.sparse.ebc.embedding_bags[f"t_{f.name}"].weight for f in FIELDS]
    rows = torch.stack([torch.stack([tables[j][ids[i, j]] for j in range(3)]) for i in range(2)])
    with torch.no_grad():
        return m(b.kjt), rows.detach()


def _mlp(seq: nn.Sequential, x: torch.Tensor, act=torch.relu) -> torch.Tensor:
    """Linear layers of ``seq`` applied by hand, ``act`` between them (dropout 0)."""
    linears = [layer for layer in seq if isinstance(layer, nn.Linear)]
    for layer in linears[:-1]:
        x = act(x @ layer.weight.T + layer.bias)
    return (x @ linears[-1].weight.T + linears[-1].bias).squeeze(1)


def _pairs(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([(v[:, i] * v[:, j]).sum(1) for i, j in itertools.combinations(range(v.shape[1]), 2)], 1)


@pytest.mark.parametrize("kind", ZOO)
def test_each_zoo_kind_is_its_formula_on_the_looked_up_rows(kind):
    m = _model(kind)
    logit, rows = _rows(m)
    d = 4
    v, w = rows[:, :, :d], rows[:, :, -4:].sum((1, 2))
    z = v.flatten(1)
    fm = _pairs(v).sum(1)
    with torch.no_grad():
        seq = m.deep.part.mlp if kind == "fm_dnn" else m.deep.mlp
        f = v.sum(1)
        outer = (f[:, :, None] * f[:, None, :]).flatten(1)
        expected = {
            "fnn": lambda: _mlp(seq, z),
            "ipnn": lambda: _mlp(seq, torch.cat([z, _pairs(v)], 1), torch.tanh),
            "opnn": lambda: _mlp(seq, torch.cat([z, outer], 1)),
            "pnn_star": lambda: _mlp(seq, torch.cat([z, _pairs(v), outer], 1)),
            "wide_deep": lambda: w + _mlp(seq, z),
            # FM on V' = the row's first D values, the DNN on V'' = the next D
            "fm_dnn": lambda: w + fm + _mlp(seq, rows[:, :, d:2 * d].flatten(1)),
            "nfm": lambda: w + _mlp(seq, _bn(m.deep.bn, sum(v[:, i] * v[:, j]
                                                            for i, j in itertools.combinations(range(3), 2)))),
            "deepfm_cross": lambda: w + fm + _cross_out(m, z, v),
        }[kind]()
        assert_close(logit, m.bias + expected)


def _cross_out(m: DeepFM, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h = z
    for layer in m.deep.mlp:
        if isinstance(layer, nn.Linear):
            h = torch.relu(h @ layer.weight.T + layer.bias)
    dots = torch.stack([(v[:, 0] * v[:, 2]).sum(1), (v[:, 1] * v[:, 2]).sum(1)], 1)    # a.c, b.c
    return (torch.cat([h, dots], 1) @ m.deep.out.weight.T + m.deep.out.bias).squeeze(1)


def test_fm_dnn_rows_hold_two_latent_vectors_and_the_rest_one():
    assert _model("fm_dnn").sparse.ebc.embedding_bags["t_b"].weight.shape == (20, 2 * 4 + 4)
    for kind in ZOO:
        if kind != "fm_dnn":
            assert _model(kind).sparse.ebc.embedding_bags["t_b"].weight.shape == (20, 4 + 4), kind


def test_ipnn_has_tanh_and_the_other_deep_parts_relu():
    acts = {k: {type(x).__name__ for x in _model(k).deep.modules() if isinstance(x, (nn.ReLU, nn.Tanh))} for k in ZOO}
    assert acts.pop("ipnn") == {"Tanh"}
    assert all(a == {"ReLU"} for a in acts.values()), acts


def test_the_first_four_kinds_keep_their_checkpoint_keys():
    tables = ["sparse.ebc.embedding_bags.t_a.weight", "sparse.ebc.embedding_bags.t_b.weight",
              "sparse.ebc.embedding_bags.t_c.weight"]
    deep = [f"deep.mlp.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    for kind, want in {"lr": ["bias"] + tables, "fm": ["bias"] + tables, "dnn": ["bias"] + tables + deep,
                       "deepfm": ["bias"] + tables + deep}.items():
        assert list(_model(kind).state_dict()) == want, kind


def test_every_kind_is_a_setting_and_has_hidden_says_which_use_hidden():
    assert set(MODELS) == set(KINDS) and len(MODELS) == len(KINDS) == 13
    assert [k for k in KINDS if not has_hidden(k)] == ["lr", "fm", "two_tower"]     # two_tower: tower_hidden
    assert set(PARTS) | set(ZOO) | set(TOWERS) == set(KINDS)


# --- the settings ----------------------------------------------------------------------------------

def _cfg(**kw):
    return load_train_config(None, kw)


def test_an_unknown_kind_is_refused_by_name():
    with pytest.raises(TrainConfigError, match=r"^model: 'pnn' is not one of deepfm, fm, lr, dnn, fnn, ipnn"):
        _cfg(model="pnn")


@pytest.mark.parametrize("crosses,msg", [
    ([["C1"]], r"^crosses\[0\]: \['C1'\] is not a pair of two different fields"),
    ([["C1", "C1"]], r"^crosses\[0\]: \['C1', 'C1'\] is not a pair"),
    ([["C1", "C2"], ["C2", "C1"]], r"^crosses\[1\]: \['C2', 'C1'\] is crosses\[0\] again"),
    ([["C1", "C2", "C3"]], r"^crosses\[0\]: \['C1', 'C2', 'C3'\] is not a pair"),
    (["C1"], r"^crosses\[0\]: expected a list of strings"),
])
def test_bad_crosses_are_refused_by_name(crosses, msg):
    with pytest.raises(TrainConfigError, match=msg):
        _cfg(model="deepfm_cross", crosses=crosses)


def test_the_settings_each_kind_needs_or_refuses():
    with pytest.raises(TrainConfigError, match=r"^crosses: model deepfm_cross needs at least one pair"):
        _cfg(model="deepfm_cross")
    with pytest.raises(TrainConfigError, match=r"^init_embeddings_from: model fnn starts from the embeddings of a "
                                               r"trained fm run"):
        _cfg(model="fnn")
    with pytest.raises(TrainConfigError, match=r"^init_embeddings_from: only model fnn .*not model dnn"):
        _cfg(model="dnn", init_embeddings_from="/runs/fm")
    assert _cfg(model="fm", crosses=[["C1", "C2"]]).crosses == (("C1", "C2"),)     # other kinds ignore crosses


def test_crosses_and_the_fm_run_round_trip_and_come_from_the_command_line():
    cfg = _cfg(model="deepfm_cross", crosses=[["C1", "C2"], [3, "I1"]])
    assert cfg.crosses == (("C1", "C2"), ("3", "I1"))
    assert load_train_config(None, to_overrides(cfg)) == cfg
    assert to_overrides(cfg)["crosses"] == [["C1", "C2"], ["3", "I1"]]
    _, cli = parse_args(["--data", "d", "--out", "o", "--model", "deepfm_cross", "--crosses", "C1:C2,I1:C3"])
    assert cli.crosses == (("C1", "C2"), ("I1", "C3"))
    _, cli = parse_args(["--data", "d", "--out", "o", "--model", "fnn", "--init-embeddings-from", "runs/fm"])
    assert (cli.model, cli.init_embeddings_from) == ("fnn", "runs/fm")


# --- the launch: crosses by name, fnn's start ------------------------------------------------------

OUT = Path("/runs/fnn")
FM_CKPT = Path("/runs/fm/checkpoints/step_000000030")
SPLITS = {"train": SplitData((0, 1), 31212, 12487), "valid": SplitData((2,), 25000, 6245)}


def _facts(**cfg) -> TrainState:
    return TrainState(world_size=2, feature_fingerprint="9861641918bd503b", contract_fingerprint="4e9972ccdc660129",
                      config=_cfg(**cfg), fields=(FieldSpec("I1", 66, 16), FieldSpec("C1", 20000, 16)),
                      data="/d/feat", splits=dict(SPLITS))


FNN = {"model": "fnn", "init_embeddings_from": "/runs/fm"}


def test_crosses_naming_a_field_the_data_lacks_are_refused_by_name():
    L.check_crosses(_cfg(model="deepfm_cross", crosses=[["C1", "I1"]]), ["I1", "C1"], Path("/d/feat/manifest.json"))
    with pytest.raises(LaunchError) as e:
        L.check_crosses(_cfg(model="deepfm_cross", crosses=[["C1", "I1"], ["C1", "C27"]]), ["I1", "C1"],
                        Path("/d/feat/manifest.json"))
    assert str(e.value) == "crosses[1]: no field C27 in /d/feat/manifest.json (its fields: I1, C1)"


def test_fnn_starts_from_the_fm_runs_tables_unless_it_resumes_or_is_warm_started():
    fm = dataclasses.replace(_facts(model="fm"), global_step=30)
    now = _facts(**FNN)
    assert L.plan_start(OUT, now, None, None, None, None, None, FM_CKPT, fm) == Start(L.EMBEDDINGS, FM_CKPT)
    own = OUT / "checkpoints" / "step_000000010"
    saved = dataclasses.replace(_facts(**FNN), global_step=10)
    assert L.plan_start(OUT, now, own, saved, None, None, None, FM_CKPT, fm) == Start(L.RESUME, own)
    warm = Path("/runs/fnn0/checkpoints/step_000000090")
    assert L.plan_start(OUT, now, None, None, None, warm, saved, FM_CKPT, fm) == Start(L.WARM, warm)


def test_an_fnn_start_from_anything_but_this_datas_fm_tables_is_refused():
    now = _facts(**FNN)
    with pytest.raises(LaunchError, match=r"^init_embeddings_from /runs/fm/checkpoints/step_000000030: a model dnn "
                                          r"checkpoint; fnn starts from an fm run's embeddings"):
        L.plan_start(OUT, now, None, None, None, None, None, FM_CKPT, _facts(model="dnn"))
    other = dataclasses.replace(_facts(model="fm"), feature_fingerprint="0000000000000000")
    with pytest.raises(LaunchError, match=r"made for featurized data with fingerprint 0000000000000000, but this "
                                          r"data's is 9861641918bd503b"):
        L.plan_start(OUT, now, None, None, None, None, None, FM_CKPT, other)
    wider = dataclasses.replace(_facts(model="fm"), fields=(FieldSpec("I1", 66, 16), FieldSpec("C1", 50000, 16)))
    with pytest.raises(LaunchError, match=r"its tables are not this run's \(table C1 50000 x 16; this run has table "
                                          r"C1 20000 x 16\)"):
        L.plan_start(OUT, now, None, None, None, None, None, FM_CKPT, wider)


def test_a_zoo_kinds_hidden_layers_and_deepfm_crosss_pairs_make_another_model():
    for kind, extra in (("nfm", {}), ("deepfm_cross", {"crosses": [["I1", "C1"]]})):
        saved = dataclasses.replace(_facts(model=kind, **extra), global_step=30)
        with pytest.raises(LaunchError, match=rf"holds a run on model {kind} with hidden 400,400,400; this launch asks "
                                              r"for hidden 64,64"):
            L.plan_start(OUT, _facts(model=kind, hidden=[64, 64], **extra), OUT / "ck", saved, None, None, None)
    saved = dataclasses.replace(_facts(model="deepfm_cross", crosses=[["I1", "C1"]]), global_step=30)
    with pytest.raises(LaunchError, match=r"holds a run on model deepfm_cross with crosses I1:C1; this launch asks "
                                          r"for crosses C1:I1"):
        L.plan_start(OUT, _facts(model="deepfm_cross", crosses=[["C1", "I1"]]), OUT / "ck", saved, None, None, None)


def test_retraining_passes_crosses_and_the_fm_run_as_the_trainers_flags():
    from pipeline.retrain.config import TrainSettings, trainer_args
    t = TrainSettings(settings={"crosses": (("C1", "C2"), ("I1", "C3")), "init_embeddings_from": "/runs/fm"})
    args = trainer_args(t)
    assert args[2:] == ["--crosses", "C1:C2,I1:C3", "--init-embeddings-from", "/runs/fm"]
    _, cfg = parse_args(["--data", "d", "--out", "o", "--model", "fnn", *args[2:]])
    assert (cfg.crosses, cfg.init_embeddings_from) == ((("C1", "C2"), ("I1", "C3")), "/runs/fm")
