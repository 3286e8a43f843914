"""Tiling geometry: pure numpy, no I/O.

Coordinate frame: every coordinate here is a level-0 pixel position (x, y) of the
slide, x to the right and y down. A tile of ``tile_size`` output pixels at
``target_mpp`` µm/px covers a square of ``extent0 = tile_size * target_mpp /
slide_mpp`` level-0 pixels, which is generally not an integer. The grid origin of
tile *i* is rounded to an integer level-0 pixel (stored as ``coords``); the tile
covers ``[x, x + extent0) × [y, y + extent0)`` in level-0 pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._io import physical_memory
from ..errors import MppError

# Slack for float noise in level downsamples (e.g. 4.000152 reported for a 4× level).
_DOWNSAMPLE_RTOL = 1e-3
#: Bytes held per planned tile while the grid is built and filtered (coords and their transients, tissue fraction).
PLAN_BYTES_PER_TILE = 64


@dataclass(frozen=True)
class TileGrid:
    """The tiles to cut from one slide.

    Attributes:
        coords: (N, 2) int64 level-0 (x, y) of each tile's top-left corner.
        tile_size: Output tile side in pixels (at ``target_mpp``).
        target_mpp: Output resolution, µm/px.
        slide_mpp: Level-0 resolution of the slide, µm/px.
        extent0: Tile side in level-0 pixels (float).
        stride0: Grid step in level-0 pixels (float); ``extent0`` minus the overlap.
        read_level: Pyramid level the pixels are read from.
        read_downsample: Downsample of ``read_level`` relative to level 0.
    """

    coords: np.ndarray
    tile_size: int
    target_mpp: float
    slide_mpp: float
    extent0: float
    stride0: float
    read_level: int
    read_downsample: float

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def scale(self) -> float:
        """Output pixels per read-level pixel (≤ 1 means downsampling)."""
        return self.tile_size / (self.extent0 / self.read_downsample)

    def select(self, keep: np.ndarray) -> TileGrid:
        """A grid holding only the tiles where the boolean/index array ``keep`` selects."""
        return TileGrid(
            coords=self.coords[keep],
            tile_size=self.tile_size,
            target_mpp=self.target_mpp,
            slide_mpp=self.slide_mpp,
            extent0=self.extent0,
            stride0=self.stride0,
            read_level=self.read_level,
            read_downsample=self.read_downsample,
        )


def select_level(
    level_downsamples: tuple[float, ...] | list[float],
    *,
    slide_mpp: float,
    target_mpp: float,
    allow_upsample: bool = False,
) -> int:
    """Pick the coarsest pyramid level that is still at least as fine as the target.

    Args:
        level_downsamples: Downsample of each level relative to level 0.
        slide_mpp: Level-0 resolution, µm/px (checked where it entered, > 0).
        target_mpp: Wanted output resolution, µm/px (checked where it entered, > 0).
        allow_upsample: Accept a target finer than level 0 (the tiles are then upsampled).

    Returns:
        The level index to read from.

    Raises:
        MppError: The target is finer than the scan and ``allow_upsample`` is false.
    """
    wanted = target_mpp / slide_mpp  # downsample from level 0 that gives the target
    if wanted < 1.0 - _DOWNSAMPLE_RTOL and not allow_upsample:
        raise MppError(
            f"target {target_mpp:g} µm/px is finer than the scan ({slide_mpp:g} µm/px) "
            "and upsampling is not allowed (allow_upsample=False)"
        )
    best = 0
    for level, ds in enumerate(level_downsamples):
        if ds <= wanted * (1.0 + _DOWNSAMPLE_RTOL) and ds >= level_downsamples[best]:
            best = level
    return best


def plan_grid(
    dimensions: tuple[int, int],
    level_downsamples: tuple[float, ...] | list[float],
    *,
    slide_mpp: float,
    target_mpp: float,
    tile_size: int,
    overlap: int = 0,
    allow_upsample: bool = False,
) -> TileGrid:
    """Lay a regular grid of whole tiles over the slide.

    Only tiles that lie entirely inside level 0 are planned (no padded border tiles).

    Args:
        dimensions: Level-0 (width, height) in pixels.
        level_downsamples: Downsample of each level.
        slide_mpp: Level-0 resolution, µm/px.
        target_mpp: Output resolution, µm/px.
        tile_size: Output tile side, pixels.
        overlap: Overlap between neighbouring tiles, in output pixels.
        allow_upsample: See :func:`select_level`.

    Raises:
        MppError: The target is finer than the scan without ``allow_upsample``, a tile would
            cover less than one level-0 pixel, or the grid would not fit in half the memory.
    """
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap}")
    level = select_level(level_downsamples, slide_mpp=slide_mpp, target_mpp=target_mpp, allow_upsample=allow_upsample)
    factor = target_mpp / slide_mpp
    extent0 = tile_size * factor
    stride0 = (tile_size - overlap) * factor
    if extent0 < 1.0:
        raise MppError(
            f"target {target_mpp:g} µm/px upsamples the scan ({slide_mpp:g} µm/px) {1 / factor:.3g}×: a {tile_size}-px "
            f"tile would cover {extent0:.3g} scanned pixels, less than one; choose a coarser target mpp"
        )
    width, height = dimensions
    nx = _count(width, extent0, stride0)
    ny = _count(height, extent0, stride0)
    need, have = nx * ny * PLAN_BYTES_PER_TILE, physical_memory()
    if need > have // 2:  # checked before allocating anything
        raise MppError(
            f"target {target_mpp:g} µm/px with {tile_size}-px tiles plans {nx * ny:,} tiles, about "
            f"{need / 2**30:.1f} GiB to hold, more than half of this machine's {have / 2**30:.1f} GiB; "
            "choose a coarser target mpp or a larger tile size"
        )
    xs = np.round(np.arange(nx) * stride0).astype(np.int64)
    ys = np.round(np.arange(ny) * stride0).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: tiles ordered by row (y), then x
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    return TileGrid(
        coords=coords,
        tile_size=int(tile_size),
        target_mpp=float(target_mpp),
        slide_mpp=float(slide_mpp),
        extent0=float(extent0),
        stride0=float(stride0),
        read_level=level,
        read_downsample=float(level_downsamples[level]),
    )


def _count(length: int, extent: float, stride: float) -> int:
    if length < extent:
        return 0
    # Tiny epsilon so an exactly fitting last tile is not lost to float rounding.
    return int(math.floor((length - extent) / stride + 1e-9)) + 1


@dataclass(frozen=True)
class Region:
    """A rectangle read in one call, and the tiles cut from it.

    Attributes:
        x0, y0: Level-0 top-left of the read.
        width, height: Size of the read in ``read_level`` pixels.
        tiles: Indices into the grid of the tiles this region covers completely.
    """

    x0: int
    y0: int
    width: int
    height: int
    tiles: np.ndarray


def tile_box(grid: TileGrid, index: int, region: Region) -> tuple[float, float, float, float]:
    """Float box (left, top, right, bottom) of tile ``index`` in the read-level pixels of ``region``."""
    ds = grid.read_downsample
    x, y = grid.coords[index]
    left = (x - region.x0) / ds
    top = (y - region.y0) / ds
    side = grid.extent0 / ds
    return (left, top, left + side, top + side)


def read_window(grid: TileGrid, indices: np.ndarray, level_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The read-level pixel window that covers the given tiles, clipped to the level.

    Returns:
        (x0, y0, width, height) with (x0, y0) in level-0 pixels and the size in read-level pixels.
    """
    ds = grid.read_downsample
    c = grid.coords[indices]
    # A margin wider than the resampling kernel's support (which grows with the downscale
    # factor), so every tile is resampled exactly as from a read of its own surroundings.
    m = int(math.ceil(max(1.0, 1.0 / grid.scale))) + 2
    left = max(0, int(math.floor(c[:, 0].min() / ds)) - m)
    top = max(0, int(math.floor(c[:, 1].min() / ds)) - m)
    right = min(level_size[0], int(math.ceil((c[:, 0].max() + grid.extent0) / ds)) + m)
    bottom = min(level_size[1], int(math.ceil((c[:, 1].max() + grid.extent0) / ds)) + m)
    return (int(round(left * ds)), int(round(top * ds)), right - left, bottom - top)


