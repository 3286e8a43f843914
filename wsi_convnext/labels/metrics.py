"""Slide-level classification metrics with stratified bootstrap confidence intervals.

Metrics (all equal to scikit-learn's on the same inputs):

- ``auc``: ROC AUC; binary: of the positive class's probability; multi-class: macro one-vs-rest
  (``roc_auc_score(..., multi_class="ovr", average="macro")``).
- ``balanced_accuracy``: mean per-class recall over classes present in ``y_true``.
- ``f1``: binary: F1 of the positive class; multi-class: macro F1 over all classes (0 where
  undefined, like scikit-learn's ``zero_division=0``).

Predicted class = argmax of the probabilities. The positive class defaults to the second sorted
class (index 1). Confidence intervals are percentile intervals over ``n_boot`` bootstrap resamples
drawn *within each class* (stratified), so every resample holds every class present in the data; a
metric undefined on a resample (e.g. AUC with one class) is left out of that metric's interval.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "METRICS",
    "roc_auc",
    "balanced_accuracy",
    "f1",
    "bootstrap_ci",
    "compute_metrics",
    "summarize_cv",
    "format_metrics_table",
    "metrics_to_json",
    "topk_precision",
]

METRICS = ("auc", "balanced_accuracy", "f1")
_LABELS = {"auc": "AUC", "balanced_accuracy": "Bal. acc.", "f1": "F1"}


def _rank_rows(scores: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(scores, method="average", axis=-1)


def _binary_auc_rows(pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC per row of (B, n) boolean positives and scores (Mann–Whitney U with average ranks)."""
    ranks = _rank_rows(scores)
    n_pos = pos.sum(axis=-1).astype(np.float64)
    n_neg = pos.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * pos).sum(axis=-1) - n_pos * (n_pos + 1) / 2
        auc = u / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _auc_rows(y: np.ndarray, probs: np.ndarray, positive: int) -> np.ndarray:
    """y (B, n) int, probs (B, n, C) → AUC (B,)."""
    n_classes = probs.shape[-1]
    if n_classes == 2:
        return _binary_auc_rows(y == positive, probs[..., positive])
    per = np.stack([_binary_auc_rows(y == c, probs[..., c]) for c in range(n_classes)], axis=-1)
    return per.mean(axis=-1)  # NaN when a class is absent, like scikit-learn (which raises)


