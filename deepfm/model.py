"""DeepFM (Guo et al., IJCAI 2017, arXiv:1703.04247) on TorchRec, in small named parts.

Shapes: B = batch, F = fields, D = embedding dim (the contract's, a multiple of 4).

Every field has one table whose rows hold [V_i (D values) | w_i (4 values)]: V_i is the latent vector
shared by the FM part and the deep part (the paper's key point), w_i the first-order weight, stored as
4 values that are summed (FBGEMM's fused tables need dims divisible by 4, so a dim-1 table is not
possible). One lookup per field serves both.

    y_FM  = w0 + sum_i w_i + 1/2 sum_d [ (sum_i V_id)^2 - sum_i V_id^2 ]      (O(F D))
    y_DNN = MLP(concat_i V_i)
    logit = y_FM + y_DNN;   p = sigmoid(logit), applied only in :func:`predict_proba`

The paper's comparison models come from the same parts switched off: ``lr`` (w0 + first order),
``fm`` (+ pairwise), ``dnn`` (deep part only), ``deepfm`` (all). The rest of the paper's comparison
(FNN, IPNN, OPNN, PNN*, LR&DNN, FM&DNN) and two DeepFM variants (NFM, DeepFM with explicit field
crosses) are :data:`ZOO` kinds: the same tables and lookup, another module in the ``deep`` slot
(deepfm/zoo.py gives each one's formula and shapes).

The model returns logits, always one tensor [B]. Training goes through :class:`DeepFMTrain`, the train
wrapper in the shape of torchrec's ``DLRMTrain`` (torchrec/models/dlrm.py): ``forward(batch) -> (loss,
(loss, logits, labels))``, which TorchRec's ``TrainPipelineSparseDist`` calls as ``model(batch)``. The
loss is the log loss plus, when ``embedding_l2`` > 0, the L2 penalty of the embedding rows the batch
looked up (sum over fields of ||V_i||^2 and ||w_i||^2, for the parts the model uses; mean over rows):
the embedding regulariser of the CTR benchmarks (FuxiCTR's ``embedding_regularizer``, DeepCTR's
``l2_reg_embedding``), applied lazily to the rows a batch touches. It goes into the loss, so it works
with any sparse optimizer and sharding (FBGEMM's fused CPU Adagrad ignores ``weight_decay``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

if TYPE_CHECKING:
    from deepfm.inputs import Batch
    from pipeline.manifest import FieldInfo

FIRST_ORDER_DIM = 4
PARTS = {"lr": (True, False, False), "fm": (True, True, False), "dnn": (False, False, True),
         "deepfm": (True, True, True)}
ZOO = ("fnn", "ipnn", "opnn", "pnn_star", "wide_deep", "fm_dnn", "nfm", "deepfm_cross")   # built by deepfm.zoo
TOWERS = ("two_tower",)         # recall: deepfm.two_tower.TwoTower, on the same tables
KINDS = (*PARTS, *ZOO, *TOWERS)  # every model kind; deepfm.trainconf.MODELS names the same (tests say so)


def has_hidden(kind: str) -> bool:
    """Whether the kind has hidden layers that ``hidden`` shapes: all but lr, fm and two_tower (whose
    towers are ``tower_hidden``)."""
    return kind in ZOO or (kind in PARTS and PARTS[kind][2])


@dataclass(frozen=True)
class FieldSpec:
    """A field's table as the model builds it, from the manifest's ``FieldInfo`` (:meth:`of`): ``pooling``
    is how a list-valued field's rows are pooled (a single-valued field has one row: sum), ``side`` which
    tower of the two-tower model reads it (user, item, or context = the user's)."""

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: str = "sum"
    side: str = "context"

    @classmethod
    def of(cls, info: "FieldInfo") -> "FieldSpec":
        return cls(info.name, info.num_embeddings, info.embedding_dim, info.pooling or "sum", info.side)


def table_name(field: str) -> str:
    return f"t_{field}"


POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


class SparseArch(nn.Module):
    """KJT with one id per field per row -> V [B, F, D] and the first-order weights' 4 parts [B, F, 4].

    A list-valued field (``pooling`` sum or mean) has any number of ids a row; its table pools their rows
    (TorchRec's ``PoolingType``), so it is one [D + 4] vector a row like any other field, and every model
    reads [B, F, D] unchanged: genres [Comedy, Drama] with mean pooling -> (row_Comedy + row_Drama) / 2.

    ``latents`` > 1 widens every row to ``latents`` latent vectors side by side, V [B, F, latents * D]
    (``dim`` is that width): fm_dnn's FM part and deep part each have their own (deepfm.zoo)."""

    def __init__(self, fields: Sequence[FieldSpec], device: torch.device | str = "cpu", init_scale: float = 0.0,
                 latents: int = 1):
        """``init_scale`` > 0: rows start uniform in [-init_scale, init_scale] in every table; 0: TorchRec's
        default, uniform in +-sqrt(1 / rows), which starts small tables (bucketized fields) far from zero."""
        super().__init__()
        dims = {f.embedding_dim for f in fields}
        if len(dims) != 1:
            raise ValueError(f"DeepFM needs one embedding dim for all fields (FM inner products); got {sorted(dims)}")
        self.dim = dims.pop() * latents
        self.fields = [f.name for f in fields]
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=table_name(f.name), embedding_dim=self.dim + FIRST_ORDER_DIM,
                                       num_embeddings=f.num_embeddings, feature_names=[f.name],
                                       pooling=POOLINGS[f.pooling],
                                       weight_init_min=-init_scale if init_scale > 0 else None,
                                       weight_init_max=init_scale if init_scale > 0 else None) for f in fields],
            device=torch.device(device))

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.ebc(kjt).to_dict()     # by key: a sharded EBC may return its keys in another order
        e = torch.stack([pooled[f] for f in self.fields], dim=1)      # [B, F, D + 4]
        return e[:, :, :self.dim], e[:, :, self.dim:]


