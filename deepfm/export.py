"""python -m deepfm.export --run RUN_DIR [--checkpoint best|latest|PATH] [--data FEATURIZED] --out model.pt2

One plain process (no torchrun): the sharded checkpoint is loaded into the unsharded model
(``torch.distributed.checkpoint`` needs no process group to read one), and written as one self-contained
``torch.export`` archive that deepfm.serving loads with torch alone:

- the graph ``ids int64 [B, F] -> logit float32 [B]`` (B dynamic; F the featurized data's fields in their
  order), the lookup as one plain table with per-field row offsets (``aten.embedding``: no torchrec or
  fbgemm op), the dense parts the model's own (:class:`deepfm.model.LogitParts`), and the negative
  sampling correction ln(neg_sample_rate) added, so that ``sigmoid(logit)`` is calibrated to the traffic
  before sampling;
- the card (pipeline.artifact: the data's manifest, the training settings, the valid and test metrics,
  the torch version, a golden set of raw rows and the probabilities the eager model gave them) and the
  vocabulary of the ``min_count`` fields.

Before anything is written the graph is run beside the eager model on rows of the test split (refused
when a logit differs by more than 1e-5); the file is written beside ``--out`` and renamed into place,
then loaded back and its golden set checked. Refused, naming the cause: an incomplete checkpoint, and
one whose feature fingerprint is not the data's.
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
from deepfm.model import DeepFM, LogitParts, predict_proba, table_name
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
GOLDEN_LINES = 24            # raw lines of the test day in the golden set (besides the made-up edge rows)


class ExportError(RuntimeError):
    """An export that cannot be made; the message names the cause."""


class ServingDeepFM(LogitParts):
    """The exported form of a trained model: ``forward(ids int64 [B, F]) -> logit [B]`` in plain torch.

    The per-field tables [rows_i, D + 4] are stacked into one [sum rows_i, D + 4]; field i's id k is row
    ``offset_i + k``. One ``aten.embedding`` gives the rows [B, F, D + 4], split into V [B, F, D] and the
    first-order parts [B, F, 4] as deepfm.model.SparseArch does; the model's own dense parts (shared with
    it, not copied) make the logit, and ``logit_offset`` (ln of the sampling rate) is added. Every kind
    exports this way: deepfm.zoo's kinds fill the same slots (``fm``, ``deep``), and fm_dnn's wider rows
    [V' | V'' | w] split at ``dim`` (its SparseArch's, 2 D) like the others'.
    """

    def __init__(self, model: DeepFM, logit_offset: float):
        super().__init__()
        ebc = model.sparse.ebc
        tables = [ebc.embedding_bags[table_name(f)].weight.detach() for f in model.sparse.fields]
        self.table = nn.Parameter(torch.cat(tables), requires_grad=False)
        starts = np.cumsum([0] + [t.shape[0] for t in tables[:-1]])
        self.register_buffer("row_offsets", torch.tensor(starts, dtype=torch.int64))
        self.dim = model.sparse.dim
        self.bias, self.fm, self.deep = model.bias, model.fm, model.deep
        self.use_first, self.use_fm = model.use_first, model.use_fm
        self.logit_offset = float(logit_offset)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offsets: torch.Tensor = self.row_offsets  # type: ignore[assignment]  # a buffer [F]
        e = nn.functional.embedding(ids + offsets, self.table)                  # [B, F, D + 4]
        return self.logits(e[:, :, :self.dim], e[:, :, self.dim:]) + self.logit_offset


def kjt_of(ids: torch.Tensor, keys: Sequence[str]) -> Any:
    """ids [B, F] -> the KeyedJaggedTensor of one id per field per row (key-major values)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    return KeyedJaggedTensor(keys=list(keys), values=ids.t().reshape(-1),
                             lengths=torch.ones(ids.numel(), dtype=torch.int32))


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


def split_rows(root: Path, m: Manifest, n: int) -> np.ndarray:
    """Up to ``n`` rows' ids [n, F] from the test split (valid, then train, when it has none), in file order."""
    import pyarrow.parquet as pq
    for split in ("test", "valid", "train"):
        if split in m.splits and m.splits[split].rows:
            chunks, have = [], 0
            for f in sorted((root / split).glob("*.parquet")):
                t = pq.read_table(f, columns=list(m.field_names))
                chunks.append(np.stack([t.column(c).to_numpy() for c in m.field_names], axis=1).astype(np.int64))
                have += len(chunks[-1])
                if have >= n:
                    break
            return np.concatenate(chunks)[:n]
    raise ExportError(f"{root}: no split has rows to check the graph on")


def golden_rows(m: Manifest, featurizer: RowFeaturizer, n_lines: int) -> list[dict[str, str | None]]:
    """Raw rows for the golden set: the first good lines of the test day's raw file when it can still be
    read (a local plain or .gz file), and made-up rows for the edges of the id rules: every field missing,
    negative and huge numbers, unseen strings."""
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
    rows.append({f: None for f in feats})                                    # all missing
    rows.append({f: ("-3" if f in {x.name for x in c.continuous} else "") for f in feats})   # negatives
    rows.append({f: ("1e300" if f in {x.name for x in c.continuous} else f"unseen-{f}") for f in feats})
    rows.append({f: ("0x1p3" if f in {x.name for x in c.continuous} else "00000000") for f in feats})
    return rows


