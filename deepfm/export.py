"""python -m deepfm.export --run RUN_DIR [--checkpoint best|latest|PATH] [--data FEATURIZED] --out model.pt2
    [--items ITEMS.parquet] [--index flat|hnsw]

One plain process (no torchrun): the sharded checkpoint is loaded into the unsharded model
(``torch.distributed.checkpoint`` needs no process group to read one), and written as one self-contained
``torch.export`` archive that deepfm.serving loads with torch alone:

- the graph ``ids int64 [B, W] -> logit float32 [B]`` (B dynamic; the featurized data's fields in their
  order, W = F columns, a list-valued field ``max_length`` of them: pipeline.artifact.InputLayout), the
  lookup as one plain table with per-field row offsets (``aten.embedding``: no torchrec or fbgemm op; a
  list field's rows masked where padded and summed or averaged as its pooling says), the dense parts the
  model's own (:class:`deepfm.model.LogitParts`), and the negative sampling correction ln(neg_sample_rate)
  added, so that ``sigmoid(logit)`` is calibrated to the traffic before sampling;
- the card (pipeline.artifact: the data's manifest, the training settings, the valid and test metrics,
  the torch version, a golden set of raw rows and the probabilities the eager model gave them) and the
  vocabulary of the ``min_count`` fields.

Model two_tower (recall, docs/recall.md) exports its two sides apart:

- ``--out``: the user tower, ``ids int64 [B, W_user] -> vector float32 [B, K]`` over the user and context
  fields alone (the same plain lookup over their tables only, then [Vec_U, 1, MLP_U]), with a card of
  graph ``user_vector`` whose golden rows carry their vectors (deepfm.serving.UserEncoder loads it);
- ``--items`` (default ``items.parquet`` beside ``--out``): every catalogue item's vector
  (deepfm.retrieval.ItemVectors, keyed by the raw item key), the featurized ``catalogue/`` through a plain
  item tower and checked against the eager model's ``item_vectors``; the card records their digest;
- ``--index flat|hnsw``: a faiss inner-product index over them (``items.<kind>.faiss`` beside), and in
  the card its recall@K against the exact search for the held-out split's user vectors.

Before anything is written the graph is run beside the eager model on rows of the test split (refused
when a logit differs by more than 1e-5, a vector by more than 1e-4); the file is written beside
``--out`` and renamed into place, then loaded back and its golden set checked. Refused, naming the
cause: an incomplete checkpoint, and one whose feature fingerprint is not the data's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from deepfm import sharded
from deepfm.model import FIRST_ORDER_DIM, TOWERS, DeepFM, LogitParts, predict_proba, table_name
from deepfm.retrieval import ItemVectors, ann_recall, build_index, exact_topk, search
from deepfm.two_tower import TwoTower
from deepfm.state import TrainState
from deepfm.trainconf import to_overrides
from pipeline import artifact as A
from pipeline import layout
from pipeline.contract import FeatureContract
from pipeline.manifest import Manifest, ManifestError, open_featurized
from pipeline.rows import RowFeaturizer, split_line

log = logging.getLogger("deepfm.export")
CHECK_ROWS = 4096            # test rows run through the graph and the eager model before writing
LOGIT_TOLERANCE = 1e-5
VECTOR_TOLERANCE = A.VECTOR_TOLERANCE
GOLDEN_LINES = 24            # raw lines of the test day in the golden set (besides the made-up edge rows)
INDEX_K = 100                # the index's recall is measured at this K (or the catalogue's size)
INDEX_QUERIES = 1000         # ... for this many user vectors of the held-out split


class ExportError(RuntimeError):
    """An export that cannot be made; the message names the cause."""


class PlainLookup(nn.Module):
    """The tables of some fields stacked into one [sum rows_i, E]: ``forward(ids int64 [B, W]) -> [B, S, E]``,
    one pooled row per field (``layout``: pipeline.artifact.InputLayout). Field j's id k is row
    ``offset_j + k``; one ``aten.embedding`` reads every column. Without list fields (W = S) that is the
    whole lookup; a list field's padded columns (:data:`pipeline.artifact.PAD_ID`) read row 0 of its table
    and are masked out, its rows summed, or divided by their count for mean pooling (TorchRec's pooling).
    """

    def __init__(self, tables: Sequence[torch.Tensor], layout: A.InputLayout):
        super().__init__()
        self.table = nn.Parameter(torch.cat(list(tables)), requires_grad=False)
        starts = np.cumsum([0] + [t.shape[0] for t in tables[:-1]])
        self.register_buffer("row_offsets", torch.tensor(np.repeat(starts, layout.widths), dtype=torch.int64))
        self.segments = list(zip(layout.starts, layout.widths, layout.poolings))
        self.has_lists = layout.has_lists

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offsets: torch.Tensor = self.row_offsets  # type: ignore[assignment]  # a buffer [W]
        if not self.has_lists:
            return nn.functional.embedding(ids + offsets, self.table)           # [B, F, E]
        mask = ids != A.PAD_ID                                                  # [B, W]
        e = nn.functional.embedding(ids.clamp(min=0) + offsets, self.table)     # [B, W, E]
        e = e * mask.unsqueeze(-1).to(e.dtype)
        pooled = []
        for start, width, pooling in self.segments:
            if width == 1:
                pooled.append(e[:, start])
                continue
            x = e[:, start:start + width].sum(1)                                # [B, E]
            if pooling == "mean":
                x = x / mask[:, start:start + width].sum(1, keepdim=True).clamp(min=1).to(x.dtype)
            pooled.append(x)
        return torch.stack(pooled, 1)                                           # [B, S, E]


class ServingDeepFM(LogitParts):
    """The exported form of a trained model: ``forward(ids int64 [B, W]) -> logit [B]`` in plain torch.

    The per-field tables [rows_i, D + 4] are read by one :class:`PlainLookup`, giving the rows [B, F, D + 4],
    split into V [B, F, D] and the first-order parts [B, F, 4] as deepfm.model.SparseArch does; the
    model's own dense parts (shared with it, not copied) make the logit, and ``logit_offset`` (ln of the
    sampling rate) is added. Every kind exports this way: deepfm.zoo's kinds fill the same slots (``fm``,
    ``deep``), and fm_dnn's wider rows [V' | V'' | w] split at ``dim`` (its SparseArch's, 2 D) like the others'.
    """

    def __init__(self, model: DeepFM, logit_offset: float, layout: A.InputLayout):
        super().__init__()
        ebc = model.sparse.ebc
        self.lookup = PlainLookup([ebc.embedding_bags[table_name(f)].weight.detach() for f in model.sparse.fields],
                                  layout)
        self.dim = model.sparse.dim
        self.bias, self.fm, self.deep = model.bias, model.fm, model.deep
        self.use_first, self.use_fm = model.use_first, model.use_fm
        self.logit_offset = float(logit_offset)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.lookup(ids)                                                     # [B, F, D + 4]
        return self.logits(e[:, :, :self.dim], e[:, :, self.dim:]) + self.logit_offset


class ServingTower(nn.Module):
    """One side of a trained two_tower in plain torch: ``forward(ids int64 [B, W_side]) -> [B, D + 1 + O]``
    over that side's fields alone (deepfm.two_tower: user [Vec_U, 1, MLP_U], item [Vec_I, w_I, MLP_I]),
    its tables stacked (:class:`PlainLookup`; the user side's V columns only) and its MLP the model's own."""

    def __init__(self, model: TwoTower, side: str, layout: A.InputLayout):
        super().__init__()
        names = model.user_fields if side == "user" else model.item_fields
        if tuple(names) != layout.fields:
            raise ValueError(f"the {side} tower reads {names}, the layout has {list(layout.fields)}")
        ebc = model.sparse.ebc
        self.dim = model.sparse.dim
        # the user side reads V alone: its rows' first-order parts are not in the file
        width = self.dim if side == "user" else self.dim + FIRST_ORDER_DIM
        self.lookup = PlainLookup([ebc.embedding_bags[table_name(f)].weight.detach()[:, :width] for f in names],
                                  layout)
        self.side = side
        self.tower = model.user_tower if side == "user" else model.item_tower

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.lookup(ids)                                                     # [B, S, D + 4]
        v = e[:, :, :self.dim]
        second = (v.new_ones(v.shape[0], 1) if self.side == "user"
                  else e[:, :, self.dim:].sum((1, 2)).unsqueeze(1))
        parts = [v.sum(1), second]
        if self.tower is not None:
            parts.append(self.tower(v))
        return torch.cat(parts, 1)


def kjt_of(ids: torch.Tensor, keys: Sequence[str], layout: A.InputLayout | None = None) -> Any:
    """ids [B, F] -> the KeyedJaggedTensor of one id per field per row (key-major values); with a
    ``layout`` (list fields), ids [B, W] -> each field's real ids and lengths."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    if layout is None or not layout.has_lists:
        return KeyedJaggedTensor(keys=list(keys), values=ids.t().reshape(-1),
                                 lengths=torch.ones(ids.numel(), dtype=torch.int32))
    return kjt_of_jagged(layout.jagged(ids.numpy()), keys, ids.shape[0])


def kjt_of_jagged(jagged: Any, keys: Sequence[str], rows: int) -> Any:
    """Per field (values, lengths) -> the KJT of the fields ``keys``; a field not in ``jagged`` is the one
    id 0 (missing) in every row (the other tower's fields, which a tower does not read)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    values, lengths = [], []
    for k in keys:
        v, n = jagged.get(k, (np.zeros(rows, np.int64), np.ones(rows, np.int64)))
        values.append(np.asarray(v, np.int64))
        lengths.append(np.asarray(n, np.int32))
    return KeyedJaggedTensor(keys=list(keys), values=torch.from_numpy(np.concatenate(values)),
                             lengths=torch.from_numpy(np.concatenate(lengths)), stride=rows)


# --- the steps -----------------------------------------------------------------------------------------

def choose_checkpoint(run: Path, which: str) -> Path:
    """``best`` (the weights of the best valid evaluation; the latest when the run kept none), ``latest``,
    or a checkpoint folder; refused unless complete."""
    if which in ("best", "latest"):
        if not (run / layout.CHECKPOINTS).is_dir():
            raise ExportError(f"--run {run}: no {layout.CHECKPOINTS} folder: not a training run folder")
        ckpt = layout.best_checkpoint(run) if which == "best" else None
        if ckpt is None:
            ckpt = layout.latest_checkpoint(run)
            if ckpt is not None and which == "best":
                log.info("%s: no complete best checkpoint; exporting the latest, %s", run, ckpt.name)
        if ckpt is None:
            raise ExportError(f"--run {run}: no complete checkpoint (a folder with {layout.COMPLETE}) to export")
        return ckpt
    ckpt = Path(which)
    if not ckpt.is_dir():
        raise ExportError(f"--checkpoint {which}: no such folder")
    if not layout.is_complete_checkpoint(ckpt):
        raise ExportError(f"--checkpoint {ckpt}: incomplete (no {layout.COMPLETE} marker: its writing did not "
                          "finish); export a complete one")
    return ckpt


def open_data(state: TrainState, data: Path | None, ckpt: Path) -> tuple[Path, Manifest]:
    """The featurized data the checkpoint was trained on (``--data``, else the folder its state names),
    refused when its feature fingerprint is not the checkpoint's."""
    root = data if data is not None else Path(state.data)
    try:
        m = open_featurized(root)
    except ManifestError as e:
        raise ExportError(f"{e} (the model's feature facts come from it; pass --data)") from None
    if m.feature_fingerprint != state.feature_fingerprint:
        raise ExportError(f"{ckpt}: made for featurized data with fingerprint {state.feature_fingerprint}, but "
                          f"{root}'s is {m.feature_fingerprint}: its ids mean other things; pass --data with the "
                          "data this model was trained on")
    return root, m


def load_eager(ckpt: Path, state: TrainState) -> DeepFM:
    """The checkpoint's weights in an unsharded DeepFM on the CPU, in eval mode."""
    cfg = state.config
    model = DeepFM(state.fields, cfg.model, cfg.hidden, cfg.dropout, crosses=cfg.crosses)
    return _load_weights(model, ckpt)


def load_towers(ckpt: Path, state: TrainState) -> TwoTower:
    """A two_tower checkpoint's weights in an unsharded TwoTower on the CPU, in eval mode."""
    cfg = state.config
    return _load_weights(TwoTower(state.fields, cfg.tower_hidden, cfg.tower_dim, cfg.tower_dropout), ckpt)


def _load_weights(model: Any, ckpt: Path) -> Any:
    sd = model.state_dict()
    dcp.load({"model": sd}, checkpoint_id=str(ckpt))      # no process group: one process reads every shard
    model.load_state_dict(sd)
    return model.eval()


def read_vocabulary(root: Path, m: Manifest) -> dict[str, np.ndarray]:
    """field -> the ids kept by ``min_count`` (the featurized data's vocab folder); {} when none."""
    if m.vocab is None:
        return {}
    import pyarrow.parquet as pq
    t = pq.read_table(root / m.vocab.path, columns=["field", "id"])
    field, ids = np.asarray(t.column("field").to_pylist(), dtype=object), t.column("id").to_numpy()
    out = {f: np.sort(ids[field == f].astype(np.int64)) for f in m.vocab.ids_kept}
    for f, n in m.vocab.ids_kept.items():
        if len(out[f]) != n:
            raise ExportError(f"{root / m.vocab.path}: {len(out[f])} ids of {f}, the manifest says {n}")
    return out


def split_rows(root: Path, m: Manifest, n: int, fields: Sequence[str] | None = None) -> np.ndarray:
    """Up to ``n`` rows' graph ids [n, W] (pipeline.artifact.InputLayout of ``fields``, default all: [n, F]
    without list fields) from the test split (valid, then train, when it has none), in file order."""
    import pyarrow.parquet as pq
    lay = A.InputLayout.of(m, tuple(fields) if fields else None)
    for split in ("test", "valid", "train"):
        if split in m.splits and m.splits[split].rows:
            chunks, have = [], 0
            for f in sorted((root / split).glob("*.parquet")):
                t = pq.read_table(f, columns=list(lay.fields))
                if lay.has_lists:
                    chunks.append(lay.pad_columns({c: t.column(c).to_pylist() for c in lay.fields}))
                else:
                    chunks.append(np.stack([t.column(c).to_numpy() for c in lay.fields], axis=1).astype(np.int64))
                have += len(chunks[-1])
                if have >= n:
                    break
            return np.concatenate(chunks)[:n]
    raise ExportError(f"{root}: no split has rows to check the graph on")


def golden_rows(m: Manifest, featurizer: RowFeaturizer, n_lines: int) -> list[dict[str, str | None]]:
    """Raw rows for the golden set: the first good lines of the test day's raw file when it can still be
    read (a local plain or .gz file), and made-up rows for the edges of the id rules: every field missing,
    negative and huge numbers, unseen strings, a list longer than its max_length with empty elements."""
    c = m.contract
    rows: list[dict[str, str | None]] = []
    test_days = set(m.splits["test"].days) if "test" in m.splits else set()
    rx = re.compile(c.source.file_pattern)            # the day of a file, as featurize read it
    for path in m.input.files:
        local = layout.local_path(path)
        if len(rows) >= n_lines or local is None or not os.path.isfile(local):
            continue
        day = rx.search(os.path.basename(local)) if c.source.day_from == "file_name" else None
        if test_days and day is not None and int(day.group(1)) not in test_days:
            continue
        rows += _good_rows(local, c, featurizer, n_lines - len(rows))
    feats = [f.name for f in c.fields]
    cont = {x.name for x in c.continuous}
    lists = {x.name: x.list for x in c.categorical if x.list is not None}
    rows.append({f: None for f in feats})                                    # all missing
    rows.append({f: ("-3" if f in cont else "") for f in feats})            # negatives
    rows.append({f: ("1e300" if f in cont else f"unseen-{f}") for f in feats})
    rows.append({f: ("0x1p3" if f in cont else "00000000") for f in feats})
    if lists:
        rows.append({f: (ls.delimiter.join([" a ", "", *[f"e{i}" for i in range(ls.max_length + 1)]])
                         if (ls := lists.get(f)) is not None else None) for f in feats})
    return rows


def _good_rows(path: str, c: FeatureContract, featurizer: RowFeaturizer, n: int) -> list[dict[str, str | None]]:
    """Up to ``n`` lines of ``path`` that the featurize job would keep, as rows of their feature fields."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    out: list[dict[str, str | None]] = []
    every = A.InputLayout(c.field_names, (1,) * len(c.field_names), ("sum",) * len(c.field_names))
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
        for i, line in enumerate(fh):
            if len(out) >= n or i >= 10 * n:
                break
            try:
                row = split_line(line.rstrip("\r\n"), c)
                A.graph_ids(featurizer, every, [row])
            except ValueError:
                continue
            if c.source.header and i == 0:
                continue
            out.append({k: v for k, v in row.items() if k in c.field_names})
    return out


def model_fingerprint(sm: nn.Module, feature_fp: str) -> str:
    """sha256 of the weights (in name order) and the feature fingerprint: 16 hex digits."""
    h = hashlib.sha256(feature_fp.encode())
    for name, t in sorted(sm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_graph(ep: Any, model: DeepFM, ids: np.ndarray, offset: float, keys: Sequence[str],
                lay: A.InputLayout | None = None) -> float:
    """max |graph logit - (eager logit + offset)| over ``ids``; refused above :data:`LOGIT_TOLERANCE`."""
    x = torch.from_numpy(ids)
    with torch.no_grad():
        eager = model(kjt_of(x, keys, lay)) + offset
        graph = ep.module()(x)
    return refuse_above(float((graph - eager).abs().max()) if len(ids) else 0.0, LOGIT_TOLERANCE,
                        "the exported graph's logits", f"{len(ids)} test rows")


def refuse_above(diff: float, tolerance: float, what: str, where: str) -> float:
    """``diff`` (max |exported - eager| of ``what`` on ``where``), or :class:`ExportError` above ``tolerance``
    (a NaN too): the one check every exported graph passes before anything is written."""
    if not diff <= tolerance:
        raise ExportError(f"{what} differ from the eager model's by {diff:.3g} on {where} (allowed {tolerance}); "
                          "nothing was written")
    return diff


def run_metrics(run: Path) -> dict[str, Any]:
    p = run / layout.METRICS
    if not p.exists():
        return {}
    d = json.loads(p.read_text())
    return {k: d[k] for k in ("valid", "test") if k in d}


def _export_program(module: nn.Module, ids: np.ndarray) -> Any:
    """torch.export of ``module`` on ids [B, W] with B dynamic."""
    batch = torch.export.Dim("batch", min=1)
    # the example input has at least 2 rows: a batch of 1 would be specialised (0/1 specialisation)
    example = torch.from_numpy(ids[:2] if len(ids) >= 2 else np.repeat(ids[:1], 2, axis=0))
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes={"ids": {0: batch}}, strict=False)


def _write_archive(ep: Any, out: Path, card: A.ModelCard, vocab: dict[str, np.ndarray], check: Any) -> None:
    """The archive beside ``out``, loaded back by ``check(path)`` (its golden set), renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.pt2")      # torch.export.save wants the suffix
    try:
        torch.export.save(ep, str(tmp), extra_files={A.CARD: card.dumps(), A.VOCABULARY: A.encode_vocabulary(vocab)})
        check(tmp)                                   # the archive as written: loads, and its golden set holds
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _card(run: Path, ckpt: Path, state: TrainState, m: Manifest, fingerprint: str,
          golden: tuple[A.GoldenRow, ...], **extra: Any) -> A.ModelCard:
    return A.ModelCard(
        model_fingerprint=fingerprint, model=state.config.model, manifest=m, train_config=to_overrides(state.config),
        metrics=run_metrics(run), checkpoint=str(ckpt.resolve()), global_step=state.global_step,
        torch_version=torch.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), golden=golden,
        **extra)


def export(run: Path, out: Path, checkpoint: str = "best", data: Path | None = None, items: Path | None = None,
           index: str | None = None) -> A.ModelCard:
    """Export ``run``'s checkpoint to ``out`` (see the module docstring); returns the card written.
    ``items`` and ``index``: model two_tower's item vectors and faiss index (:func:`export_towers`)."""
    t0 = time.time()
    ckpt = choose_checkpoint(run, checkpoint)
    state = sharded.read_state(ckpt)
    root, m = open_data(state, data, ckpt)
    if state.config.model in TOWERS:
        return export_towers(run, ckpt, state, root, m, out, items, index, t0)
    if items is not None or index is not None:
        raise ExportError(f"--items / --index: model {state.config.model} ranks given candidates; only model "
                          "two_tower exports item vectors")
    model = load_eager(ckpt, state)
    offset = math.log(m.sampling.neg_sample_rate)
    lay = A.InputLayout.of(m)
    sm = ServingDeepFM(model, offset, lay).eval()
    ids = split_rows(root, m, CHECK_ROWS)
    keys = list(m.field_names)
    ep = _export_program(sm, ids)
    diff = check_graph(ep, model, ids, offset, keys, lay)
    log.info("graph checked against the eager model on %d test rows: max |logit difference| %.2g", len(ids), diff)

    vocab = read_vocabulary(root, m)
    featurizer = RowFeaturizer(m.contract, m.boundaries, vocab)
    rows = golden_rows(m, featurizer, GOLDEN_LINES)
    gids = A.graph_ids(featurizer, lay, rows)
    with torch.no_grad():
        gp = predict_proba(model(kjt_of(torch.from_numpy(gids), keys, lay)) + offset).double().numpy()
    golden = tuple(A.GoldenRow(row=r, ids=tuple(int(x) for x in i), probability=float(p))
                   for r, i, p in zip(rows, gids, gp))
    card = _card(run, ckpt, state, m, model_fingerprint(sm, m.feature_fingerprint), golden)
    from deepfm.serving import Predictor
    _write_archive(ep, out, card, vocab, Predictor.load)
    log.info("exported %s (step %d, model %s, fingerprint %s) to %s: %.1f MB, %d golden rows, %.1f s", ckpt,
             state.global_step, state.config.model, card.model_fingerprint, out, out.stat().st_size / 1e6,
             len(golden), time.time() - t0)
    return card


# --- two_tower: the user tower, the catalogue's item vectors, an index ------------------------------------

def catalogue_vectors(root: Path, m: Manifest, model: TwoTower, batch: int = 8192) -> tuple[ItemVectors, float]:
    """Every catalogue item (the featurized ``catalogue/``, by ``item_index``) through the plain item tower
    (:class:`ServingTower`), and the max |difference| from the eager model's ``item_vectors`` (refused
    above :data:`VECTOR_TOLERANCE`)."""
    import pyarrow.parquet as pq
    r = m.recall
    assert r is not None
    lay = A.InputLayout.of(m, tuple(model.item_fields))
    t = pq.read_table(root / r.catalogue, columns=[layout.ITEM_INDEX, layout.ITEM_KEY, *lay.fields])
    order = np.argsort(t.column(layout.ITEM_INDEX).to_numpy(), kind="stable")
    index = t.column(layout.ITEM_INDEX).to_numpy().astype(np.int64)[order]
    if not np.array_equal(index, np.arange(r.items)):
        raise ExportError(f"{root / r.catalogue}: item_index is not 0..{r.items - 1} once each (the manifest's "
                          f"{r.items} items)")
    keys = np.asarray(t.column(layout.ITEM_KEY).to_pylist(), dtype=object)[order]
    ids = lay.pad_columns({c: t.column(c).to_pylist() for c in lay.fields})[order]
    tower = ServingTower(model, "item", lay).eval()
    names = list(m.field_names)
    vectors, diff = [], 0.0
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            x = torch.from_numpy(ids[s:s + batch])
            plain = tower(x)
            eager = model.item_vectors(kjt_of_jagged(lay.jagged(x.numpy()), names, len(x)))
            diff = max(diff, float((plain - eager).abs().max()))
            vectors.append(plain.float().numpy())
    refuse_above(diff, VECTOR_TOLERANCE, "the plain item tower's vectors", f"the {len(ids)} catalogue items")
    vec = np.concatenate(vectors) if vectors else np.zeros((0, model.out_dim), np.float32)
    return ItemVectors(keys=keys, index=index, vectors=np.ascontiguousarray(vec)), diff


def check_vectors(ep: Any, model: TwoTower, ids: np.ndarray, lay: A.InputLayout, keys: Sequence[str]) -> float:
    """max |graph user vector - eager user_vectors| over ``ids`` (the user tower's fields; the item fields
    missing in the eager model's input); refused above :data:`VECTOR_TOLERANCE`."""
    x = torch.from_numpy(ids)
    with torch.no_grad():
        eager = model.user_vectors(kjt_of_jagged(lay.jagged(ids), keys, len(ids)))
        graph = ep.module()(x)
    return refuse_above(float((graph - eager).abs().max()) if len(ids) else 0.0, VECTOR_TOLERANCE,
                        "the exported user tower's vectors", f"{len(ids)} test rows")


def build_item_index(items: ItemVectors, kind: str, path: Path, queries: np.ndarray) -> A.IndexInfo:
    """A faiss index of ``kind`` over the item vectors written to ``path``, and its recall@K against the
    exact search (deepfm.retrieval.exact_topk) for ``queries``."""
    import faiss
    t0 = time.time()
    idx = build_index(items.vectors, kind)
    seconds = time.time() - t0
    k = min(INDEX_K, len(items.keys))
    _, exact = exact_topk(queries, items.vectors, k)
    _, approx = search(idx, queries, k)
    recall = ann_recall(approx, exact)
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(idx, str(tmp))
    os.replace(tmp, path)
    log.info("index %s over %d items: recall@%d against the exact search %.4f (%d queries), built in %.1f s",
             kind, len(items.keys), k, recall, len(queries), seconds)
    return A.IndexInfo(kind=kind, file=path.name, k=k, queries=len(queries), recall=recall,
                       build_seconds=round(seconds, 3))


def export_towers(run: Path, ckpt: Path, state: TrainState, root: Path, m: Manifest, out: Path,
                  items_path: Path | None, index: str | None, t0: float) -> A.ModelCard:
    """Model two_tower: the user tower to ``out``, the catalogue's vectors to ``items_path`` (default
    ``items.parquet`` beside it) and, with ``index``, a faiss index (the module docstring)."""
    if m.recall is None:
        raise ExportError(f"{root}: model two_tower needs the recall output it was trained on (a catalogue)")
    if index is not None and index not in ("flat", "hnsw"):
        raise ExportError(f"--index {index}: not one of flat, hnsw")
    model = load_towers(ckpt, state)
    keys = list(m.field_names)
    lay = A.InputLayout.of(m, tuple(model.user_fields))
    ut = ServingTower(model, "user", lay).eval()
    ids = split_rows(root, m, CHECK_ROWS, lay.fields)
    ep = _export_program(ut, ids)
    diff = check_vectors(ep, model, ids, lay, keys)
    log.info("user tower checked against the eager model on %d test rows: max |vector difference| %.2g",
             len(ids), diff)
    items, item_diff = catalogue_vectors(root, m, model)
    log.info("item vectors of %d catalogue items: max |plain - eager| %.2g", len(items.keys), item_diff)
    items_path = items_path if items_path is not None else out.with_name("items.parquet")
    items_path.parent.mkdir(parents=True, exist_ok=True)
    items.write(items_path)
    info: A.IndexInfo | None = None
    if index is not None:
        with torch.no_grad():
            queries = ut(torch.from_numpy(ids[:INDEX_QUERIES])).numpy()
        info = build_item_index(items, index, items_path.with_name(f"{items_path.stem}.{index}.faiss"), queries)

    vocab = read_vocabulary(root, m)
    featurizer = RowFeaturizer(m.contract, m.boundaries, vocab)
    rows = []
    for r in golden_rows(m, featurizer, GOLDEN_LINES):        # restricted to the user tower's fields, once each
        mine = {k: v for k, v in r.items() if k in lay.fields}
        if mine not in rows:
            rows.append(mine)
    gids = A.graph_ids(featurizer, lay, rows)
    with torch.no_grad():
        gv = model.user_vectors(kjt_of_jagged(lay.jagged(gids), keys, len(gids))).double().numpy()
    golden = tuple(A.GoldenRow(row=r, ids=tuple(int(x) for x in i), vector=tuple(float(x) for x in v))
                   for r, i, v in zip(rows, gids, gv))
    retrieval = A.RetrievalInfo(items=len(items.keys), dim=items.dim, items_file=items_path.name,
                                items_digest=A.items_digest(items.keys, items.index, items.vectors), item_max_diff=item_diff, index=info)
    card = _card(run, ckpt, state, m, model_fingerprint(ut, m.feature_fingerprint), golden, graph=A.USER_VECTOR,
                 inputs=lay.fields, retrieval=retrieval)
    from deepfm.serving import UserEncoder
    _write_archive(ep, out, card, vocab, UserEncoder.load)
    log.info("exported %s (step %d, two_tower, fingerprint %s): user tower %s (%.1f MB, %d golden rows), %d item "
             "vectors %s%s, %.1f s", ckpt, state.global_step, card.model_fingerprint, out, out.stat().st_size / 1e6,
             len(golden), len(items.keys), items_path, f", index {info.file}" if info else "", time.time() - t0)
    return card


def main(argv: Sequence[str] | None = None) -> A.ModelCard:
    logging.basicConfig(level=logging.WARNING, force=True, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("deepfm").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")   # fbgemm CPU ops
    # reading a checkpoint in one process is the point here; fx asks whether it is tracing at every KJT
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(prog="python -m deepfm.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="the training run folder")
    p.add_argument("--checkpoint", default="best",
                   help="best (default: the best valid weights; the latest when none were kept), latest, or a "
                        "checkpoint folder")
    p.add_argument("--data", type=Path, help="the featurized data it was trained on (default: the one its "
                                             "checkpoint names)")
    p.add_argument("--out", required=True, type=Path, help="the model file to write, e.g. model.pt2 (two_tower: "
                                                          "the user tower)")
    p.add_argument("--items", type=Path, help="two_tower: the item vectors' Parquet (default: items.parquet "
                                              "beside --out)")
    p.add_argument("--index", choices=("flat", "hnsw"), help="two_tower: also a faiss index over the item vectors "
                                                             "(beside them), its recall@K in the card")
    a = p.parse_args(argv)
    return export(a.run, a.out, a.checkpoint, a.data, a.items, a.index)


def cli() -> None:
    try:
        main()
    except (ExportError, sharded.CheckpointError, A.ArtifactError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