def _counts(y: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row, per-class true positives, true counts and predicted counts: each (B, C)."""
    tp = np.stack([((y == c) & (pred == c)).sum(-1) for c in range(n_classes)], -1).astype(np.float64)
    true = np.stack([(y == c).sum(-1) for c in range(n_classes)], -1).astype(np.float64)
    predicted = np.stack([(pred == c).sum(-1) for c in range(n_classes)], -1).astype(np.float64)
    return tp, true, predicted


def _balacc_rows(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    tp, true, _ = _counts(y, pred, n_classes)
    present = true > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / np.maximum(true, 1), 0.0)
        return recall.sum(-1) / present.sum(-1)  # NaN only for an empty sample


def _f1_rows(y: np.ndarray, pred: np.ndarray, n_classes: int, positive: int) -> np.ndarray:
    tp, true, predicted = _counts(y, pred, n_classes)
    denom = true + predicted  # = 2tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1c = np.where(denom > 0, 2 * tp / denom, 0.0)
    return f1c[..., positive] if n_classes == 2 else f1c.mean(axis=-1)


def _prep(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, C>=2) matching y_true (n={y.shape[0]}), got {p.shape}")
    return y, p


def roc_auc(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, *, positive: int = 1) -> float:
    """ROC AUC (binary: of ``probs[:, positive]``; multi-class: macro one-vs-rest). NaN if undefined."""
    y, p = _prep(y_true, probs)
    return float(_auc_rows(y[None], p[None], positive)[0])


def balanced_accuracy(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Balanced accuracy of argmax predictions."""
    y, p = _prep(y_true, probs)
    return float(_balacc_rows(y[None], p.argmax(1)[None], p.shape[1])[0])


def f1(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, *, positive: int = 1) -> float:
    """F1 of argmax predictions (binary: positive class; multi-class: macro over all classes)."""
    y, p = _prep(y_true, probs)
    return float(_f1_rows(y[None], p.argmax(1)[None], p.shape[1], positive)[0])


def _all_rows(y: np.ndarray, probs: np.ndarray, positive: int) -> dict[str, np.ndarray]:
    """y (B, n), probs (B, n, C) → metric name → (B,)."""
    c = probs.shape[-1]
    pred = probs.argmax(-1)
    return {
        "auc": _auc_rows(y, probs, positive),
        "balanced_accuracy": _balacc_rows(y, pred, c),
        "f1": _f1_rows(y, pred, c, positive),
    }


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    *,
    positive: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    stratified: bool = True,
) -> dict[str, tuple[float, float, int]]:
    """Percentile bootstrap intervals: metric → (low, high, number of resamples where defined)."""
    y, p = _prep(y_true, probs)
    rng = np.random.default_rng(seed)
    n = len(y)
    if stratified:
        parts = [np.flatnonzero(y == c) for c in np.unique(y)]
        idx = np.concatenate([rng.choice(part, size=(n_boot, len(part)), replace=True) for part in parts], axis=1)
    else:
        idx = rng.integers(0, n, size=(n_boot, n))
    out: dict[str, tuple[float, float, int]] = {}
    alpha = (1 - ci) / 2
    # Chunked: (chunk, n, C) float64 stays small for large cohorts.
    chunk = max(1, int(2e6 // max(1, n * p.shape[1])))
    vals: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for i in range(0, n_boot, chunk):
        sel = idx[i : i + chunk]
        for m, v in _all_rows(y[sel], p[sel], positive).items():
            vals[m].append(v)
    for m in METRICS:
        v = np.concatenate(vals[m]) if vals[m] else np.array([])
        v = v[np.isfinite(v)]
        if len(v) == 0:
            out[m] = (math.nan, math.nan, 0)
        else:
            lo, hi = np.quantile(v, [alpha, 1 - alpha])
            out[m] = (float(lo), float(hi), int(len(v)))
    return out


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    positive: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """All metrics with bootstrap CIs as a JSON-ready dict.

    Returns:
        ``{"n", "n_per_class", "positive_class" (binary only), "auc": {"value", "ci_low", "ci_high",
        "n_boot_valid"}, "balanced_accuracy": {...}, "f1": {...}, "n_boot", "ci", "seed"}``; undefined
        values are NaN (``None`` once written by :func:`metrics_to_json`).
    """
    y, p = _prep(y_true, probs)
    if p.shape[1] != len(classes):
        raise ValueError(f"probs have {p.shape[1]} columns but there are {len(classes)} classes")
    point = {m: float(v[0]) for m, v in _all_rows(y[None], p[None], positive).items()}
    cis = bootstrap_ci(y, p, positive=positive, n_boot=n_boot, seed=seed, ci=ci) if n_boot > 0 else {}
    out: dict[str, Any] = {
        "n": int(len(y)),
        "n_per_class": {str(c): int((y == i).sum()) for i, c in enumerate(classes)},
    }
    if len(classes) == 2:
        out["positive_class"] = str(classes[positive])
    for m in METRICS:
        lo, hi, nv = cis.get(m, (math.nan, math.nan, 0))
        out[m] = {"value": point[m], "ci_low": lo, "ci_high": hi, "n_boot_valid": nv}
    out.update({"n_boot": int(n_boot), "ci": float(ci), "seed": int(seed)})
    return out


def summarize_cv(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    fold_of: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    **options: Any,
) -> dict[str, Any]:
    """Per-fold and pooled out-of-fold metrics.

    Args:
        fold_of: Test fold of each slide; negative for slides never tested (excluded).
        **options: :func:`compute_metrics`'s keywords (``positive``, ``n_boot``, ``seed``, ``ci``).

    Returns:
        ``{"folds": [metrics per fold...], "fold_mean": {metric: {"mean", "std"}}, "pooled": metrics}``.
    """
    y, p = _prep(y_true, probs)
    fold_of = np.asarray(fold_of, dtype=np.int64)
    tested = fold_of >= 0
    folds = []
    for k in sorted(set(fold_of[tested].tolist())):
        sel = fold_of == k
        m = compute_metrics(y[sel], p[sel], classes, **options)
        m["fold"] = int(k)
        folds.append(m)
    fold_mean = {}
    for m in METRICS:
        vals = np.array([f[m]["value"] for f in folds], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        fold_mean[m] = {
            "mean": float(vals.mean()) if len(vals) else math.nan,
            "std": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
        }
    pooled = compute_metrics(y[tested], p[tested], classes, **options)
    return {"folds": folds, "fold_mean": fold_mean, "pooled": pooled}


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


def _cell(entry: Mapping[str, Any]) -> str:
    return f"{_fmt(entry['value'])} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


def format_metrics_table(metrics: Mapping[str, Any], *, title: str | None = None) -> str:
    """Readable fixed-width table of :func:`compute_metrics` or :func:`summarize_cv` output."""
    single = "folds" not in metrics
    ref = metrics if single else metrics["pooled"]
    f1_name = f"F1 ({ref['positive_class']})" if "positive_class" in ref else "F1 (macro)"
    heads = {"auc": "AUC" if "positive_class" in ref else "AUC (macro OvR)", "balanced_accuracy": "Balanced acc.", "f1": f1_name}
    rows: list[tuple[str, list[str]]] = []
    if single:
        rows.append((f"all (n={ref['n']})", [_cell(ref[m]) for m in METRICS]))
    else:
        for f in metrics["folds"]:
            rows.append((f"fold {f['fold']} (n={f['n']})", [_cell(f[m]) for m in METRICS]))
        if len(metrics["folds"]) > 1:
            fm = metrics["fold_mean"]
            rows.append(("mean ± sd over folds", [f"{_fmt(fm[m]['mean'])} ± {_fmt(fm[m]['std'])}" for m in METRICS]))
        rows.append((f"pooled out-of-fold (n={ref['n']})", [_cell(ref[m]) for m in METRICS]))
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(heads[m]), *(len(r[1][i]) for r in rows)) for i, m in enumerate(METRICS)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join([" " * w0] + [heads[m].ljust(w) for m, w in zip(METRICS, widths)]).rstrip())
    for name, cells in rows:
        lines.append("  ".join([name.ljust(w0)] + [c.ljust(w) for c, w in zip(cells, widths)]).rstrip())
    counts = ", ".join(f"{c}: {k}" for c, k in ref["n_per_class"].items())
    ci_pct = int(round(100 * ref.get("ci", 0.95)))
    lines.append(f"slides per class: {counts}; [{ci_pct}% CI, stratified bootstrap, n_boot={ref.get('n_boot')}]")
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def metrics_to_json(metrics: Mapping[str, Any], indent: int | None = 2) -> str:
    """JSON text (NaN → null)."""
    return json.dumps(_json_safe(metrics), indent=indent, allow_nan=False)


def topk_precision(scores: np.ndarray, truth: np.ndarray, k: int | float | None = None) -> float:
    """Fraction of the ``k`` highest-scoring tiles that are true lesion tiles.

    Args:
        scores: (N,) tile scores (higher = more suspicious).
        truth: (N,) bool lesion membership of each tile.
        k: Number of tiles (int), a fraction of the slide's tiles (float in (0, 1)), or None for
            the number of true lesion tiles (then precision = recall at k). At least 1.

    Returns:
        Precision in [0, 1]; NaN when ``k`` is None and the slide has no lesion tile.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores and truth must be (N,) arrays of equal length, got {s.shape} and {t.shape}")
    if k is None:
        if not t.any():
            return math.nan
        n = int(t.sum())
    elif isinstance(k, float) and 0 < k < 1:
        n = max(1, int(round(k * len(s))))
    else:
        n = max(1, int(k))
    top = np.argsort(-s, kind="stable")[:n]
    return float(t[top].mean())
