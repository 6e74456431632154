"""The command line: ``python -m pipeline.retrain --config conf/retrain.yaml [--day N] [--refit] [--force]
[--dry-run]``, or ``--readmit N`` alone; :func:`main` returns the exit code."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.retrain.config import ROOT, RetrainConfigError, load_config
from pipeline.retrain.run import EXIT_CONFIG, run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.retrain",
                                description="one scheduled retraining run: featurize the newest window, train a "
                                            "candidate, gate it against the current model, promote it")
    p.add_argument("--config", default=str(ROOT / "conf" / "retrain.yaml"), help="retrain settings (conf/retrain.yaml)")
    p.add_argument("--day", type=int, help="process this day as the newest (held-out) day instead of the newest "
                                           "complete one")
    p.add_argument("--refit", action="store_true", help="refit boundaries and vocabulary and train from scratch")
    p.add_argument("--force", action="store_true", help="process the day even when it was already processed")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    p.add_argument("--readmit", type=int, metavar="N",
                   help="let excluded day N (rejected by the gate or held by the data checks) into later windows "
                        "again, record it, and exit (no run)")
    a = p.parse_args(argv)
    if a.readmit is not None and (a.day is not None or a.refit or a.force or a.dry_run):
        p.error("--readmit N goes alone: it records the re-admission and exits; the next run uses it")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        cfg = load_config(a.config)
    except RetrainConfigError as e:
        print(f"retrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return run(cfg, day=a.day, refit=a.refit, force=a.force, dry_run=a.dry_run, readmit=a.readmit)
