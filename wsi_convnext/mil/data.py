"""Bags of tile embeddings and slide labels.

A :class:`Bag` is one slide: tile embeddings (N, D) and level-0 tile coordinates (N, 2) as (x, y)
pixels. Features stay in their storage dtype (float16 at rest) and are cast to float32 one bag at a
time by the model. Bags either hold their features in memory or re-read them from their zarr store on
each access (``in_memory=False``), so a cohort never needs to fit in RAM.

Slide labels (:class:`~wsi_convnext.labels.LabelTable`) are read by
:func:`wsi_convnext.labels.read_labels`; :func:`labels_for_bags` aligns them with bags.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, LabelsError, OnFailure, StoreError, fail_or_raise, listing
from ..labels.table import LabelTable

__all__ = ["Bag", "index_stores", "labels_for_bags", "load_bags"]

log = logging.getLogger(__name__)

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


def _open(path: str | os.PathLike[str]):  # noqa: ANN202 - Store type lives in wsi_convnext.store
    from ..store import open_store

    return open_store(path)


def resolve_feature_key(store, feature_key: str | None, where: str) -> str:  # noqa: ANN001
    """The feature set to use in ``store``: ``feature_key``, or its only feature set."""
    keys = list(store.feature_keys)
    if feature_key is not None:
        if feature_key not in keys:
            raise StoreError(
                f"{where}: no feature set {feature_key!r} (has: {listing(keys) or 'none'}); "
                "embed it first or pass another feature key"
            )
        return feature_key
    if not keys:
        raise StoreError(f"{where}: has no embeddings; run embedding on this store first")
    if len(keys) > 1:
        raise ConfigError(f"{where}: has several feature sets ({listing(keys)}); pass a feature key")
    return keys[0]


def index_stores(
    store_paths: Iterable[str | os.PathLike[str]], *, on_failure: OnFailure | None = None
) -> dict[str, str]:
    """Map slide id → store path for ``store_paths`` (opens each store; reads no features).

    Args:
        store_paths: Store paths.
        on_failure: ``on_failure(path, message)`` for a store that fails to open (damaged metadata,
            incomplete, foreign): it is left out and the others go on. None: raise.

    Raises:
        LabelsError: Two stores hold the same slide id.
        StoreError: A store fails to open (without ``on_failure``).
    """
    out: dict[str, str] = {}
    for path in store_paths:
        try:
            sid = str(_open(path).slide_id)
        except StoreError as exc:
            fail_or_raise(path, exc, on_failure, log)
            continue
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
    on_failure: OnFailure | None = None,
) -> list[Bag]:
    """Load one :class:`Bag` per zarr store.

    Args:
        store_paths: Store paths (as accepted by :func:`wsi_convnext.store.open_store`).
        feature_key: Feature set to use; ``None`` = each store's only feature set (all stores must
            then resolve to the same key).
        in_memory: Keep features in memory (their storage dtype, float16 at rest). ``False`` re-reads
            them from the store at each access (cohorts larger than RAM).
        progress: Optional ``progress(description, done, total)`` callback.
        on_failure: ``on_failure(path, message)`` for a store whose metadata, coords or features
            fail to read (damaged, replaced, missing chunk; lazy bags are read once to check):
            it is left out and the others go on. None: raise.

    Raises:
        StoreError: A store fails to read (without ``on_failure``), has no embeddings, the key is missing, feature rows do not match the tile
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
        try:
            store = _open(path)
        except StoreError as exc:
            fail_or_raise(path, exc, on_failure, log)
            continue
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
        try:
            coords = np.asarray(store.coords, dtype=np.int64)
            if in_memory:
                bag = Bag(sid, store.features(key), coords, source=path, feature_key=key)
                d = bag.features.shape[1]
            else:
                bag = Bag(sid, coords=coords, loader=_StoreLoader(path, key), source=path, feature_key=key)
                d = bag.features.shape[1] if on_failure is not None else None
            if len(coords) != len(store):
                raise StoreError(f"store {path}: {len(coords)} coords but {len(store)} tiles")
        except StoreError as exc:
            fail_or_raise(path, exc, on_failure, log)
            continue
        if d is not None:
            if dim is not None and d != dim:
                raise StoreError(f"store {path}: feature dimension {d} differs from {dim} in {bags[0].source}")
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
        raise LabelsError(f"duplicate bag slide_id(s) {listing(dups)}; each slide must appear once")
    missing = [s for s in ids if s not in table]
    if missing:
        raise LabelsError(f"{table.source}: no label for slide(s) {listing(missing)}")
    sub = table.subset(ids)
    sub.require_classes(2)
    return sub
