"""Labels, splits and metrics: what supervised training and evaluation share (MIL, finetune, pretrain probes).

- :mod:`.table`: the slide labels CSV (:func:`read_labels`, :func:`write_labels`, :class:`LabelTable`),
  checks of fixed ``split``/``fold`` columns, :func:`match_labels`.
- :mod:`.splits`: patient-grouped stratified folds and hold-out splits.
- :mod:`.metrics`: AUC / balanced accuracy / F1 with bootstrap CIs, metric tables.

numpy only at import (scipy and scikit-learn are imported by the functions that need them).
"""

from __future__ import annotations

from .metrics import compute_metrics, format_metrics_table
from .splits import holdout_split, inner_validation_split, make_folds
from .table import LabelTable, match_labels, read_labels, sort_classes, write_labels

__all__ = [
    "LabelTable",
    "compute_metrics",
    "format_metrics_table",
    "holdout_split",
    "inner_validation_split",
    "make_folds",
    "match_labels",
    "read_labels",
    "sort_classes",
    "write_labels",
]
