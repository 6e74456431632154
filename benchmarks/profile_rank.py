"""Where a training rank's time goes, on the trainer's own parts, under torchrun as users run it.

    torchrun --standalone --nproc_per_node=2 benchmarks/profile_rank.py --data FEATURIZED
        [--steps 150] [--warmup 20] [--profile-steps 30] [--set key=value ...] [--json OUT]

Each rank builds what deepfm/train.py builds (conf/train.yaml's defaults, ``--set`` over them; `bf16: auto`
and `train_pipeline: auto` decided the same way) and runs the plain loop on its train shard:

- the step, timed part by part: waiting for the next batch, forward (the id all-to-all of the sharded
  tables, the embedding lookups, FM and MLP, the loss), backward (the MLP's gradients, DDP's gloo
  all-reduce of the dense gradients, the tables' backward with their fused Adagrad update), the dense
  optimizer (Adam);
- the batch thread, timed part by part while it runs beside the step: petastorm's read and decode of
  row groups, the re-batching, the KJT building;
- for ``--profile-steps`` steps, torch.profiler's operator table, summed into the issue's categories
  (embedding lookup and fused update, input distribution, MLP, dropout, gloo collectives, optimizer);
- the process's CPU seconds against the wall: how much of the two cores the rank used.

Prints one block per rank and, with --json, writes rank 0's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deepfm import inputs, sharded  # noqa: E402
from deepfm.cluster import init_cluster, shutdown  # noqa: E402
from deepfm.train import resolve  # noqa: E402
from deepfm.trainconf import load_train_config  # noqa: E402

# operator name (lower case) contains -> category; first match wins
CATEGORIES = [
    ("embedding lookup + fused update (FBGEMM)", ("fbgemm", "split_embedding", "tbe", "embedding_bag", "lookup")),
    ("id all-to-all: input distribution and its waits", ("all_to_all", "alltoall", "all2all", "input_dist", "kjt",
                                                          "awaitable")),
    ("gloo collectives (all-reduce)", ("allreduce", "all_reduce", "gloo", "c10d", "broadcast", "barrier")),
    ("dropout (ByteDropout)", ("random_", "aten::lt", "uint8")),
    ("dense optimizer (Adam)", ("optimizer.step", "adam", "_foreach")),
    ("MLP matmuls", ("addmm", "aten::mm", "matmul", "linear")),
    ("MLP elementwise (relu, masks, loss, sums)", ("relu", "threshold", "mul", "add", "sum", "sigmoid", "binary_cross",
                                                   "where", "div", "sub", "neg", "exp", "log", "pow", "copy_",
                                                   "fill_", "zero", "cat", "view", "reshape", "to", "empty")),
]


class Timed:
    """The batch thread's iterator of columns, with the seconds spent in each part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, it: Iterator[Any], part: str) -> Iterator[Any]:
        while True:
            t = time.perf_counter()
            try:
                x = next(it)
            except StopIteration:
                return
            self.seconds[part] += time.perf_counter() - t
            yield x


def train_stream(ds: inputs.Dataset, rank: int, world: int, cfg: Any, timed: Timed) -> inputs.Prefetcher:
    """deepfm.inputs.train_batches, with its parts timed."""
    def gen() -> Iterator[inputs.Batch]:
        with inputs._reader(ds, "train", rank, world, None, cfg.seed, cfg.reader_workers) as r:
            chunks = timed.wrap(inputs._chunks(r), "petastorm read + decode")
            batches = timed.wrap(inputs._rebatch(chunks, inputs._batch_columns(ds), cfg.batch_size, pad_last=False),
                                 "re-batch (numpy)")
            for cols, _ in batches:
                t = time.perf_counter()
                b = inputs.columns_batch(cols, ds)
                timed.seconds["KJT building"] += time.perf_counter() - t
                yield b
    return inputs.Prefetcher(gen(), cfg.prefetch_batches)


