"""Bags of tile embeddings and slide labels.

A :class:`Bag` is one slide: tile embeddings (N, D) and level-0 tile coordinates (N, 2) as (x, y)
pixels. Features stay in their storage dtype (float16 at rest) and are cast to float32 one bag at a
time by the model. Bags either hold their features in memory or re-read them from their zarr store on
each access (``in_memory=False``), so a cohort never needs to fit in RAM.

Labels come from a CSV (:func:`read_labels`) with columns ``slide_id,label`` and optionally
``patient_id`` and one of ``split`` (train/val/test) or ``fold`` (integer).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .._io import csv_unescape
from ..errors import ConfigError, InputNotFoundError, LabelsError, StoreError

__all__ = [
    "Bag",
    "LabelTable",
    "read_labels",
    "write_labels",
    "load_bags",
    "index_stores",
    "match_labels",
    "sort_classes",
]

log = logging.getLogger(__name__)

SPLIT_VALUES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
_MAX_LISTED = 5


def _listing(items: Iterable[object], n: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


class Bag:
    """One slide's tile embeddings.

    Args:
        slide_id: Slide identifier (matches ``slide_id`` in the labels CSV).
        features: (N, D) float array (float16/float32), or ``None`` when ``loader`` is given.
        coords: (N, 2) int64 level-0 pixel coordinates (x, y) of the tiles' top-left corners, or None.
        loader: Callable returning the (N, D) features; used for lazy, store-backed bags.
        source: Where the features come from (store path), for messages.
        feature_key: Name of the feature set in the store.
    """

    def __init__(
        self,
        slide_id: str,
        features: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        *,
        loader: Callable[[], np.ndarray] | None = None,
        source: str | None = None,
        feature_key: str | None = None,
    ) -> None:
        if (features is None) == (loader is None):
            raise ConfigError(f"Bag {slide_id!r}: pass exactly one of features or loader")
        self.slide_id = str(slide_id)
        self.source = source
        self.feature_key = feature_key
        self._loader = loader
        self._features: np.ndarray | None = None
        if features is not None:
            self._features = self._check(features)
        self.coords = None if coords is None else np.asarray(coords, dtype=np.int64)
        if self.coords is not None and (self.coords.ndim != 2 or self.coords.shape[1] != 2):
            raise StoreError(f"{self._where()}: coords must have shape (N, 2), got {self.coords.shape}")
        if self.coords is not None and self._features is not None and len(self.coords) != len(self._features):
            raise StoreError(
                f"{self._where()}: {len(self.coords)} coords but {len(self._features)} feature rows"
            )

    def _where(self) -> str:
        return f"slide {self.slide_id!r}" + (f" ({self.source})" if self.source else "")

    def _check(self, features: np.ndarray) -> np.ndarray:
        arr = np.asarray(features)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise StoreError(f"{self._where()}: features must have shape (N>0, D>0), got {arr.shape}")
        if arr.dtype not in (np.float16, np.float32):
            if not np.issubdtype(arr.dtype, np.floating):
                raise StoreError(f"{self._where()}: features must be floating point, got {arr.dtype}")
            arr = arr.astype(np.float32)
        # Chunked so a 100k×768 bag does not need a full-size boolean temporary.
        for i in range(0, arr.shape[0], 16384):
            if not np.isfinite(arr[i : i + 16384]).all():
                raise StoreError(
                    f"{self._where()}: features contain NaN/inf; re-run embedding for this slide"
                )
        return arr

    @property
    def in_memory(self) -> bool:
        """Whether the features are held in memory (else re-read on each access)."""
        return self._features is not None

    @property
    def features(self) -> np.ndarray:
        """(N, D) tile embeddings in their storage dtype (not copied when in memory)."""
        if self._features is not None:
            return self._features
        assert self._loader is not None
        arr = self._check(self._loader())
        if self.coords is not None and len(self.coords) != len(arr):
            raise StoreError(f"{self._where()}: {len(self.coords)} coords but {len(arr)} feature rows")
        return arr

    def __len__(self) -> int:
        if self.coords is not None:
            return len(self.coords)
        return len(self.features)

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else (self.source or "lazy")
        return f"Bag({self.slide_id!r}, n={len(self)}, {where})"


# --------------------------------------------------------------------------- labels


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
            raise LabelsError(f"{src}: duplicate slide_id(s) {_listing(dups)}; each slide must appear once")
        cls_list = tuple(sort_classes(labs)) if classes is None else tuple(str(c) for c in classes)
        unknown = sorted(set(labs) - set(cls_list))
        if unknown:
            raise LabelsError(f"{src}: label(s) {_listing(unknown)} are not among the classes {list(cls_list)}")
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
                f"({_listing(present) or 'none'}); training needs slides of at least {n} classes"
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


def _open(path: str | os.PathLike[str]):  # noqa: ANN202 - Store type lives in wsi_convnext.store
    from ..store import open_store

    return open_store(path)


def resolve_feature_key(store, feature_key: str | None, where: str) -> str:  # noqa: ANN001
    """The feature set to use in ``store``: ``feature_key``, or its only feature set."""
    keys = list(store.feature_keys)
    if feature_key is not None:
        if feature_key not in keys:
            raise StoreError(
                f"{where}: no feature set {feature_key!r} (has: {_listing(keys) or 'none'}); "
                "embed it first or pass another feature key"
            )
        return feature_key
    if not keys:
        raise StoreError(f"{where}: has no embeddings; run embedding on this store first")
    if len(keys) > 1:
        raise ConfigError(f"{where}: has several feature sets ({_listing(keys)}); pass a feature key")
    return keys[0]


def index_stores(store_paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """Map slide id → store path for ``store_paths`` (opens each store; reads no features).

    Raises:
        LabelsError: Two stores hold the same slide id.
    """
    out: dict[str, str] = {}
    for path in store_paths:
        sid = str(_open(path).slide_id)
        if sid in out:
            raise LabelsError(f"stores {out[sid]} and {path} both hold slide_id {sid!r}; pass each slide once")
        out[sid] = str(path)
    return out


def load_bags(
    store_paths: Iterable[str | os.PathLike[str]],
    feature_key: str | None = None,
    *,
    in_memory: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Bag]:
    """Load one :class:`Bag` per zarr store.

    Args:
        store_paths: Store paths (as accepted by :func:`wsi_convnext.store.open_store`).
        feature_key: Feature set to use; ``None`` = each store's only feature set (all stores must
            then resolve to the same key).
        in_memory: Keep features in memory (their storage dtype, float16 at rest). ``False`` re-reads
            them from the store at each access (cohorts larger than RAM).
        progress: Optional ``progress(description, done, total)`` callback.

    Raises:
        StoreError: A store has no embeddings, the key is missing, feature rows do not match the tile
            count, dimensions differ between stores, or features are not finite.
        ConfigError: ``feature_key`` is None and a store has several feature sets, or stores have
            different ones.
        LabelsError: Two stores hold the same slide id.
    """
    paths = [str(p) for p in store_paths]
    bags: list[Bag] = []
    keys: dict[str, str] = {}
    seen: dict[str, str] = {}
    dim: int | None = None
    for i, path in enumerate(paths):
        store = _open(path)
        sid = str(store.slide_id)
        if sid in seen:
            raise LabelsError(f"stores {seen[sid]} and {path} both hold slide_id {sid!r}; pass each slide once")
        seen[sid] = path
        key = resolve_feature_key(store, feature_key, f"store {path}")
        keys.setdefault(key, path)
        if len(keys) > 1:
            a, b = list(keys.items())[:2]
            raise ConfigError(
                f"stores use different feature sets ({a[0]!r} in {a[1]}, {b[0]!r} in {b[1]}); pass a feature key"
            )
        coords = np.asarray(store.coords, dtype=np.int64)
        if in_memory:
            bag = Bag(sid, store.features(key), coords, source=path, feature_key=key)
            d = bag.features.shape[1]
        else:
            bag = Bag(sid, coords=coords, loader=_StoreLoader(path, key), source=path, feature_key=key)
            d = None
        if len(coords) != len(store):
            raise StoreError(f"store {path}: {len(coords)} coords but {len(store)} tiles")
        if d is not None:
            if dim is not None and d != dim:
                raise StoreError(f"store {path}: feature dimension {d} differs from {dim} in {paths[0]}")
            dim = d
        bags.append(bag)
        if progress is not None:
            progress("load bags", i + 1, len(paths))
    return bags


class _StoreLoader:
    """Picklable callable that re-reads one feature set from a store."""

    def __init__(self, path: str, key: str) -> None:
        self.path = path
        self.key = key

    def __call__(self) -> np.ndarray:
        return _open(self.path).features(self.key)


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
            f"{table.source}: {len(missing)} labelled slide(s) have no store: {_listing(missing)}; "
            "pass their stores or remove the rows"
        )
    if missing:
        log.warning("%d labelled slide(s) have no store and are skipped: %s", len(missing), _listing(missing))
    unlabeled = [s for s in slide_ids if s not in table]
    if unlabeled:
        log.warning(
            "%d store(s) have no label in %s and are ignored: %s", len(unlabeled), table.source, _listing(unlabeled)
        )
    idx = [pos[s] for s in table.slide_ids if s in pos]
    if not idx:
        raise LabelsError(
            f"{table.source}: no slide id matches any store (e.g. CSV {table.slide_ids[0]!r} vs store "
            f"{slide_ids[0] if slide_ids else 'none'!r}); check the slide_id column"
        )
    return idx, unlabeled


def labels_for_bags(bags: Sequence[Bag], labels: LabelTable | Mapping[str, object] | Sequence[object]) -> LabelTable:
    """A :class:`LabelTable` aligned with ``bags`` from a table, a ``{slide_id: label}`` mapping, or a
    per-bag sequence of labels. Bags without a label raise :class:`LabelsError`."""
    ids = [b.slide_id for b in bags]
    if isinstance(labels, LabelTable):
        table = labels
    elif isinstance(labels, Mapping):
        table = LabelTable.from_mapping(labels)
    else:
        labs = list(labels)
        if len(labs) != len(bags):
            raise LabelsError(f"got {len(labs)} labels for {len(bags)} bags")
        table = LabelTable.from_mapping(dict(zip(ids, labs)))
    dups = [s for s, c in Counter(ids).items() if c > 1]
    if dups:
        raise LabelsError(f"duplicate bag slide_id(s) {_listing(dups)}; each slide must appear once")
    missing = [s for s in ids if s not in table]
    if missing:
        raise LabelsError(f"{table.source}: no label for slide(s) {_listing(missing)}")
    sub = table.subset(ids)
    sub.require_classes(2)
    return sub


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
            f"{table.source}: patient(s) {_listing(leaky)} have slides in several {what}s; "
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
                    f"{table.source}: the {name} split has no slide of class(es) {_listing(lacking)}; "
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
                    f"{table.source}: fold {f} has no slide of class(es) {_listing(lacking)} so it cannot be "
                    "evaluated; reassign folds so each holds every class"
                )
