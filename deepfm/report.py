"""python -m deepfm.report --run RUN [--run RUN ...] --out report.html [--name NAME ...] [--title TITLE]

One self-contained HTML file about one or more training runs, for people to look at instead of JSON:
the test metrics table, the ROC curve, the reliability (calibration) diagram of the probabilities after
the negative-sampling correction, the train loss and the valid AUC and logloss against steps, every
valid evaluation, and, from the featurized data's manifest, the data summary (rows and positives per
split before and after sampling, rejected lines by reason, each field's table size and how much of it
the train split fills). Given several runs the curves are overlaid and a comparison table is added
(the difference to the best test AUC and logloss, training time relative to LR's run, or to the first
run's without one). When the data was generated (pipeline.generate: its ``truth/`` beside the raw
day files the manifest names) the oracle, the generator's true click probabilities, is a row of the
tables and a curve of the ROC.

Everything is read from files: RUN/metrics.json, RUN/curves.json and RUN/predictions/test.npz
(deepfm/runfiles.py; a run of an older trainer without them gets its tables and a note instead of
its figures), the latest checkpoint's meta.json for the settings, the data folder's manifest.json
(metrics.json names the folder). No torch import: it runs wherever numpy and matplotlib do. Images are
matplotlib PNGs (the Agg canvas) embedded as base64 ``data:`` URIs; no script, no external link.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from deepfm import runfiles
from pipeline import layout
from pipeline import manifest as M
from pipeline import metrics as PM

log = logging.getLogger("deepfm.report")

FILL_MAX_ROWS = 5_000_000       # table fill is counted over the train split up to this many rows
ROC_POINTS = 2_000              # points drawn per ROC curve (the curve is exact, then thinned)
CALIBRATION_BINS = 20           # equal-count bins of the reliability diagram


class ReportError(ValueError):
    """A run folder the report cannot use (no metrics.json): one line, exit 2."""


# --- what a run folder holds -------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    label: str
    metrics: dict[str, Any]
    settings: dict[str, Any] | None             # the latest checkpoint's config (conf/train.yaml's keys)
    curves: dict[str, Any] | None
    predictions: runfiles.Predictions | None
    data: Path | None
    manifest: M.Manifest | None
    notes: tuple[str, ...] = ()

    @property
    def model(self) -> str:
        return str(self.metrics.get("model", "?"))

    @property
    def test(self) -> dict[str, Any]:
        t = self.metrics.get("test")
        return t if isinstance(t, dict) else {}

    @property
    def seconds(self) -> float | None:
        s = (self.metrics.get("train") or {}).get("seconds")
        return float(s) if isinstance(s, (int, float)) else None

    def steps_per_epoch(self) -> int | None:
        """Steps per epoch: the train split's rows over the examples of one step (batch x world)."""
        steps, examples = self.metrics.get("global_step"), (self.metrics.get("train") or {}).get("examples")
        if self.manifest is None or not steps or not examples:
            return None
        return max(1, self.manifest.rows("train") // max(1, round(examples / steps)))

    def epochs(self) -> float | None:
        """Epochs trained (fractional when stopped mid-epoch by max_steps)."""
        spe = self.steps_per_epoch()
        return None if spe is None else self.metrics["global_step"] / spe

    def best_epoch(self) -> float | None:
        """The epoch (1 = the end of the first) of the best valid evaluation, whose weights were tested."""
        spe, best = self.steps_per_epoch(), self.metrics.get("valid_best_step")
        if spe is None or not isinstance(best, int) or best < 0:
            return None
        return best / spe


def _checkpoint_meta(run: Path) -> dict[str, Any] | None:
    ckpt = layout.latest_checkpoint(run)
    if ckpt is None:
        return None
    try:
        d = json.loads((ckpt / layout.CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def load_run(path: str | Path, label: str | None = None) -> Run:
    """A run folder's files; :class:`ReportError` without a metrics.json."""
    run = Path(path)
    try:
        metrics = json.loads((run / layout.METRICS).read_text())
    except OSError as e:
        raise ReportError(f"{run}: no readable {layout.METRICS} ({e.strerror}); is it a finished run folder?") from None
    except ValueError as e:
        raise ReportError(f"{run / layout.METRICS}: not JSON: {e}") from None
    meta = _checkpoint_meta(run)
    notes = []
    data_name = metrics.get("data") or (meta or {}).get("data")
    data = Path(data_name) if data_name else None
    manifest = None
    if data is not None:
        try:
            manifest = M.read(data)
        except M.ManifestError as e:
            notes.append(f"no data summary: {e}")
    else:
        notes.append("no data summary: neither metrics.json nor a checkpoint names the data folder")
    curves = runfiles.read_curves(run)
    predictions = runfiles.read_predictions(run, "test")
    if curves is None:
        notes.append(f"no {runfiles.CURVES} (a run of an older trainer): no train loss curve")
    if predictions is None and "test" in metrics:
        notes.append(f"no {runfiles.predictions_path(Path('.'))} (a run of an older trainer): no ROC or reliability "
                     "diagram")
    return Run(run, label or str(metrics.get("model", run.name)), metrics, (meta or {}).get("config"), curves,
               predictions, data, manifest, tuple(notes))


def load_runs(paths: Sequence[str | Path], labels: Sequence[str] = ()) -> list[Run]:
    """The runs, labelled by ``labels`` in order, else by model (and by folder name where models repeat)."""
    runs = [load_run(p, labels[i] if i < len(labels) else None) for i, p in enumerate(paths)]
    given = len(labels)
    seen: dict[str, int] = {}
    for r in runs[given:]:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs[given:]:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"
    return runs


# --- the oracle: the generator's true click probabilities -------------------------------------------

@dataclass(frozen=True)
class Oracle:
    metrics: dict[str, float]
    p: np.ndarray            # subsampled as the runs' predictions are (deepfm.runfiles.subsample)
    y: np.ndarray
    raw: Path
    note: str = ""


def raw_folder(m: M.Manifest) -> Path | None:
    """The generated logs' folder (the one holding ``truth/``) the manifest's input came from, or None."""
    candidates = []
    for f in m.input.files:
        local = layout.local_path(f)
        if local is not None:
            candidates.append(Path(local).parent)
    local = layout.local_path(m.input.path)
    if local is not None:
        candidates.append(Path(local))
    for c in candidates:
        if (c / "truth").is_dir():
            return c
    return None


def oracle(m: M.Manifest) -> Oracle | None:
    """The test split's oracle AUC and logloss from pipeline.generate's truth files, or None when the
    data was not generated (or its truth files are gone)."""
    raw = raw_folder(m)
    days = m.splits["test"].days if "test" in m.splits else ()
    if raw is None or not days or not all((raw / "truth" / f"day_{d}.prob").exists() for d in days):
        return None
    from pipeline.generate import read_truth
    parts = [read_truth(raw, d) for d in days]
    p = np.concatenate([a for a, _ in parts]).astype(np.float64)
    y = np.concatenate([b for _, b in parts])
    note = ""
    if len(y) != m.rows("test"):
        note = (f"the oracle is over the raw test day's {len(y)} lines; the test split has {m.rows('test')} rows "
                f"({m.rejects.total} lines rejected in all)")
    keep = runfiles.subsample(len(y))
    ps, ys = (p, y) if keep is None else (p[keep], y[keep])
    return Oracle(PM.summary(p, y), ps.astype(np.float32), ys, raw, note)


# --- figures -----------------------------------------------------------------------------------------

def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw: Any) -> tuple[Any, Any]:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def figure_uri(fig: Any) -> str:
    """The figure as a PNG ``data:`` URI (without the PNG's Software text, which names a web address)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colors(n: int) -> list[Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def roc_points(p: np.ndarray, y: np.ndarray, points: int = ROC_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve (false positive rate, true positive rate) at every distinct score, from (0, 0) to
    (1, 1), thinned to about ``points`` points (the ends kept).

        roc_points([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) -> ([0, 0, .5, .5, 1], [0, .5, .5, 1, 1])
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]        # the last row of each run of equal scores
    tps = np.cumsum(ys)[last]
    fps = last + 1 - tps
    pos, neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    fpr, tpr = np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]
    if len(fpr) > points:
        idx = np.unique(np.r_[np.linspace(0, len(fpr) - 1, points).round().astype(int), len(fpr) - 1])
        fpr, tpr = fpr[idx], tpr[idx]
    return fpr, tpr


def reliability(p: np.ndarray, y: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, np.ndarray]:
    """Equal-count bins of the predicted probability: per bin the mean prediction, the observed click
    rate, its normal 95% half-width and the row count."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    order = np.argsort(p, kind="mergesort")
    groups = [g for g in np.array_split(order, min(bins, max(len(p), 1))) if len(g)]
    n = np.array([len(g) for g in groups], dtype=np.float64)
    pred = np.array([p[g].mean() for g in groups])
    obs = np.array([y[g].mean() for g in groups])
    half = 1.96 * np.sqrt(np.maximum(obs * (1 - obs), 1e-12) / n)
    return {"predicted": pred, "observed": obs, "half_width": half, "rows": n}


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def roc_figure(runs: Sequence[Run], oracles: Sequence[Oracle]) -> str:
    fig, ax = new_figure(5.6, 5.0)
    ax = ax[0][0]
    ax.plot([0, 1], [0, 1], ":", color="lightgray", lw=1, label="constant predictor (AUC 0.5)")
    for r, c in zip(runs, colors(len(runs))):
        if r.predictions is None:
            continue
        fpr, tpr = roc_points(r.predictions.p, r.predictions.y)
        auc = r.test.get("auc")
        ax.plot(fpr, tpr, color=c, lw=1.4, label=f"{r.label} (AUC {auc:.4f})" if isinstance(auc, float) else r.label)
    for o in oracles:
        fpr, tpr = roc_points(o.p, o.y)
        ax.plot(fpr, tpr, "--", color="black", lw=1.2, label=f"oracle (AUC {o.metrics['auc']:.4f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.005), xlabel="false positive rate", ylabel="true positive rate",
           title="ROC, test split")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return figure_uri(fig)


def calibration_figure(runs: Sequence[Run]) -> str:
    fig, axes = new_figure(6.4, 6.4, 2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    hi = 0.0
    for r, c in zip(runs, colors(len(runs))):
        if r.predictions is None:
            continue
        b = reliability(r.predictions.p, r.predictions.y)
        hi = max(hi, float(b["predicted"].max()), float(b["observed"].max()),
                 float(np.quantile(r.predictions.p, 0.999)))
        top.errorbar(b["predicted"], b["observed"], yerr=b["half_width"], fmt="o-", ms=3, lw=1, color=c, capsize=2,
                     label=f"{r.label} (mean p / CTR {r.test.get('calibration', float('nan')):.3f})")
        bottom.hist(r.predictions.p, bins=60, range=(0, 1), histtype="step", color=c, lw=1)
    hi = min(1.0, hi * 1.05) if hi > 0 else 1.0
    top.plot([0, hi], [0, hi], ":", color="gray", lw=1, label="perfectly calibrated")
    top.set(xlim=(0, hi), ylim=(0, hi), ylabel="observed click rate",
            title=f"Reliability, test split ({CALIBRATION_BINS} equal-count bins, 95% intervals)")
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    bottom.set(xlabel="predicted probability after the sampling correction", ylabel="rows")
    bottom.set_yscale("log")
    bottom.grid(alpha=0.3)
    return figure_uri(fig)


def curves_figure(runs: Sequence[Run]) -> str:
    fig, axes = new_figure(11.5, 3.6, 1, 3)
    loss_ax, auc_ax, ll_ax = axes[0]
    any_loss = False
    for r, c in zip(runs, colors(len(runs))):
        points = ((r.curves or {}).get("train_loss") or {}).get("points") or []
        if points:
            any_loss = True
            s, v = zip(*points)
            loss_ax.plot(s, v, color=c, lw=1, label=r.label)
        hist = r.metrics.get("history") or []
        if hist:
            steps = [h["step"] for h in hist]
            auc_ax.plot(steps, [h["auc"] for h in hist], "o-", color=c, ms=3, lw=1, label=r.label)
            ll_ax.plot(steps, [h["logloss"] for h in hist], "o-", color=c, ms=3, lw=1, label=r.label)
            best = r.metrics.get("valid_best_step")
            for h in hist:
                if h["step"] == best:
                    auc_ax.plot([best], [h["auc"]], "*", color=c, ms=10)
    if any_loss:
        loss_ax.set(xlabel="step", ylabel="loss", title="train loss (rank 0, sampled rows)")
        loss_ax.grid(alpha=0.3)
    else:
        _empty(loss_ax, "no train loss recorded")
    auc_ax.set(xlabel="step", ylabel="AUC", title="valid AUC (* the tested weights)")
    ll_ax.set(xlabel="step", ylabel="logloss", title="valid logloss (corrected)")
    for ax in (auc_ax, ll_ax):
        ax.grid(alpha=0.3)
    (auc_ax if not any_loss else loss_ax).legend(fontsize=7)
    return figure_uri(fig)


# --- HTML ---------------------------------------------------------------------------------------------

def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not np.isfinite(x):
            return "–"
        return f"{x:.{digits}f}"
    return str(x)


@dataclass(frozen=True)
class Cell:
    """A table cell: its text and, for a number, the exact value (``data-value``, for readers and tests)."""

    text: str
    value: Any = None
    raw_html: bool = False


def num(x: Any, digits: int = 4, suffix: str = "") -> Cell:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool)
    return Cell(fmt(x, digits) + (suffix if ok and x is not None else ""), x if ok else None)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str | None = None,
          caption: str | None = None) -> str:
    out = [f'<table{f" id={chr(34)}{esc(table_id)}{chr(34)}" if table_id else ""}>']
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, Cell):
                attr = f' data-value="{esc(repr(c.value))}" class="n"' if c.value is not None else ""
                cells.append(f"<td{attr}>{c.text if c.raw_html else esc(c.text)}</td>")
            else:
                cells.append(f"<td>{esc(fmt(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def image(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; } caption { text-align: left; font-weight: 600; padding: 4px 0; }
.note { color: #666; font-size: 0.85em; } img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _settings_text(r: Run) -> str:
    s = r.settings or {}
    keys = ("hidden", "batch_size", "epochs", "dropout", "dense_lr", "sparse_optimizer", "sparse_lr", "seed",
            "max_steps", "crosses", "init_embeddings_from")
    parts = []
    for k in keys:
        v = s.get(k)
        if v in (None, [], 0):
            continue
        if k == "hidden":
            v = "-".join(map(str, v))
        elif k == "crosses":
            v = ",".join(":".join(pair) for pair in v)
        parts.append(f"{k} {v}")
    return "; ".join(parts) if parts else "–"


def runs_section(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        pred = r.predictions
        kept = "–" if pred is None else (f"{len(pred.y):,} of {pred.rows:,} (sampled)" if pred.subsampled
                                          else f"all {pred.rows:,}")
        rows.append([r.label, Cell(esc(r.path), raw_html=True), r.model,
                     f"{r.metrics.get('world_size', '?')} x {r.metrics.get('device', '?')}",
                     r.metrics.get("precision", "?"), _settings_text(r), str(r.data or "–"), kept])
    body = table(["run", "folder", "model", "ranks", "precision", "settings", "data", "test predictions kept"],
                 rows, "runs")
    notes = [f"<li>{esc(r.label)}: {esc(n)}</li>" for r in runs for n in r.notes]
    return body + (f'<ul class="note">{"".join(notes)}</ul>' if notes else "")


def test_section(runs: Sequence[Run], oracles: Sequence[Oracle]) -> str:
    rows = []
    for r in runs:
        t = r.test
        rows.append([r.label, r.model, num(t.get("auc")), num(t.get("logloss"), 5), num(t.get("ne")),
                     num(t.get("calibration"), 3), num(t.get("rows")), num(r.metrics.get("weights_from_step")),
                     num(r.metrics.get("global_step")), num(r.metrics.get("valid_best_auc"))])
    for o in oracles:
        rows.append(["oracle (true click probabilities)", "–", num(o.metrics["auc"]), num(o.metrics["logloss"], 5),
                     num(o.metrics["ne"]), num(o.metrics["calibration"], 3), num(o.metrics["rows"]), "–", "–", "–"])
    note = ("<p class=\"note\">Test metrics over every row of the test split, after the sampling correction "
            f"({esc(M.CORRECTION)}); the tested weights are those of the best valid evaluation when "
            "<code>keep_best</code> is on. NE: logloss over the entropy of the observed click rate (below 1 beats "
            "a constant); calibration: mean prediction over the observed click rate.</p>")
    notes = "".join(f'<p class="note">{esc(o.note)}</p>' for o in oracles if o.note)
    return table(["run", "model", "test AUC", "test logloss", "NE", "calibration", "rows", "weights of step",
                  "steps", "best valid AUC"], rows, "test-metrics") + note + notes


def baseline(runs: Sequence[Run]) -> Run | None:
    """The run training times are relative to: the first LR run, else the first run."""
    return next((r for r in runs if r.model == "lr"), runs[0] if runs else None)


def comparison_section(runs: Sequence[Run], oracles: Sequence[Oracle]) -> str:
    aucs = [r.test["auc"] for r in runs if isinstance(r.test.get("auc"), float)]
    lls = [r.test["logloss"] for r in runs if isinstance(r.test.get("logloss"), float)]
    best_auc, best_ll = (max(aucs) if aucs else None), (min(lls) if lls else None)
    base = baseline(runs)
    base_s = base.seconds if base is not None else None
    lr = next((r for r in runs if r.model == "lr"), None)
    o = oracles[0] if len(oracles) == 1 else None
    rows = []
    for r in runs:
        auc, ll, s = r.test.get("auc"), r.test.get("logloss"), r.seconds
        gap = None
        if o is not None and lr is not None and isinstance(auc, float) and o.metrics["auc"] != lr.test.get("auc"):
            gap = (auc - lr.test["auc"]) / (o.metrics["auc"] - lr.test["auc"])
        rows.append([r.label, num(auc), num(auc - best_auc if isinstance(auc, float) and best_auc else None, 4),
                     num(ll, 5), num(ll - best_ll if isinstance(ll, float) and best_ll else None, 5),
                     num(100 * gap if gap is not None else None, 1, "%"), num(s, 1),
                     num(s / base_s if s is not None and base_s else None, 2), num(r.epochs(), 2),
                     num(r.best_epoch(), 2), num((r.metrics.get("train") or {}).get("examples_per_s"), 0)])
    is_lr = base is not None and base.model == "lr"
    rel = "LR's run" if is_lr else f"the first run's ({base.label})" if base is not None else "–"
    head = ["run", "test AUC", "Δ AUC vs best", "test logloss", "Δ logloss vs best",
            "LR → oracle AUC gap closed", "train s", "time / LR" if is_lr else "time / first run",
            "epochs", "best epoch", "examples/s"]
    note = (f"<p class=\"note\">Training time: seconds of training (reading, steps, optimizers; evaluation and "
            f"checkpoints excluded), relative to {esc(rel)}. Best epoch: when the tested weights were made "
            "(1 = the end of the first epoch).</p>")
    return table(head, rows, "comparison") + note


def history_section(runs: Sequence[Run]) -> str:
    out: list[str] = []
    for r in runs:
        hist = r.metrics.get("history") or []
        rows = [[num(h.get("step")), num(h.get("epoch")), num(h.get("auc")), num(h.get("logloss"), 5),
                 num(h.get("ne")), num(h.get("calibration"), 3), num(h.get("rows"))] for h in hist]
        out.append(f"<details><summary>{esc(r.label)}: {len(hist)} valid evaluation(s)</summary>"
                   + table(["step", "epoch", "AUC", "logloss", "NE", "calibration", "rows"], rows,
                           f"history-{len(out)}") + "</details>")
    return "\n".join(out)


def table_fill(data: Path, m: M.Manifest) -> dict[str, int] | None:
    """Per field, the distinct ids the train split uses (a boolean per table row, so O(rows)); None when
    the split has more than :data:`FILL_MAX_ROWS` rows or pyarrow is missing."""
    if m.rows("train") > FILL_MAX_ROWS:
        return None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    seen = {f.name: np.zeros(f.num_embeddings, dtype=bool) for f in m.fields}
    for f in sorted((data / "train").glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=262_144, columns=list(seen)):
            for name, used in seen.items():
                ids = batch.column(name).to_numpy(zero_copy_only=False)
                used[ids[(ids >= 0) & (ids < len(used))]] = True
    return {k: int(v.sum()) for k, v in seen.items()}


def data_section(data: Path, m: M.Manifest) -> str:
    out = [f'<p>Featurized data <code>{esc(data)}</code> (features {esc(m.feature_fingerprint)}, contract '
           f'{esc(m.contract.name)}, made {esc(m.created)} in {m.seconds:.1f} s by Spark {esc(m.spark_version)}); '
           f'input <code>{esc(m.input.path)}</code>: {m.input.lines:,} lines in {len(m.input.files)} file(s), days '
           f'{esc(", ".join(map(str, m.input.days)))}. Negative sampling: each train negative kept with probability '
           f'{m.sampling.neg_sample_rate} (seed {m.sampling.seed}); the models\' probabilities are corrected by '
           f'{esc(m.sampling.correction)}.</p>']
    rows = []
    for k, s in m.splits.items():
        b = s.before_sampling
        rows.append([k, ", ".join(map(str, s.days)) or "–", num(b.rows), num(b.positives),
                     num(b.positives / b.rows if b.rows else None), num(s.neg_sample_rate, 2), num(s.rows),
                     num(s.positives), num(s.positives / s.rows if s.rows else None), num(s.files)])
    out.append(table(["split", "days", "rows before sampling", "positives", "click rate", "negatives kept",
                      "rows after", "positives after", "click rate after", "files"], rows, "splits",
                     "Rows and positives per split"))
    rej = [[reason, num(n)] for reason, n in m.rejects.by_reason.items()]
    rej.append(["total", num(m.rejects.total)])
    out.append(table(["reason", "lines"], rej, "rejects", "Rejected lines by reason"))
    fill = table_fill(data, m)
    kept = dict(m.vocab.ids_kept) if m.vocab is not None else {}
    rows = []
    for f in m.fields:
        used = fill.get(f.name) if fill is not None else None
        rule = (f"{f.bucketing} buckets" if f.kind == "continuous" else
                f"min_count {f.min_count}" if f.min_count else "hashed")
        rows.append([f.name, f.kind, rule, num(f.num_embeddings), num(f.embedding_dim), num(kept.get(f.name)),
                     num(used), num(100 * used / f.num_embeddings if used is not None else None, 1, "%")])
    caption = ("Tables: rows, and the distinct ids the train split uses (fill)" if fill is not None else
               f"Tables (fill not counted: the train split has more than {FILL_MAX_ROWS:,} rows)")
    out.append(table(["field", "kind", "ids", "table rows", "dim", "ids kept by the vocabulary", "ids used in train",
                      "fill"], rows, "tables", caption))
    total = sum(f.num_embeddings for f in m.fields)
    out.append(f'<p class="note">{len(m.fields)} fields, {total:,} table rows in all.</p>')
    return "\n".join(out)


Section = tuple[str, str]           # (heading, HTML body)


def render(runs: Sequence[Run], out: str | Path, title: str | None = None, extra: Sequence[Section] = (),
           with_oracle: bool = True) -> Path:
    """Write the report of ``runs`` to ``out`` (atomically); ``extra`` sections come after the tables."""
    if not runs:
        raise ReportError("no run to report on")
    datas: dict[str, tuple[Path, M.Manifest]] = {}
    for r in runs:
        if r.data is not None and r.manifest is not None:
            datas.setdefault(str(r.data), (r.data, r.manifest))
    oracles = [o for _, m in datas.values() for o in [oracle(m) if with_oracle else None] if o is not None]
    multi = len(runs) > 1
    title = title or (f"Training report: {runs[0].label}" if not multi else f"Comparison of {len(runs)} runs")
    sections: list[Section] = [("Runs", runs_section(runs)), ("Test metrics", test_section(runs, oracles))]
    if multi:
        sections.append(("Comparison", comparison_section(runs, oracles)))
    sections += list(extra)
    have_predictions = any(r.predictions is not None for r in runs)
    if have_predictions:
        sections.append(("ROC curve", image(roc_figure(runs, oracles), "ROC curve")))
        sections.append(("Calibration after the sampling correction",
                         image(calibration_figure(runs), "reliability diagram") +
                         '<p class="note">Rows sorted by predicted probability and cut into equal-count bins; a '
                         'calibrated model\'s points lie on the diagonal. Below: how the predictions spread '
                         '(log scale).</p>' + "".join(
                             f'<p class="note">{esc(r.label)}: a seeded sample of {len(r.predictions.y):,} of the '
                             f'{r.predictions.rows:,} test rows.</p>' for r in runs
                             if r.predictions is not None and r.predictions.subsampled)))
    else:
        sections.append(("ROC curve and calibration", '<p class="note">No run holds its test predictions '
                                                      f'({esc(runfiles.PREDICTIONS)}/test.npz).</p>'))
    sections.append(("Training curves", image(curves_figure(runs), "training curves")))
    sections.append(("Valid evaluations", history_section(runs)))
    for data, m in datas.values():
        sections.append((f"Data: {data.name}", data_section(data, m)))
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = "\n".join(f"<h2>{esc(h)}</h2>\n{b}" for h, b in sections)
    text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n"
            f'<p class="note">python -m deepfm.report, {esc(when)}.</p>\n{body}\n</body></html>\n')
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m deepfm.report", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--run", action="append", required=True, help="a finished run folder (repeat for several)")
    p.add_argument("--out", required=True, type=Path, help="the HTML file to write")
    p.add_argument("--name", action="append", default=[], help="a label for each --run, in order (default: the model)")
    p.add_argument("--title")
    p.add_argument("--no-oracle", action="store_true", help="do not read the generator's truth files")
    a = p.parse_args(argv)
    runs = load_runs(a.run, a.name)
    out = render(runs, a.out, a.title, with_oracle=not a.no_oracle)
    print(f"report: {len(runs)} run(s) -> {out} ({out.stat().st_size / 1e3:,.0f} kB)")
    return out


def cli(entry: Callable[[], Any] = main) -> None:
    try:
        entry()
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
