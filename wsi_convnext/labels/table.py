"""Slide labels: the labels CSV, read and written in one place, and checks of fixed splits.

Labels come from a CSV (:func:`read_labels`) with columns ``slide_id,label`` and optionally
``patient_id`` and one of ``split`` (train/val/test) or ``fold`` (integer). :func:`match_labels`
pairs a table with the slides (stores) at hand.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .._io import csv_unescape
from ..errors import InputNotFoundError, LabelsError, listing

__all__ = [
    "SPLIT_VALUES",
    "MISSING_LABELS",
    "LabelTable",
    "check_label",
    "check_fixed_assignment",
    "match_labels",
    "read_labels",
    "sort_classes",
    "write_labels",
]

log = logging.getLogger(__name__)

SPLIT_VALUES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}


def sort_classes(labels: Iterable[str]) -> list[str]:
    """Sorted unique class names; numerically when every label is an integer ("2" < "10")."""
    uniq = sorted(set(labels))
    try:
        return sorted(uniq, key=lambda s: (int(s), s))
    except ValueError:
        return uniq


@dataclass(frozen=True)
class LabelTable:
    """Slide labels (one row per slide).

    Attributes:
        slide_ids: Slide identifiers.
        labels: Class name per slide (strings).
        classes: Sorted class names (index = class index in model outputs).
        patient_ids: Patient per slide (the slide id itself when the CSV has no ``patient_id``).
        split: Per-slide fixed split (``train``/``val``/``test``) or None.
        fold: Per-slide fixed test fold (int) or None.
        path: The CSV it was read from, for messages.
    """

    slide_ids: tuple[str, ...]
    labels: tuple[str, ...]
    classes: tuple[str, ...]
    patient_ids: tuple[str, ...]
    split: tuple[str, ...] | None = None
    fold: tuple[int, ...] | None = None
    path: str | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.clear()
        self._index.update({s: i for i, s in enumerate(self.slide_ids)})

    @classmethod
    def from_mapping(
        cls,
        labels: Mapping[str, object],
        patients: Mapping[str, str] | None = None,
        *,
        classes: Sequence[str] | None = None,
    ) -> LabelTable:
        """Build a table from ``{slide_id: label}`` (labels converted with ``str``)."""
        ids = [str(k) for k in labels]
        labs = [str(v) for v in labels.values()]
        pats = [str(patients[s]) if patients and s in patients else s for s in ids]
        return cls._validated(ids, labs, pats, None, None, None, classes=classes)

    @classmethod
    def _validated(
        cls,
        ids: list[str],
        labs: list[str],
        pats: list[str],
        split: list[str] | None,
        fold: list[int] | None,
        path: str | None,
        classes: Sequence[str] | None = None,
        min_classes: int = 2,
    ) -> LabelTable:
        src = path or "labels"
        dups = [s for s, c in Counter(ids).items() if c > 1]
        if dups:
            raise LabelsError(f"{src}: duplicate slide_id(s) {listing(dups)}; each slide must appear once")
        cls_list = tuple(sort_classes(labs)) if classes is None else tuple(str(c) for c in classes)
        unknown = sorted(set(labs) - set(cls_list))
        if unknown:
            raise LabelsError(f"{src}: label(s) {listing(unknown)} are not among the classes {list(cls_list)}")
        table = cls(tuple(ids), tuple(labs), cls_list, tuple(pats),
                    None if split is None else tuple(split), None if fold is None else tuple(fold), path)
        if classes is None:
            table.require_classes(min_classes)
        return table

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._index

    @property
    def source(self) -> str:
        return self.path or "labels"

    @property
    def y(self) -> np.ndarray:
        """Class index per slide (int64)."""
        lut = {c: i for i, c in enumerate(self.classes)}
        return np.array([lut[lab] for lab in self.labels], dtype=np.int64)

    def require_classes(self, n: int = 2) -> None:
        """Raise LabelsError when fewer than ``n`` classes have slides (e.g. a single-class cohort)."""
        present = sorted(set(self.labels))
        if len(present) < n:
            raise LabelsError(
                f"{self.source}: only {len(present)} class(es) among {len(self)} labelled slides "
                f"({listing(present) or 'none'}); training needs slides of at least {n} classes"
            )

    def subset(self, slide_ids: Sequence[str]) -> LabelTable:
        """Rows for ``slide_ids`` in that order; the class list is kept."""
        idx = [self._index[s] for s in slide_ids]
        return LabelTable(
            tuple(self.slide_ids[i] for i in idx),
            tuple(self.labels[i] for i in idx),
            self.classes,
            tuple(self.patient_ids[i] for i in idx),
            None if self.split is None else tuple(self.split[i] for i in idx),
            None if self.fold is None else tuple(self.fold[i] for i in idx),
            self.path,
        )


def _sniff_delimiter(header: str) -> str:
    for d in (",", "\t", ";"):
        if d in header:
            return d
    return ","


#: Cells that mean "no value" (empty, or pandas' and spreadsheets' NaN in any case); never a class name.
MISSING_LABELS = frozenset({"", "nan"})


def check_label(label: str, where: str) -> str:
    """Return ``label`` (stripped) unless it is empty or ``NaN`` (any case).

    Raises:
        LabelsError: The label is missing, naming ``where`` (e.g. ``labels.csv: row 3``).
    """
    value = label.strip()
    if value.lower() in MISSING_LABELS:
        shown = "an empty label" if not value else f"label {value!r}, which marks a missing value, not a class"
        raise LabelsError(f"{where} has {shown}; fill it in or remove the row")
    return value


def write_labels(path: str | os.PathLike[str], table: LabelTable) -> Path:
    """Write ``table`` as a labels CSV (``slide_id,label,patient_id``), atomically; returns the path."""
    from .._io import write_csv

    return write_csv(Path(path), ["slide_id", "label", "patient_id"], zip(table.slide_ids, table.labels, table.patient_ids))


def read_labels(path: str | os.PathLike[str], *, min_classes: int = 2, check_splits: bool = True) -> LabelTable:
    """Read a labels CSV.

    Columns (header names case-insensitive; comma, tab or semicolon separated): ``slide_id``,
    ``label`` (any string but an empty one or ``NaN``, see :func:`check_label`; classes are the
    sorted unique labels, numerically sorted when all are integers), optional ``patient_id``
    (slides of one patient are never split apart), optional ``split`` (train/val/test) **or**
    ``fold`` (integer test fold).

    Args:
        path: CSV path.
        min_classes: Minimum number of classes with slides (1 for evaluation sets).
        check_splits: Validate the split/fold column (see :func:`check_fixed_assignment`).

    Raises:
        InputNotFoundError: The file does not exist.
        LabelsError: Missing columns, empty cells, duplicate slide ids, bad split/fold values, a
            single-class cohort, a patient on both sides of a fixed split, or a fold/test split
            missing a class.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"labels file {p} not found; pass a CSV with columns slide_id,label")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelsError(f"{p}: not a UTF-8 text CSV ({e}); save it as UTF-8 CSV") from e
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise LabelsError(f"{p}: empty file; expected a header slide_id,label[,patient_id][,split|fold]")
    reader = ([csv_unescape(c) for c in row] for row in csv.reader(lines, delimiter=_sniff_delimiter(lines[0])))
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in ("slide_id", "label") if c not in header]
    if missing:
        raise LabelsError(
            f"{p}: missing column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'}); "
            "expected header slide_id,label[,patient_id][,split|fold]"
        )
    if "split" in header and "fold" in header:
        raise LabelsError(f"{p}: has both 'split' and 'fold' columns; keep only one")
    col = {name: header.index(name) for name in ("slide_id", "label", "patient_id", "split", "fold") if name in header}
    ids: list[str] = []
    labs: list[str] = []
    pats: list[str] = []
    splits: list[str] | None = [] if "split" in col else None
    folds: list[int] | None = [] if "fold" in col else None
    for lineno, row in enumerate(reader, start=2):
        cells = {k: (row[i].strip() if i < len(row) else "") for k, i in col.items()}
        if not cells["slide_id"]:
            raise LabelsError(f"{p}: row {lineno} has an empty slide_id; fill it in or remove the row")
        ids.append(cells["slide_id"])
        labs.append(check_label(cells["label"], f"{p}: row {lineno}"))
        pats.append(cells.get("patient_id") or cells["slide_id"])
        if splits is not None:
            v = _SPLIT_ALIASES.get(cells["split"].lower())
            if v is None:
                raise LabelsError(
                    f"{p}: row {lineno} has split {cells['split']!r}; use one of train, val, test"
                )
            splits.append(v)
        if folds is not None:
            try:
                folds.append(int(cells["fold"]))
            except ValueError:
                raise LabelsError(f"{p}: row {lineno} has fold {cells['fold']!r}; folds must be integers") from None
    if not ids:
        raise LabelsError(f"{p}: no data rows below the header")
    table = LabelTable._validated(ids, labs, pats, splits, folds, str(p), min_classes=min_classes)
    if check_splits:
        check_fixed_assignment(table)
    return table


