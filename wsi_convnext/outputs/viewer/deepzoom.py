"""Deep Zoom (DZI) tiles of a slide for OpenSeadragon, read through the project's slide readers.

A Deep Zoom pyramid of a ``width × height`` image has ``ceil(log2(max(width, height))) + 1``
levels; level ``L`` is the image downsampled by ``2 ** (max_level - L)`` (sides rounded up), so
the last level is level 0 of the slide and level 0 of the pyramid is 1×1 px. Each level is cut
into ``tile_size`` px tiles; a tile also carries ``overlap`` px of its neighbours on every side
that has one. This is the layout of Microsoft's DZI format as OpenSeadragon's ``DziTileSource``
and OpenSlide's ``DeepZoomGenerator`` compute it.

Pixels come from a :class:`RegionSource`: :class:`SlideSource` reads the slide (the coarsest
pyramid level at least as fine as the tile, then an antialiased resize), :class:`ThumbnailSource`
crops the store's thumbnail when the slide file is gone. :class:`DeepZoom` encodes tiles as
JPEG and keeps the most recent ones in a byte-bounded LRU cache.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from ...slide import BaseSlideReader

__all__ = ["DeepZoom", "DeepZoomGrid", "RegionSource", "SlideSource", "ThumbnailSource", "TileCache"]

#: Default Deep Zoom tile side and overlap, px (OpenSlide's defaults: 254 + 2 × 1 = 256).
TILE_SIZE = 254
OVERLAP = 1


@dataclass(frozen=True)
class DeepZoomGrid:
    """Tile geometry of a Deep Zoom pyramid over a ``width × height`` level-0 image.

    Attributes:
        width, height: Level-0 size in pixels.
        tile_size: Tile side in pixels of its level, without overlap.
        overlap: Pixels each tile shares with each neighbour.
    """

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        if self.tile_size < 1 or self.overlap < 0:
            raise ValueError(f"bad tile size {self.tile_size} / overlap {self.overlap}")

    @property
    def level_count(self) -> int:
        """Number of levels (level ``level_count - 1`` is the full-resolution image)."""
        return math.ceil(math.log2(max(self.width, self.height))) + 1

    def downsample(self, level: int) -> int:
        """Level-0 pixels per pixel of ``level``."""
        self._check_level(level)
        return 2 ** (self.level_count - 1 - level)

    def level_dimensions(self, level: int) -> tuple[int, int]:
        """``(width, height)`` in pixels of ``level``."""
        ds = self.downsample(level)
        return -(-self.width // ds), -(-self.height // ds)

    def level_tiles(self, level: int) -> tuple[int, int]:
        """``(columns, rows)`` of tiles at ``level``."""
        w, h = self.level_dimensions(level)
        return -(-w // self.tile_size), -(-h // self.tile_size)

    def tile_bounds(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a tile in pixels of ``level``, overlap included.

        Raises:
            IndexError: The level or tile does not exist.
        """
        cols, rows = self.level_tiles(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise IndexError(f"no tile ({col}, {row}) at level {level} ({cols}x{rows} tiles)")
        w, h = self.level_dimensions(level)
        ts, ov = self.tile_size, self.overlap
        left = col * ts - (ov if col > 0 else 0)
        top = row * ts - (ov if row > 0 else 0)
        return left, top, min(w, (col + 1) * ts + ov), min(h, (row + 1) * ts + ov)

    def level0_box(self, level: int, col: int, row: int) -> tuple[float, float, float, float]:
        """The tile's ``(left, top, right, bottom)`` in level-0 pixels (clipped to the image)."""
        ds = self.downsample(level)
        left, top, right, bottom = self.tile_bounds(level, col, row)
        return left * ds, top * ds, min(self.width, right * ds), min(self.height, bottom * ds)

    def dzi_xml(self, fmt: str = "jpeg") -> str:
        """The ``.dzi`` descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>'
        )

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise IndexError(f"no level {level} (levels 0..{self.level_count - 1})")


class RegionSource(Protocol):
    """Where Deep Zoom pixels come from."""

    dimensions: tuple[int, int]

    def region(self, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
        """The level-0 ``box`` (left, top, right, bottom; floats) as ``size`` = (w, h) uint8 RGB."""
        ...


def _resize(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Resample ``box`` (pixels of ``image``) to ``size`` with Pillow's antialiased bilinear filter."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=None))


class SlideSource:
    """Pixels read from a slide (any registered backend), from the best pyramid level.

    A coarse Deep Zoom tile of a slide without a coarse enough pyramid level (a flat TIFF)
    would need a read of more than ``max_read_pixels``; such tiles come from an overview of
    the slide instead (:meth:`BaseSlideReader.thumbnail`, read block by block once, long side
    ``overview_size`` px), so memory stays bounded on any slide.
    """

    def __init__(self, reader: BaseSlideReader, *, max_read_pixels: int = 4096 * 4096, overview_size: int = 4096) -> None:
        self.reader = reader
        self.dimensions = reader.dimensions
        self.max_read_pixels = int(max_read_pixels)
        self.overview_size = int(overview_size)
        self._overview: ThumbnailSource | None = None
        self._lock = threading.Lock()

    def overview(self) -> ThumbnailSource:
        """The whole slide at ``overview_size`` px (read once)."""
        with self._lock:
            if self._overview is None:
                thumb = self.reader.thumbnail(self.overview_size)
                ds = max(self.dimensions[0] / thumb.shape[1], self.dimensions[1] / thumb.shape[0])
                self._overview = ThumbnailSource(thumb, ds, self.dimensions)
            return self._overview

    def region(self, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
        """Read ``box`` from the coarsest level at least as fine as the output, then resize."""
        left, top, right, bottom = box
        scale = max((right - left) / size[0], (bottom - top) / size[1])
        level = self.reader.get_best_level_for_downsample(scale)
        ds = self.reader.level_downsamples[level]
        x0, y0 = math.floor(left), math.floor(top)
        w = max(1, math.ceil((right - x0) / ds))
        h = max(1, math.ceil((bottom - y0) / ds))
        if w * h > self.max_read_pixels:
            return self.overview().region(box, size)
        image = self.reader.read_region((x0, y0), level, (w, h))
        local = ((left - x0) / ds, (top - y0) / ds, (right - x0) / ds, (bottom - y0) / ds)
        if (w, h) == tuple(size) and local == (0.0, 0.0, float(w), float(h)):
            return image
        return _resize(image, local, size)


class ThumbnailSource:
    """Pixels cropped from a store's thumbnail (the slide file is missing).

    Args:
        thumbnail: (h, w, 3) uint8 overview.
        downsample: Level-0 pixels per thumbnail pixel.
        dimensions: Level-0 (width, height) of the slide.
    """

    def __init__(self, thumbnail: np.ndarray, downsample: float, dimensions: tuple[int, int]) -> None:
        self.thumbnail = np.ascontiguousarray(thumbnail[..., :3], dtype=np.uint8)
        self.downsample = float(downsample)
        self.dimensions = (int(dimensions[0]), int(dimensions[1]))

    def region(self, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
        """Resample ``box`` of the thumbnail (blurry when zoomed in further than it holds)."""
        th, tw = self.thumbnail.shape[:2]
        ds = self.downsample
        local = tuple(min(max(v / ds, 0.0), lim) for v, lim in zip(box, (tw, th, tw, th)))
        if local[2] <= local[0] or local[3] <= local[1]:
            return np.full((size[1], size[0], 3), 255, np.uint8)
        return _resize(self.thumbnail, local, size)  # type: ignore[arg-type]


class TileCache:
    """A thread-safe LRU cache of encoded tiles, bounded by total bytes."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[object, ...]) -> bytes | None:
        """The cached value, or None (counts a hit or a miss)."""
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[object, ...], data: bytes) -> None:
        """Store ``data``, dropping the least recently used entries beyond ``max_bytes``."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class DeepZoom:
    """JPEG Deep Zoom tiles of one region source, cached.

    Args:
        source: Where pixels come from.
        cache: Shared tile cache (keys include ``name``).
        name: Cache namespace (the slide id).
        quality: JPEG quality of the tiles.
    """

    def __init__(self, source: RegionSource, cache: TileCache, name: str, *, quality: int = 90) -> None:
        self.source = source
        self.grid = DeepZoomGrid(*source.dimensions)
        self.cache = cache
        self.name = name
        self.quality = quality

    def tile(self, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of one Deep Zoom tile.

        Raises:
            IndexError: No such level or tile.
            SlideReadError: The slide cannot be read there.
        """
        from ...store import encode_tile

        key = (self.name, level, col, row)
        data = self.cache.get(key)
        if data is None:
            left, top, right, bottom = self.grid.tile_bounds(level, col, row)
            pixels = self.source.region(self.grid.level0_box(level, col, row), (right - left, bottom - top))
            data = encode_tile(pixels, "jpeg", self.quality)
            self.cache.put(key, data)
        return data
