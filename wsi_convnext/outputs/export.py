"""Export what the tile stores hold to files other tools read.

The formats are registered writers, one module each, in :mod:`wsi_convnext.outputs.exports`
(:data:`FORMATS`; add one with :func:`register_format`):

- ``h5`` (default): ``OUT/<slide_id>.h5`` in the CLAM / TRIDENT layout (features, coords
  and the tile geometry: ``patch_size``, ``patch_size_level0``, ``target_mpp``, ``level0_mpp``,
  magnifications, ``overlap``, ``name``; see :mod:`~wsi_convnext.outputs.exports.h5`);
- ``pt``: ``OUT/<slide_id>.pt``, the (N, D) float tensor alone, as CLAM's ``pt_files``;
- ``geojson``: ``OUT/<slide_id>.geojson`` for QuPath, tissue polygons and one detection per
  tile with its tissue fraction and scores, in level-0 pixels (needs no embeddings);
- ``anndata``: ``OUT/<slide_id>.h5ad`` (or ``OUT/cohort.h5ad`` with ``cohort=True``) for
  scverse, with the features as ``X`` and the coords in ``obsm["spatial"]``.

Every file is written under a hidden temporary name and moved into place with
:func:`os.replace`, so a reader never sees a half-written file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, ensure_dir, inside
from ..errors import ConfigError, InputNotFoundError, StoreError, StoreExistsError, WsiConvnextError, OnFailure, fail_or_raise
from ..store import META_DIGEST, TileStore, find_stores, open_store
from .exports import FORMATS, STORE_PARTS, ExportFormat, SlideExport, register_format

__all__ = [
    "COHORT_STEM", "EXPORT_DTYPES", "FORMATS", "ExportFormat", "SlideExport", "export_features", "read_h5",
    "register_format", "slide_export",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: Exported feature dtypes by name.
EXPORT_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
#: Store bookkeeping attrs (completion flag, chunk checksums, metadata digest) that exports leave out.
_BOOKKEEPING = frozenset({"complete", "integrity", META_DIGEST})

#: File stem of a cohort export (``OUT/cohort<suffix>``).
COHORT_STEM = "cohort"


def _magnification(mpp: float) -> float:
    # The usual convention 10 µm/px ÷ mpp (0.25 µm/px ≈ 40×, 0.5 µm/px ≈ 20×).
    return round(10.0 / mpp, 2)


def slide_export(
    store: TileStore, key: str | None, dtype: str | np.dtype = "float32", reads: Sequence[str] = STORE_PARTS
) -> SlideExport:
    """What one store exports: features of ``key`` (None: none), coords, geometry, and the ``reads`` parts.

    Args:
        reads: Parts of :data:`~wsi_convnext.outputs.exports.STORE_PARTS` to read (tissue
            fraction, tissue mask, scores); the others are left unread (None / empty).
    """
    dtype = np.dtype(dtype)
    attrs = store.attrs
    extent0 = float(attrs.get("extent0", store.tile_size * store.mpp / store.slide_mpp))
    coords_attrs = {
        "name": store.slide_id,
        "patch_size": store.tile_size,
        "patch_size_level0": int(round(extent0)),
        "extent0": extent0,
        "target_mpp": store.mpp,
        "level0_mpp": store.slide_mpp,
        "target_magnification": _magnification(store.mpp),
        "level0_magnification": _magnification(store.slide_mpp),
        "overlap": attrs.get("overlap", 0),
        "coords_frame": "level-0 pixels, (x, y) of the tile's top-left corner",
    }
    features, feature_attrs = None, {}
    coords = store.coords
    if key is not None:
        feature_attrs = {k: v for k, v in store.feature_attrs(key).items() if k not in _BOOKKEEPING}
        feature_attrs["feature_key"] = key
        feature_attrs["store_dtype"] = feature_attrs.pop("dtype", None)
        feature_attrs["dtype"] = dtype.name
        features = store.features(key).astype(dtype, copy=False)
        if features.shape[0] != coords.shape[0]:
            raise StoreError(
                f"{store.path}: store damaged: features/{key} has {features.shape[0]} rows but coords has "
                f"{coords.shape[0]}; re-embed it (`wsi-convnext embed --overwrite`)"
            )
    names = store.score_keys if "scores" in reads else []
    return SlideExport(
        store.slide_id, features, coords, coords_attrs, feature_attrs,
        tissue_fraction=store.tissue_fraction if "tissue_fraction" in reads else None,
        scores={n: store.scores(n) for n in names},
        score_attrs={n: {k: v for k, v in store.score_attrs(n).items() if k not in _BOOKKEEPING} for n in names},
        tissue_mask=store.tissue_mask if "tissue_mask" in reads else None,
        mask_downsample=float(attrs.get("mask_downsample", 1.0)),
    )  # fmt: skip


def _resolve_key(store: TileStore, feature_key: str | None, required: bool) -> str | None:
    if not required and (feature_key is None and len(store.feature_keys) != 1):
        return None  # a format without features exports stores with none or several keys
    key = store.resolve_feature_key(feature_key)
    if key not in store.feature_keys:
        have = ", ".join(store.feature_keys) or "none"
        raise StoreError(f"{store.path}: no embeddings {key!r} (available: {have}); run `wsi-convnext embed` first")
    return key


def export_features(
    stores: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "h5",
    feature_key: str | None = None,
    dtype: str = "float32",
    cohort: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_failure: OnFailure | None = None,
) -> list[Path]:
    """Write each store's export to ``out_dir/<slide_id><suffix>`` (or all to one cohort file).

    All stores and output paths are checked before anything is written, so bad input
    raises without leaving a partial export behind. Only the arrays the format needs are
    read (:attr:`ExportFormat.reads`), each checked against its checksums as it is read.

    Args:
        stores: Store folders and/or folders of stores.
        out_dir: Output folder (created).
        fmt: A key of :data:`FORMATS`.
        feature_key: Which embeddings (``features/<key>``); may be omitted when every store
            holds exactly one. Formats without features (``geojson``) export no embeddings then.
        dtype: Exported feature dtype, a key of :data:`EXPORT_DTYPES` (float32 by default,
            which is what CLAM/TRIDENT models expect).
        cohort: Write one ``out_dir/cohort<suffix>`` holding every slide (formats with a
            cohort writer only, e.g. ``anndata``).
        overwrite: Replace existing output files.
        progress: Called as ``progress(files_done, files_total)``.
        on_failure: Called as ``on_failure(store_path, one-line error)`` for a store that cannot be
            exported (invalid, damaged, replaced, lacking the embeddings); the export goes on
            without it and writes nothing for it. None: such a store raises.

    Returns:
        The written files, in store order.

    Raises:
        InputNotFoundError: A path does not exist or a folder holds no stores.
        StoreError: A store is foreign/incomplete, lacks the embeddings, or holds several and
            ``feature_key`` is not given.
        StoreExistsError: An output file exists and ``overwrite`` is False.
        ConfigError: Unknown ``fmt`` or ``dtype``, ``cohort`` for a per-slide format, a missing
            optional dependency, or two stores share a slide id.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (--format): choose one of {', '.join(FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r} (--dtype): choose one of {', '.join(EXPORT_DTYPES)}")
    spec = FORMATS[fmt]
    if cohort and spec.write_cohort is None:
        with_cohort = ", ".join(n for n, f in FORMATS.items() if f.write_cohort is not None) or "none"
        raise ConfigError(f"--format {fmt} writes one file per slide; drop --cohort (cohort files: {with_cohort})")
    if spec.check is not None:
        spec.check()
    out = ensure_dir(out_dir, create=False)

    # Validate everything first: a bad store or an existing file stops the export before it starts.
    def failed(path: Path, exc: WsiConvnextError) -> None:
        fail_or_raise(path, exc, on_failure, logger)

    plan: list[tuple[TileStore, str | None, Path]] = []
    owners: dict[str, Path] = {}
    for path in find_stores(stores):
        try:
            store = open_store(path, check=())  # each array is checked as it is read
            key = _resolve_key(store, feature_key, spec.needs_features or cohort)
        except (StoreError, InputNotFoundError) as exc:
            failed(path, exc)
            continue
        sid = store.slide_id  # open_store refuses stores whose slide_id breaks the id policy
        if sid in owners:
            raise ConfigError(
                f"stores {owners[sid]} and {store.path} share the slide id {sid!r}; export them separately"
            )
        owners[sid] = store.path
        target = inside(out, f"{COHORT_STEM if cohort else sid}{spec.suffix}")
        if target.exists() and not overwrite:
            raise StoreExistsError(f"{target}: already exists; pass --overwrite to replace it")
        plan.append((store, key, target))
    if cohort:
        keys = {key for _, key, _ in plan}
        if len(keys) > 1:
            raise StoreError(
                f"stores hold different embeddings ({', '.join(sorted(map(str, keys)))}); choose one with --features KEY"
            )

    ensure_dir(out)
    written: list[Path] = []
    if cohort:
        items = []
        for i, (store, key, _) in enumerate(plan):
            try:
                items.append(slide_export(store, key, dtype, spec.reads))
            except StoreError as exc:
                failed(store.path, exc)
            if progress is not None:
                progress(i + 1, len(plan) + 1)
        if not items:
            return []
        target = inside(out, f"{COHORT_STEM}{spec.suffix}")
        with atomic_path(target) as tmp:
            spec.write_cohort(tmp, items)  # type: ignore[misc]
        logger.info("wrote %s (%d slides, %s)", target, len(items), plan[0][1] if plan else None)
        if progress is not None:
            progress(len(plan) + 1, len(plan) + 1)
        return [target]
    for i, (store, key, target) in enumerate(plan):
        try:
            item = slide_export(store, key, dtype, spec.reads)
        except StoreError as exc:
            failed(store.path, exc)
        else:
            with atomic_path(target) as tmp:
                spec.write(tmp, item)
            logger.info("%s: wrote %s (%d tiles, %s)", store.slide_id, target, len(item.coords), key)
            written.append(target)
        if progress is not None:
            progress(i + 1, len(plan))
    return written


def read_h5(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read an exported ``.h5``: ``(features (N, D), coords (N, 2), coords attrs)``."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs: Mapping[str, Any] = dict(f["coords"].attrs)
        return np.asarray(f["features"][...]), np.asarray(f["coords"][...]), dict(attrs)
