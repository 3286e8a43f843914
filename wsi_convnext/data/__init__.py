"""Tile datasets, shared by embedding and encoder training.

- :mod:`.stores`: streaming and map-style access to the tiles of zarr stores (embedding).
- :mod:`.labelled`: labelled tiles for training: image folders, CSVs, and weak slide labels
  over stores; grouped stratified splits and balanced samplers.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# Names import their submodule on first use: `stores` imports torch, `labelled` does not.
__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "labelled": (
            "BALANCE_MODES", "IMAGE_SUFFIXES", "SIZE_POLICIES", "CorruptTileError", "EpochSampler", "LabelledBatch",
            "LabelledTileDataset", "LabelledTiles", "collate_tiles", "csv_tiles", "grouped_split",
            "image_folder_tiles", "load_labelled_tiles", "store_tiles",
        ),
        "stores": (
            "DECODE_THREAD_PREFIX", "PREFETCH_BYTES", "StoreTileDataset", "StoreTileStream", "TileBatch",
            "TileSpan", "decode_on_device", "plan_decode_threads",
        ),
    },
)
