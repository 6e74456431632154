"""python -m deepfm.evaluate --run RUN_DIR --data FEATURIZED_DIR --split test

Loads the run's latest complete checkpoint (or --checkpoint) into a model of this process's world size
(a plain python run is a world of one; under torchrun the evaluation is sharded) and prints exact
AUC, logloss, normalized entropy and calibration over every row of the split, with the negative
sampling correction from the manifest. Refuses a checkpoint made for other features.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from deepfm import inputs, sharded
from deepfm.cluster import init_cluster, log_project_info, shutdown
from deepfm.evaluator import Evaluator
from deepfm.launch import refuse
from deepfm.trainconf import TrainConfigError
from pipeline import layout

log = logging.getLogger("deepfm.evaluate")


def evaluate(run: Path, data: Path, split: str, checkpoint: Path | None = None, batch_size: int | None = None,
             cpu: bool = False) -> dict:
    """The metrics of ``split`` under ``checkpoint`` (a checkpoint folder, or a run folder's latest), else
    under the run's latest complete checkpoint. The model is built from the settings saved with it."""
    where = checkpoint if checkpoint is not None else run
    ckpt = layout.checkpoint_of(where)
    if ckpt is None:
        raise sharded.CheckpointError(f"{where}: no complete checkpoint")
    saved = sharded.read_state(ckpt)
    cfg = replace(saved.config, batch_size=batch_size) if batch_size else saved.config
    ds = inputs.open_dataset(data)
    if not ds.has_split(split) or ds.rows(split) == 0:
        raise inputs.DataError(f"{data}: split {split!r} has no rows")
    cluster = init_cluster(force_cpu=cpu)
    try:
        t = sharded.build(ds.fields, cfg, cluster)
        sharded.load(t, ckpt, ds.fingerprint, with_optimizer=False)
        m = Evaluator(t, ds, cfg, cluster).evaluate(split)
    finally:
        shutdown()
    return {"split": split, "checkpoint": str(ckpt), "global_step": saved.global_step, **m}


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, force=True, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")   # fbgemm CPU ops
    log_project_info()
    p = argparse.ArgumentParser(prog="python -m deepfm.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                   help="run folder (under torchrun write --run-dir: torchrun takes --run for its own --run-path)")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--json", type=Path, help="also write the metrics here")
    a = p.parse_args(argv)
    m = evaluate(a.run, a.data, a.split, a.checkpoint, a.batch_size, a.cpu)
    print(json.dumps(m, indent=1))
    if a.json:
        a.json.write_text(json.dumps(m, indent=1))
    return m


@record
def cli() -> None:
    """The command: a refusal is one line, said once (under torchrun: its failure summary's root cause), exit 2."""
    try:
        main()
    except (TrainConfigError, inputs.DataError, sharded.CheckpointError) as e:
        refuse("evaluate", e)
        sys.exit(2)


if __name__ == "__main__":
    cli()
