from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.contract import load_contract
from pipeline.generate import CHUNK_ROWS, build_click_model, generate, make_chunk, read_truth
from pipeline.metrics import auc, logloss
from tests.conftest import RAW_DAYS, RAW_ROWS, SMALL


def read_day(raw: Path, day: int) -> list[list[str]]:
    return [line.split("\t") for line in (raw / f"day_{day}").read_text().splitlines()]


def test_day_files_have_the_rows_and_columns_asked_for(raw_logs):
    for day in range(RAW_DAYS):
        rows = read_day(raw_logs, day)
        assert len(rows) == RAW_ROWS
        assert {len(r) for r in rows} == {40}
        prob, label = read_truth(raw_logs, day)
        assert len(prob) == len(label) == RAW_ROWS
        assert [int(r[0]) for r in rows] == label.tolist()      # the side file follows the lines
        assert ((prob > 0) & (prob < 1)).all()


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    c = load_contract(SMALL)
    rows = CHUNK_ROWS + 123                     # two chunks
    generate(c, tmp_path / "a", [5], rows, seed=3, workers=1, max_cardinality=1000)
    generate(c, tmp_path / "b", [5], rows, seed=3, workers=2, max_cardinality=1000)
    generate(c, tmp_path / "c", [5], rows, seed=4, workers=1, max_cardinality=1000)
    a, b, d = ((tmp_path / x / "day_5").read_bytes() for x in "abc")
    assert a == b and a != d
    assert len(a.splitlines()) == rows


def test_ten_rows_work():
    model = build_click_model(load_contract(SMALL), seed=1, max_cardinality=100)
    chunk = make_chunk(model, "\t", day=0, chunk=0, rows=10)
    lines = chunk.text.decode().splitlines()
    assert len(lines) == 10 and all(len(x.split("\t")) == 40 for x in lines)


def test_realistic_properties(raw_logs):
    rows = read_day(raw_logs, 0) + read_day(raw_logs, 1)
    n = len(rows)
    labels = np.array([int(r[0]) for r in rows])
    assert 0.22 < labels.mean() < 0.28                          # about 25% positives
    cols = list(zip(*rows))
    ints, cats = cols[1:14], cols[14:]
    missing = [sum(v == "" for v in c) / n for c in ints + cats]
    assert min(missing) == 0.0 and max(missing) > 0.15         # some fields complete, some often missing
    values = [np.array([float(v) for v in c if v != ""]) for c in ints]
    assert any((v < 0).any() for v in values)                   # a few negative integers, as in Criteo
    # heavy tails: the maximum far above the median in every integer field
    assert all(v.max() > 20 * max(np.median(v), 1) for v in values)
    distinct = sorted(len(set(c) - {""}) for c in cats)
    assert distinct[0] <= 5 and distinct[-1] > 10_000           # a handful to (here) tens of thousands
    # Zipf-like: in the largest field the top value is far more frequent than the median value
    big = max(cats, key=lambda c: len(set(c)))
    counts = sorted(Counter(v for v in big if v).values(), reverse=True)
    assert counts[0] > 50 * counts[len(counts) // 2]
    assert all(len(v) == 8 and int(v, 16) >= 0 for v in cats[0] if v)   # 8 hex digits


def _one_hot_lr(train_rows, test_rows, epochs=120):
    """Best first-order fit: logistic regression on one-hot values of every field (full-batch Adam)."""
    import torch
    torch.manual_seed(0)
    ncol = len(train_rows[0]) - 1
    vocab = [dict() for _ in range(ncol)]
    def encode(rows, grow):
        ids = np.zeros((len(rows), ncol), dtype=np.int64)
        for j in range(ncol):
            v = vocab[j]
            for i, r in enumerate(rows):
                key = r[j + 1]
                if key not in v and grow:
                    v[key] = len(v) + 1
                ids[i, j] = v.get(key, 0)
        offsets = np.cumsum([0] + [len(v) + 1 for v in vocab[:-1]])
        return torch.tensor(ids + offsets)
    xtr = encode(train_rows, True)
    xte = encode(test_rows, False)
    ytr = torch.tensor([float(r[0]) for r in train_rows])
    w = torch.zeros(sum(len(v) + 1 for v in vocab))
    b = torch.zeros(1)
    opt = torch.optim.Adam([w, b], lr=0.1)
    flat, n = xtr.reshape(-1), len(ytr)
    # the gradients of mean log loss + 1e-4 * ||w||^2, written out: a bincount is far faster than autograd's
    # scatter-add backward of w[xtr] (19 s -> a few)
    for _ in range(epochs):
        r = (torch.sigmoid(w[xtr].sum(1) + b) - ytr) / n
        w.grad = torch.bincount(flat, weights=r[:, None].expand(n, ncol).reshape(-1), minlength=len(w)).float() + 2e-4 * w
        b.grad = r.sum().reshape(1)
        opt.step()
    return torch.sigmoid(w[xte].sum(1) + b).numpy()


def test_planted_interactions_carry_signal_beyond_first_order(raw_logs):
    train = read_day(raw_logs, 0) + read_day(raw_logs, 1) + read_day(raw_logs, 2)
    test = read_day(raw_logs, 3)
    prob, label = read_truth(raw_logs, 3)
    oracle_auc = auc(prob, label)
    lr_auc = auc(_one_hot_lr(train, test), label)
    print(f"oracle AUC {oracle_auc:.4f}, first-order LR AUC {lr_auc:.4f}, oracle logloss {logloss(prob, label):.4f}")
    assert oracle_auc > 0.75
    assert oracle_auc - lr_auc > 0.03
