"""Patient-grouped, class-stratified cross-validation splits.

Every split is grouped by patient: a patient's slides are never on both sides of any split (test vs
train, and the inner validation part used for early stopping vs the part trained on).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, LabelsError, listing
from .table import LabelTable, check_fixed_assignment

__all__ = ["Fold", "make_folds", "inner_validation_split", "holdout_split", "assert_no_leak"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fold:
    """Indices (into the cohort) of one outer fold.

    Attributes:
        index: Fold number (0-based).
        train: Slides the model is fitted on.
        val: Held-out part of the training side, for early stopping (may be empty).
        test: Slides predicted out-of-fold.
    """

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _groups_per_class(y: np.ndarray, groups: np.ndarray) -> dict[int, int]:
    per: dict[int, set[str]] = defaultdict(set)
    for c, g in zip(y.tolist(), groups.tolist()):
        per[c].add(g)
    return {c: len(s) for c, s in per.items()}


def _sgkf(n_splits: int, seed: int, X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    with warnings.catch_warnings():
        # We check class/group counts ourselves and raise clear errors.
        warnings.simplefilter("ignore", UserWarning)
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(cv.split(X, y, groups))


def inner_validation_split(
    y: np.ndarray,
    groups: np.ndarray,
    idx: np.ndarray,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (fit, val) parts, stratified by ``y`` and grouped by ``groups``.

    The validation part is about ``val_fraction`` of the slides and holds every class when possible.
    When some class has fewer than two patients in ``idx`` (or ``val_fraction`` is 0) the validation
    part is empty and training runs for a fixed number of epochs.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if val_fraction <= 0 or len(idx) < 4:
        return idx, idx[:0]
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    yi, gi = y[idx], groups[idx]
    min_groups = min(_groups_per_class(yi, gi).values())
    n_splits = min(max(2, int(round(1.0 / val_fraction))), min_groups)
    if n_splits < 2 or len(np.unique(yi)) < 2:
        log.warning(
            "a class has fewer than 2 patients in a training fold: no validation part, training for a fixed number of epochs"
        )
        return idx, idx[:0]
    fit, val = _sgkf(n_splits, seed, np.zeros(len(idx)), yi, gi)[0]
    return idx[fit], idx[val]


def holdout_split(table: LabelTable, test_fraction: float, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out about ``test_fraction`` of the slides as a test set, by patient and stratified by class.

    The held-out slides are for a final test that no training step sees (the encoder's
    fine-tuning, the MIL model's cross-validation).

    Returns:
        (training slide ids, held-out slide ids), each in the table's order; the held-out
        list is empty for ``test_fraction`` 0 or when a class has fewer than 2 patients.
    """
    idx = np.arange(len(table.slide_ids))
    fit, test = inner_validation_split(
        table.y, np.asarray(table.patient_ids, dtype=object), idx, val_fraction=test_fraction, seed=seed
    )
    return [table.slide_ids[i] for i in sorted(fit)], [table.slide_ids[i] for i in sorted(test)]


def make_folds(
    table: LabelTable,
    *,
    folds: int = 5,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> list[Fold]:
    """Outer cross-validation folds with inner validation parts.

    Uses the table's fixed ``split`` column (one fold: train/val/test; an empty val part is carved
    from train) or ``fold`` column (each fold value is the test set once) when present; otherwise
    scikit-learn's ``StratifiedGroupKFold`` with patients as groups (shuffled with ``seed``).

    Raises:
        LabelsError: A class has fewer patients than ``folds``, a test fold lacks a class, or a
            fixed assignment is inconsistent (see :func:`check_fixed_assignment`).
        ConfigError: ``folds`` < 2.
    """
    y = table.y
    groups = np.asarray(table.patient_ids, dtype=object)
    n = len(y)
    all_idx = np.arange(n)
    check_fixed_assignment(table)
    out: list[Fold] = []
    if table.split is not None:
        split = np.asarray(table.split)
        train, val, test = (all_idx[split == s] for s in ("train", "val", "test"))
        if len(val) == 0:
            train, val = inner_validation_split(y, groups, train, val_fraction=val_fraction, seed=seed)
        return [Fold(0, train, val, test)]
    if table.fold is not None:
        fold = np.asarray(table.fold)
        for k, f in enumerate(sorted(set(table.fold))):
            test = all_idx[fold == f]
            train, val = inner_validation_split(y, groups, all_idx[fold != f], val_fraction=val_fraction, seed=seed + k)
            out.append(Fold(k, train, val, test))
        return out
    if int(folds) < 2:
        raise ConfigError(f"folds must be >= 2 for cross-validation, got {folds}")
    counts = _groups_per_class(y, groups)
    short = {table.classes[c]: k for c, k in counts.items() if k < folds}
    if short:
        desc = ", ".join(f"{c!r}: {k}" for c, k in short.items())
        raise LabelsError(
            f"{table.source}: class(es) with fewer patients than folds={folds} ({desc}); "
            "some fold would have no slide of that class; lower the number of folds or add slides"
        )
    for k, (train_all, test) in enumerate(_sgkf(int(folds), seed, np.zeros(n), y, groups)):
        lacking = sorted(set(range(len(table.classes))) - set(y[test].tolist()))
        if lacking:
            raise LabelsError(
                f"{table.source}: patient grouping left fold {k} without class(es) "
                f"{listing(table.classes[c] for c in lacking)}; lower the number of folds"
            )
        train, val = inner_validation_split(y, groups, train_all, val_fraction=val_fraction, seed=seed + k)
        out.append(Fold(k, np.sort(train), np.sort(val), np.sort(test)))
    return out


def assert_no_leak(folds_: list[Fold], groups: np.ndarray) -> None:
    """Raise LabelsError when a patient appears on two sides (train/val/test) of any fold."""
    groups = np.asarray(groups, dtype=object)
    for f in folds_:
        sides = [set(groups[f.train].tolist()), set(groups[f.val].tolist()), set(groups[f.test].tolist())]
        for a in range(3):
            for b in range(a + 1, 3):
                both = sides[a] & sides[b]
                if both:
                    raise LabelsError(f"fold {f.index}: patient(s) {listing(sorted(both))} on two sides of the split")