def _good_rows(path: str, c: FeatureContract, featurizer: RowFeaturizer, n: int) -> list[dict[str, str | None]]:
    """Up to ``n`` lines of ``path`` that the featurize job would keep, as rows of their feature fields."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    out: list[dict[str, str | None]] = []
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
        for i, line in enumerate(fh):
            if len(out) >= n or i >= 10 * n:
                break
            try:
                row = split_line(line.rstrip("\r\n"), c)
                featurizer.ids([row])
            except ValueError:
                continue
            if c.source.header and i == 0:
                continue
            out.append({k: v for k, v in row.items() if k in c.field_names})
    return out


def model_fingerprint(sm: ServingDeepFM, feature_fp: str) -> str:
    """sha256 of the weights (in name order) and the feature fingerprint: 16 hex digits."""
    h = hashlib.sha256(feature_fp.encode())
    for name, t in sorted(sm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_graph(ep: Any, model: DeepFM, ids: np.ndarray, offset: float, keys: Sequence[str]) -> float:
    """max |graph logit - (eager logit + offset)| over ``ids``; refused above :data:`LOGIT_TOLERANCE`."""
    x = torch.from_numpy(ids)
    with torch.no_grad():
        eager = model(kjt_of(x, keys)) + offset
        graph = ep.module()(x)
    diff = float((graph - eager).abs().max()) if len(ids) else 0.0
    if not diff <= LOGIT_TOLERANCE:
        raise ExportError(f"the exported graph's logits differ from the eager model's by {diff:.3g} on "
                          f"{len(ids)} test rows (allowed {LOGIT_TOLERANCE}); nothing was written")
    return diff


def run_metrics(run: Path) -> dict[str, Any]:
    p = run / layout.METRICS
    if not p.exists():
        return {}
    d = json.loads(p.read_text())
    return {k: d[k] for k in ("valid", "test") if k in d}


def export(run: Path, out: Path, checkpoint: str = "best", data: Path | None = None) -> A.ModelCard:
    """Export ``run``'s checkpoint to ``out`` (see the module docstring); returns the card written."""
    t0 = time.time()
    ckpt = choose_checkpoint(run, checkpoint)
    state = sharded.read_state(ckpt)
    root, m = open_data(state, data, ckpt)
    model = load_eager(ckpt, state)
    offset = math.log(m.sampling.neg_sample_rate)
    sm = ServingDeepFM(model, offset).eval()
    ids = split_rows(root, m, CHECK_ROWS)
    keys = list(m.field_names)
    batch = torch.export.Dim("batch", min=1)
    # the example input has at least 2 rows: a batch of 1 would be specialised (0/1 specialisation)
    example = torch.from_numpy(ids[:2] if len(ids) >= 2 else np.repeat(ids[:1], 2, axis=0))
    with torch.no_grad():
        ep = torch.export.export(sm, (example,), dynamic_shapes={"ids": {0: batch}}, strict=False)
    diff = check_graph(ep, model, ids, offset, keys)
    log.info("graph checked against the eager model on %d test rows: max |logit difference| %.2g", len(ids), diff)

    vocab = read_vocabulary(root, m)
    featurizer = RowFeaturizer(m.contract, m.boundaries, vocab)
    rows = golden_rows(m, featurizer, GOLDEN_LINES)
    gids = featurizer.ids(rows)
    with torch.no_grad():
        gp = predict_proba(model(kjt_of(torch.from_numpy(gids), keys)) + offset).double().numpy()
    golden = tuple(A.GoldenRow(row=r, ids=tuple(int(x) for x in i), probability=float(p))
                   for r, i, p in zip(rows, gids, gp))
    card = A.ModelCard(
        model_fingerprint=model_fingerprint(sm, m.feature_fingerprint), model=state.config.model, manifest=m,
        train_config=to_overrides(state.config), metrics=run_metrics(run), checkpoint=str(ckpt.resolve()),
        global_step=state.global_step, torch_version=torch.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), golden=golden)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.pt2")      # torch.export.save wants the suffix
    try:
        torch.export.save(ep, str(tmp), extra_files={A.CARD: card.dumps(), A.VOCABULARY: A.encode_vocabulary(vocab)})
        from deepfm.serving import Predictor
        Predictor.load(tmp)                         # the archive as written: loads, and its golden set holds
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (step %d, model %s, fingerprint %s) to %s: %.1f MB, %d golden rows, %.1f s", ckpt,
             state.global_step, state.config.model, card.model_fingerprint, out, out.stat().st_size / 1e6,
             len(golden), time.time() - t0)
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
    p.add_argument("--out", required=True, type=Path, help="the model file to write, e.g. model.pt2")
    a = p.parse_args(argv)
    return export(a.run, a.out, a.checkpoint, a.data)


def cli() -> None:
    try:
        main()
    except (ExportError, sharded.CheckpointError, A.ArtifactError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
