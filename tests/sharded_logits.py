"""Run by torchrun in tests/test_export.py: a checkpoint loaded into the sharded model (DistributedModelParallel
at this world size, as training runs it) scores the first N test rows on every rank; rank 0 saves the logits.

    torchrun --standalone --nproc_per_node=2 tests/sharded_logits.py CHECKPOINT FEATURIZED N OUT.npy
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo, not tests/

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepfm import inputs, sharded  # noqa: E402
from deepfm.cluster import init_cluster, shutdown  # noqa: E402
from deepfm.export import kjt_of, split_rows  # noqa: E402


def main() -> None:
    ckpt, data, n, out = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    state = sharded.read_state(ckpt)
    ds = inputs.open_dataset(data)
    cluster = init_cluster(force_cpu=True)
    try:
        t = sharded.build(ds.fields, state.config, cluster)
        sharded.load(t, ckpt, ds.fingerprint, with_optimizer=False)
        t.dmp.eval()
        ids = torch.from_numpy(split_rows(data, ds.manifest, n))
        with torch.no_grad():
            logits = t.model(kjt_of(ids, ds.field_names))
        if cluster.is_main:
            np.save(out, logits.numpy())
    finally:
        shutdown()


if __name__ == "__main__":
    main()
