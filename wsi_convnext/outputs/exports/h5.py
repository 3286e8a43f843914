"""``h5``: CLAM / TRIDENT HDF5, ``OUT/<slide_id>.h5``.

Layout::

    features      (N, D) float32 (or float16) tile embeddings, row i = tile i
    coords        (N, 2) int64 level-0 (x, y) of each tile's top-left corner
    coords.attrs  patch_size (px at the tile mpp), patch_size_level0 (level-0 px, rounded),
                  target_mpp, level0_mpp (µm/px), target_magnification, level0_magnification
                  (≈ 10 / mpp), overlap, name (slide id)
    features.attrs / file attrs
                  feature_key, model, stem, weights_sha256, ... (the store's feature attrs;
                  nested values as JSON strings)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import ExportFormat, SlideExport, register_format


def _h5_attr(value: Any) -> Any:
    """A value h5py can store as an attribute: scalars and strings as is, the rest as JSON."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    return json.dumps(value, default=str)


def write_h5(path: Path, item: SlideExport) -> None:
    """Write one slide's features and coords in the CLAM/TRIDENT layout."""
    import h5py

    from ... import __version__

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


register_format(ExportFormat("h5", ".h5", write_h5, "HDF5 features (N, D) + coords (N, 2), CLAM/TRIDENT layout"))
