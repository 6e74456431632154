"""The rest of the DeepFM paper's comparison models, and two DeepFM variants, from the same parts.

Shapes: B = batch, F = fields, D = embedding dim, P = pairs of fields, H = the last hidden layer's width.
V [B, F, D] are the looked-up latent vectors, w_i the first-order weights (deepfm.model.SparseArch: the
same TorchRec tables, sharding, optimizers and checkpoints for every kind); z = concat_i V_i [B, F D].
Each kind is deepfm.model.LogitParts with its own flags and a module of this file in the ``deep`` slot
(``fm`` too for fm_dnn), so the exported form (deepfm.export.ServingDeepFM) holds every kind the same way:

    kind          logit                                                  first  FM   deep slot
    fnn           w0 + MLP(z), the tables from a trained fm run             -     -   DeepArch
    ipnn          w0 + MLP_tanh([z, p_inner])                               -     -   ProductNet
    opnn          w0 + MLP([z, p_outer])                                    -     -   ProductNet
    pnn_star      w0 + MLP([z, p_inner, p_outer])                           -     -   ProductNet
    wide_deep     w0 + sum_i w_i + MLP(z)                                   x     -   DeepArch
    fm_dnn        w0 + sum_i w_i + FM(V') + MLP(concat_i V''_i)             x     x   LatentSlice (both)
    nfm           w0 + sum_i w_i + MLP(BN(BI(V)))                           x     -   NFMArch
    deepfm_cross  w0 + sum_i w_i + FM(V) + W [a(H), <V_a, V_b>_crosses] + b x     x   CrossDeepArch

Where they come from (Guo et al., IJCAI 2017, arXiv:1703.04247, sections 3-4, whose settings are
dropout 0.5, 400-400-400, Adam, "ReLU (tanh only for IPNN)"):

- **fnn** (Zhang et al., ECIR 2016): a DNN over embeddings pre-trained by an FM. Here the DNN reads
  z as the dnn kind does, and the pre-training is the start: the run's tables are loaded from an fm
  run's checkpoint (``init_embeddings_from``: deepfm.launch decides, deepfm.sharded.load_embeddings
  loads the tables only), the dense layers start fresh. The fm run's w_i come along but are unused.
- **ipnn / opnn / pnn_star** (Qu et al., ICDM 2016): a product layer before the first hidden layer,
  l1 = act(W_z z + W_p p + b1), which is one linear layer over [z, p]; then the hidden layers and the
  output unit. tanh in every hidden layer of IPNN, ReLU in OPNN and PNN*, as the paper says.
- **wide_deep** (the paper's LR&DNN): Wide&Deep with the wide part an LR over the raw features (the
  first-order weights, its own parameters) and the DNN over z.
- **fm_dnn** (the paper's FM&DNN): Wide&Deep with an FM as the wide part. The FM and the DNN do not
  share the embedding, which is what DeepFM changes: each table row holds two latent vectors
  [V' | V'' | w] (SparseArch ``latents=2``, still one lookup per field); the FM reads V', the DNN V''.
- **nfm** (He and Chua, SIGIR 2017): Bi-Interaction pooling, the FM's pairwise sum kept as a vector,
  batch-normalized as in the authors' code and fed to an MLP, plus the first order.
- **deepfm_cross** (the Sparrow RecSys DeepFM): DeepFM whose output unit also reads explicit cross
  dot products <V_a, V_b> for the field pairs named in the training config (``crosses``), concatenated
  with the deep part's last hidden layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from deepfm.model import DeepArch, FMInteraction, hidden_layers


class InnerProduct(nn.Module):
    """IPNN's product layer: V [B, F, D] -> p [B, F(F-1)/2], p_k = <V_i, V_j> for the k-th pair i < j in
    row-major order, (0, 1), (0, 2), ..., (F-2, F-1).

        V = [[[1, 2], [3, 4], [0.5, -1]]]  ->  [[11, -1.5, -2.5]]
    """

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        f = v.shape[1]
        i, j = torch.triu_indices(f, f, 1, device=v.device)
        gram = torch.bmm(v, v.transpose(1, 2))                  # [B, F, F]: <V_i, V_j>
        return gram[:, i, j]


class OuterProduct(nn.Module):
    """OPNN's product layer with the sum-pooling trick: V [B, F, D] -> p [B, D * D], p = vec(f f^T) with
    f = sum_i V_i [B, D].

    The outer products of all field pairs, summed, are f f^T: sum_i sum_j V_i V_j^T (every ordered pair,
    i = j included) = (sum_i V_i)(sum_j V_j)^T. Qu et al. use this to bring the layer from O(F^2 D^2)
    to O(D (F + D)); vec flattens row-major, p[d * D + e] = f_d f_e.

        V = [[[1, 2], [3, 4]]]  ->  f = [4, 6]  ->  [[16, 24, 24, 36]]
    """

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        f = v.sum(1)                                            # [B, D]
        return (f.unsqueeze(2) * f.unsqueeze(1)).flatten(1)     # [B, D, D] -> [B, D * D]


class ProductNet(DeepArch):
    """PNN's deep part: V [B, F, D] -> [B], MLP([z, p_inner?, p_outer?]) with z = V flattened [B, F D]:
    the product layer feeds the first hidden layer alongside z, l1 = act(W_z z + W_p p + b1) (a
    linear layer over the concatenation is that sum). Keys as DeepArch's (``mlp.N``)."""

    def __init__(self, fields: int, dim: int, inner: bool, outer: bool, hidden: Sequence[int], dropout: float,
                 activation: str = "relu", device: torch.device | str = "cpu"):
        width = fields * dim + (fields * (fields - 1) // 2 if inner else 0) + (dim * dim if outer else 0)
        super().__init__(width, hidden, dropout, device, activation)
        self.inner = InnerProduct() if inner else None
        self.outer = OuterProduct() if outer else None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        parts = [v.flatten(1)]
        if self.inner is not None:
            parts.append(self.inner(v))
        if self.outer is not None:
            parts.append(self.outer(v))
        return self.mlp(torch.cat(parts, 1)).squeeze(1)


class BiInteraction(nn.Module):
    """NFM's Bi-Interaction pooling: V [B, F, D] -> [B, D], sum_{i<j} V_i (.) V_j (element-wise products)
    = 1/2 [(sum_i V_i)^2 - sum_i V_i^2] element-wise, in O(F D); summed over D it is the FM's pairwise term.

        V = [[[1, 2], [3, 4], [0.5, -1]]]  ->  [[1*3 + 1*0.5 + 3*0.5, 2*4 + 2*-1 + 4*-1]] = [[5, 2]]
    """

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        s = v.sum(1)
        return 0.5 * (s * s - (v * v).sum(1))


class NFMArch(DeepArch):
    """NFM's deep part: V [B, F, D] -> [B], MLP(BN(BI(V))): batch normalization of the pooled [B, D] vector,
    then the hidden layers and the output unit (with no hidden layers, h^T BN(BI(V)): a weighted FM).
    Keys as DeepArch's (``mlp.N``), and ``bn``.

    The batch normalization is He and Chua's (their NeuralFM.py normalizes the Bi-Interaction output), and
    here it is what lets the part learn at all: BI(V) is a sum of products of two embedding values, so with
    rows starting at +-0.01 it starts near 1e-4, its gradient to the embeddings is as small, and Adagrad's
    ``sparse_eps`` (1e-3) damps such steps to nothing. Without it NFM trained to LR's test AUC exactly
    (0.7376 against LR's 0.7376, benchmarks/README.md); normalized, the MLP sees unit-scale inputs and the
    embeddings get gradients scaled up by the same 1 / std."""

    def __init__(self, dim: int, hidden: Sequence[int], dropout: float, device: torch.device | str = "cpu"):
        super().__init__(dim, hidden, dropout, device)
        self.bi = BiInteraction()
        self.bn = nn.BatchNorm1d(dim, device=device)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.bn(self.bi(v))).squeeze(1)


