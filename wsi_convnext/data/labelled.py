"""Labelled tile datasets for training the encoder.

Three sources, one result type (:class:`LabelledTiles`):

- **Image folder** (:func:`image_folder_tiles`): one sub-folder per class; every image file in
  it is a tile of that class. Each file is its own group, so pass a CSV with a ``group`` column
  when tiles share a source (near-duplicates must not sit on both sides of a split).
- **CSV** (:func:`csv_tiles`): ``path,label[,group][,split]``; ``path`` relative to the CSV's
  folder (or absolute); ``split`` is ``train``/``val``/``test``.
- **Weak labels over tile stores** (:func:`store_tiles`): zarr stores plus a labels CSV
  ``slide_id,label[,patient_id][,split]`` (read with :func:`wsi_convnext.labels.read_labels`);
  every tile takes its slide's label and its group is the patient (else the slide).

Image files are checked when listed (the header is read, not the pixels): a corrupt or
non-image file is skipped and listed in :attr:`LabelledTiles.skipped`, or raises with its name
when ``strict``. A file whose pixels fail to decode later, in a DataLoader worker, is dropped
from its batch and reported by :func:`collate_tiles` in the same way.

**Sizes.** Tiles are never rescaled (that would change µm/px). With ``on_size="crop"`` (default)
tiles larger than the training size are cropped to it (random position when training, centre
otherwise); a tile smaller than the training size is an error. With ``on_size="refuse"``
tiles of different sizes are an error.

Batches: :class:`EpochSampler` yields ``(index, seed)`` pairs, reproducible from ``(seed,
epoch)`` alone, so resuming at a batch position replays the same order; with a balance mode it
draws (with replacement) so that every class, and within a class every group (slide), carries
the same weight. Decoding and the geometric augmentations run in DataLoader workers, seeded per
item, so results do not depend on the number of workers.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._io import csv_unescape
from ..errors import (
    ConfigError, CorruptTileError, InputNotFoundError, LabelsError, OnFailure, StoreError, fail_or_raise, listing,
)
from ..labels.splits import inner_validation_split
from ..labels.table import check_label, read_labels, sort_classes

__all__ = [
    "BALANCE_MODES",
    "IMAGE_SUFFIXES",
    "SIZE_POLICIES",
    "CorruptTileError",
    "EpochSampler",
    "LabelledTileDataset",
    "LabelledTiles",
    "LabelledBatch",
    "collate_tiles",
    "csv_tiles",
    "grouped_split",
    "image_folder_tiles",
    "is_store_input",
    "load_labelled_tiles",
    "store_tiles",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
SIZE_POLICIES = {
    "crop": "crop tiles larger than the training size (random when training, centre otherwise); smaller is an error",
    "refuse": "all tiles must have the same size",
}
BALANCE_MODES = {
    "none": "each tile once per epoch, shuffled",
    "class": "draw so that every class has the same weight",
    "class_group": "every class the same weight, and within a class every group (slide/patient) the same weight",
}
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# ----------------------------------------------------------------------------------- tile lists


@dataclass
class LabelledTiles:
    """Labelled tiles of one source; arrays are aligned (one row per tile).

    Attributes:
        kind: ``"folder"``, ``"csv"`` or ``"stores"``.
        source: The folder, CSV or labels CSV the tiles come from (for messages).
        classes: Class names; ``y`` indexes them.
        refs: Per tile, its name in outputs: the path as given in the CSV (or relative to the
            folder), or ``<slide_id>:<tile index>`` for stores.
        y: (N,) int64 class index.
        groups: (N,) str group (``group`` column, patient, slide; the file itself by default).
        split: (N,) str fixed split (``train``/``val``/``test``) or None.
        paths: (N,) absolute image paths (folder/CSV) or None.
        sizes: (N, 2) int (height, width) in pixels.
        store_paths: Stores (kind ``stores``), indexed by ``store_of``.
        store_of: (N,) int index into ``store_paths``, or None.
        tile_of: (N,) int tile index within its store, or None.
        slide_ids: (N,) str slide per tile (stores) or None.
        skipped: ``(ref, reason)`` of files left out as unreadable.
        failed_stores: ``(store path, reason)`` of stores left out because they failed their check.
    """

    kind: str
    source: str
    classes: tuple[str, ...]
    refs: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    split: np.ndarray | None
    sizes: np.ndarray
    paths: np.ndarray | None = None
    store_paths: tuple[str, ...] = ()
    store_of: np.ndarray | None = None
    tile_of: np.ndarray | None = None
    slide_ids: np.ndarray | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed_stores: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(len(self.y))

    def subset(self, idx: Sequence[int] | np.ndarray) -> LabelledTiles:
        """The tiles at ``idx`` (classes and skipped list kept)."""
        idx = np.asarray(idx, dtype=np.int64)

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return replace(
            self, refs=self.refs[idx], y=self.y[idx], groups=self.groups[idx], split=pick(self.split),
            sizes=self.sizes[idx], paths=pick(self.paths), store_of=pick(self.store_of),
            tile_of=pick(self.tile_of), slide_ids=pick(self.slide_ids), skipped=list(self.skipped),
        )  # fmt: skip

    def counts(self) -> dict[str, int]:
        """Tiles per class."""
        c = Counter(self.y.tolist())
        return {name: int(c.get(i, 0)) for i, name in enumerate(self.classes)}

    def summary(self) -> dict[str, Any]:
        """JSON-able description (for config.json / metrics.json)."""
        return {
            "kind": self.kind,
            "source": self.source,
            "n_tiles": len(self),
            "n_groups": int(len(np.unique(self.groups))) if len(self) else 0,
            "classes": list(self.classes),
            "tiles_per_class": self.counts(),
            "sizes": sorted({f"{h}x{w}" for h, w in self.sizes.tolist()}),
            "n_skipped": len(self.skipped),
            "failed_stores": [{"store": p, "error": why} for p, why in self.failed_stores],
        }

    def data_fingerprint(self) -> str:
        """sha256 over (ref, label, group) of every tile, in order: what the data fingerprint of a training run names."""
        import hashlib

        h = hashlib.sha256()
        for r, y, g in zip(self.refs.tolist(), self.y.tolist(), self.groups.tolist()):
            h.update(f"{r}\t{self.classes[y]}\t{g}\n".encode())
        return h.hexdigest()

    def require_classes(self, n: int = 2) -> None:
        """Raise LabelsError when fewer than ``n`` classes have tiles."""
        present = [self.classes[i] for i in sorted(set(self.y.tolist()))]
        if len(present) < n:
            raise LabelsError(
                f"{self.source}: only {len(present)} class(es) ({listing(present) or 'none'}) among {len(self)} "
                f"tiles; training needs tiles of at least {n} classes"
            )


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header; raises CorruptTileError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptTileError(f"{path}: not a readable image ({' '.join(str(exc).split())[:120]})") from exc
    return int(h), int(w)


def _check_images(
    paths: list[Path], refs: list[str], strict: bool, source: str
) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
    """Read every image header: (kept positions, (n_kept, 2) sizes, skipped (ref, reason))."""
    keep: list[int] = []
    sizes: list[tuple[int, int]] = []
    skipped: list[tuple[str, str]] = []
    for i, p in enumerate(paths):
        try:
            sizes.append(_image_size(p))
            keep.append(i)
        except CorruptTileError as exc:
            if strict:
                raise CorruptTileError(f"{exc} (listed in {source}); remove it or drop --strict to skip it") from exc
            skipped.append((refs[i], str(exc)))
    if skipped:
        logger.warning("%s: skipped %d unreadable file(s): %s", source, len(skipped), listing([s[0] for s in skipped]))
    return keep, np.asarray(sizes, dtype=np.int64).reshape(-1, 2), skipped


def _class_index(labels: list[str], classes: Sequence[str] | None, source: str, where: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    cls = tuple(sort_classes(labels)) if classes is None else tuple(str(c) for c in classes)
    lut = {c: i for i, c in enumerate(cls)}
    unknown = [f"{lab!r} ({w})" for lab, w in zip(labels, where) if lab not in lut]
    if unknown:
        raise LabelsError(f"{source}: unknown label(s) {listing(unknown)}; the classes are {list(cls)}")
    return cls, np.array([lut[lab] for lab in labels], dtype=np.int64)


def image_folder_tiles(
    root: str | os.PathLike[str], *, classes: Sequence[str] | None = None, strict: bool = False,
    loose_label: str | None = None,
) -> LabelledTiles:  # fmt: skip
    """Tiles of an image folder with one sub-folder per class (files found recursively below it).

    Args:
        root: The folder.
        classes: Expected class names (e.g. a trained model's); a sub-folder outside them is an
            error. Default: the sorted sub-folder names.
        strict: Fail on the first unreadable file instead of skipping it.
        loose_label: Also take the images lying directly in ``root``, under this label (for
            unlabelled uses such as pretraining, where a flat folder of tiles is the usual input).

    Raises:
        InputNotFoundError: No folder, or no image files in it.
        LabelsError: A sub-folder that is not among ``classes``.
        CorruptTileError: ``strict`` and an unreadable file.
    """
    base = Path(root)
    if not base.is_dir():
        raise InputNotFoundError(f"{base}: not a folder; pass a folder with one sub-folder per class, or a CSV")
    paths: list[Path] = []
    labels: list[str] = []
    if loose_label is not None:
        for f in sorted(base.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(loose_label)
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(sub.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                paths.append(f)
                labels.append(sub.name)
    if not paths:
        raise InputNotFoundError(
            f"{base}: no image files ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders; "
            "expected <folder>/<class>/<image> or a CSV path,label[,group]"
        )
    if (base / "labels.csv").is_file():
        logger.warning("%s has a labels.csv: pass it as DATA to split by its groups instead of by file", base)
    refs = [p.relative_to(base).as_posix() for p in paths]
    keep, sizes, skipped = _check_images(paths, refs, strict, str(base))
    paths = [paths[i] for i in keep]
    refs = [refs[i] for i in keep]
    labels = [labels[i] for i in keep]
    cls, y = _class_index(labels, classes, str(base), [f"folder {lab}" for lab in labels])
    return LabelledTiles(
        "folder", str(base), cls, np.array(refs, dtype=object), y, np.array(refs, dtype=object), None, sizes,
        paths=np.array([str(p) for p in paths], dtype=object), skipped=skipped,
    )  # fmt: skip


def csv_tiles(
    path: str | os.PathLike[str], *, classes: Sequence[str] | None = None, strict: bool = False,
    require_label: bool = True,
) -> LabelledTiles:  # fmt: skip
    """Tiles listed in a CSV ``path,label[,group][,split]`` (paths relative to the CSV's folder).

    Args:
        path: The CSV.
        classes: Expected class names; a label outside them is an error.
        strict: Fail on the first unreadable or missing file instead of skipping it.
        require_label: Whether the ``label`` column is required (not for unlabelled prediction;
            without it every tile gets class 0 of ``classes``).

    Raises:
        InputNotFoundError: No CSV, or no rows.
        LabelsError: Missing columns, empty cells, bad split values, unknown labels.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: CSV not found; pass a CSV with columns path,label[,group][,split]")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        rows = [[csv_unescape(c) for c in r] for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputNotFoundError(f"{p}: empty CSV; expected a header path,label[,group][,split]")
    header = [h.strip().lower() for h in rows[0]]
    need = ["path", "label"] if require_label else ["path"]
    missing = [c for c in need if c not in header]
    if missing:
        raise LabelsError(f"{p}: missing column(s) {', '.join(missing)} (found {', '.join(header)}); expected path,label[,group][,split]")
    col = {k: header.index(k) for k in ("path", "label", "group", "split") if k in header}
    if len(rows) < 2:
        raise InputNotFoundError(f"{p}: no rows below the header; list at least one tile")
    files: list[Path] = []
    refs: list[str] = []
    labels: list[str] = []
    groups: list[str] = []
    splits: list[str] = []
    for lineno, row in enumerate(rows[1:], start=2):
        cell = {k: (row[i].strip() if i < len(row) else "") for k, i in col.items()}
        if not cell["path"]:
            raise LabelsError(f"{p}: row {lineno} has an empty path; fill it in or remove the row")
        if "label" in col:
            cell["label"] = check_label(cell["label"], f"{p}: row {lineno}")
        f = Path(cell["path"]).expanduser()
        files.append(f if f.is_absolute() else p.parent / f)
        refs.append(cell["path"])
        labels.append(cell.get("label", ""))
        groups.append(cell.get("group") or cell["path"])
        if "split" in col:
            s = _SPLITS.get(cell["split"].lower())
            if s is None:
                raise LabelsError(f"{p}: row {lineno} has split {cell['split']!r}; use train, val or test")
            splits.append(s)
    keep, sizes, skipped = _check_images(files, refs, strict, str(p))
    if "label" in col:
        kept_labels = [labels[i] for i in keep]
        cls, y = _class_index(kept_labels, classes, str(p), [f"row {i + 2}" for i in keep])
    else:
        if not classes:
            raise LabelsError(f"{p}: no label column and no classes given")
        cls, y = tuple(classes), np.zeros(len(keep), dtype=np.int64)
    out = LabelledTiles(
        "csv", str(p), cls, np.array([refs[i] for i in keep], dtype=object), y,
        np.array([groups[i] for i in keep], dtype=object),
        np.array([splits[i] for i in keep], dtype=object) if splits else None, sizes,
        paths=np.array([str(files[i]) for i in keep], dtype=object), skipped=skipped,
    )  # fmt: skip
    if not len(out):
        raise InputNotFoundError(f"{p}: none of its {len(files)} files is a readable image")
    return out


def store_tiles(
    stores: Sequence[str | os.PathLike[str]],
    labels: str | os.PathLike[str] | None,
    *,
    classes: Sequence[str] | None = None,
    on_failure: OnFailure | None = None,
) -> LabelledTiles:
    """Weak labels: every tile of a labelled store takes its slide's label.

    Args:
        stores: Store paths or folders of stores.
        labels: CSV ``slide_id,label[,patient_id][,split]``; stores without a row are left out
            (logged). None (prediction only): every tile gets class 0 of ``classes``.
        classes: Expected class names; a label outside them is an error.
        on_failure: ``on_failure(path, message)`` for a store that fails to open or whose tile chunks
            fail their check (damaged, replaced, missing chunk): it is left out (listed in
            ``failed_stores``) and the others go on. None: raise.

    Raises:
        StoreError: A store fails to open or its tiles fail their check (without ``on_failure``).
        InputNotFoundError: No stores, or no store with a label.
        LabelsError: Bad labels CSV (see :func:`~wsi_convnext.labels.read_labels`) or unknown labels.
    """
    from ..store import find_stores, open_store

    paths = find_stores(stores)
    if not paths:
        raise InputNotFoundError(f"no tile stores (*.zarr) in {listing([str(s) for s in stores])}")
    table = None
    if labels is not None:
        table = read_labels(labels, min_classes=1)
        by_id = {s: i for i, s in enumerate(table.slide_ids)}
    src = str(labels) if labels is not None else listing([str(s) for s in stores])
    store_paths: list[str] = []
    refs: list[np.ndarray] = []
    y_names: list[str] = []
    n_of: list[int] = []
    group_of: list[str] = []
    split_of: list[str] = []
    sizes: list[int] = []
    unlabelled: list[str] = []
    slide_of: list[str] = []
    failed: list[tuple[str, str]] = []

    def record(path: Path, why: str) -> None:
        failed.append((str(path), why))
        on_failure(path, why)  # type: ignore[misc]

    for path in paths:
        try:
            st = open_store(path)
            sid = st.slide_id
            if table is not None and sid not in by_id:
                unlabelled.append(sid)
                continue
            if len(st) == 0:
                continue
            st.verify("tiles")  # damage is found here, in one line, not as tiles skipped in workers
        except StoreError as exc:
            fail_or_raise(path, exc, record if on_failure is not None else None, logger)
            continue
        i = by_id[sid] if table is not None else -1
        store_paths.append(str(path))
        n_of.append(len(st))
        slide_of.append(sid)
        y_names.append(table.labels[i] if table is not None else "")
        group_of.append(table.patient_ids[i] if table is not None else sid)
        split_of.append(table.split[i] if table is not None and table.split is not None else "")
        sizes.append(st.tile_size)
    if unlabelled:
        logger.warning("%s: %d store(s) have no label and are left out: %s", src, len(unlabelled), listing(unlabelled))
    if not store_paths:
        why = f" ({len(failed)} failed to read)" if failed else ""
        raise InputNotFoundError(f"{src}: none of the {len(paths)} store(s){why} has a label row (slide_id) or any tiles")
    if table is not None:
        cls, y_store = _class_index(y_names, classes, src, [f"slide {s}" for s in slide_of])
    else:
        if not classes:
            raise LabelsError("stores without a labels CSV need the model's classes")
        cls, y_store = tuple(classes), np.zeros(len(store_paths), dtype=np.int64)
    counts = np.asarray(n_of, dtype=np.int64)
    store_of = np.repeat(np.arange(len(store_paths)), counts)
    tile_of = np.concatenate([np.arange(n) for n in n_of])
    for sid, n in zip(slide_of, n_of):
        refs.append(np.array([f"{sid}:{t}" for t in range(n)], dtype=object))
    has_split = table is not None and table.split is not None
    return LabelledTiles(
        "stores", src, cls, np.concatenate(refs), y_store[store_of],
        np.array(group_of, dtype=object)[store_of],
        np.array(split_of, dtype=object)[store_of] if has_split else None,
        np.repeat(np.asarray(sizes, dtype=np.int64)[:, None], 2, axis=1)[store_of],
        store_paths=tuple(store_paths), store_of=store_of, tile_of=tile_of,
        slide_ids=np.array(slide_of, dtype=object)[store_of], failed_stores=failed,
    )  # fmt: skip


def is_store_input(p: Path) -> bool:
    """Whether ``p`` is a tile store (``*.zarr``) or a folder holding some."""
    if p.suffix == ".zarr":
        return True
    return p.is_dir() and any(c.suffix == ".zarr" and c.is_dir() for c in p.iterdir())


def load_labelled_tiles(
    data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    require_label: bool = True,
    on_failure: OnFailure | None = None,
) -> LabelledTiles:
    """Tiles of whatever ``data`` is: a CSV, an image folder, or stores (with ``labels``).

    Stores are recognised by their ``.zarr`` name (or a folder holding ``*.zarr``); ``on_failure``
    applies to them (see :func:`store_tiles`).

    Raises:
        InputNotFoundError, LabelsError, CorruptTileError: See the source functions.
        ConfigError: Several CSVs/folders, or ``labels`` with a non-store input.
    """
    items = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(d) for d in data]
    if not items:
        raise InputNotFoundError("no data given; pass an image folder, a CSV or tile stores")
    for it in items:
        if not it.exists():
            raise InputNotFoundError(f"{it}: does not exist; pass an image folder, a CSV or tile stores")
    if all(is_store_input(it) for it in items):
        if labels is None and require_label:
            raise LabelsError(f"stores {listing([str(i) for i in items])} need --labels slide_id,label[,patient_id]")
        return store_tiles(items, labels, classes=classes, on_failure=on_failure)
    if len(items) != 1:
        raise ConfigError(f"pass one image folder or one CSV, not {len(items)} inputs ({listing([str(i) for i in items])})")
    if labels is not None:
        raise ConfigError(f"--labels applies to tile stores; {items[0]} is not a store (put labels in its CSV)")
    it = items[0]
    if it.is_file():
        return csv_tiles(it, classes=classes, strict=strict, require_label=require_label)
    return image_folder_tiles(it, classes=classes, strict=strict)


# --------------------------------------------------------------------------------------- splits


def grouped_split(
    tiles: LabelledTiles, *, val_frac: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) tile indices, never a group on two sides.

    With a ``split`` column the split is taken from it (each group must have one split).
    Otherwise ``val_frac`` of the groups, stratified by class, become validation (no test
    part); ``val_frac == 0`` gives no validation part.

    Raises:
        LabelsError: A group in two splits, or a class present only outside training.
        ConfigError: ``val_frac`` outside [0, 1).
    """
    n = len(tiles)
    if tiles.split is not None:
        by_group: dict[str, set[str]] = {}
        for g, s in zip(tiles.groups.tolist(), tiles.split.tolist()):
            by_group.setdefault(g, set()).add(s)
        both = sorted(g for g, s in by_group.items() if len(s) > 1)
        if both:
            raise LabelsError(f"{tiles.source}: group(s) {listing(both)} appear in several splits; give each group one split")
        parts = [np.flatnonzero(tiles.split == s) for s in ("train", "val", "test")]
    else:
        if not 0 <= val_frac < 1:
            raise ConfigError(f"--val-frac must be in [0, 1), got {val_frac}")
        idx = np.arange(n)
        if val_frac == 0:
            parts = [idx, idx[:0], idx[:0]]
        else:
            fit, val = inner_validation_split(tiles.y, tiles.groups.astype(str), idx, val_fraction=val_frac, seed=seed)
            parts = [np.sort(fit), np.sort(val), idx[:0]]
    train = parts[0]
    train_classes = set(tiles.y[train].tolist())
    outside = sorted({tiles.classes[c] for p in parts[1:] for c in tiles.y[p].tolist()} - {tiles.classes[c] for c in train_classes})
    if outside:
        raise LabelsError(f"{tiles.source}: class(es) {listing(outside)} have no training tiles; put some of their groups in the training split")
    return parts[0], parts[1], parts[2]


# -------------------------------------------------------------------------------------- sampling


class EpochSampler:
    """Per-epoch order of ``(tile index, item seed)`` pairs, a pure function of (seed, epoch).

    Args:
        y: (N,) class per tile.
        groups: (N,) group per tile (slides for weak labels).
        balance: Name in :data:`BALANCE_MODES`.
        seed: Base seed.
        num_samples: Draws per epoch (default N).
    """

    def __init__(
        self, y: np.ndarray, groups: np.ndarray, *, balance: str = "none", seed: int = 0, num_samples: int | None = None
    ) -> None:
        if balance not in BALANCE_MODES:
            raise ConfigError(f"unknown balance mode {balance!r}: choose one of {', '.join(BALANCE_MODES)}")
        self.n = len(y)
        self.balance = balance
        self.seed = int(seed)
        self.num_samples = self.n if num_samples is None else int(num_samples)
        self.epoch = 0
        self.start = 0
        self._p: np.ndarray | None = None
        if balance != "none":
            y = np.asarray(y)
            w = np.zeros(self.n, dtype=np.float64)
            classes = np.unique(y)
            for c in classes:
                in_c = np.flatnonzero(y == c)
                if balance == "class":
                    w[in_c] = 1.0 / len(in_c)
                else:
                    g = np.asarray(groups)[in_c]
                    uniq, inv, cnt = np.unique(g, return_inverse=True, return_counts=True)
                    w[in_c] = 1.0 / (len(uniq) * cnt[inv])
            self._p = w / w.sum()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first ``start`` draws (resume)."""
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> np.ndarray:
        """(num_samples,) tile indices of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch, 0x5A4D])
        if self._p is None:
            reps = -(-self.num_samples // max(1, self.n))
            return np.concatenate([rng.permutation(self.n) for _ in range(reps)])[: self.num_samples]
        return rng.choice(self.n, size=self.num_samples, replace=True, p=self._p)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        for pos in range(self.start, self.num_samples):
            yield int(order[pos]), int(np.random.SeedSequence([self.seed, self.epoch, pos]).generate_state(1)[0])


# -------------------------------------------------------------------------------------- dataset


@dataclass
class LabelledBatch:
    """A collated batch.

    Attributes:
        tiles: (B, H, W, 3) uint8 tensor.
        y: (B,) int64 tensor.
        index: (B,) int64 tensor of tile indices into the dataset's :class:`LabelledTiles`.
        bad: ``(index, reason)`` of tiles that failed to decode and were dropped.
    """

    tiles: Any
    y: Any
    index: Any
    bad: list[tuple[int, str]]


def collate_tiles(items: list[tuple[np.ndarray | None, int, int, str]]) -> LabelledBatch:
    """Stack decoded tiles; tiles that failed to decode are left out and listed in ``bad``."""
    import torch

    good = [it for it in items if it[0] is not None]
    bad = [(int(it[2]), it[3]) for it in items if it[0] is None]
    if good:
        tiles = torch.from_numpy(np.stack([it[0] for it in good]))
    else:
        tiles = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    y = torch.tensor([it[1] for it in good], dtype=torch.int64)
    index = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return LabelledBatch(tiles, y, index, bad)


def _decode_file(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class LabelledTileDataset:
    """Map-style torch dataset over :class:`LabelledTiles`: key ``i`` or ``(i, seed)``.

    Items are ``(tile (S, S, 3) uint8 | None, label, index, error)``; ``None`` marks a tile whose
    pixels did not decode (see :func:`collate_tiles`). With ``train`` and a seed, a random crop of
    ``size`` px, random flips and 90° rotations are applied (all at the tile's µm/px); otherwise the
    centre crop.

    Args:
        tiles: The tiles.
        size: Output side in pixels (default: the smallest tile side).
        train: Random crop and geometric augmentation.
        augment: Whether ``train`` also flips and rotates (crops always).
        on_size: Name in :data:`SIZE_POLICIES`.

    Raises:
        ConfigError: Tiles smaller than ``size``, or mixed sizes under ``on_size="refuse"``.
    """

    def __init__(
        self, tiles: LabelledTiles, *, size: int | None = None, train: bool = False, augment: bool = True,
        on_size: str = "crop",
    ) -> None:  # fmt: skip
        if on_size not in SIZE_POLICIES:
            raise ConfigError(f"unknown size policy {on_size!r}: choose one of {', '.join(SIZE_POLICIES)}")
        self.tiles = tiles
        self.train = train
        self.augment = augment
        sides = np.unique(tiles.sizes.reshape(-1)) if len(tiles) else np.array([0])
        if on_size == "refuse":
            shapes = sorted({(int(h), int(w)) for h, w in tiles.sizes.tolist()})
            if len(shapes) > 1:
                raise ConfigError(
                    f"{tiles.source}: tiles have {len(shapes)} different sizes ({listing([f'{h}x{w}' for h, w in shapes])}); "
                    "make them one size or use --on-size crop"
                )
        min_side = int(sides.min())
        self.size = min_side if size is None else int(size)
        if self.size < 1:
            raise ConfigError(f"tile size must be positive, got {self.size}")
        small = np.flatnonzero(tiles.sizes.min(axis=1) < self.size) if len(tiles) else []
        if len(small):
            names = [f"{tiles.refs[i]} ({tiles.sizes[i][0]}x{tiles.sizes[i][1]})" for i in small]
            raise ConfigError(
                f"{tiles.source}: {len(small)} tile(s) are smaller than the {self.size}-px training size: {listing(names)}; "
                "tiles are never upscaled (it would change µm/px): use a smaller --crop-size or remove them"
            )
        self._stores: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def _read(self, i: int) -> np.ndarray:
        t = self.tiles
        if t.kind == "stores":
            s = int(t.store_of[i])
            st = self._stores.get(s)
            if st is None:
                from ..store import open_store

                st = self._stores[s] = open_store(t.store_paths[s])
            return st.read_tiles([int(t.tile_of[i])])[0]
        return _decode_file(str(t.paths[i]))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray | None, int, int, str]:
        i, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        label = int(self.tiles.y[i])
        try:
            img = self._read(i)
        except (OSError, ValueError, SyntaxError, StoreError) as exc:
            return None, label, i, f"{self.tiles.refs[i]}: {' '.join(str(exc).split())[:160]}"
        if img.ndim != 3 or img.shape[2] != 3:
            return None, label, i, f"{self.tiles.refs[i]}: not an RGB image (shape {img.shape})"
        h, w = img.shape[:2]
        s = self.size
        if h < s or w < s:
            return None, label, i, f"{self.tiles.refs[i]}: {h}x{w} is smaller than the {s}-px training size"
        if self.train and seed is not None:
            rng = np.random.default_rng(seed)
            y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            img = img[y0 : y0 + s, x0 : x0 + s]
            if self.augment:
                if rng.random() < 0.5:
                    img = img[:, ::-1]
                img = np.rot90(img, int(rng.integers(0, 4)))
        else:
            y0, x0 = (h - s) // 2, (w - s) // 2
            img = img[y0 : y0 + s, x0 : x0 + s]
        return np.ascontiguousarray(img), label, i, ""
