"""The reference trainer for benchmarks/train_bench.py: DeepCTR-Torch 0.3.0's DeepFM on the same
featurized Parquet, one process, the same model settings (fields and dims from the manifest; MLP,
dropout, batch, learning rate from conf/train.yaml; each field's ids re-encoded to the values that occur,
as DeepCTR's examples do), one epoch, then the test AUC.

    python benchmarks/deepctr_reference.py --data FEATURIZED --json OUT.json [--threads 2] [--epochs 1]

Needs the benchmark extra (`pip install -e .[bench]`: deepctr-torch, scikit-learn, requests). Prints
and writes examples/s of ``model.fit`` (the reference's own loop; reading the Parquet into memory
before it is not counted, which favours the reference) and the test AUC after the sampling correction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import manifest as M           # noqa: E402
from pipeline import metrics                  # noqa: E402


def load_split(folder: Path, m: M.Manifest, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    t = pq.read_table(folder / split, columns=[m.label_column, *m.field_names])
    x = {f: t.column(f).to_numpy().astype(np.int64) for f in m.field_names}
    return x, t.column(m.label_column).to_numpy().astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--embedding-dim", type=int, help="default: the manifest's dims")
    a = p.parse_args(argv)

    import torch
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    from deepfm.trainconf import load_train_config
    torch.set_num_threads(a.threads)
    cfg = load_train_config()
    m = M.open_featurized(a.data)
    batch = a.batch_size or cfg.batch_size
    t0 = time.perf_counter()
    x, y = load_split(a.data, m, "train")
    xt, yt = load_split(a.data, m, "test")
    # As DeepCTR's own examples do (a LabelEncoder per field over all the data), each field's ids become
    # 0..n-1 over the values that occur: its tables have n rows, not the contract's hash buckets (its
    # dense Adam updates every row of every table at every step; 26 tables of 1M rows ran at 68 examples/s)
    sizes = {}
    for f in m.field_names:
        uniq, inv = np.unique(np.concatenate([x[f], xt[f]]), return_inverse=True)
        x[f], xt[f] = inv[:len(y)], inv[len(y):]
        sizes[f] = len(uniq)
    load_s = time.perf_counter() - t0
    cols = [SparseFeat(f.name, vocabulary_size=sizes[f.name], embedding_dim=a.embedding_dim or f.embedding_dim)
            for f in m.fields]
    model = DeepFM(cols, cols, task="binary", dnn_hidden_units=cfg.hidden, dnn_dropout=cfg.dropout,
                   device="cpu", seed=cfg.seed)
    model.compile(torch.optim.Adam(model.parameters(), lr=cfg.dense_lr), "binary_crossentropy")
    t1 = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=a.epochs, verbose=0, shuffle=True)
    fit_s = time.perf_counter() - t1
    q = model.predict(xt, batch_size=8192).reshape(-1)
    prob = metrics.debias(q.astype(np.float64), m.sampling.neg_sample_rate)
    out = {"trainer": "deepctr-torch 0.3.0 DeepFM", "threads": a.threads, "batch_size": batch,
           "train_rows": int(len(y)), "epochs": a.epochs, "fit_seconds": round(fit_s, 2),
           "load_seconds": round(load_s, 2), "table_rows": sum(sizes.values()), "examples_per_s": round(len(y) * a.epochs / fit_s, 1),
           "test": metrics.summary(prob, yt)}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