class FieldCrosses(nn.Module):
    """Explicit crosses: V [B, F, D] -> [B, P], c_k = <V_a, V_b> for the k-th pair (a, b) of field
    positions, as the training config's ``crosses`` names them (deepfm.model.cross_indices).

        pairs [(0, 2)], V = [[[1, 2], [3, 4], [0.5, -1]]]  ->  [[-1.5]]
    """

    def __init__(self, pairs: Sequence[tuple[int, int]]):
        super().__init__()
        self.a = [a for a, _ in pairs]
        self.b = [b for _, b in pairs]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return (v[:, self.a] * v[:, self.b]).sum(-1)

    def extra_repr(self) -> str:
        return f"pairs={list(zip(self.a, self.b))}"


class CrossDeepArch(nn.Module):
    """deepfm_cross's deep part: V [B, F, D] -> [B], w^T [a(H), c] + b: the hidden layers over z give
    a(H) [B, H], the crosses c [B, P] (:class:`FieldCrosses`) are concatenated with it, and one output
    unit reads both (the crosses reach the logit through their own weights, not through the MLP)."""

    def __init__(self, fields: int, dim: int, pairs: Sequence[tuple[int, int]], hidden: Sequence[int],
                 dropout: float, device: torch.device | str = "cpu"):
        super().__init__()
        layers, width = hidden_layers(fields * dim, hidden, dropout, "relu", device)
        self.mlp = nn.Sequential(*layers)
        self.crosses = FieldCrosses(pairs)
        self.out = nn.Linear(width + len(pairs), 1, device=device)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.mlp(v.flatten(1)), self.crosses(v)], 1)).squeeze(1)


