"""python -m deepfm.score --model model.pt2 --input FEATURIZED_SPLIT --output SCORES [--shard I/N]

Scores featurized Parquet (a split folder of the featurize job's output, e.g. ``data/featurized/test``)
with an exported model, without Spark: pyarrow reads the files in batches, the graph scores them
(deepfm.serving). The split's data must be what the model was trained on (the same feature
fingerprint in the output's manifest), else it is refused.

Output, one part per shard: ``SCORES/part-I-of-N.parquet`` with ``file`` (the input file's name), ``row``
(the row's position in it), ``label``, ``logit`` (calibrated: the sampling correction included) and
``probability``, and ``part-I-of-N.json`` (rows, seconds, the model's load seconds, rows/s after the load). ``--shard I/N`` scores every N-th file from
the I-th (0-based), so N processes or machines split a split between them over a shared folder; each
part is written under a temporary name and renamed, and the process that finds all N parts there writes
``scores.json`` (the model, the rows, and AUC, logloss, NE and calibration over all parts when the data
has labels) and then ``_SUCCESS``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import layout
from pipeline import metrics as M
from pipeline.artifact import ArtifactError
from pipeline.manifest import Manifest, ManifestError, open_featurized

log = logging.getLogger("deepfm.score")
SCORES = "scores.json"


class ScoreError(RuntimeError):
    """A scoring run that cannot go on; the message names the cause."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"1/4"`` -> Shard(1, 4); ScoreError for anything but 0 <= I < N."""
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ScoreError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
        if not 0 <= i < n:
            raise ScoreError(f"--shard {text}: I must be in [0, N)")
        return cls(i, n)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"


def open_split(split: Path) -> tuple[Manifest, list[Path]]:
    """The manifest of the featurized output that holds ``split`` and the split's Parquet files, sorted."""
    try:
        m = open_featurized(split.parent)
    except ManifestError as e:
        raise ScoreError(f"--input {split}: not a split folder of a complete featurized output ({e})") from None
    files = sorted(split.glob("*.parquet"))
    if split.name not in m.splits:
        raise ScoreError(f"--input {split}: the manifest has no split {split.name!r} (it has {', '.join(m.splits)})")
    if m.splits[split.name].rows and not files:
        raise ScoreError(f"--input {split}: no Parquet files, but the manifest says {m.splits[split.name].rows} rows")
    return m, files


def batches(files: Sequence[Path], columns: Sequence[str], batch_size: int) -> Iterator[tuple[str, int, Any]]:
    """(file name, first row's position in the file, record batch) over ``files`` in order."""
    import pyarrow.parquet as pq
    for f in files:
        start = 0
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns)):
            yield f.name, start, b
            start += b.num_rows