def group_regions(
    grid: TileGrid,
    level_size: tuple[int, int],
    *,
    region_size: int = 2048,
    source_tile: tuple[int, int] | None = None,
) -> list[Region]:
    """Group tiles into large reads aligned to the source's own tiles.

    Each tile is assigned to the block (of about ``region_size`` read-level pixels,
    rounded up to a multiple of the source tile size) that holds its top-left corner;
    the block's read window is then grown to cover its tiles completely. Reading a few
    large aligned regions decodes every source tile about once, instead of several
    times as per-tile ``read_region`` calls do.

    Args:
        grid: The tiles to read (already filtered to tissue).
        level_size: (width, height) of ``grid.read_level``.
        region_size: Target block side in read-level pixels.
        source_tile: Native tile (width, height) of the read level, if known.

    Returns:
        Regions in row-major block order; every tile index appears in exactly one region.
    """
    if len(grid) == 0:
        return []
    ds = grid.read_downsample
    bw = bh = max(1, int(region_size))
    if source_tile:
        tw, th = source_tile
        bw = max(tw, (bw + tw - 1) // tw * tw)
        bh = max(th, (bh + th - 1) // th * th)
    level_x = grid.coords[:, 0] / ds
    level_y = grid.coords[:, 1] / ds
    bx = (level_x // bw).astype(np.int64)
    by = (level_y // bh).astype(np.int64)
    order = np.lexsort((bx, by))
    key = by[order] * (int(bx.max()) + 1) + bx[order]
    splits = np.flatnonzero(np.diff(key)) + 1
    regions = []
    for idx in np.split(order, splits):
        idx = np.sort(idx)
        x0, y0, w, h = read_window(grid, idx, level_size)
        regions.append(Region(x0=x0, y0=y0, width=w, height=h, tiles=idx))
    return regions
