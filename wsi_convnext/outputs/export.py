"""Export embeddings from tile stores to files other tools read.

``h5`` (default) writes ``OUT/<slide_id>.h5`` in the CLAM / TRIDENT layout::

    features      (N, D) float32 (or float16) tile embeddings, row i = tile i
    coords        (N, 2) int64 level-0 (x, y) of each tile's top-left corner
    coords.attrs  patch_size (px at the tile mpp), patch_size_level0 (level-0 px, rounded),
                  target_mpp, level0_mpp (µm/px), target_magnification, level0_magnification
                  (≈ 10 / mpp), overlap, name (slide id)
    features.attrs / file attrs
                  feature_key, model, stem, weights_sha256, ... (the store's feature attrs;
                  nested values as JSON strings)

``pt`` writes ``OUT/<slide_id>.pt``: the (N, D) float tensor alone, as CLAM's ``pt_files``.

Formats live in :data:`FORMATS`; add one with :func:`register_format`. Every file is
written under a hidden temporary name and moved into place with :func:`os.replace`, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._io import atomic_path, ensure_dir, inside
from ..errors import ConfigError, StoreError, StoreExistsError
from ..store import TileStore, find_stores, open_store

__all__ = ["EXPORT_DTYPES", "FORMATS", "ExportFormat", "SlideExport", "export_features", "read_h5", "register_format"]

logger = logging.getLogger(__name__)

#: Exported feature dtypes by name.
EXPORT_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


@dataclass(frozen=True)
class SlideExport:
    """What one slide exports.

    Attributes:
        slide_id: Slide identifier (the output file's stem).
        features: (N, D) embeddings.
        coords: (N, 2) int64 level-0 (x, y) of each tile's top-left corner.
        coords_attrs: Tile geometry (see the module docstring).
        feature_attrs: Provenance of the embeddings (store feature attrs plus ``feature_key``).
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    coords_attrs: dict[str, Any]
    feature_attrs: dict[str, Any]


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: Registry name (``--format``).
        suffix: File suffix, with the dot.
        write: ``write(path, slide_export)``; writes one complete file at ``path``.
        description: One line for help texts.
    """

    name: str
    suffix: str
    write: Callable[[Path, SlideExport], None]
    description: str


#: Export formats by name.
FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add (or replace) a format in :data:`FORMATS`."""
    FORMATS[fmt.name] = fmt
    return fmt


def _h5_attr(value: Any) -> Any:
    """A value h5py can store as an attribute: scalars and strings as is, the rest as JSON."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    return json.dumps(value, default=str)


def _write_h5(path: Path, item: SlideExport) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", data=item.features)
        coords = f.create_dataset("coords", data=item.coords)
        for k, v in item.coords_attrs.items():
            coords.attrs[k] = _h5_attr(v)
        for k, v in item.feature_attrs.items():
            feats.attrs[k] = _h5_attr(v)
        for k, v in {**item.feature_attrs, **item.coords_attrs}.items():
            f.attrs[k] = _h5_attr(v)
        f.attrs["exported_by"] = f"wsi-convnext {__version__}"


def _write_pt(path: Path, item: SlideExport) -> None:
    import torch

    torch.save(torch.from_numpy(np.ascontiguousarray(item.features)), path)


register_format(
    ExportFormat("h5", ".h5", _write_h5, "HDF5 with features (N, D) and coords (N, 2), CLAM/TRIDENT layout")
)
register_format(ExportFormat("pt", ".pt", _write_pt, "torch tensor (N, D) of features only, CLAM pt_files layout"))


def _magnification(mpp: float) -> float:
    # The usual convention 10 µm/px ÷ mpp (0.25 µm/px ≈ 40×, 0.5 µm/px ≈ 20×).
    return round(10.0 / mpp, 2)


def _slide_export(store: TileStore, key: str, dtype: np.dtype) -> SlideExport:
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
    feature_attrs = {k: v for k, v in store.feature_attrs(key).items() if k != "complete"}
    feature_attrs["feature_key"] = key
    feature_attrs["store_dtype"] = feature_attrs.pop("dtype", None)
    feature_attrs["dtype"] = dtype.name
    features = store.features(key).astype(dtype, copy=False)
    coords = store.coords
    if features.shape[0] != coords.shape[0]:
        raise StoreError(
            f"{store.path}: store damaged: features/{key} has {features.shape[0]} rows but coords has "
            f"{coords.shape[0]}; re-embed it (`wsi-convnext embed --overwrite`)"
        )
    return SlideExport(store.slide_id, features, coords, coords_attrs, feature_attrs)


def export_features(
    stores: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "h5",
    feature_key: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write each store's embeddings (and coords) to ``out_dir/<slide_id><suffix>``.

    All stores and output paths are checked before anything is written, so bad input
    raises without leaving a partial export behind.

    Args:
        stores: Store folders and/or folders of stores.
        out_dir: Output folder (created).
        fmt: A key of :data:`FORMATS`.
        feature_key: Which embeddings (``features/<key>``); may be omitted when every store
            holds exactly one.
        dtype: Exported feature dtype, a key of :data:`EXPORT_DTYPES` (float32 by default,
            which is what CLAM/TRIDENT models expect).
        overwrite: Replace existing output files.
        progress: Called as ``progress(files_done, files_total)``.

    Returns:
        The written files, in store order.

    Raises:
        InputNotFoundError: A path does not exist or a folder holds no stores.
        StoreError: A store is foreign/incomplete, lacks the embeddings, or holds several and
            ``feature_key`` is not given.
        StoreExistsError: An output file exists and ``overwrite`` is False.
        ConfigError: Unknown ``fmt`` or ``dtype``, or two stores share a slide id.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (--format): choose one of {', '.join(FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r} (--dtype): choose one of {', '.join(EXPORT_DTYPES)}")
    spec = FORMATS[fmt]
    out = Path(out_dir)

    # Validate everything first: a bad store or an existing file stops the export before it starts.
    plan: list[tuple[TileStore, str, Path]] = []
    owners: dict[str, Path] = {}
    for path in find_stores(stores):
        store = open_store(path)
        key = store.resolve_feature_key(feature_key)
        if key not in store.feature_keys:
            have = ", ".join(store.feature_keys) or "none"
            raise StoreError(f"{store.path}: no embeddings {key!r} (available: {have}); run `wsi-convnext embed` first")
        sid = store.slide_id  # open_store refuses stores whose slide_id breaks the id policy
        if sid in owners:
            raise ConfigError(
                f"stores {owners[sid]} and {store.path} share the slide id {sid!r}; export them separately"
            )
        owners[sid] = store.path
        target = inside(out, f"{sid}{spec.suffix}")
        if target.exists() and not overwrite:
            raise StoreExistsError(f"{target}: already exists; pass --overwrite to replace it")
        plan.append((store, key, target))

    ensure_dir(out)
    written: list[Path] = []
    for i, (store, key, target) in enumerate(plan):
        item = _slide_export(store, key, EXPORT_DTYPES[dtype])
        with atomic_path(target) as tmp:
            spec.write(tmp, item)
        logger.info("%s: wrote %s (%d × %d, %s)", store.slide_id, target, *item.features.shape, key)
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
