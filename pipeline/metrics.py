"""Exact binary-classification metrics on numpy arrays (no torch, no sklearn).

    >>> auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
"""
from __future__ import annotations

import numpy as np

EPS = 1e-7


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties get their average rank): exact, O(n log n)."""
    score = np.asarray(score, dtype=np.float64)
    label = np.asarray(label).astype(bool)
    n_pos = int(label.sum())
    n_neg = len(label) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0          # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(prob: np.ndarray, label: np.ndarray) -> float:
    p = np.clip(np.asarray(prob, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(label, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(prob: np.ndarray, label: np.ndarray) -> float:
    """Logloss divided by the entropy of the observed CTR (He et al., 2014): < 1 beats the constant."""
    ctr = float(np.clip(np.mean(label), EPS, 1 - EPS))
    base = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    return logloss(prob, label) / base


def calibration(prob: np.ndarray, label: np.ndarray) -> float:
    """Mean prediction / observed CTR (1.0 is calibrated)."""
    return float(np.mean(prob) / max(np.mean(label), EPS))


def debias(q, rate: float):
    """Undo negative sampling (negatives kept with probability ``rate``) on predicted probabilities:
    p = q / (q + (1 - q) / rate). Works on floats and numpy arrays."""
    return q / (q + (1.0 - q) / rate)


def summary(prob: np.ndarray, label: np.ndarray) -> dict[str, float]:
    return {"auc": auc(prob, label), "logloss": logloss(prob, label), "ne": normalized_entropy(prob, label),
            "calibration": calibration(prob, label), "rows": int(len(label))}
