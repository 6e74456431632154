"""The baseline for benchmarks/train_bench.py: DeepFM in plain PyTorch, on the same data and reader.

One nn.EmbeddingBag per field ([V | w] rows, as in deepfm/model.py), the whole model under
torch DistributedDataParallel, dense Adam on everything. Run with torchrun; prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from deepfm import inputs  # noqa: E402
from deepfm.cluster import init_cluster, shutdown  # noqa: E402
from deepfm.model import FIRST_ORDER_DIM, DeepArch, FMInteraction  # noqa: E402


class PlainDeepFM(nn.Module):
    def __init__(self, fields, hidden, dropout):
        super().__init__()
        self.dim = fields[0].embedding_dim
        self.tables = nn.ModuleList(nn.EmbeddingBag(f.num_embeddings, self.dim + FIRST_ORDER_DIM, mode="sum")
                                    for f in fields)
        self.bias = nn.Parameter(torch.zeros(1))
        self.fm = FMInteraction()
        self.deep = DeepArch(len(fields) * self.dim, hidden, dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:          # ids [B, F]
        e = torch.stack([t(ids[:, j:j + 1]) for j, t in enumerate(self.tables)], 1)
        v, w = e[:, :, :self.dim], e[:, :, self.dim:].sum(-1)
        return self.bias + w.sum(1) + self.fm(v) + self.deep(v)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward pass, as deepfm/train.py --bf16")
    a = p.parse_args()
    c = init_cluster(force_cpu=True)
    ds = inputs.open_dataset(a.data)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(PlainDeepFM(ds.fields, (400, 400, 400), 0.5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    stream = inputs.train_batches(ds, c.rank, c.world, a.batch_size, 0, 2, 8)
    t0 = time.time()
    for _ in range(a.steps):
        b = next(stream)
        ids = b.kjt.values().view(len(ds.field_names), -1).t()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            logit = model(ids)
        loss = loss_fn(logit.float(), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dist.barrier()
    secs = time.time() - t0
    stream.close()
    if c.rank == 0:
        print(json.dumps({"examples_per_s": a.steps * a.batch_size * c.world / secs, "seconds": secs,
                          "world_size": c.world}))
    shutdown()


if __name__ == "__main__":
    main()
