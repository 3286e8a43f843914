"""TIFF details the slide backends need: page-0 tags (description, resolution) and truncation checks.

tifffile is imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: The first four bytes of a classic (``*``) or BigTIFF (``+``) file, little or big endian.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class TiffTags:
    """Page-0 TIFF tags that carry resolution metadata.

    Attributes:
        description: ImageDescription (e.g. the Aperio header), if any.
        x_resolution, y_resolution: Pixels per ``resolution_unit``.
        resolution_unit: TIFF ResolutionUnit code (2 inch, 3 cm; 4 mm and 5 µm are tifffile extensions).
    """

    description: str | None = None
    x_resolution: float | None = None
    y_resolution: float | None = None
    resolution_unit: int | None = None


def tiff_truncation(tf: Any, level_pages: list[Any]) -> str | None:
    """Return why a TIFF looks truncated, or None.

    tifffile tolerates a broken file: it stops at an IFD pointer past the end of the file (logging
    it) and would decode missing tiles as zeros or fail only at read time. Checked: the pixel data
    of every level lies inside the file and the IFD chain ends with a 0 pointer.
    """
    import struct

    fh = tf.filehandle
    size = fh.size
    for page in level_pages:
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        used = counts > 0
        if used.any() and int((offsets[used] + counts[used]).max()) > size:
            return f"pixel data of a {page.shape[1]}x{page.shape[0]} level extends past the end of the file (truncated)"
    try:
        last = tf.pages[len(tf.pages) - 1]
        t = tf.tiff
        with fh.lock:
            fh.seek(last.offset)
            tagno = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))[0]
            fh.seek(last.offset + t.tagnosize + tagno * t.tagsize)
            raw = fh.read(t.offsetsize)
        nxt = struct.unpack(t.offsetformat, raw)[0] if len(raw) == t.offsetsize else size
    except Exception:  # an unreadable chain end is as bad as a dangling one
        logger.debug("cannot follow the IFD chain", exc_info=True)
        return "the TIFF directory chain cannot be followed (truncated or corrupt)"
    if nxt >= size:
        return "the TIFF directory chain points past the end of the file (truncated)"
    return None


def read_tiff_tags_from_file(path: Path) -> TiffTags | None:
    """Page-0 description and resolution tags via tifffile, or None if not a (readable) TIFF."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) not in TIFF_MAGIC:
                return None
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return tiff_tags_from_page(tf.pages.first)
    except Exception:
        logger.debug("%s: cannot read TIFF tags", path, exc_info=True)
        return None


def tiff_tags_from_page(page: Any) -> TiffTags:
    tags = page.tags

    def rational(name: str) -> float | None:
        tag = tags.get(name)
        if tag is None:
            return None
        v = tag.value
        try:
            num, den = (v[0], v[1]) if isinstance(v, tuple) and len(v) == 2 else (v, 1)
            return float(num) / float(den) if float(den) else None
        except (TypeError, ValueError, IndexError):
            return None

    unit_tag = tags.get("ResolutionUnit")
    desc_tag = tags.get("ImageDescription")
    desc = desc_tag.value if desc_tag is not None else None
    if isinstance(desc, bytes):
        desc = desc.decode("latin-1", "replace")
    return TiffTags(
        description=desc if isinstance(desc, str) else None,
        x_resolution=rational("XResolution"),
        y_resolution=rational("YResolution"),
        resolution_unit=int(unit_tag.value) if unit_tag is not None else None,
    )
