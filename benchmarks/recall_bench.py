"""Recall end to end on the generator's default set (issue 16's targets), each step as users run it.

    python benchmarks/recall_bench.py [--work /tmp/clickpipe-recall-bench] [--config TRAIN_YAML ...]
        [--extra "--epochs 4"] [--nproc 2] [--reuse-featurized] [--retrieval-items 100000,1000000] [--no-retrieval]

1. ``python -m pipeline.generate --config conf/recall.yaml --seed 7`` with its defaults (20,000 users, 5,000
   items, 10 days x 300,000 impressions), cached in WORK/raw and reused when complete;
2. ``spark-submit jobs/featurize.py --config conf/recall.yaml`` (``--master local[2] --driver-memory 4g``), the
   whole process timed (``--reuse-featurized`` keeps WORK/feat when it is there: for reruns of the training);
3. ``torchrun --nproc_per_node=2 deepfm/train.py --model two_tower`` with the project's defaults
   (conf/train.yaml), or once per ``--config`` file (``--config conf/train.yaml`` is the defaults; ``--extra``
   adds flags to every run), the whole process timed; examples/s from its metrics.json (the training loop,
   reading included, evaluation excluded); steps 4 and 5 for each run, one row each;
4. ``python -m deepfm.export`` (the user tower, the catalogue's item vectors, a faiss HNSW index whose
   recall against the exact search the card reports);
5. recall@10/50/100, hit rate and NDCG on the held-out day (the last) computed from its raw click lines
   through the exported user tower, a user's vector the mean over its clicks of the day (as the trainer's
   evaluation), the exact top K of the exported item vectors with the items clicked before the day left out
   (pipeline.recall_metrics: one definition), beside the generator's popularity baseline and ceiling
   (pipeline.recall_truth.baselines); the ratio to the ceiling;
6. ``benchmarks/retrieve_bench.py --dim D`` (D: the model's vector width) for 10^5 and 10^6 items.

Prints markdown tables, the date, the CPU and the load average. Checkpoints are deleted at the end (the
metrics, the export and the cached data stay in WORK).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402

CONTRACT = ROOT / "conf" / "recall.yaml"
SEED = 7
KS = (10, 50, 100)
TARGET = 0.8            # issue 16: recall@50 at least 0.8x the ceiling


def run(cmd: Sequence[str], what: str) -> tuple[float, str]:
    """Run ``cmd`` (the venv's tools first on PATH) from the repository; (wall seconds, stdout + stderr)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    print(f"$ {shlex.join(cmd)}", flush=True)
    t = time.perf_counter()
    r = subprocess.run(list(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{what} failed (exit {r.returncode}):\n{r.stdout[-4000:]}")
    return wall, r.stdout


def generate(raw: Path) -> float | None:
    """The default set in ``raw`` (None: reused), written beside it and renamed into place when complete."""
    if (raw / "truth" / "recall_model.json").exists():
        return None
    tmp = raw.with_name(raw.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    wall, _ = run([sys.executable, "-m", "pipeline.generate", "--config", str(CONTRACT), "--out", str(tmp),
                   "--seed", str(SEED), "--workers", "2"], "generate")
    tmp.rename(raw)
    return wall


def featurize(raw: Path, out: Path) -> float:
    wall, _ = run([str(BIN / "spark-submit"), "--master", "local[2]", "--driver-memory", "4g",
                   "--conf", "spark.ui.showConsoleProgress=false",
                   "--driver-java-options", f"-Dlog4j2.configurationFile=file:{ROOT}/tools/log4j2.properties",
                   str(ROOT / "jobs" / "featurize.py"), "--input", str(raw), "--output", str(out),
                   "--config", str(CONTRACT), "--overwrite"], "featurize")
    return wall


def train(data: Path, run_dir: Path, nproc: int, config: Path | None, extra: Sequence[str]) -> tuple[float, dict]:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "deepfm" / "train.py"),
           "--data", str(data), "--out", str(run_dir), "--model", "two_tower",
           *(["--config", str(config)] if config else []), *extra]
    wall, _ = run(cmd, "torchrun deepfm/train.py")
    return wall, json.loads((run_dir / "metrics.json").read_text())


def heldout(model: Path, items: Path, raw: Path, data: Path, day: int) -> dict[str, float]:
    """recall/hit rate/NDCG@K of day ``day`` from its raw click lines through the exported user tower (the
    module's docstring, step 5)."""
    import pyarrow.parquet as pq

    from deepfm.retrieval import ItemVectors, exact_topk
    from deepfm.serving import UserEncoder
    from pipeline import layout
    from pipeline import manifest as M
    from pipeline import recall_metrics as R
    from pipeline.rows import split_line
    m = M.read(data)
    c = m.contract
    assert m.recall is not None and c.recall is not None
    enc = UserEncoder.load(model)
    iv = ItemVectors.read(items)
    vectors = iv.vectors[np.argsort(iv.index)]
    users = pq.read_table(data / m.recall.users_path)
    user_index = dict(zip(users.column(layout.USER_KEY).to_pylist(), users.column(layout.USER_INDEX).to_pylist()))
    with (raw / f"day_{day}").open() as f:
        clicks = [r for r in (split_line(line.rstrip("\n"), c) for line in f) if r[c.label] == "1"]
    vec = enc.vectors(clicks)
    who = np.array([user_index[r[c.recall.user_key]] for r in clicks])
    seen = pq.read_table(data / m.recall.seen)
    s_user, s_item, s_day = (seen.column(x).to_numpy().astype(np.int64)
                             for x in (layout.USER_INDEX, layout.ITEM_INDEX, layout.FIRST_DAY))
    sets = R.eval_sets(s_user, s_item, s_day, eval_day=day, n_items=len(vectors))
    order = np.argsort(who, kind="stable")
    bounds = np.searchsorted(who[order], sets.users)
    ends = np.searchsorted(who[order], sets.users, side="right")
    queries = np.stack([vec[order[a:b]].mean(0) for a, b in zip(bounds, ends)])
    _, top = exact_topk(queries, vectors, max(KS), exclude=[sets.seen(j) for j in range(len(sets))])
    return R.evaluate(top, sets, KS)


def table(rows: list[tuple[str, dict[str, Any]]], ceiling: dict[str, Any]) -> str:
    head = ["ranking"] + [f"{m}@{k}" for m in ("recall", "hit_rate", "ndcg") for k in KS] + ["recall@50 / ceiling"]
    out = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, r in rows:
        cells = [f"{r[f'{m}@{k}']:.4f}" for m in ("recall", "hit_rate", "ndcg") for k in KS]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {r['recall@50'] / ceiling['recall@50']:.2f} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/clickpipe-recall-bench"))
    p.add_argument("--config", type=Path, action="append",
                   help="a training config over conf/train.yaml; given several times, one run each (default: "
                        "the project's defaults alone)")
    p.add_argument("--extra", default="", help="more deepfm/train.py flags, e.g. '--epochs 4'")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--reuse-featurized", action="store_true", help="keep WORK/feat when it is complete")
    p.add_argument("--retrieval-items", default="100000,1000000")
    p.add_argument("--no-retrieval", action="store_true", help="skip benchmarks/retrieve_bench.py")
    a = p.parse_args(argv)
    from deepfm.serving import UserEncoder
    from pipeline.manifest import read as read_manifest
    from pipeline.recall_truth import baselines
    a.work.mkdir(parents=True, exist_ok=True)
    raw, feat = a.work / "raw", a.work / "feat"
    load = [os.getloadavg()[0]]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_name()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f}", flush=True)
    gen_s = generate(raw)
    print(f"generate: {'reused ' + str(raw) if gen_s is None else f'{gen_s:.1f} s'}", flush=True)
    if a.reuse_featurized and (feat / "_SUCCESS").exists():
        feat_s = None
    else:
        feat_s = featurize(raw, feat)
    load.append(os.getloadavg()[0])
    m = read_manifest(feat)
    assert m.recall is not None
    print(f"featurize: {'reused' if feat_s is None else f'{feat_s:.1f} s (whole spark-submit)'}; "
          f"{m.recall.train_positives:,} train positives, {m.recall.items:,} items, {m.recall.users:,} users",
          flush=True)
    days = json.loads((raw / "truth" / "recall_model.json").read_text())["days"]
    day = days[-1]
    truth = baselines(raw, heldout_day=day, train_days=days[:-2], ks=KS)
    ceiling = truth["ceiling"]
    rows: list[tuple[str, dict[str, Any]]] = []
    runs = []
    for i, config in enumerate(a.config or [None]):
        default = config is None or config.resolve() == ROOT / "conf" / "train.yaml"
        name = "project defaults" if default else str(config)
        run_dir, model = a.work / f"run{i}", a.work / f"model{i}" / "user_tower.pt2"
        train_s, metrics = train(feat, run_dir, a.nproc, config, shlex.split(a.extra))
        load.append(os.getloadavg()[0])
        tr = metrics["train"]
        print(f"train ({name}): {train_s:.1f} s (whole torchrun), {tr['examples']:,} examples in {tr['seconds']:.1f} "
              f"s: {tr['examples_per_s']:,.0f} examples/s; {metrics['global_step']} steps, the best valid at step "
              f"{metrics['valid_best_step']}; valid recall@50 by evaluation "
              f"{[round(h['recall@50'], 4) for h in metrics['history']]}", flush=True)
        export_s, _ = run([sys.executable, "-m", "deepfm.export", "--run", str(run_dir), "--out", str(model),
                           "--index", "hnsw"], "export")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        card = UserEncoder.load(model).card
        assert card.retrieval is not None
        dim, index = card.retrieval.dim, card.retrieval.index
        print(f"export: {export_s:.1f} s; vectors of dim {dim}" + (
            f"; HNSW recall@{index.k} against the exact search {index.recall:.4f} ({index.queries:,} queries)"
            if index else ""), flush=True)
        got = heldout(model, model.with_name("items.parquet"), raw, feat, day)
        test = metrics.get("test", {})
        print(f"held-out day {day}: {int(got['users']):,} users; recall@50 {got['recall@50']:.4f} (the trainer's own "
              f"test evaluation {test.get('recall@50', float('nan')):.4f})", flush=True)
        rows.append((f"two_tower, {name}", got))
        runs.append({"config": name, "model": got, "metrics": metrics, "train_s": train_s, "dim": dim,
                     "ratio": got["recall@50"] / ceiling["recall@50"], "examples_per_s": tr["examples_per_s"]})
    rows += [("popularity (train-day clicks)", truth["popularity"]), ("features-only truth", truth["features_only"]),
             ("ceiling (true scores)", ceiling), ("random (expected)", truth["random"])]
    print(f"\n{time.strftime('%Y-%m-%d', time.gmtime())}, {cpu_name()}; held-out day {day}: {truth['users']:,} users, "
          f"{truth['items']:,} items; featurize {'reused' if feat_s is None else f'{feat_s:.1f} s'}; load average "
          f"{', '.join(f'{x:.1f}' for x in load)}")
    print(table(rows, ceiling))
    print()
    for r in runs:
        print(f"{r['config']}: recall@50 / ceiling = {r['ratio']:.3f} (target >= {TARGET}: "
              f"{'met' if r['ratio'] >= TARGET else 'NOT met'}); training {r['examples_per_s']:,.0f} examples/s on "
              f"{a.nproc} ranks, torchrun {r['train_s']:.1f} s", flush=True)
    if not a.no_retrieval:
        _, out = run([sys.executable, str(ROOT / "benchmarks" / "retrieve_bench.py"), "--dim", str(runs[-1]["dim"]),
                      "--items", a.retrieval_items], "retrieve_bench")
        print(out, flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return {"truth": truth, "runs": runs, "featurize_s": feat_s}


if __name__ == "__main__":
    main()
