"""``geojson``: a QuPath-readable FeatureCollection per slide, ``OUT/<slide_id>.geojson``.

All coordinates are level-0 pixels of the source slide (x right, y down), which is what
QuPath expects (File → Import objects). The collection holds:

- one ``annotation`` named ``Tissue`` (classification ``Tissue``) whose geometry is a
  MultiPolygon traced from the stored tissue mask: one polygon per connected tissue region,
  with its holes as inner rings (mask pixel edges scaled by ``mask_downsample``);
- one ``detection`` per tile: the square ``[x, x + extent0] × [y, y + extent0]`` at the
  tile's stored coords, ``name`` ``tile <i>``, ``tile_index`` i, and ``measurements``
  ``tissue_fraction`` plus every per-tile score in the store (``scores/<name>``: MIL
  attention or per-class scores, see :func:`~wsi_convnext.outputs.exports.score_columns`).

Rings follow RFC 7946: closed, exteriors counterclockwise and holes clockwise in (x, y).
The collection carries a foreign member ``wsi_convnext`` with the slide id and tile geometry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import ExportFormat, SlideExport, register_format, score_columns

if TYPE_CHECKING:
    import numpy as np

__all__ = ["mask_polygons", "slide_feature_collection", "write_geojson"]

_TISSUE_COLOUR = [0, 160, 0]  # QuPath's packed RGB as a list


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float((x[:-1] * y[1:] - x[1:] * y[:-1]).sum())


def _ring(contour_rc: np.ndarray, downsample: float, *, exterior: bool) -> list[list[float]] | None:
    """A closed, oriented ring in level-0 (x, y) from a padded-mask (row, col) contour."""
    import numpy as np
    from skimage.measure import approximate_polygon

    pts = approximate_polygon(contour_rc, tolerance=0.25)  # keeps the 0.5-px corner cuts
    if len(pts) < 4:  # fewer than 3 distinct corners
        return None
    # Padded mask index (r, c) is mask pixel (r-1, c-1); the 0.5 iso-line between pixel
    # centres c and c+1 is the pixel edge c+1 of the unpadded mask, i.e. level-0 (c+0.5)·ds.
    ring = np.stack([(pts[:, 1] - 0.5) * downsample, (pts[:, 0] - 0.5) * downsample], axis=1)
    ring[-1] = ring[0]
    area = _signed_area(ring)
    if area == 0:
        return None
    if (area > 0) != exterior:
        ring = ring[::-1]
    return np.round(ring, 2).tolist()


def mask_polygons(mask: np.ndarray, downsample: float) -> list[list[list[list[float]]]]:
    """Trace a boolean mask into GeoJSON polygons (MultiPolygon coordinates) in level-0 px.

    Args:
        mask: (h, w) bool, True = tissue.
        downsample: Level-0 pixels per mask pixel.

    Returns:
        One polygon per 8-connected region: ``[exterior, hole, ...]``, each ring a closed
        list of ``[x, y]``; exteriors counterclockwise, holes clockwise (in x, y).
    """
    import numpy as np
    from scipy import ndimage
    from skimage.measure import find_contours

    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    polygons: list[list[list[list[float]]]] = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        region = labels[sl] == i
        filled = ndimage.binary_fill_holes(region)
        off = np.array([sl[0].start, sl[1].start], dtype=float)
        padded = np.pad(filled, 1).astype(np.float32)
        outer = max(find_contours(padded, 0.5, fully_connected="high"), key=len)  # 8-connected tissue
        exterior = _ring(outer + off, downsample, exterior=True)
        if exterior is None:
            continue
        rings = [exterior]
        holes, n_holes = ndimage.label(filled & ~region)  # 4-connected background inside
        for j in range(1, n_holes + 1):
            hole = np.pad(holes == j, 1).astype(np.float32)
            inner = _ring(max(find_contours(hole, 0.5), key=len) + off, downsample, exterior=False)
            if inner is not None:
                rings.append(inner)
        polygons.append(rings)
    return polygons


def _num(v: float) -> float | None:
    import math

    return float(v) if math.isfinite(v) else None


def slide_feature_collection(item: SlideExport) -> dict[str, Any]:
    """The GeoJSON FeatureCollection (a dict) of one slide: tissue annotation + tile detections."""
    import numpy as np

    features: list[dict[str, Any]] = []
    if item.tissue_mask is not None and item.tissue_mask.any():
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": mask_polygons(item.tissue_mask, item.mask_downsample)},
            "properties": {"objectType": "annotation", "name": "Tissue",
                           "classification": {"name": "Tissue", "color": _TISSUE_COLOUR}},
        })  # fmt: skip
    side = float(item.coords_attrs["extent0"])
    tissue = item.tissue_fraction if item.tissue_fraction is not None else np.full(len(item.coords), np.nan)
    columns = {"tissue_fraction": np.asarray(tissue, dtype=np.float64), **score_columns(item)}
    names = list(columns)
    values = np.stack([columns[k].astype(np.float64) for k in names], axis=1) if names else None
    for i, (x, y) in enumerate(item.coords.tolist()):
        x1, y1 = round(x + side, 2), round(y + side, 2)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {"objectType": "detection", "name": f"tile {i}", "tile_index": i,
                           "measurements": {k: _num(v) for k, v in zip(names, values[i].tolist())}},
        })  # fmt: skip
    return {
        "type": "FeatureCollection",
        "features": features,
        "wsi_convnext": {"slide_id": item.slide_id, "coords_frame": "level-0 pixels", **{
            k: item.coords_attrs[k] for k in ("extent0", "target_mpp", "level0_mpp", "patch_size") if k in item.coords_attrs
        }},
    }  # fmt: skip


def write_geojson(path: Path, item: SlideExport) -> None:
    """Write one slide's FeatureCollection (compact JSON, UTF-8)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(slide_feature_collection(item), fh, separators=(",", ":"), allow_nan=False)


register_format(
    ExportFormat(
        "geojson", ".geojson", write_geojson,
        "QuPath GeoJSON: tissue polygons + one detection per tile with scores (level-0 px)",
        needs_features=False, reads=("tissue_fraction", "tissue_mask", "scores"),
    )
)  # fmt: skip