class FMInteraction(nn.Module):
    """Pairwise term: V [B, F, D] -> [B], 1/2 sum_d ((sum_i V_id)^2 - sum_i V_id^2) = sum_{i<j} <V_i, V_j>."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        s = v.sum(1)
        return 0.5 * (s * s - (v * v).sum(1)).sum(1)


class ByteDropout(nn.Module):
    """Inverted dropout whose mask is drawn from random bytes: [*] -> [*], the same semantics as
    ``nn.Dropout(p)`` (each element kept with probability k, kept ones scaled by 1 / k, identity in
    eval mode), at a fraction of its cost on a CPU.

    ``F.dropout`` draws one Bernoulli per element; here one 64-bit random word gives 8 elements a byte
    each, and an element is kept when its byte is below ``round((1 - p) * 256)``. So the keep probability
    k is that threshold / 256 (exactly 0.5 at the paper's p = 0.5, within 1/512 of 1 - p otherwise) and
    the scale is 1 / k, so that every element's expectation is unchanged. Measured on the Intel Xeon of
    2026-12-01 (one thread, [2048, 400], forward + backward): ``F.dropout`` 13.3 ms, this 3.2 ms.

    The bytes come from a generator of its own, seeded on first use from ``torch.initial_seed()`` and the
    rank, so ranks draw different masks (one shared seed would give every rank the same mask sequence)
    and a run is reproducible from its seed.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout {p} is not in [0, 1)")
        self.p = p
        self.threshold = min(256, max(1, round((1.0 - p) * 256)))
        self.scale = 256.0 / self.threshold
        self._gen: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._gen.get(device)
        if g is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            g = torch.Generator(device=device)
            g.manual_seed((torch.initial_seed() * 1_000_003 + rank) % (1 << 63))
            self._gen[device] = g
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 256:
            return x
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device)
        words.random_(-(1 << 63), None, generator=self._generator(x.device))
        keep = words.view(torch.uint8)[:n].view(x.shape) < self.threshold
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}, keep={self.threshold}/256"


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def hidden_layers(in_features: int, hidden: Sequence[int], dropout: float, activation: str = "relu",
                  device: torch.device | str = "cpu") -> tuple[list[nn.Module], int]:
    """The hidden layers a(l+1) = dropout(act(W a(l) + b)), [B, in_features] -> [B, hidden[-1]], and the
    last one's width (``in_features`` when ``hidden`` is empty)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h, device=device), ACTIVATIONS[activation](), ByteDropout(dropout)]
        width = h
    return layers, width


class DeepArch(nn.Module):
    """V [B, F, D] (or any [B, X]) -> [B]: an MLP over the concatenated embeddings, ReLU (or ``activation``)
    and dropout, linear output."""

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float, device: torch.device | str = "cpu",
                 activation: str = "relu"):
        super().__init__()
        layers, width = hidden_layers(in_features, hidden, dropout, activation, device)
        layers.append(nn.Linear(width, 1, device=device))
        self.mlp = nn.Sequential(*layers)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(v.flatten(1)).squeeze(1)


class LogitParts(nn.Module):
    """The parts after the lookup, which DeepFM and its exported form (deepfm.export) share: ``bias`` (w0),
    ``fm``, ``deep`` and the flags of the parts in use; :meth:`logits` adds them up. ``fm`` and ``deep``
    are any modules V [B, F, D] -> [B]: FMInteraction and DeepArch for the paper's four kinds, the
    modules of deepfm.zoo for the others, so the exported form holds every kind the same way."""

    bias: nn.Parameter
    fm: nn.Module
    deep: nn.Module | None
    use_first: bool
    use_fm: bool

    def logits(self, v: torch.Tensor, w4: torch.Tensor) -> torch.Tensor:
        """The looked-up V [B, F, D] and first-order parts [B, F, 4] -> logit [B] = w0 + first + FM + deep."""
        logit = self.bias.expand(v.shape[0])
        if self.use_first:
            logit = logit + w4.sum((1, 2))
        if self.use_fm:
            logit = logit + self.fm(v)
        if self.deep is not None:
            logit = logit + self.deep(v)
        return logit


class DeepFM(LogitParts):
    """The whole model: ``forward(kjt) -> logits [B]``; the parts it uses come from ``kind`` (:data:`PARTS`,
    or :data:`ZOO`: deepfm.zoo.zoo_parts). ``crosses``: the field pairs deepfm_cross crosses (others
    ignore them)."""

    def __init__(self, fields: Sequence[FieldSpec], kind: str = "deepfm", hidden: Sequence[int] = (400, 400, 400),
                 dropout: float = 0.5, sparse_device: torch.device | str = "cpu",
                 dense_device: torch.device | str = "cpu", init_scale: float = 0.0,
                 crosses: Sequence[Sequence[str]] = ()):
        super().__init__()
        if kind not in KINDS or kind in TOWERS:
            raise ValueError(f"model {kind!r} is not one of {', '.join(k for k in KINDS if k not in TOWERS)} "
                             "(two_tower: deepfm.two_tower.TwoTower)")
        self.kind = kind
        if kind in PARTS:
            self.use_first, self.use_fm, self.use_deep = PARTS[kind]
            self.sparse = SparseArch(fields, sparse_device, init_scale)
            self.bias = nn.Parameter(torch.zeros(1, device=dense_device))     # w0
            self.fm = FMInteraction()
            self.deep = DeepArch(len(fields) * self.sparse.dim, hidden, dropout, dense_device) if self.use_deep else None
            return
        from deepfm.zoo import zoo_parts          # deepfm.zoo builds on this module's parts
        parts = zoo_parts(kind, len(fields), fields[0].embedding_dim if fields else 0, hidden, dropout,
                          cross_indices([f.name for f in fields], crosses), dense_device)
        self.use_first, self.use_fm, self.use_deep = parts.use_first, parts.use_fm, True
        self.sparse = SparseArch(fields, sparse_device, init_scale, latents=parts.latents)
        self.bias = nn.Parameter(torch.zeros(1, device=dense_device))
        self.fm = parts.fm if parts.fm is not None else FMInteraction()
        self.deep = parts.deep

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.logits(*self.sparse(kjt))

    def embedding_l2(self, v: torch.Tensor, w4: torch.Tensor) -> torch.Tensor:
        """Per row [B]: the squared L2 norm of the looked-up rows, of the parts the model uses (V for FM
        and deep, w for the first order)."""
        l2 = v.new_zeros(v.shape[0])
        if self.use_fm or self.deep is not None:
            l2 = l2 + (v * v).sum((1, 2))
        if self.use_first:
            l2 = l2 + (w4 * w4).sum((1, 2))
        return l2


def cross_indices(names: Sequence[str], crosses: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """Field-name pairs -> their positions in ``names``: (["I1", "C1", "C2"], [["C1", "C2"]]) -> [(1, 2)]."""
    out = []
    for i, pair in enumerate(crosses):
        missing = [x for x in pair if x not in names]
        if missing or len(pair) != 2:
            raise ValueError(f"crosses[{i}]: {list(pair)} is not a pair of the data's fields")
        out.append((names.index(pair[0]), names.index(pair[1])))
    return out


class DeepFMTrain(nn.Module):
    """The train wrapper (torchrec's ``DLRMTrain`` shape): ``forward(batch) -> (loss, (loss, logits, labels))``,
    the inner loss and logits detached. DistributedModelParallel wraps this module, so the loss is part of
    what TorchRec's ``TrainPipelineSparseDist`` runs.

    loss = BCE(logits, labels) + embedding_l2 * mean_rows(||looked-up rows||^2); ``bf16`` runs the model
    under bf16 autocast (the loss in fp32). Evaluation calls :attr:`model` itself (fp32, logits only).
    """

    def __init__(self, model: DeepFM, embedding_l2: float = 0.0, bf16: bool = False, device_type: str = "cpu"):
        super().__init__()
        self.model = model
        self.embedding_l2 = embedding_l2
        self.bf16 = bf16
        self.device_type = device_type       # autocast needs it as a str (fx traces forward with a proxy batch)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: "Batch") -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            v, w4 = self.model.sparse(batch.kjt)
            logits = self.model.logits(v, w4)
            l2 = self.model.embedding_l2(v, w4) if self.embedding_l2 else None
        logits = logits.float()
        loss = self.loss_fn(logits, batch.labels)
        if l2 is not None:
            loss = loss + self.embedding_l2 * l2.float().mean()
        return loss, (loss.detach(), logits.detach(), batch.labels)


def predict_proba(logit: torch.Tensor) -> torch.Tensor:
    """The one place the sigmoid is applied."""
    return torch.sigmoid(logit.float())