# --------------------------------------------------------------------------- stores


def match_labels(
    slide_ids: Sequence[str],
    table: LabelTable,
    *,
    require_all: bool = True,
) -> tuple[list[int], list[str]]:
    """Match available slides against the label table.

    Args:
        slide_ids: Slides available (e.g. one per store).
        table: Labels.
        require_all: Raise when a labelled slide is not available (training); when False, such rows
            are only logged (evaluation of a subset).

    Returns:
        ``(indices, unlabeled)``: indices into ``slide_ids`` of labelled slides (CSV order), and the
        ids of available slides without a label (logged as a warning; they are ignored).

    Raises:
        LabelsError: A labelled slide has no store (``require_all``), or nothing matches.
    """
    pos = {s: i for i, s in enumerate(slide_ids)}
    missing = [s for s in table.slide_ids if s not in pos]
    if missing and require_all:
        raise LabelsError(
            f"{table.source}: {len(missing)} labelled slide(s) have no store: {listing(missing)}; "
            "pass their stores or remove the rows"
        )
    if missing:
        log.warning("%d labelled slide(s) have no store and are skipped: %s", len(missing), listing(missing))
    unlabeled = [s for s in slide_ids if s not in table]
    if unlabeled:
        log.warning(
            "%d store(s) have no label in %s and are ignored: %s", len(unlabeled), table.source, listing(unlabeled)
        )
    idx = [pos[s] for s in table.slide_ids if s in pos]
    if not idx:
        raise LabelsError(
            f"{table.source}: no slide id matches any store (e.g. CSV {table.slide_ids[0]!r} vs store "
            f"{slide_ids[0] if slide_ids else 'none'!r}); check the slide_id column"
        )
    return idx, unlabeled