def categorise(table: Any) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """key_averages -> seconds of self CPU time per category, and the top operators."""
    cats: dict[str, float] = defaultdict(float)
    ops = []
    for e in table:
        s = e.self_cpu_time_total / 1e6
        ops.append((e.key, s, e.count))
        name = e.key.lower()
        for cat, keys in CATEGORIES:
            if any(k in name for k in keys):
                cats[cat] += s
                break
        else:
            cats["other"] += s
    ops.sort(key=lambda x: -x[1])
    return dict(cats), ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=150, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--profile-steps", type=int, default=30, help="steps under torch.profiler, after the timed ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting (YAML value)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    import yaml
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    cluster = init_cluster()
    ds = inputs.open_dataset(a.data)
    cfg = resolve(load_train_config(None, over), cluster, ds)
    t = sharded.build(ds.fields, cfg, cluster)
    timed = Timed()
    stream = train_stream(ds, cluster.rank, cluster.world, cfg, timed)
    parts: dict[str, float] = defaultdict(float)
    t.dmp.train()

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        b = next(stream).to(cluster.device)
        t1 = time.perf_counter()
        loss, _ = t.dmp(b)
        t2 = time.perf_counter()
        t.optimizer.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        t.optimizer.step()
        t4 = time.perf_counter()
        if record:
            for k, s in (("wait for the batch", t1 - t0), ("forward", t2 - t1), ("backward + fused sparse update", t3 - t2),
                         ("dense optimizer step", t4 - t3)):
                parts[k] += s

    for _ in range(a.warmup):
        step(False)
    dist.barrier()
    timed.seconds.clear()
    cpu0, wall0 = os.times(), time.perf_counter()
    for _ in range(a.steps):
        step(True)
    wall = time.perf_counter() - wall0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    reader = dict(timed.seconds)
    cats: dict[str, float] = {}
    ops: list[tuple[str, float, int]] = []
    if a.profile_steps:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.profile_steps):
                step(False)
        cats, ops = categorise(prof.key_averages())
    stream.close()
    examples = a.steps * cfg.batch_size * cluster.world
    out = {"rank": cluster.rank, "world": cluster.world, "threads": torch.get_num_threads(),
           "batch_size": cfg.batch_size, "precision": "bf16" if cfg.bf16 else "fp32", "steps": a.steps,
           "wall_s": round(wall, 3), "examples_per_s": round(examples / wall, 1), "cpu_s": round(cpu, 3),
           "cores_used": round(cpu / wall, 2), "step_parts_s": {k: round(v, 3) for k, v in parts.items()},
           "batch_thread_s": {k: round(v, 3) for k, v in reader.items()},
           "profiled_steps": a.profile_steps, "profiler_self_cpu_s": {k: round(v, 3) for k, v in cats.items()},
           "top_ops": [(k, round(s, 4), n) for k, s, n in ops[:25]]}
    for r in range(cluster.world):
        if r == cluster.rank:
            lines = [f"rank {r}/{cluster.world} ({out['threads']} torch threads, {out['precision']}, batch "
                     f"{cfg.batch_size}): {a.steps} steps in {wall:.2f} s, {out['examples_per_s']:,.0f} examples/s "
                     f"(all ranks), {out['cores_used']:.2f} cores used by this process"]
            lines.append("  step, per step: " + ", ".join(f"{k} {1e3 * v / a.steps:.1f} ms ({v / wall:.0%})"
                                                          for k, v in parts.items()))
            lines.append("  batch thread (beside the step), per batch: " + ", ".join(
                f"{k} {1e3 * v / a.steps:.1f} ms" for k, v in reader.items()))
            if cats:
                total = sum(cats.values())
                lines.append(f"  torch.profiler, self CPU over {a.profile_steps} steps (all threads): " + ", ".join(
                    f"{k} {v / total:.0%}" for k, v in sorted(cats.items(), key=lambda x: -x[1])))
                lines.append("  top operators: " + "; ".join(f"{k} {1e3 * s / a.profile_steps:.1f} ms/step"
                                                             for k, s, _ in ops[:12]))
            print("\n".join(lines), flush=True)
            if r == 0 and a.json:
                a.json.write_text(json.dumps(out, indent=1))
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
