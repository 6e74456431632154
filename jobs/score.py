"""spark-submit jobs/score.py: raw click logs -> the exported model's calibrated click probabilities.

    spark-submit jobs/score.py --model model.pt2 --input RAW --output SCORES [--key COLUMN] [--with-ids]
        [--overwrite] [--max-reject-fraction X]

RAW is a file or a folder of files in the model's contract layout (plain or compressed; a day written as a
folder of parts too). The lines are featurized with the model's own contract, boundaries and vocabulary by
the featurize job's expressions, and scored in the executors by the model's graph (shipped with the job;
the executors need torch and this project installed, the driver neither torch nor the training stack).

Writes SCORES/scores (Parquet: ``file`` and ``line``, the 0-based line number in that file, or the
``--key`` column's raw text; ``label``, null when the line has none; ``logit``, calibrated to the traffic
before negative sampling; ``probability``; with ``--with-ids`` the id columns), SCORES/rejects (the
malformed lines: file, line, day, reason, the line as text and as its bytes), SCORES/scores.json (the model's
fingerprint, the input, rows scored, rejects by reason, seconds) and SCORES/_SUCCESS. Everything is
written to a staging folder beside SCORES and renamed into place at the end, so SCORES is complete or
absent. More malformed lines than --max-reject-fraction (default: the contract's
quality.max_reject_fraction) fail the job.

The entry point only: the arguments become :class:`Options`, and pipeline.spark.scoring does the work.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from jobs.featurize import get_spark
from pipeline.contract import ContractError
from pipeline.spark.errors import FeaturizeError, RejectLimitError
from pipeline.spark.scoring import (BATCH_ROWS, Options, ScoreError, ScoresManifest, check_key, check_local_paths,
                                    check_paths, open_model, run)


# A broadcast hash relation takes one memory page per task that reads it, and map_rare joins one per
# min_count field (26 in the Criteo layout); Spark sizes pages from the heap (64 MB with 2-4 GB), which
# made 26 x 64 MB per task: heap exhausted, spills, and 10-15% more CPU. Small pages instead (a launcher's
# --conf spark.buffer.pageSize wins).
SPARK_DEFAULTS = {"spark.buffer.pageSize": "2m"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spark-submit jobs/score.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the exported model (python -m deepfm.export), a local file")
    p.add_argument("--input", required=True, help="a raw log file, or a folder of them, in the model's contract layout")
    p.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--key", help="a source column whose raw text keys each row (default: file and line)")
    p.add_argument("--with-ids", action="store_true", help="write the id columns too")
    p.add_argument("--max-reject-fraction", type=float,
                   help="fail when more input lines than this are malformed (default: the contract's)")
    p.add_argument("--batch-rows", type=int, default=BATCH_ROWS, help="rows per call of the model in an executor")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def parse_args(argv: Sequence[str] | None) -> Options:
    a = _parser().parse_args(argv)
    if a.batch_rows < 1:
        raise ScoreError(f"--batch-rows {a.batch_rows}: must be at least 1")
    if a.max_reject_fraction is not None and not 0 <= a.max_reject_fraction <= 1:
        raise ScoreError(f"--max-reject-fraction {a.max_reject_fraction}: must be between 0 and 1")
    o = Options(model=a.model, input=a.input, output=a.output.rstrip("/"), key=a.key, with_ids=a.with_ids,
                overwrite=a.overwrite, max_reject_fraction=a.max_reject_fraction, batch_rows=a.batch_rows)
    # before Spark starts, so that a wrong path or model fails in a moment (run() checks them again)
    model = open_model(o.model)
    check_key(o.key, model.contract, o.with_ids)
    check_paths(o.output, o.input, model.path)
    check_local_paths(o)
    return o


def main(argv: Sequence[str] | None = None) -> ScoresManifest:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)     # its INFO lines at shutdown would follow an error line
    o = parse_args(argv)
    s = run(get_spark("score", SPARK_DEFAULTS), o)
    print(s.summary_line())
    return s


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for the command line: 0, or 2 with ``score: error: ...`` on stderr for a refusal."""
    try:
        main(argv)
    except (ContractError, FeaturizeError) as e:
        print(f"score: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ScoreError", "RejectLimitError", "Options", "parse_args", "run", "main", "cli"]

if __name__ == "__main__":
    sys.exit(cli())