def check_fixed_assignment(table: LabelTable) -> None:
    """Validate a table's ``split`` or ``fold`` column (no-op when it has neither).

    Raises:
        LabelsError: A patient is in several splits/folds, the test split is empty, or a test
            split / fold lacks a class.
    """
    if table.split is None and table.fold is None:
        return
    parts = table.split if table.split is not None else table.fold
    assert parts is not None
    what = "split" if table.split is not None else "fold"
    where: dict[str, set[object]] = defaultdict(set)
    for pat, part in zip(table.patient_ids, parts):
        where[pat].add(part)
    leaky = sorted(p for p, s in where.items() if len(s) > 1)
    if leaky:
        raise LabelsError(
            f"{table.source}: patient(s) {listing(leaky)} have slides in several {what}s; "
            f"put all of a patient's slides in one {what}"
        )
    all_classes = set(table.labels)
    if table.split is not None:
        test_classes = {lab for lab, s in zip(table.labels, table.split) if s == "test"}
        train_classes = {lab for lab, s in zip(table.labels, table.split) if s == "train"}
        if not test_classes:
            raise LabelsError(f"{table.source}: the split column has no 'test' slides; mark some slides as test")
        if not train_classes:
            raise LabelsError(f"{table.source}: the split column has no 'train' slides; mark some slides as train")
        for name, present in (("test", test_classes), ("train", train_classes)):
            lacking = sorted(all_classes - present)
            if lacking:
                raise LabelsError(
                    f"{table.source}: the {name} split has no slide of class(es) {listing(lacking)}; "
                    f"every class must be in the {name} split"
                )
    else:
        assert table.fold is not None
        fold_ids = sorted(set(table.fold))
        if len(fold_ids) < 2:
            raise LabelsError(f"{table.source}: the fold column has a single fold ({fold_ids[0]}); use at least 2 folds")
        for f in fold_ids:
            present = {lab for lab, k in zip(table.labels, table.fold) if k == f}
            lacking = sorted(all_classes - present)
            if lacking:
                raise LabelsError(
                    f"{table.source}: fold {f} has no slide of class(es) {listing(lacking)} so it cannot be "
                    "evaluated; reassign folds so each holds every class"
                )
