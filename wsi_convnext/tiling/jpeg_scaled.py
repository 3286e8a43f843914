"""Reading JPEG-tiled TIFF levels at 1/2, 1/4 or 1/8 scale in the DCT domain.

Tiling a 0.25-µm/px scan at 0.5 µm/px decodes four source pixels per output pixel and then
averages them; decoding dominates the cost. libjpeg(-turbo) can instead run a reduced
inverse DCT that yields the tile at 1/2, 1/4 or 1/8 of its size directly, several times
cheaper (the entropy decoding stays, so about 1.5× per source tile here), and the result
is itself an area-like low-pass of the full-size tile (measured ≥ 49 dB PSNR against the
exact 2×2, 4×4 and 8×8 area averages on CMU-1). simplejpeg (a pip wheel bundling
libjpeg-turbo) exposes it through ``min_width``/``min_height``; Pillow's ``draft()`` does
too but parses each tile's header in Python and measured slower per tile.

:func:`read_region_scaled` is the tiler's fast path: for a region read whose tiles shrink
by a factor ``k >= 2``, it reads the raw tile bytes and the shared ``JPEGTables`` of the
level through tifffile, decodes each source tile at the scale ``s`` that :func:`pick_scale`
chooses (the largest of 8, 4, 2 that keeps the tiles within 40 dB of the exact area
average) and returns the region at 1/s with the tile boxes mapped into it; the caller
finishes the remaining factor ``k / s`` with its exact resampler. Whatever it cannot
do exactly as the slide reader would (not a JPEG level, unusual photometric, missing
tiles, a decoding error) returns ``None``, and the caller reads the region the normal way.

Coordinate frames: ``location`` is in level-0 pixels; windows and boxes are in pixels of
the read level; a decoded pixel ``(i, j)`` at scale ``s`` covers level pixels
``[s·i, s·i + s) × [s·j, s·j + s)`` of the level's own tile grid.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DCT_SCALES", "JpegLevel", "jpeg_level", "pick_scale", "read_region_scaled", "read_window_scaled"]

#: Scales libjpeg decodes to in the DCT domain, largest first.
DCT_SCALES = (8, 4, 2)

_TIFF_JPEG = 7  # TIFF Compression: JPEG ("new-style", technote 2)
# TIFF Photometric -> libjpeg colour space of the stored components.
_JPEG_COLOURSPACE = {2: "RGB", 6: "YCbCr"}


@dataclass(frozen=True)
class JpegLevel:
    """Where the JPEG tiles of one pyramid level lie in the file.

    Attributes:
        path: The TIFF file.
        width, height: Level size in pixels.
        tile_width, tile_height: Tile size in pixels (multiples of 16).
        offsets, counts: File offset and byte count of each tile, row-major.
        tables: The level's ``JPEGTables`` (a JPEG stream of DQT/DHT only), or None.
        colourspace: Colour space of the stored components, ``"RGB"`` or ``"YCbCr"``
            (from the TIFF photometric tag, which wins over libjpeg's guess).
    """

    path: Path
    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes | None
    colourspace: str

    @property
    def tiles_across(self) -> int:
        """Number of tile columns."""
        return -(-self.width // self.tile_width)

    def tile_bytes(self, fd: int, col: int, row: int) -> bytes:
        """The complete JPEG stream of tile ``(col, row)`` (tables spliced in), read from ``fd``."""
        i = row * self.tiles_across + col
        data = os.pread(fd, self.counts[i], self.offsets[i])
        if self.tables and len(self.tables) > 4 and data[:2] == b"\xff\xd8":
            # Abbreviated stream: SOI + tables (without their EOI) + the tile after its SOI.
            return self.tables[:-2] + data[2:]
        return data


def _level_of(page: Any, path: Path) -> JpegLevel | None:
    """The :class:`JpegLevel` of a tifffile page, or None if it is not a plain tiled RGB JPEG level."""
    try:
        if (
            int(page.compression) != _TIFF_JPEG
            or not page.is_tiled
            or int(page.samplesperpixel) != 3
            or int(page.planarconfig) != 1
            or int(page.bitspersample) != 8
            or int(page.photometric) not in _JPEG_COLOURSPACE
            or getattr(page, "imagedepth", 1) != 1
        ):
            return None
        offsets = tuple(int(v) for v in page.dataoffsets)
        counts = tuple(int(v) for v in page.databytecounts)
        tw, th = int(page.tilewidth), int(page.tilelength)
        if len(offsets) != -(-int(page.imagewidth) // tw) * -(-int(page.imagelength) // th):
            return None
        tables = page.jpegtables
        return JpegLevel(
            path=path, width=int(page.imagewidth), height=int(page.imagelength), tile_width=tw, tile_height=th,
            offsets=offsets, counts=counts, tables=bytes(tables) if tables else None,
            colourspace=_JPEG_COLOURSPACE[int(page.photometric)],
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - an unusual page is simply not eligible
        return None


@functools.lru_cache(maxsize=32)
def _levels(path: str, mtime_ns: int, size: int) -> dict[tuple[int, int], JpegLevel]:
    import tifffile

    found: dict[tuple[int, int], JpegLevel] = {}
    with tifffile.TiffFile(path) as tf:
        if not tf.series:
            return found
        for level in tf.series[0].levels:
            page = level.keyframe if hasattr(level, "keyframe") else level.pages[0]
            jl = _level_of(page, Path(path))
            if jl is not None:
                found.setdefault((jl.width, jl.height), jl)
    return found


def jpeg_level(path: str | os.PathLike[str], dimensions: tuple[int, int]) -> JpegLevel | None:
    """The JPEG-tiled level of ``path`` whose size is ``dimensions`` (width, height), or None.

    Cached per file (keyed by its modification time and size), so repeated region reads
    parse the TIFF once per process.
    """
    try:
        st = os.stat(path)
        levels = _levels(os.fspath(path), st.st_mtime_ns, st.st_size)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse: no fast path
        return None
    return levels.get((int(dimensions[0]), int(dimensions[1])))


def _whole(v: float) -> bool:
    return abs(v - round(v)) < 1e-6


def pick_scale(factor: float, boxes: Sequence[tuple[float, float, float, float]], tile: tuple[int, int]) -> int:
    """The DCT scale (8, 4, 2) to decode at, or 1 for a full-resolution read.

    Two cases keep the tiles within 40 dB of the exact area average (tests/test_jpeg_scaled.py):

    * whole: the remaining factor ``factor / s`` is a whole number and every box lies on
      whole decoded pixels; the resampler then averages whole decoded pixels, each the
      (DCT-domain) average of an s×s block, so a tile is the k×k area average up to
      libjpeg's reduced IDCT (≥ 49 dB on CMU-1);
    * wide: ``factor / s >= 2``, so the resampler's antialiasing kernel spans at least two
      decoded pixels and where the boxes fall on the s-pixel DCT grid hardly matters.

    A non-whole remainder below 2 (e.g. a 0.499-µm/px scan tiled at 1.0: factor 2.004) is
    read at full resolution: boxes would straddle decoded pixels by up to half a pixel,
    which blurs tiles to ~35 dB of the reference.

    Args:
        factor: Shrink from read-level pixels to output pixels (box side / tile size).
        boxes: Tile boxes in read-level pixels of the level's own frame (not of a region).
        tile: (width, height) of the level's JPEG tiles; the scale must divide both.
    """
    for s in DCT_SCALES:
        if factor < s * (1 - 1e-9) or tile[0] % s or tile[1] % s:
            continue
        rest = factor / s
        if rest >= 2 - 1e-9:
            return s
        if _whole(rest) and all(_whole(v / s) for box in boxes for v in box):
            return s
    return 1


def _adobe_marker(colourspace: str) -> bytes:
    """An Adobe APP14 segment whose transform flag tells libjpeg what the components are."""
    transform = 0 if colourspace == "RGB" else 1  # 0: RGB as stored, 1: YCbCr
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def _decode_scaled(data: bytes, level: JpegLevel, scale: int) -> np.ndarray:
    """Decode one tile at 1/``scale``: (tile_height/scale, tile_width/scale, 3) uint8 RGB.

    simplejpeg (libjpeg-turbo's TurboJPEG API) picks the DCT scale from the minimum size.
    The TIFF photometric tag, not libjpeg's guess, decides the colour space: Aperio stores
    RGB components without an Adobe marker, which libjpeg would take for YCbCr, so one is
    spliced in after SOI.
    """
    import simplejpeg

    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    want_w, want_h = level.tile_width // scale, level.tile_height // scale
    image = simplejpeg.decode_jpeg(
        data[:2] + _adobe_marker(level.colourspace) + data[2:], colorspace="RGB", min_width=want_w, min_height=want_h
    )
    if image.shape[:2] != (want_h, want_w):
        raise ValueError(f"libjpeg decoded {image.shape[1]}x{image.shape[0]}, not {want_w}x{want_h}")
    return image


def read_window_scaled(level: JpegLevel, window: tuple[int, int, int, int], scale: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode the level-pixel ``window`` ``(x, y, width, height)`` at 1/``scale``.

    Args:
        level: The JPEG level.
        window: Level pixels; must lie inside the level.
        scale: 2, 4 or 8 (the tile size must be a multiple of it).

    Returns:
        The image covering decoded pixels ``[x0, x1) × [y0, y1)`` with ``x0 = x // scale``,
        ``x1 = ceil((x + width) / scale)`` (likewise y), and its origin ``(x0, y0)`` in
        decoded pixels.

    Raises:
        ValueError: A tile is missing (zero bytes), or the scale does not divide the tile size.
        OSError: A tile does not decode.
    """
    x, y, w, h = window
    tw, th = level.tile_width, level.tile_height
    if tw % scale or th % scale:
        raise ValueError(f"tile {tw}x{th} is not a multiple of the DCT scale {scale}")
    if x < 0 or y < 0 or x + w > level.width or y + h > level.height:
        raise ValueError("window outside the level")
    x0, y0 = x // scale, y // scale
    x1, y1 = -(-(x + w) // scale), -(-(y + h) // scale)
    stw, sth = tw // scale, th // scale
    c0, c1 = x // tw, (x + w - 1) // tw
    r0, r1 = y // th, (y + h - 1) // th
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    fd = os.open(level.path, os.O_RDONLY)
    try:
        for row in range(r0, r1 + 1):
            for col in range(c0, c1 + 1):
                if level.counts[row * level.tiles_across + col] == 0:
                    raise ValueError(f"tile ({col}, {row}) is missing")
                tile = _decode_scaled(level.tile_bytes(fd, col, row), level, scale)
                # Overlap of this tile with the output, in decoded pixels.
                tx0, ty0 = col * stw, row * sth
                ox0, oy0 = max(x0, tx0), max(y0, ty0)
                ox1, oy1 = min(x1, tx0 + stw), min(y1, ty0 + sth)
                out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = tile[oy0 - ty0 : oy1 - ty0, ox0 - tx0 : ox1 - tx0]
    finally:
        os.close(fd)
    return out, (x0, y0)


def read_region_scaled(
    reader: Any,
    location: tuple[int, int],
    level: int,
    size: tuple[int, int],
    boxes: Sequence[tuple[float, float, float, float]],
    tile_size: int,
) -> tuple[Any, list[tuple[float, float, float, float]]] | None:
    """The tiler's region read, decoded at a DCT scale when that is possible.

    Args:
        reader: The slide reader (``path``, ``level_dimensions``, ``level_downsamples``).
        location: Level-0 top-left of the read (as for ``reader.read_region``).
        level: Pyramid level read.
        size: (width, height) of the read in level pixels.
        boxes: Float (left, top, right, bottom) of each output tile within the read, level pixels.
        tile_size: Output tile side in pixels.

    Returns:
        ``(image, boxes)``: a PIL RGB image decoded at 1/s and each box in its pixels, for
        the caller's resampler to finish the remaining factor; ``None`` when the fast path
        does not apply (shrink below 2, not a JPEG-tiled TIFF level, a missing or
        undecodable tile): then read the region the usual way.
    """
    if not boxes:
        return None
    path = getattr(reader, "path", None)
    if path is None or Path(path).suffix.lower() not in (".svs", ".tif", ".tiff"):
        return None
    factor = min(min(r - l, b - t) for l, t, r, b in boxes) / tile_size
    if factor < DCT_SCALES[-1] * (1 - 1e-9):
        return None
    jl = jpeg_level(path, reader.level_dimensions[level])
    if jl is None:
        return None
    ds = float(reader.level_downsamples[level])
    # The same level-coordinate transform as the readers (floor of level-0 / downsample).
    x, y = int(location[0] / ds), int(location[1] / ds)
    absolute = [(x + l, y + t, x + r, y + b) for l, t, r, b in boxes]
    scale = pick_scale(factor, absolute, (jl.tile_width, jl.tile_height))
    if scale == 1:
        return None
    w, h = int(size[0]), int(size[1])
    try:
        pixels, (ox, oy) = read_window_scaled(jl, (x, y, w, h), scale)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: an install without simplejpeg
        logger.debug("%s: DCT-scaled read of level %d at (%d, %d) failed (%s); reading normally", path, level, x, y, exc)
        return None
    from PIL import Image

    # Box in the level's frame -> decoded pixels -> relative to the decoded window's origin.
    mapped = [(l / scale - ox, t / scale - oy, r / scale - ox, b / scale - oy) for l, t, r, b in absolute]
    # Snap float noise so whole-pixel boxes stay whole (the resampler then averages exactly).
    mapped = [tuple(float(round(v)) if abs(v - round(v)) < 1e-6 else v for v in box) for box in mapped]
    return Image.fromarray(pixels), mapped  # type: ignore[return-value]
