"""The two-tower DeepFM for recall (docs/recall.md; issue 16): the score of a user and an item is one dot
product, so items can be retrieved from the whole catalogue by nearest-neighbour search over their
precomputed vectors.

Shapes: B = batch, F = fields, D = embedding dim, U / I = the user tower's / item tower's fields (user
and context fields / item fields: the manifest's ``FieldInfo.side``), O = ``tower_dim``.

The tables are DeepFM's (deepfm.model.SparseArch: one EmbeddingBagCollection, rows [V_f | w_f (4 parts)],
sharded by DMP; a field read by both towers is one table). With Vec_U = sum_{f in U} V_f and Vec_I =
sum_{f in I} V_f, the FM's user x item cross terms are sum_{a in U, b in I} <V_a, V_b> = <Vec_U, Vec_I>:
what DeepFM's pairwise term over all fields adds beyond the pairs within a side. The item's first-order
weight w_I = sum_{f in I} sum(w_f) rides as one more dimension (the user's is 1), and each side has an MLP
over its fields' V concatenated:

    u = [Vec_U, 1,   MLP_U(concat_{f in U} V_f)]       [B, D + 1 + O]
    v = [Vec_I, w_I, MLP_I(concat_{f in I} V_f)]       [B, D + 1 + O]
    score = <u, v> = <Vec_U, Vec_I> + w_I + <MLP_U, MLP_I>

The user's own first-order weights and the within-side pairs are the same for every item of a user, so
they do not change a user's ranking and are left out. ``u`` reads no item field, and ``v`` no user field.

Losses (:class:`TwoTowerTrain`):

- ``softmax``: in-batch sampled softmax with the logQ correction (Yi et al., "Sampling-Bias-Corrected
  Neural Modeling for Large Corpus Item Recommendations", RecSys 2019): for the positives i of this rank
  and the items j of every rank's batch, gathered with their gradients (so the negatives are global),
  logit_ij = <u_i, v_j> / temperature - log_q(item_j), where q is the item's frequency among the train
  positives (the catalogue's ``log_q``): a popular item is a negative in many batches, and the
  correction stops the model from learning to push popular items down for that. An accidental hit (a
  column j != i holding row i's own item) is masked with -inf; so is the column of a labelled negative
  (a row with label 0: the featurize job's random negatives are not in-batch positives).
  loss = mean over this rank's positives of cross_entropy(logit_i., i).
- ``pointwise``: BCE(<u, v>, label) on the train split's labelled rows: its positives and the featurize
  job's random negatives (``recall.random_negatives`` > 0). They are drawn uniformly from the catalogue,
  so their ``sample_prob`` is one constant (1 / items): a logQ-like correction would shift every
  negative's logit by the same amount (what the output layers' biases absorb) and change no ranking,
  so none is applied.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.fx
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from deepfm.model import FieldSpec, SparseArch, hidden_layers
from pipeline import layout

if TYPE_CHECKING:
    from deepfm.inputs import Batch

USER_SIDES = ("user", "context")     # the user tower's fields (pipeline.contract.FeatureContract.side("user"))
ITEM_SIDES = ("item",)
LOSSES = ("softmax", "pointwise")


class Tower(nn.Module):
    """One side's MLP: its fields' V concatenated [B, S D] -> [B, O]; ReLU and dropout in the hidden layers,
    a linear output."""

    def __init__(self, in_features: int, hidden: Sequence[int], out: int, dropout: float,
                 device: torch.device | str = "cpu"):
        super().__init__()
        layers, width = hidden_layers(in_features, hidden, dropout, device=device)
        layers.append(nn.Linear(width, out, device=device))
        self.mlp = nn.Sequential(*layers)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(v.flatten(1))


class TwoTower(nn.Module):
    """``forward(kjt) -> score [B]`` of each row's user and item, ``user_vectors(kjt)`` / ``item_vectors(kjt)``
    -> [B, D + 1 + O] (see the module's docstring); :meth:`towers` does both from looked-up rows."""

    def __init__(self, fields: Sequence[FieldSpec], tower_hidden: Sequence[int] = (128, 64), tower_dim: int = 32,
                 dropout: float = 0.0, sparse_device: torch.device | str = "cpu",
                 dense_device: torch.device | str = "cpu", init_scale: float = 0.0):
        super().__init__()
        self.sparse = SparseArch(fields, sparse_device, init_scale)
        names = [f.name for f in fields]
        self.user_fields = [f.name for f in fields if f.side in USER_SIDES]
        self.item_fields = [f.name for f in fields if f.side in ITEM_SIDES]
        if not self.user_fields or not self.item_fields:
            raise ValueError(f"two_tower needs fields of side item and of side user/context; got sides "
                             f"{sorted({f.side for f in fields})}")
        self.user_idx = [names.index(n) for n in self.user_fields]
        self.item_idx = [names.index(n) for n in self.item_fields]
        d = self.sparse.dim
        self.tower_dim = tower_dim
        self.user_tower = Tower(len(self.user_idx) * d, tower_hidden, tower_dim, dropout, dense_device) if tower_dim else None
        self.item_tower = Tower(len(self.item_idx) * d, tower_hidden, tower_dim, dropout, dense_device) if tower_dim else None
        self.out_dim = d + 1 + tower_dim

    def user_of(self, v: torch.Tensor) -> torch.Tensor:
        """V [B, F, D] -> u [B, D + 1 + O] = [Vec_U, 1, MLP_U]: the user tower's fields only."""
        vu = v[:, self.user_idx]
        parts = [vu.sum(1), vu.new_ones(vu.shape[0], 1)]
        if self.user_tower is not None:
            parts.append(self.user_tower(vu).to(vu.dtype))
        return torch.cat(parts, 1)

    def item_of(self, v: torch.Tensor, w4: torch.Tensor) -> torch.Tensor:
        """V [B, F, D], first-order parts [B, F, 4] -> v [B, D + 1 + O] = [Vec_I, w_I, MLP_I]: the item fields only."""
        vi = v[:, self.item_idx]
        parts = [vi.sum(1), w4[:, self.item_idx].sum((1, 2)).unsqueeze(1).to(vi.dtype)]
        if self.item_tower is not None:
            parts.append(self.item_tower(vi).to(vi.dtype))
        return torch.cat(parts, 1)

    def towers(self, v: torch.Tensor, w4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_of(v), self.item_of(v, w4)

    def user_vectors(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.user_of(self.sparse(kjt)[0])

    def item_vectors(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.item_of(*self.sparse(kjt))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        u, i = self.towers(*self.sparse(kjt))
        return (u * i).sum(1)


def in_batch_softmax_loss(u: torch.Tensor, items: torch.Tensor, item_index: torch.Tensor, log_q: torch.Tensor,
                          labels: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """The in-batch sampled softmax (the module's docstring) of this rank's rows: user vectors u [B, K] and
    item vectors [B, K] of the same rows, the rows' item_index [B], log_q [B] and labels [B]. In a process
    group of more than one rank every rank's item vectors are gathered with their gradients (every rank
    calls this with the same B), so the gradient of rank r's loss reaches rank s's items; the loss is the
    mean over this rank's positives (a batch without any: 0, still connected to the graph). ``gather``
    False: this rank's items alone (a reference on a whole batch in one process).

        u = [[1, 0], [0, 1]], items = [[2, 0], [0, 1]], log_q 0, temperature 1, distinct items
        -> mean(-log softmax([2, 0])[0], -log softmax([0, 1])[1])
    """
    b = u.shape[0]
    positive = labels > 0.5
    if gather and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        all_items = torch.cat(dist_nn.all_gather(items.contiguous()), 0)       # with gradients back to each rank
        meta = torch.stack([item_index.to(torch.float64), log_q.to(torch.float64), positive.to(torch.float64)], 1)
        gathered = [torch.empty_like(meta) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, meta.contiguous())
        all_meta = torch.cat(gathered, 0)
        all_index, all_log_q, all_positive = all_meta[:, 0].long(), all_meta[:, 1].float(), all_meta[:, 2] > 0.5
    else:
        rank, all_items, all_index, all_log_q, all_positive = 0, items, item_index, log_q.float(), positive
    own = rank * b + torch.arange(b, device=u.device)
    logits = u.float() @ all_items.float().T / temperature - all_log_q.unsqueeze(0)        # [B, W B]
    masked = item_index.unsqueeze(1) == all_index.unsqueeze(0)                              # accidental hits
    masked[torch.arange(b, device=u.device), own] = False                                   # ... not the row itself
    masked |= ~all_positive.unsqueeze(0)                                                    # labelled negatives
    logits = logits.masked_fill(masked, float("-inf"))
    if not bool(positive.any()):
        return (u.sum() + all_items.sum()) * 0.0
    return F.cross_entropy(logits[positive], own[positive])


torch.fx.wrap("in_batch_softmax_loss")      # a leaf for TorchRec's train pipeline tracer (it holds collectives)


class TwoTowerTrain(nn.Module):
    """The train wrapper (deepfm.model.DeepFMTrain's shape): ``forward(batch) -> (loss, (loss, scores,
    labels))``, the inner loss and scores detached; ``loss`` softmax or pointwise (module docstring),
    plus ``embedding_l2`` x the mean over rows of the looked-up rows' squared norms (V of every field, w
    of the item fields: the parts the model uses). ``bf16``: the towers under bf16 autocast, the loss in
    fp32. Evaluation calls :attr:`model` itself."""

    def __init__(self, model: TwoTower, loss: str = "softmax", temperature: float = 0.05, embedding_l2: float = 0.0,
                 bf16: bool = False, device_type: str = "cpu"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
        self.model = model
        self.loss = loss
        self.temperature = temperature
        self.embedding_l2 = embedding_l2
        self.bf16 = bf16
        self.device_type = device_type
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: "Batch") -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            v, w4 = self.model.sparse(batch.kjt)
            u, i = self.model.towers(v, w4)
        u, i = u.float(), i.float()
        scores = (u * i).sum(1)
        if self.loss == "softmax":
            loss = in_batch_softmax_loss(u, i, batch.recall[layout.ITEM_INDEX], batch.recall[layout.LOG_Q], batch.labels,
                                         self.temperature)
        else:
            loss = self.loss_fn(scores, batch.labels)
        if self.embedding_l2:
            wi = w4[:, self.model.item_idx]
            loss = loss + self.embedding_l2 * ((v.float() ** 2).sum((1, 2)) + (wi.float() ** 2).sum((1, 2))).mean()
        return loss, (loss.detach(), scores.detach(), batch.labels)
