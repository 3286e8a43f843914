"""Tile datasets: labelled tiles for training (:mod:`.labelled`)."""

from __future__ import annotations

from .labelled import (
    BALANCE_MODES,
    IMAGE_SUFFIXES,
    SIZE_POLICIES,
    CorruptTileError,
    EpochSampler,
    LabelledTileDataset,
    LabelledTiles,
    TileBatch,
    collate_tiles,
    csv_tiles,
    grouped_split,
    image_folder_tiles,
    load_labelled_tiles,
    store_tiles,
)

__all__ = [
    "BALANCE_MODES",
    "IMAGE_SUFFIXES",
    "SIZE_POLICIES",
    "CorruptTileError",
    "EpochSampler",
    "LabelledTileDataset",
    "LabelledTiles",
    "TileBatch",
    "collate_tiles",
    "csv_tiles",
    "grouped_split",
    "image_folder_tiles",
    "load_labelled_tiles",
    "store_tiles",
]