def score(model: Path, split: Path, output: Path, shard: Shard = Shard(0, 1), batch_size: int = 8192,
          overwrite: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Score this shard's files of ``split`` into ``output``; returns the part's summary (and, from the
    process that completes the output, the whole output's under ``"scores"``). ``workers`` threads
    score batches at once (default: the cores), each with one torch thread."""
    import pyarrow as pa
    import torch
    import pyarrow.parquet as pq

    from deepfm.serving import Predictor, probability

    t0 = time.time()
    workers = workers or os.cpu_count() or 1
    torch.set_num_threads(1)
    try:
        layout.refuse_overlap(("--output", str(output)), ("--input", str(split)), ("--model", str(model)))
    except layout.PathOverlapError as e:
        raise ScoreError(str(e)) from None
    p = Predictor.load(model)
    loaded = time.time()
    m, files = open_split(split)
    if m.feature_fingerprint != p.card.feature_fingerprint:
        raise ScoreError(f"--input {split}: featurized with feature fingerprint {m.feature_fingerprint}, the model "
                         f"was trained on {p.card.feature_fingerprint}: its ids mean other things (featurize "
                         "with --reuse of the model's training data)")
    part = output / f"{shard.name}.parquet"
    if shard.count == 1 and output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ScoreError(f"--output {output} exists; pass --overwrite to replace it")
        for old in output.iterdir():
            old.unlink()
    output.mkdir(parents=True, exist_ok=True)
    mine = files[shard.index::shard.count]
    label = m.label_column
    schema = pa.schema([("file", pa.string()), ("row", pa.int64()), ("label", pa.int32()),
                        ("logit", pa.float32()), ("probability", pa.float64())])
    tmp = output / f".{shard.name}.tmp.parquet"
    rows = 0
    lists = p.layout                     # the graph's input: [B, F], or list fields padded to max_length

    def scored(name: str, start: int, b: Any) -> Any:
        if lists.has_lists:              # list fields: padded to their max_length, as the graph reads them
            ids = lists.pad_columns({c: b.column(c).to_pylist() if w > 1 else b.column(c).to_numpy()
                                     for c, w in zip(lists.fields, lists.widths)})
        else:
            ids = np.stack([b.column(c).to_numpy() for c in m.field_names], axis=1).astype(np.int64)
        logit = p.logits_of_ids(ids)
        n = len(logit)
        return pa.table({"file": pa.array([name] * n, pa.string()),
                         "row": pa.array(np.arange(start, start + n), pa.int64()),
                         "label": b.column(label).cast(pa.int32()), "logit": pa.array(logit),
                         "probability": pa.array(probability(logit))}, schema=schema)

    # torch ops release the GIL: ``workers`` threads, each running the graph on one core (torch's own
    # intra-op threads at 1), keep the cores busy without OpenMP's barriers; batches are written in order
    with pq.ParquetWriter(tmp, schema) as w, ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for name, start, b in batches(mine, [label, *m.field_names], batch_size):
            pending.append(pool.submit(scored, name, start, b))
            if len(pending) > 2 * workers:
                t = pending.popleft().result()
                w.write_table(t)
                rows += t.num_rows
        while pending:
            t = pending.popleft().result()
            w.write_table(t)
            rows += t.num_rows
    os.replace(tmp, part)
    seconds = round(time.time() - t0, 3)
    scoring = time.time() - loaded
    summary: dict[str, Any] = {"shard": f"{shard.index}/{shard.count}", "files": len(mine), "rows": rows,
                               "workers": workers,
                               "seconds": seconds, "load_seconds": round(loaded - t0, 3),
                               "rows_per_s": round(rows / max(scoring, 1e-9), 1)}
    _write_json(output / f"{shard.name}.json", summary)
    log.info("%s: %d rows from %d file(s) in %.1f s (model loaded in %.1f s; %.0f rows/s after it)", shard.name,
             rows, len(mine), seconds, summary["load_seconds"], summary["rows_per_s"])
    done = complete(output, shard.count, p.fingerprint, model, split, m)
    if done is not None:
        summary["scores"] = done
    return summary


def complete(output: Path, count: int, fingerprint: str, model: Path, split: Path, m: Manifest) -> dict | None:
    """When all ``count`` parts are in ``output``: write scores.json (with metrics over every part when the
    rows have labels) and ``_SUCCESS``, and return the scores.json content; else None."""
    import pyarrow.parquet as pq
    names = [Shard(i, count).name for i in range(count)]
    if not all((output / f"{n}.parquet").exists() and (output / f"{n}.json").exists() for n in names):
        return None
    parts = [json.loads((output / f"{n}.json").read_text()) for n in names]
    t = pq.read_table([str(output / f"{n}.parquet") for n in names], columns=["label", "probability"])
    y, prob = t.column("label").to_numpy(), t.column("probability").to_numpy()
    out: dict[str, Any] = {"model": str(model), "model_fingerprint": fingerprint, "input": str(split),
                           "feature_fingerprint": m.feature_fingerprint, "rows": int(len(y)), "parts": count,
                           "seconds": round(max(p["seconds"] for p in parts), 3)}
    if len(y) and not np.isnan(y.astype(float)).any():
        out["metrics"] = M.summary(prob, y)
    _write_json(output / SCORES, out)
    (output / layout.SUCCESS).write_text("")
    return out


def _write_json(path: Path, d: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, force=True, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("deepfm").setLevel(logging.INFO)
    p = argparse.ArgumentParser(prog="python -m deepfm.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="an exported model (python -m deepfm.export)")
    p.add_argument("--input", required=True, type=Path, help="a split folder of featurized data, e.g. FEAT/test")
    p.add_argument("--output", required=True, type=Path, help="the scores folder")
    p.add_argument("--shard", default="0/1", help="I/N: score every N-th file from the I-th (default 0/1: all)")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per graph call (default 8192)")
    p.add_argument("--workers", type=int, help="threads scoring batches at once, one core each (default: the cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (with one shard)")
    a = p.parse_args(argv)
    summary = score(a.model, a.input, a.output, Shard.parse(a.shard), a.batch_size, a.overwrite, a.workers)
    print(json.dumps(summary, indent=1))
    return summary


def cli() -> None:
    try:
        main()
    except (ScoreError, ArtifactError) as e:
        print(f"score: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
