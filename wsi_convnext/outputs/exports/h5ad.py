"""``anndata``: scverse AnnData, ``OUT/<slide_id>.h5ad`` (or one ``OUT/cohort.h5ad`` with ``--cohort``).

One observation per tile:

- ``X``: (N, D) embeddings of one feature key (float32 by default);
- ``obs``: ``slide_id`` (categorical), ``tile`` (the tile's index in its store),
  ``tissue_fraction`` and one column per per-tile score in the store (MIL attention,
  per-class scores; names from :func:`~wsi_convnext.outputs.exports.score_columns`);
  the index is ``<slide_id>:<tile>``;
- ``obsm["spatial"]``: (N, 2) int64 level-0 (x, y) of each tile's top-left corner;
- ``uns["wsi_convnext"]``: ``feature_key``, ``encoder`` (the feature array's provenance:
  model, stem, weights sha256, preprocessing, ...), ``mpp`` (tile resolution, µm/px) and
  ``slides`` (per slide: ``slide_mpp``, ``target_mpp``, ``extent0``, ``tile_size``, ...).

anndata is an optional dependency: ``pip install "wsi-convnext[scverse]"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError, StoreError
from . import ExportFormat, SlideExport, register_format, score_columns

__all__ = ["to_anndata", "write_h5ad", "write_h5ad_cohort"]


def _anndata() -> Any:
    try:
        import anndata
    except ImportError as exc:
        raise ConfigError('--format anndata needs the anndata package: pip install "wsi-convnext[scverse]"') from exc
    return anndata


def _uns_value(value: Any) -> Any:
    """A value h5ad can store in ``uns``: nested dicts of numbers, strings and arrays (None dropped)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _uns_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, (bool, int, float, str, np.generic)):
        return value
    if isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged
            arr = np.asarray([], dtype=object)
        if value and arr.dtype.kind in "iuf":  # numbers, or equal-length rows of numbers (a matrix)
            return arr
        if value and all(isinstance(v, str) for v in value):
            return np.asarray(value, dtype=object)
        return {str(i): _uns_value(v) for i, v in enumerate(value) if v is not None}
    return str(value)


def to_anndata(items: Sequence[SlideExport]) -> Any:
    """One AnnData over the tiles of ``items`` (in order); see the module docstring.

    Raises:
        ConfigError: anndata is not installed.
        StoreError: The slides hold different feature keys or feature dimensions.
    """
    import numpy as np
    import pandas as pd

    anndata = _anndata()
    keys = {it.feature_attrs.get("feature_key") for it in items}
    dims = {it.features.shape[1] for it in items}
    if len(keys) > 1 or len(dims) > 1:
        raise StoreError(
            f"stores hold different embeddings ({', '.join(sorted(map(str, keys)))}); "
            "choose one with --features KEY or export them separately"
        )
    obs_parts = []
    for it in items:
        n = len(it.coords)
        cols: dict[str, Any] = {"slide_id": [it.slide_id] * n, "tile": np.arange(n, dtype=np.int64)}
        if it.tissue_fraction is not None:
            cols["tissue_fraction"] = np.asarray(it.tissue_fraction, dtype=np.float32)
        cols.update(score_columns(it))
        obs_parts.append(pd.DataFrame(cols, index=[f"{it.slide_id}:{i}" for i in range(n)]))
    obs = pd.concat(obs_parts) if obs_parts else pd.DataFrame()
    obs["slide_id"] = pd.Categorical(obs["slide_id"], categories=[it.slide_id for it in items])
    first = items[0]
    slide_meta = {it.slide_id: _uns_value(dict(it.coords_attrs, mask_downsample=it.mask_downsample)) for it in items}
    scores_meta = {f"{it.slide_id}/{k}": _uns_value(v) for it in items for k, v in it.score_attrs.items()}
    uns = {
        "wsi_convnext": {
            "feature_key": str(first.feature_attrs.get("feature_key")),
            "encoder": _uns_value({k: v for k, v in first.feature_attrs.items() if k != "created"}),
            "mpp": float(first.coords_attrs["target_mpp"]),
            "coords_frame": "obsm['spatial'] = level-0 pixels, (x, y) of each tile's top-left corner",
            "slides": slide_meta,
            "scores": {k.replace("/", ":"): v for k, v in scores_meta.items()},
        }
    }
    x = np.concatenate([it.features for it in items]) if items else np.zeros((0, 0), np.float32)
    spatial = np.concatenate([np.asarray(it.coords, dtype=np.int64) for it in items])
    return anndata.AnnData(X=x, obs=obs, obsm={"spatial": spatial}, uns=uns)


def write_h5ad(path: Path, item: SlideExport) -> None:
    """Write one slide as ``.h5ad``."""
    to_anndata([item]).write_h5ad(path)


def write_h5ad_cohort(path: Path, items: Sequence[SlideExport]) -> None:
    """Write all slides into one ``.h5ad`` (``obs["slide_id"]`` tells them apart)."""
    to_anndata(items).write_h5ad(path)


register_format(
    ExportFormat(
        "anndata", ".h5ad", write_h5ad, "scverse AnnData .h5ad: X = features, obsm['spatial'] = coords, obs = scores",
        write_cohort=write_h5ad_cohort, check=_anndata, reads=("tissue_fraction", "scores"),
    )
)  # fmt: skip
