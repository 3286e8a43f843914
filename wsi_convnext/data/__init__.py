"""Tile datasets, shared by embedding and encoder training.

- :mod:`.stores`: streaming and map-style access to the tiles of zarr stores (embedding).
- :mod:`.labelled`: labelled tiles for training: image folders, CSVs, and weak slide labels
  over stores; grouped stratified splits and balanced samplers.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

# Names import their submodule on first use: `stores` imports torch, `labelled` does not.
_EXPORTS = {
    "BALANCE_MODES": "labelled",
    "IMAGE_SUFFIXES": "labelled",
    "SIZE_POLICIES": "labelled",
    "CorruptTileError": "labelled",
    "EpochSampler": "labelled",
    "LabelledBatch": "labelled",
    "LabelledTileDataset": "labelled",
    "LabelledTiles": "labelled",
    "collate_tiles": "labelled",
    "csv_tiles": "labelled",
    "grouped_split": "labelled",
    "image_folder_tiles": "labelled",
    "load_labelled_tiles": "labelled",
    "store_tiles": "labelled",
    "DECODE_THREAD_PREFIX": "stores",
    "PREFETCH_BYTES": "stores",
    "StoreTileDataset": "stores",
    "StoreTileStream": "stores",
    "TileBatch": "stores",
    "TileSpan": "stores",
    "decode_on_device": "stores",
    "plan_decode_threads": "stores",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
