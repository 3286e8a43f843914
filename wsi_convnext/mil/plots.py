"""ROC curve figures (matplotlib, imported lazily; renders with the Agg canvas, no global backend change)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_roc"]


def plot_roc(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    positive: int = 1,
    fold_of: Sequence[int] | np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Write ROC curves to a PNG.

    Binary: the positive class's curve pooled over all slides, plus one thin curve per fold when
    ``fold_of`` is given. Multi-class: one one-vs-rest curve per class (pooled).

    Args:
        y_true: Class index per slide.
        probs: (n, C) class probabilities.
        classes: Class names.
        path: Output PNG path.
        positive: Positive class index for binary tasks.
        fold_of: Test fold per slide (negative = not tested, excluded).
        title: Figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    folds = np.zeros(len(y), dtype=np.int64) if fold_of is None else np.asarray(fold_of, dtype=np.int64)
    keep = folds >= 0
    y, p, folds = y[keep], p[keep], folds[keep]
    fig = Figure(figsize=(5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")

    def curve(yb: np.ndarray, s: np.ndarray, **kw: object) -> None:
        if yb.min() == yb.max():
            return
        fpr, tpr, _ = roc_curve(yb, s)
        auc = roc_auc_score(yb, s)
        label = kw.pop("label")
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})", **kw)

    if len(classes) == 2:
        yb = (y == positive).astype(int)
        uniq = np.unique(folds)
        if fold_of is not None and len(uniq) > 1:
            for k in uniq:
                sel = folds == k
                curve(yb[sel], p[sel, positive], label=f"fold {k}", lw=0.8, alpha=0.6)
        curve(yb, p[:, positive], label="pooled" if len(uniq) > 1 else str(classes[positive]), lw=2.0, color="k")
    else:
        for c, name in enumerate(classes):
            curve((y == c).astype(int), p[:, c], label=f"{name} vs rest", lw=1.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title or "ROC")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
