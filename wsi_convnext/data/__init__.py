"""Tile datasets, shared by embedding and encoder training.

- :mod:`.stores`: streaming and map-style access to the tiles of zarr stores (embedding).
- :mod:`.labelled`: labelled tiles for training: image folders, CSVs, and weak slide labels
  over stores; grouped stratified splits and balanced samplers.
"""

from __future__ import annotations

from .labelled import (
    BALANCE_MODES,
    IMAGE_SUFFIXES,
    SIZE_POLICIES,
    CorruptTileError,
    EpochSampler,
    LabelledBatch,
    LabelledTileDataset,
    LabelledTiles,
    collate_tiles,
    csv_tiles,
    grouped_split,
    image_folder_tiles,
    load_labelled_tiles,
    store_tiles,
)
from .stores import (
    DECODE_THREAD_PREFIX,
    PREFETCH_BYTES,
    StoreTileDataset,
    StoreTileStream,
    TileBatch,
    TileSpan,
    decode_on_device,
    plan_decode_threads,
)

__all__ = [
    "BALANCE_MODES",
    "DECODE_THREAD_PREFIX",
    "IMAGE_SUFFIXES",
    "PREFETCH_BYTES",
    "SIZE_POLICIES",
    "CorruptTileError",
    "EpochSampler",
    "LabelledBatch",
    "LabelledTileDataset",
    "LabelledTiles",
    "StoreTileDataset",
    "StoreTileStream",
    "TileBatch",
    "TileSpan",
    "collate_tiles",
    "csv_tiles",
    "decode_on_device",
    "grouped_split",
    "image_folder_tiles",
    "load_labelled_tiles",
    "plan_decode_threads",
    "store_tiles",
]
