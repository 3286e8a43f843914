"""Build real tile stores for tests from CMU-1-Small-Region.svs (read with OpenSlide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_convnext.store import TILES_PER_CHUNK, TileStoreWriter, encode_tile

CMU_MPP = 0.499


def read_cmu_tiles(cmu_slide: Path, n: int = 40, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real H&E tiles of ``size`` px from level 0, row by row over the tissue band.

    Returns:
        tiles (n, size, size, 3) uint8 and their level-0 (x, y) top-left corners (n, 2) int64.
    """
    import openslide

    cols = 2220 // size
    rows = -(-n // cols)
    x0, y0 = 0, 560
    with openslide.OpenSlide(str(cmu_slide)) as slide:
        region = np.asarray(slide.read_region((x0, y0), 0, (cols * size, rows * size)).convert("RGB"))
    tiles, coords = [], []
    for i in range(n):
        r, c = divmod(i, cols)
        tiles.append(region[r * size : (r + 1) * size, c * size : (c + 1) * size])
        coords.append((x0 + c * size, y0 + r * size))
    return np.stack(tiles), np.asarray(coords, dtype=np.int64)


def write_store(
    path: Path,
    tiles: np.ndarray,
    coords: np.ndarray,
    *,
    slide_mpp: float = CMU_MPP,
    target_mpp: float = CMU_MPP,
    encoding: str = "jpeg",
    encoded: list[bytes] | None = None,
    overwrite: bool = False,
    attrs: dict | None = None,
) -> Path:
    """Write a complete store at ``path`` (``<slide_id>.zarr``) holding ``tiles``."""
    n, t = len(tiles), tiles.shape[1]
    data = encoded if encoded is not None else [encode_tile(x, encoding, quality=95) for x in tiles]
    w = TileStoreWriter(path, n, t, encoding)
    for start in range(0, n, TILES_PER_CHUNK):
        w.write_tiles(data[start : start + TILES_PER_CHUNK])
    return w.commit(
        coords=coords,
        tissue_fraction=np.ones(n),
        thumbnail=np.zeros((8, 8, 3), np.uint8),
        tissue_mask=np.ones((8, 8), bool),
        attrs={
            "slide_id": path.name.removesuffix(".zarr"),
            "slide_mpp": slide_mpp,
            "target_mpp": target_mpp,
            "extent0": t * target_mpp / slide_mpp,
            "overlap": 0,
            **(attrs or {}),
        },
        overwrite=overwrite,
    )


def edit_store_attrs(store: Path, **attrs: object) -> None:
    """Set group attrs of a finished store and re-seal its metadata digest, as a writer of those values would."""
    import json

    from wsi_convnext.store import META_DIGEST, _meta_digest

    meta_file = Path(store) / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"].update(attrs)
    meta["attributes"][META_DIGEST] = _meta_digest(meta)
    meta_file.write_text(json.dumps(meta))
