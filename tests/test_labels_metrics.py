"""Metrics: equality with scikit-learn, bootstrap CIs, tables, ROC figure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from wsi_convnext.labels.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    compute_metrics,
    f1,
    format_metrics_table,
    metrics_to_json,
    roc_auc,
    summarize_cv,
)


def _binary(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 * y + rng.uniform(0, 0.6, n), 0, 1)
    p1 = np.round(p1, 1)  # ties on purpose
    return y, np.stack([1 - p1, p1], axis=1)


def _multi(n: int = 90, c: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn(seed: int) -> None:
    y, p = _binary(seed=seed)
    pred = p.argmax(1)
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert f1(y, p) == pytest.approx(f1_score(y, pred, pos_label=1), abs=1e-12)
    # Positive class configurable: class 0 as positive.
    assert roc_auc(y, p, positive=0) == pytest.approx(roc_auc_score(y == 0, p[:, 0]), abs=1e-12)
    assert f1(y, p, positive=0) == pytest.approx(f1_score(y, pred, pos_label=0), abs=1e-12)


def test_multiclass_metrics_match_sklearn() -> None:
    y, p = _multi()
    pred = p.argmax(1)
    labels = [0, 1, 2]
    assert roc_auc(y, p) == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels), abs=1e-12
    )
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert f1(y, p) == pytest.approx(f1_score(y, pred, average="macro", labels=labels, zero_division=0), abs=1e-12)


def test_degenerate_predictions_match_sklearn() -> None:
    y = np.array([0, 0, 1, 1, 1])
    p = np.tile([0.9, 0.1], (5, 1))  # always predicts class 0, all scores tied
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert f1(y, p) == f1_score(y, p.argmax(1), zero_division=0) == 0.0
    assert balanced_accuracy(y, p) == pytest.approx(0.5)
    assert math.isnan(roc_auc(np.ones(4, dtype=int), np.tile([0.3, 0.7], (4, 1))))


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    y, p = _binary(n=80, seed=3)
    m1 = compute_metrics(y, p, ["neg", "pos"], n_boot=500, seed=7)
    m2 = compute_metrics(y, p, ["neg", "pos"], n_boot=500, seed=7)
    m3 = compute_metrics(y, p, ["neg", "pos"], n_boot=500, seed=8)
    assert m1 == m2
    assert m1["auc"] != m3["auc"]
    for name in ("auc", "balanced_accuracy", "f1"):
        e = m1[name]
        assert e["ci_low"] <= e["value"] <= e["ci_high"], (name, e)
        assert e["ci_low"] < e["ci_high"]
        assert e["n_boot_valid"] == 500  # stratified resamples always hold both classes
    assert m1["positive_class"] == "pos"
    assert m1["n_per_class"] == {"neg": int((y == 0).sum()), "pos": int((y == 1).sum())}


def test_bootstrap_unstratified_skips_single_class_resamples() -> None:
    y = np.array([0, 0, 0, 0, 0, 1])
    p = np.stack([1 - np.linspace(0, 1, 6), np.linspace(0, 1, 6)], axis=1)
    ci = bootstrap_ci(y, p, n_boot=300, seed=0, stratified=False)
    lo, hi, valid = ci["auc"]
    assert 0 < valid < 300  # some resamples lack the positive slide and are left out
    assert 0.0 <= lo <= hi <= 1.0


def test_summarize_cv_and_table_and_json() -> None:
    y, p = _binary(n=40, seed=5)
    fold_of = np.arange(40) % 4
    fold_of[0] = -1  # never tested: excluded
    s = summarize_cv(y, p, fold_of, ["benign", "malignant"], n_boot=100, seed=0)
    assert len(s["folds"]) == 4 and s["pooled"]["n"] == 39
    sel = fold_of == 2
    assert s["folds"][2]["auc"]["value"] == pytest.approx(roc_auc_score(y[sel], p[sel, 1]))
    vals = [f["auc"]["value"] for f in s["folds"]]
    assert s["fold_mean"]["auc"]["mean"] == pytest.approx(np.mean(vals))
    text = format_metrics_table(s, title="demo")
    assert "pooled out-of-fold (n=39)" in text and "F1 (malignant)" in text and "fold 3" in text
    # NaN (single-class fold) becomes null in JSON.
    s["folds"][0]["auc"]["value"] = float("nan")
    doc = json.loads(metrics_to_json(s))
    assert doc["folds"][0]["auc"]["value"] is None


def test_plot_roc_writes_png(tmp_path) -> None:
    from wsi_convnext.mil.plots import plot_roc

    y, p = _binary(n=40)
    out = plot_roc(y, p, ["a", "b"], tmp_path / "roc.png", fold_of=np.arange(40) % 3)
    ym, pm = _multi(n=30)
    out2 = plot_roc(ym, pm, ["a", "b", "c"], tmp_path / "sub" / "roc3.png")
    for f in (out, out2):
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_topk_precision() -> None:
    from wsi_convnext.labels.metrics import topk_precision

    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.0, 0.05, 0.6, 0.4])
    truth = np.zeros(10, dtype=bool)
    truth[[0, 2, 5]] = True
    assert topk_precision(scores, truth) == pytest.approx(2 / 3)  # k = 3 lesion tiles: 0.9, 0.8 hit; 0.7 misses
    assert topk_precision(scores, truth, k=2) == 1.0
    assert topk_precision(scores, truth, k=0.1) == 1.0  # top 10 % = 1 tile
    assert math.isnan(topk_precision(scores, np.zeros(10, dtype=bool)))
