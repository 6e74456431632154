"""Carry out one retrain run: see (raw days, registry, run records), decide (:func:`make_plan`), act.

Acting on a plan: featurize the window (spark-submit jobs/featurize.py, reading a folder of links to
the window's day files, so excluded days are left out), check the new day's data against the trailing
days (a day outside the bounds is held: not trained on), train a candidate (torchrun deepfm/train.py),
evaluate the current model on the same held-out day (python -m deepfm.evaluate), gate, export a
candidate that passed (python -m deepfm.export of the checkpoint its version gets, into the work
folder's model.pt2; its card read torch-free, its feature fingerprint checked against the data's),
publish (the version holds copies of the checkpoint and model.pt2, the model's fingerprint in its
lineage; ``current`` switches only then), prune, and record every step. The export is part of
publishing, not a decision of the plan: every promoted candidate is exported, so the plan (and its key)
does not change; it is a step of its own in the run record ("export", with its log), and a failed
export fails the run before anything is published: ``current`` stays where it was. A day the gate
judges (see :func:`~pipeline.retrain.gate.day_failures`) or the data checks hold is excluded from later
windows until ``--readmit N``. A first candidate the gate rejects leaves no model to serve: the run
fails (exit 1) and the day stays unprocessed. Every finished step of a plan is reused by a rerun of the
same plan (the work folder is named after the plan's key; the export's model.pt2 too). This module does
the printing.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline import artifact as A
from pipeline import layout
from pipeline import manifest as M
from pipeline.contract import ContractError, load_contract
from pipeline.retrain.config import ROOT, RetrainConfig, trainer_args
from pipeline.retrain.checks import DataChecks, DayStatsFiles, check_day, read_day_stats
from pipeline.retrain.days import link_days, scan_days
from pipeline.retrain.gate import day_failures, describe as describe_gate, fmt, gate
from pipeline.retrain.jsonio import now, read_json, write_json
from pipeline.retrain.plan import Nothing, Plan, PlanError, cold_after_featurize, make_plan
from pipeline.retrain.procs import (Interrupted, StepError, child_env, find_tool, kill_stale, quote, run_child)
from pipeline.retrain.records import RunRecord, RunRecords
from pipeline.retrain.registry import (CURRENT, LOCK, METRICS, TRAIN_METRICS, Exclusion, LockBusy, Registry,
                                       RegistryError, RegistryState, RunLock, Version)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3

# the work folder: runs/ (the run records), stats/day_<N>.json (the kept statistics of processed days),
# days/day_<N>-<plan key>/{plan.json, input/, featurized/, train/, train.done, eval_current.json, model.pt2}
RUNS = "runs"
STATS = "stats"
DAYS = "days"
PLAN_FILE = "plan.json"
INPUT = "input"                 # links to the window's raw day files: what featurize reads
FEATURIZED = "featurized"
TRAIN_RUN = "train"
TRAIN_DONE = "train.done"
EVAL_CURRENT = "eval_current.json"
MODEL_FILE = "model.pt2"        # the exported candidate (written atomically by deepfm.export), then copied


class Run:
    def __init__(self, cfg: RetrainConfig, day: int | None = None, refit: bool = False, force: bool = False):
        self.cfg = cfg
        self.day = day
        self.refit = refit
        self.force = force
        self.registry = Registry(cfg.registry_dir)
        self.records = RunRecords(cfg.work_dir / RUNS)
        self.record = RunRecord(self.records.root, cfg.path)
        self.stats = DayStatsFiles(cfg.work_dir / STATS)
        self.step = "start"
        self.env = child_env()
        self.file_pattern = ""                  # the contract's, once decide() has read it

    # -- see and decide -----------------------------------------------------------------------------
    def decide(self) -> tuple[Plan | Nothing, RegistryState]:
        cfg = self.cfg
        contract = load_contract(cfg.contract)
        if contract.source.day_from != "file_name":
            raise StepError("find_days", f"{cfg.contract}: retraining needs one file per day (source.day_from: "
                                         "file_name)")
        self.file_pattern = contract.source.file_pattern
        scan = scan_days(cfg.raw_dir, contract.source.file_pattern, cfg.completeness, cfg.stable_seconds)
        state = self.registry.state(self.records.processed_days(), self.stats.index())
        try:
            return make_plan(scan, state, cfg, contract.fingerprint, self.day, self.refit, self.force), state
        except PlanError as e:
            raise StepError("find_days", str(e)) from None

    def label(self, name: str | None) -> str:
        """A version as the output shows it: its name and its exported model's fingerprint."""
        if name is None:
            return "none"
        try:
            return self.registry.version(name).label
        except RegistryError:
            return name

    def say_nothing(self, nothing: Nothing, state: RegistryState) -> None:
        cur = f"current model: {self.label(state.current.name)}" if state.current else "no current model yet"
        ex = f"; excluded days: {sorted(state.excluded)} (--readmit N lets one in)" if state.excluded else ""
        print(f"retrain: nothing new: {nothing.reason} ({cur}{ex})")

    def work_dir(self, plan: Plan) -> Path:
        return self.cfg.work_dir / DAYS / f"day_{plan.day}-{plan.run_key}"

    # -- the commands -------------------------------------------------------------------------------
    def featurize_cmd(self, plan: Plan, day_dir: Path) -> list[str]:
        """The featurize job over ``day_dir/input`` (links to the window's day files, excluded days left
        out); days missing between its first and last day are allowed (``--allow-day-gaps``): they are
        the excluded days, or days that never arrived."""
        c = self.cfg
        cmd = [find_tool("spark-submit", self.env), "--master", c.spark.master, *c.spark.submit_args,
               str(ROOT / "jobs" / "featurize.py"), "--input", str(day_dir / INPUT),
               "--output", str(day_dir / FEATURIZED), "--config", plan.contract, "--days", f"{plan.first}-{plan.last}",
               "--valid-days", str(plan.valid_days), "--test-days", str(plan.test_days)]
        if plan.gaps:
            cmd += ["--allow-day-gaps"]
        if plan.reuse:
            cmd += ["--reuse", plan.reuse]
        if plan.neg_sample_rate is not None:
            cmd += ["--neg-sample-rate", repr(plan.neg_sample_rate)]
        return cmd + [*plan.featurize_args, "--overwrite"]

    def train_cmd(self, data: Path, run_dir: Path, warm_from: str | None) -> list[str]:
        t = self.cfg.train
        return [find_tool("torchrun", self.env), "--standalone", f"--nproc_per_node={t.nproc}",
                str(ROOT / "deepfm" / "train.py"), "--data", str(data), "--out", str(run_dir), *trainer_args(t),
                *(["--warm-start", warm_from] if warm_from else []), *t.extra_args]

    @staticmethod
    def evaluate_cmd(version: Version, data: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "deepfm.evaluate", "--run", str(version.path), "--checkpoint",
                str(version.checkpoint), "--data", str(data), "--split", "test", "--json", str(out)]

    @staticmethod
    def export_cmd(run_dir: Path, ckpt: Path | str, data: Path, out: Path) -> list[str]:
        """The export of the checkpoint the version gets (not ``best``: the same weights as its checkpoint/)."""
        return [sys.executable, "-m", "deepfm.export", "--run", str(run_dir), "--checkpoint", str(ckpt),
                "--data", str(data), "--out", str(out)]

    # -- the dry run --------------------------------------------------------------------------------
    def dry_run(self) -> int:
        """Print what a run would do now; change nothing (no lock, no folders)."""
        try:
            outcome, state = self.decide()
            if isinstance(outcome, Nothing):
                self.say_nothing(outcome, state)
            else:
                self.describe(outcome)
            return EXIT_OK
        except (StepError, RegistryError, OSError, ValueError) as e:
            print(f"retrain (dry run): error: {e}", file=sys.stderr)
            return EXIT_FAILED

    def describe(self, plan: Plan) -> None:
        day_dir = self.work_dir(plan)
        feat, run_dir = day_dir / FEATURIZED, day_dir / TRAIN_RUN
        resume = layout.latest_checkpoint(run_dir)
        print(f"retrain (dry run): would process day {plan.day}: {plan.window_text()}; {plan.start_text()}")
        print(f"  work folder: {day_dir}" + (" (exists: its finished steps would be reused)" if day_dir.exists() else ""))
        print(f"  1. featurize{' (already complete, reused)' if M.is_complete(feat) else ''} days {list(plan.days)} "
              f"(linked into {day_dir / INPUT}): {quote(self.featurize_cmd(plan, day_dir))}")
        trailing = (f"against trailing day(s) {list(plan.trailing)}" if plan.trailing else "no trailing days yet")
        print(f"  2. data checks of day {plan.day} {trailing}"
              + ("" if plan.hold_on_checks else " (recorded only: an operator re-admitted the day)"))
        print(f"  3. train{f' (resumes from {resume})' if resume else ''}: "
              f"{quote(self.train_cmd(feat, run_dir, plan.warm_start_from))}")
        if plan.parent:
            print(f"  4. evaluate current {plan.parent} on the same test day: "
                  f"{quote(self.evaluate_cmd(self.registry.version(plan.parent), feat, day_dir / EVAL_CURRENT))}")
        else:
            print("  4. no current model to compare with")
        print(f"  5. gate: {describe_gate(self.cfg.gate, plan.parent is not None)}")
        name = self.registry.next_name()
        export = self.export_cmd(run_dir, "<its latest checkpoint>", feat, day_dir / MODEL_FILE)
        print(f"  6. if it passes: export it: {quote(export)}; then {self.cfg.registry_dir / name} (its checkpoint "
              f"and {MODEL_FILE}), then "
              f"{self.cfg.registry_dir / CURRENT} -> it; keep the last {self.cfg.keep_versions} version(s)")

    # -- the scheduled run --------------------------------------------------------------------------
    def scheduled(self) -> int:
        """Take the lock, then see, decide and act; SIGTERM/SIGHUP stop the step and are recorded."""
        return self._with_lock(self._locked)

    def readmit(self, day: int) -> int:
        """Let an excluded day into later windows again (under the lock), with a run record saying so."""
        def body() -> int:
            try:
                was = self.registry.readmit(day, self.record.run_id)
            except RegistryError as e:
                print(f"retrain: error: --readmit {day}: {e}", file=sys.stderr)
                return EXIT_CONFIG
            self.record.update(day=day, action="readmit", readmitted=was.to_json())
            self.record.finish(status="readmitted", decision="readmitted", reason=f"re-admitted by an operator; it "
                                                                                   f"was {was.text}")
            print(f"retrain: readmitted day {day} (it was {was.text}); later windows include it again")
            print(f"retrain: run record {self.record.path}")
            return EXIT_OK
        return self._with_lock(body)

    def _with_lock(self, body: Callable[[], int]) -> int:
        self.cfg.registry_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.cfg.registry_dir / LOCK)
        try:
            lock.acquire()
        except LockBusy as e:
            print(f"retrain: error: {e}", file=sys.stderr)
            return EXIT_LOCKED
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

        def on_signal(signum: int, frame: Any) -> None:
            raise Interrupted(signum)
        for s in old:
            signal.signal(s, on_signal)
        try:
            return body()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            lock.release()

    def _locked(self) -> int:
        try:
            self.step = "find_days"
            self.registry.remove_partial()
            self.records.mark_interrupted(self.record.run_id)
            outcome, state = self.decide()
            if isinstance(outcome, Nothing):
                self.say_nothing(outcome, state)
                return EXIT_OK
            return self._execute(outcome)
        except StepError as e:
            return self._fail(e.step, str(e))
        except (Interrupted, KeyboardInterrupt) as e:
            signum = e.signum if isinstance(e, Interrupted) else int(signal.SIGINT)
            self._fail(self.step, f"interrupted by signal {signal.Signals(signum).name}")
            return 128 + signum
        except (ContractError, RegistryError, M.ManifestError) as e:      # bad contract, registry, data
            return self._fail(self.step, str(e))
        except (OSError, ValueError) as e:
            return self._fail(self.step, f"{type(e).__name__}: {e}")
        except Exception as e:                          # a bug: still a record and a clear message
            return self._fail(self.step, f"{type(e).__name__}: {e}", traceback.format_exc())

    def _fail(self, step: str, message: str, tb: str | None = None) -> int:
        self.record.update(status="failed", decision="failed", failed_step=step, error=message, finished=now(),
                           **({"traceback": tb} if tb else {}))
        print(f"retrain: error: step {step!r} failed: {message} (run record {self.record.path})", file=sys.stderr)
        return EXIT_FAILED

    def _begin(self, step: str) -> None:
        self.step = step
        self.record.begin(step)

    def _child(self, step: str, cmd: list[str], timeout_key: str, error_prefixes: Sequence[str]) -> float:
        log = self.record.log_dir / f"{step}.log"
        self.record.step(step, command=quote(cmd), log=str(log))
        print(f"retrain: {step}: {quote(cmd)}", flush=True)
        return run_child(step, cmd, log=log, env=self.env, timeout=getattr(self.cfg.timeouts, timeout_key),
                         timeout_key=f"timeouts.{timeout_key}", error_prefixes=error_prefixes)

    # -- acting on the plan -------------------------------------------------------------------------
    def _execute(self, plan: Plan) -> int:
        day_dir, resumed = self._open_work_dir(plan)
        self.record.update(day=plan.day, window={"first": plan.first, "last": plan.last, "days": list(plan.days),
                                                 "splits": {k: list(v) for k, v in plan.splits.items()}},
                           parent=plan.parent, warm_start=plan.warm_start, start="warm" if plan.warm_start else "cold",
                           cold_start_reason=plan.cold_start_reason, run_key=plan.run_key, work_dir=str(day_dir),
                           resumed_work_dir=resumed, left_out=[{"day": x.day, "reason": x.reason} for x in plan.left_out],
                           trailing_days=list(plan.trailing))
        print(f"retrain: day {plan.day}: {plan.window_text()}; {plan.start_text()}"
              + (f"; resuming {day_dir}" if resumed else ""), flush=True)
        feat, manifest = self._featurize(plan, day_dir)
        checked = self._check_data(plan, feat, manifest)
        if checked.held and plan.hold_on_checks:
            return self._hold(plan, day_dir, checked)
        warm_from = plan.warm_start_from
        cold = cold_after_featurize(plan, manifest.feature_fingerprint)
        if cold is not None:
            warm_from = None
            self.record.update(warm_start=False, start="cold", cold_start_reason=cold)
        run_dir, ckpt, train_metrics = self._train(day_dir, feat, warm_from)
        candidate = train_metrics.get("test") or {}
        self.record.update(candidate_metrics=candidate)
        current_metrics = self._evaluate_current(plan, day_dir, feat, manifest)

        self._begin("gate")
        passed, checks = gate(candidate, current_metrics, self.cfg.gate)
        self.record.update(gate={"passed": passed, "checks": checks})
        self.record.step("gate", status="passed" if passed else "rejected")
        if not passed and plan.parent is None:
            return self._no_model(plan, day_dir, checks)
        version = None
        if passed:
            model, card = self._export(day_dir, feat, manifest, run_dir, ckpt)
            self._begin("publish")
            version = self._publish(plan, feat, manifest, run_dir, ckpt, model, card, train_metrics, checks,
                                    warm_from)
            self.record.step("publish", status="done", version=version.name)
            if plan.day in self.registry.excluded():         # a forced redo of an excluded day that passed
                self.registry.readmit(plan.day, self.record.run_id, by=f"run {self.record.run_id} (promoted)")
        else:
            judged = day_failures(checks)
            if judged:
                self.registry.exclude(Exclusion(
                    day=plan.day, by="gate", checks=tuple(judged), run_id=self.record.run_id, since=now(),
                    reason="; ".join(c["detail"] for c in checks if c["check"] in judged)))
            self.record.update(excluded=bool(judged))
        self._finish(plan, day_dir, version, warm_from, checks)
        return EXIT_OK

    def _check_data(self, plan: Plan, feat: Path, manifest: M.Manifest) -> DataChecks:
        """The new day's statistics (kept for the days after it) against the trailing days' kept ones."""
        self._begin("data_checks")
        st = read_day_stats(feat, manifest, plan.day)
        trailing = [t for t in (self.stats.load(d) for d in plan.trailing) if t is not None]
        checked = check_day(st, trailing, self.cfg.checks)
        self.stats.save(st)
        status = ("skipped" if checked.skipped else "passed" if not checked.held
                  else "held" if plan.hold_on_checks else "waived")
        self.record.update(day_stats=st.to_json(), data_checks={**checked.to_json(), "enforced": plan.hold_on_checks})
        self.record.step("data_checks", status=status, stats=str(self.stats.path(plan.day)), finished=now(),
                         **({"reason": checked.skipped} if checked.skipped else {}))
        if checked.held and not plan.hold_on_checks:
            print(f"retrain: day {plan.day}: data checks would hold it ({checked.reason}); re-admitted by an "
                  "operator, so it trains", flush=True)
        return checked

    def _hold(self, plan: Plan, day_dir: Path, checked: DataChecks) -> int:
        """A day outside the data checks' bounds: not trained on, processed, excluded from later windows."""
        bounds = tuple(dict.fromkeys(c.bound for c in checked.failed if c.bound))
        self.registry.exclude(Exclusion(day=plan.day, by="data_checks", checks=bounds, reason=checked.reason,
                                        run_id=self.record.run_id, since=now()))
        self.step = "prune"
        self.record.update(pruned_work_dirs=self._prune_work(day_dir), excluded=True)
        self.record.finish(status="held", decision="held", version=self.registry.current_name(),
                           reason=f"held by data checks: {checked.reason}")
        print(f"retrain: held day {plan.day}: {checked.reason}")
        print(f"retrain: run record {self.record.path}")
        return EXIT_OK

    def _no_model(self, plan: Plan, day_dir: Path, checks: list[dict]) -> int:
        """The first candidate was rejected: nothing to serve, so the run fails and the day stays unprocessed
        (a later run tries it again, or the next day)."""
        reasons = "; ".join(c["detail"] for c in checks if not c["passed"])
        self.step = "prune"
        self.record.update(pruned_work_dirs=self._prune_work(day_dir))
        self.record.finish(status="no_model", decision="rejected", version=None, failed_step="gate",
                           reason=reasons, error=f"no model to serve: the first candidate was rejected ({reasons})")
        print(f"retrain: error: no model to serve: the first candidate was rejected ({reasons}); day {plan.day} is "
              f"not marked processed: the next run tries again (run record {self.record.path})", file=sys.stderr)
        print(f"retrain: run record {self.record.path}")
        return EXIT_FAILED

    def _open_work_dir(self, plan: Plan) -> tuple[Path, bool]:
        """The plan's work folder (and whether it existed: its finished steps are reused)."""
        day_dir = self.work_dir(plan)
        resumed = day_dir.exists()
        day_dir.mkdir(parents=True, exist_ok=True)
        want = {**plan.to_json(), "run_key": plan.run_key}
        saved = read_json(day_dir / PLAN_FILE)
        if saved is not None and saved != want:            # cannot happen with the key in the name
            shutil.rmtree(day_dir)
            day_dir.mkdir(parents=True)
            resumed = False
        write_json(day_dir / PLAN_FILE, want)
        return day_dir, resumed

    def _featurize(self, plan: Plan, day_dir: Path) -> tuple[Path, M.Manifest]:
        self._begin("featurize")
        feat = day_dir / FEATURIZED
        try:
            manifest = M.open_featurized(feat)
            self.record.step("featurize", status="reused", output=str(feat))
        except M.ManifestError:
            for stale in day_dir.glob(f"{FEATURIZED}.__*"):      # a killed job's staging folder
                shutil.rmtree(stale, ignore_errors=True)
            linked = link_days(self.cfg.raw_dir, self.file_pattern, plan.days, day_dir / INPUT)
            self.record.step("featurize", input=str(day_dir / INPUT), linked=linked)
            secs = self._child("featurize", self.featurize_cmd(plan, day_dir), "featurize",
                               ["featurize: error:", "Error:", "Exception"])
            self.record.step("featurize", status="done", seconds=secs, output=str(feat))
            try:
                manifest = M.open_featurized(feat)
            except M.ManifestError as e:
                raise StepError("featurize", str(e)) from None
        test_days = list(manifest.splits["test"].days)
        if test_days != [plan.day]:
            raise StepError("featurize", f"{feat}: test days {test_days}, expected [{plan.day}]")
        self.record.update(feature_fingerprint=manifest.feature_fingerprint, splits={
            s: {"days": list(x.days), "rows": x.rows, "positives": x.positives} for s, x in manifest.splits.items()})
        self.record.step("featurize", finished=now())
        return feat, manifest

    def _train(self, day_dir: Path, feat: Path, warm_from: str | None) -> tuple[Path, Path, dict]:
        """Train the candidate (a relaunch on the same run folder resumes from its latest complete
        checkpoint); its run folder, checkpoint and metrics.json."""
        self._begin("train")
        run_dir, done = day_dir / TRAIN_RUN, day_dir / TRAIN_DONE
        if done.exists() and (run_dir / layout.METRICS).exists():
            self.record.step("train", status="reused", run_dir=str(run_dir))
        else:
            resume_from = layout.latest_checkpoint(run_dir)
            kill_stale(["--out", str(run_dir)])                    # workers of a run that was killed
            self.record.step("train", resumed=resume_from is not None,
                             resumed_from=str(resume_from) if resume_from else None, warm_start_from=warm_from)
            secs = self._child("train", self.train_cmd(feat, run_dir, warm_from), "train", ["train: error:", "Error:"])
            done.write_text(now() + "\n")
            self.record.step("train", status="done", seconds=secs, run_dir=str(run_dir))
        metrics = read_json(run_dir / layout.METRICS)
        ckpt = layout.latest_checkpoint(run_dir)
        if not isinstance(metrics, dict) or ckpt is None:
            raise StepError("train", f"{run_dir}: no {layout.METRICS} or no complete checkpoint after training")
        self.record.step("train", checkpoint=str(ckpt), global_step=metrics.get("global_step"), finished=now())
        return run_dir, ckpt, metrics

    def _evaluate_current(self, plan: Plan, day_dir: Path, feat: Path, manifest: M.Manifest) -> dict | None:
        """The current model's metrics on the same held-out rows, or None when there is none or it cannot
        read the new features."""
        self._begin("evaluate_current")
        metrics: dict | None = None
        fp = manifest.feature_fingerprint
        if plan.parent is None:
            self.record.step("evaluate_current", status="skipped", reason="no current model")
        elif plan.parent_feature_fingerprint != fp:
            self.record.step("evaluate_current", status="skipped",
                             reason=f"{plan.parent} was trained on features {plan.parent_feature_fingerprint}, the "
                                    f"new ones are {fp}: it cannot score them; absolute checks only")
        else:
            out = day_dir / EVAL_CURRENT
            metrics = read_json(out)
            if isinstance(metrics, dict) and "auc" in metrics:
                self.record.step("evaluate_current", status="reused")
            else:
                tmp = day_dir / f".{EVAL_CURRENT}.tmp"
                cmd = self.evaluate_cmd(self.registry.version(plan.parent), feat, tmp)
                secs = self._child("evaluate_current", cmd, "evaluate", ["evaluate: error:", "Error:"])
                os.replace(tmp, out)
                metrics = read_json(out)
                self.record.step("evaluate_current", status="done", seconds=secs)
        self.record.update(current_metrics=metrics)
        self.record.step("evaluate_current", finished=now())
        return metrics

    def _export(self, day_dir: Path, feat: Path, manifest: M.Manifest, run_dir: Path,
                ckpt: Path) -> tuple[Path, A.ModelCard]:
        """The candidate exported (python -m deepfm.export of ``ckpt``, the checkpoint its version gets) to
        the work folder's model.pt2, and its card (read torch-free). An export of the same checkpoint
        already there is reused (deepfm.export renames the file into place only when it is complete and
        its golden set checked). Its feature fingerprint must be the featurized data's."""
        self._begin("export")
        out = day_dir / MODEL_FILE
        card = _card_if_exported(out, ckpt)
        if card is not None:
            self.record.step("export", status="reused", output=str(out))
        else:
            secs = self._child("export", self.export_cmd(run_dir, ckpt, feat, out), "export",
                               ["export: error:", "Error:"])
            self.record.step("export", status="done", seconds=secs, output=str(out))
            try:
                card = A.read_card(out)
            except A.ArtifactError as e:
                raise StepError("export", str(e)) from None
        if card.feature_fingerprint != manifest.feature_fingerprint:
            raise StepError("export", f"{out}: made for features {card.feature_fingerprint}, the candidate's data "
                                      f"{feat} has {manifest.feature_fingerprint}")
        self.record.update(model_fingerprint=card.model_fingerprint)
        self.record.step("export", model_fingerprint=card.model_fingerprint, finished=now())
        return out, card

    def _publish(self, plan: Plan, feat: Path, manifest: M.Manifest, run_dir: Path, ckpt: Path, model: Path,
                 card: A.ModelCard, train_metrics: dict, checks: list[dict], warm_from: str | None) -> Version:
        r = self.record.data
        s = plan.splits
        lineage = {
            "parent": plan.parent, "created": now(), "run_id": self.record.run_id, "day": plan.day,
            "window": [plan.first, plan.last], "days_trained": list(s["train"]), "valid_days": list(s["valid"]),
            "test_days": list(s["test"]), "featurized": str(feat), "run_dir": str(run_dir),
            "checkpoint_source": str(ckpt), "global_step": train_metrics.get("global_step"),
            "warm_start": warm_from is not None, "warm_started_from": plan.parent if warm_from else None,
            "cold_start_reason": None if warm_from else r.get("cold_start_reason"),
            "feature_fingerprint": manifest.feature_fingerprint, "contract_fingerprint": manifest.contract_fingerprint,
            "contract": plan.contract, "train": plan.train, "model_fingerprint": card.model_fingerprint,
        }
        documents = {TRAIN_METRICS: train_metrics,
                     METRICS: {"test": r["candidate_metrics"], "current_on_same_rows": r["current_metrics"],
                              "gate": checks, "test_day": plan.day}}
        return self.registry.publish(plan.run_key, ckpt, model, feat, manifest, documents, lineage)

    def _finish(self, plan: Plan, day_dir: Path, version: Version | None, warm_from: str | None,
                checks: list[dict]) -> None:
        self.step = "prune"
        removed = self.registry.prune(self.cfg.keep_versions)
        self.record.update(pruned_versions=removed, pruned_work_dirs=self._prune_work(day_dir))
        candidate, current = self.record.data["candidate_metrics"], self.record.data["current_metrics"]
        if version is not None:
            self.record.finish(status="promoted", decision="promoted", version=version.name, reason=None)
            vs = f" vs current {fmt(current.get('auc'))}" if current else ""
            msg = (f"retrain: day {plan.day}: promoted {version.name} (model {version.model_fingerprint}; "
                   f"{f'warm start from {plan.parent}' if warm_from else 'cold start'}; test AUC "
                   f"{fmt(candidate.get('auc'))}{vs}, logloss {fmt(candidate.get('logloss'))}, "
                   f"calibration {fmt(candidate.get('calibration'))})")
        else:
            reasons = "; ".join(c["detail"] for c in checks if not c["passed"])
            cur = self.registry.current_name()
            self.record.finish(status="kept_current", decision="kept_current", version=cur, reason=reasons)
            judged = day_failures(checks)
            later = (f"day {plan.day} is left out of later windows ({', '.join(judged)}; --readmit {plan.day} to "
                     "let it in)" if judged else f"day {plan.day} stays in later windows (only vs_current failed)")
            msg = (f"retrain: day {plan.day}: kept current {self.label(cur)}: the candidate was rejected: {reasons}; "
                   f"{later}")
        print(msg)
        print(f"retrain: run record {self.record.path}")

    def _prune_work(self, keep_dir: Path) -> list[str]:
        """Delete per-day work folders that no kept version refers to (its featurized data), except this
        run's."""
        root = self.cfg.work_dir / DAYS
        referenced = {keep_dir.resolve()}
        for n in self.registry.versions():
            try:
                feat = self.registry.version(n).lineage.get("featurized")
            except RegistryError:
                continue
            if feat:
                referenced.add(Path(feat).resolve().parent)
        removed = []
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if d.is_dir() and d.resolve() not in referenced:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed


def _card_if_exported(out: Path, ckpt: Path) -> A.ModelCard | None:
    """The card of an export of ``ckpt`` already at ``out`` (a rerun of the plan), or None."""
    try:
        card = A.read_card(out)
    except A.ArtifactError:
        return None
    return card if Path(card.checkpoint) == ckpt.resolve() else None


def run(cfg: RetrainConfig, day: int | None = None, refit: bool = False, force: bool = False,
        dry_run: bool = False, readmit: int | None = None) -> int:
    """One retrain run (or, ``dry_run``, what it would do; or, ``readmit``, let that excluded day into
    later windows again); the exit code."""
    r = Run(cfg, day=day, refit=refit, force=force)
    if readmit is not None:
        return r.readmit(readmit)
    return r.dry_run() if dry_run else r.scheduled()
