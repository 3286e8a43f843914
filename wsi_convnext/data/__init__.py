"""Tile datasets: streaming and map-style access to the tiles of zarr stores (:mod:`.stores`).

``data/labelled.py`` (image folders, CSVs, weak labels over stores) joins this package in
another branch; this module re-exports both.
"""

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
    "DECODE_THREAD_PREFIX",
    "PREFETCH_BYTES",
    "StoreTileDataset",
    "StoreTileStream",
    "TileBatch",
    "TileSpan",
    "decode_on_device",
    "plan_decode_threads",
]
