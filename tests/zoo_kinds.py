"""Run by torchrun in tests/test_zoo_dist.py: each model kind in turn trained for two short epochs on the
same data, in one process group, by deepfm.train's own parts (the launch decision, the start, the loop,
the valid evaluation, the checkpoint and metrics.json in a run folder per kind), so that the kinds cost
one torchrun start between them.

    torchrun --standalone --nproc_per_node=2 tests/zoo_kinds.py FEATURIZED OUT_DIR KIND[,KIND...] N_ROWS

fm must come before fnn: fnn's run starts from fm's run folder (``init_embeddings_from``). Before fnn
trains, rank 0 saves the table rows its sharded model looks up for the first N_ROWS test rows
(OUT_DIR/fnn_start_rows.npy), to compare with the fm checkpoint's. Rank 0 writes OUT_DIR/zoo.json: per
kind, its run folder, how it started and from which checkpoint, its valid metrics and seconds.
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo, not tests/

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepfm import inputs, launch, sharded, train  # noqa: E402
from deepfm.cluster import init_cluster, shutdown  # noqa: E402
from deepfm.export import kjt_of, split_rows  # noqa: E402
from deepfm.trainconf import load_train_config  # noqa: E402

SETTINGS = {"batch_size": 512, "epochs": 2, "hidden": [64, 64], "dropout": 0.1, "bf16": False,
            "train_pipeline": "plain", "checkpoint_every_steps": 0, "keep_best": False, "reader_workers": 1}
CROSSES = [["C1", "C2"], ["I1", "C3"]]


def main() -> None:
    data, out, kinds, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])
    ds = inputs.open_dataset(data)
    cluster = init_cluster(force_cpu=True)
    results = {}
    try:
        for kind in kinds:
            t0 = time.perf_counter()
            run = out / kind
            extra = {"crosses": CROSSES} if kind == "deepfm_cross" else {
                "init_embeddings_from": str(out / "fm")} if kind == "fnn" else {}
            cfg = load_train_config(None, {**SETTINGS, "model": kind, **extra})
            start = launch.prepare(run, ds.root, ds.manifest, cfg, cluster.world, None, test=False).start
            cfg = train.resolve(cfg, cluster, ds)
            if cluster.is_main:
                run.mkdir(parents=True, exist_ok=True)
            t = sharded.build(ds.fields, cfg, cluster)
            state = train.start_or_resume(t, ds, cfg, cluster, start)
            if kind == "fnn":
                save_start_rows(t, ds, n, out / "fnn_start_rows.npy", cluster.is_main)
            loop = train.Loop(t, ds, cfg, cluster, run, state)
            while state.epoch < cfg.epochs and not loop.stop:
                loop.one_epoch()
            m = train.finish(loop, test=False)
            results[kind] = {"run": str(run), "start": start.kind, "from": str(start.checkpoint or ""),
                             "valid": m["valid"], "global_step": m["global_step"],
                             "seconds": round(time.perf_counter() - t0, 1)}
            if cluster.is_main:
                print(f"zoo: {kind}: {results[kind]}", flush=True)
        if cluster.is_main:
            (out / "zoo.json").write_text(json.dumps(results, indent=1))
    finally:
        shutdown()


def save_start_rows(t: sharded.Trainable, ds: inputs.Dataset, n: int, path: Path, main: bool) -> None:
    """The rows [V | w] [n, F, D + 4] the sharded model looks up for the first n test rows (every rank
    runs the lookup: the tables are sharded); rank 0 saves them."""
    ids = torch.from_numpy(split_rows(ds.root, ds.manifest, n))
    with torch.no_grad():
        v, w4 = t.model.sparse(kjt_of(ids, ds.field_names))
    if main:
        np.save(path, torch.cat([v, w4], 2).numpy())


if __name__ == "__main__":
    main()
