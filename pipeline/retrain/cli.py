"""The command line: ``python -m pipeline.retrain --config conf/retrain.yaml [--day N] [--refit] [--force]
[--dry-run]``; :func:`main` returns the exit code."""
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
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        cfg = load_config(a.config)
    except RetrainConfigError as e:
        print(f"retrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return run(cfg, day=a.day, refit=a.refit, force=a.force, dry_run=a.dry_run)