class LatentSlice(nn.Module):
    """One part on its own latent vectors: V [B, F, k D] -> part(V[:, :, start:stop]) [B]. fm_dnn's rows
    hold [V' | V''] (SparseArch ``latents=2``): its FM reads V' = [0, D), its DNN V'' = [D, 2D)."""

    def __init__(self, part: nn.Module, start: int, stop: int):
        super().__init__()
        self.part, self.start, self.stop = part, start, stop

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.part(v[:, :, self.start:self.stop])

    def extra_repr(self) -> str:
        return f"latents=[{self.start}, {self.stop})"


@dataclass
class ZooParts:
    """What deepfm.model.DeepFM takes from a zoo kind: the flags, the module for the ``deep`` slot (and
    the ``fm`` slot when not the plain FMInteraction), and how many latent vectors a table row holds."""

    use_first: bool
    use_fm: bool
    deep: nn.Module
    fm: nn.Module | None = None
    latents: int = 1


def zoo_parts(kind: str, fields: int, dim: int, hidden: Sequence[int], dropout: float,
              crosses: Sequence[tuple[int, int]] = (), device: torch.device | str = "cpu") -> ZooParts:
    """The parts of ``kind`` (one of deepfm.model.ZOO) for F = ``fields`` of dim D = ``dim``;
    ``crosses``: field positions, for deepfm_cross."""
    if kind == "fnn":
        return ZooParts(False, False, DeepArch(fields * dim, hidden, dropout, device))
    if kind in ("ipnn", "opnn", "pnn_star"):
        inner, outer = kind != "opnn", kind != "ipnn"
        return ZooParts(False, False, ProductNet(fields, dim, inner, outer, hidden, dropout,
                                                 "tanh" if kind == "ipnn" else "relu", device))
    if kind == "wide_deep":
        return ZooParts(True, False, DeepArch(fields * dim, hidden, dropout, device))
    if kind == "fm_dnn":
        return ZooParts(True, True, LatentSlice(DeepArch(fields * dim, hidden, dropout, device), dim, 2 * dim),
                        fm=LatentSlice(FMInteraction(), 0, dim), latents=2)
    if kind == "nfm":
        return ZooParts(True, False, NFMArch(dim, hidden, dropout, device))
    if kind == "deepfm_cross":
        if not crosses:
            raise ValueError("model deepfm_cross needs crosses: at least one pair of fields")
        return ZooParts(True, True, CrossDeepArch(fields, dim, crosses, hidden, dropout, device))
    raise ValueError(f"model {kind!r} is not a zoo kind")
