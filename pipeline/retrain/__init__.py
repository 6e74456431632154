"""python -m pipeline.retrain: one scheduled retraining run (cron, Airflow, a Kubernetes CronJob).

    python -m pipeline.retrain --config conf/retrain.yaml [--day N] [--refit] [--force] [--dry-run]
    python -m pipeline.retrain --config conf/retrain.yaml --readmit N

One run: find the newest complete day not yet processed in the raw folder; featurize the window of the
last ``window_days`` days up to it (spark-submit jobs/featurize.py), the newest day held out as the
test day, reusing the current model's boundaries and vocabulary (``--reuse``) so that ids mean the
same; train a candidate (torchrun deepfm/train.py), warm-started from the current model; evaluate the
current model on the same held-out day (python -m deepfm.evaluate); promote the candidate into the
registry only when it passes the gate, exported first (python -m deepfm.export: each version holds its
model.pt2 beside its checkpoint, so ``registry/current`` always names a model that can serve); write a
run record. Before training, the new day's data is
checked against the trailing days (rows, positive rate, malformed lines, per field missing ids and
distinct ids): a day outside the bounds is held, not trained on. A held day, and a day whose candidate
the gate judged unlearnable, stay out of later windows until ``--readmit N``.

Exit codes: 0 promoted, kept the current model, held the day, nothing new, a dry run, or a re-admission;
1 a step failed (the message and the run record name it), or the first candidate was rejected (no model
to serve; the day stays unprocessed); 2 bad configuration or arguments; 3 another run holds the lock;
130/143 interrupted by a signal.

This process only orchestrates: it imports neither Spark nor torch, and runs every step as a child
process (in its own session, killed with this process: a run killed at any step leaves no orphans
behind and never a partial model behind ``registry/current``).

The modules, in the order a run uses them:

* :mod:`~pipeline.retrain.config` - the settings (conf/retrain.yaml), checked at load, the trainer's
  through its own loader and parser;
* :mod:`~pipeline.retrain.days` - which raw days are complete (and the links featurize reads);
* :mod:`~pipeline.retrain.registry` - versions, ``current``, the excluded days, the lock, and what the plan
  reads of them;
* :mod:`~pipeline.retrain.plan` - the plan, a pure function of the above (decide);
* :mod:`~pipeline.retrain.run` - carries it out (act), with :mod:`~pipeline.retrain.procs` (child
  processes), :mod:`~pipeline.retrain.checks` (the data checks), :mod:`~pipeline.retrain.gate` and
  :mod:`~pipeline.retrain.records` (run records);
* :mod:`~pipeline.retrain.cli` - the command line.
"""
from pipeline.retrain.checks import DataChecks, DayStats, check_day
from pipeline.retrain.config import (CheckSettings, GateSettings, RetrainConfig, RetrainConfigError, SparkSettings,
                                     Timeouts, TrainSettings, load_config)
from pipeline.retrain.days import DayScan, scan_days
from pipeline.retrain.gate import gate
from pipeline.retrain.plan import LeftOut, Nothing, Plan, PlanError, make_plan
from pipeline.retrain.procs import stale_processes
from pipeline.retrain.registry import (Architecture, CurrentModel, Exclusion, LockBusy, Registry, RegistryError,
                                       RegistryState, RunLock, Version)
from pipeline.retrain.run import EXIT_CONFIG, EXIT_FAILED, EXIT_LOCKED, EXIT_OK

__all__ = ["DataChecks", "DayStats", "check_day", "CheckSettings", "GateSettings", "RetrainConfig",
           "RetrainConfigError", "SparkSettings", "Timeouts", "TrainSettings", "load_config", "DayScan", "scan_days",
           "gate", "LeftOut", "Nothing", "Plan", "PlanError", "make_plan", "stale_processes", "Architecture",
           "CurrentModel", "Exclusion", "LockBusy", "Registry", "RegistryError", "RegistryState", "RunLock",
           "Version", "EXIT_CONFIG", "EXIT_FAILED", "EXIT_LOCKED", "EXIT_OK"]
