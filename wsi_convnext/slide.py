"""Slide reading: one small, thread-safe interface over OpenSlide and tiffslide.

:func:`open_slide` returns a :class:`BaseSlideReader` (it satisfies the :class:`SlideReader`
protocol) from the first backend in the registry that can open the file. Everything downstream
(tissue detection, tiling, embedding) reads pixels only through this interface.

Coordinate frames and units:

* ``location`` arguments are level-0 pixel coordinates ``(x, y)``;
* ``size`` arguments are ``(width, height)`` in pixels *of the requested level*;
* pixel arrays are ``(height, width, 3)`` ``uint8`` RGB; transparent or out-of-slide pixels are
  white (RGBA is composited on white);
* microns per pixel (``mpp``, µm/px) always refer to level 0.

The resolution comes from slide metadata only; :func:`resolve_mpp` turns it (or a user override)
into the single isotropic µm/px value the pipeline works with and refuses missing, absurd or
anisotropic values instead of guessing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from .errors import ConfigError, InputNotFoundError, MppError, SlideOpenError, SlideReadError

__all__ = [
    "SLIDE_EXTENSIONS",
    "BaseSlideReader",
    "OpenSlideReader",
    "SlideMetadata",
    "SlideReader",
    "TiffSlideReader",
    "available_backends",
    "fingerprint",
    "open_slide",
    "register_backend",
    "resolve_mpp",
    "slide_info",
]

logger = logging.getLogger(__name__)

#: File extensions (lower case, with dot) of the whole-slide formats OpenSlide or tiffslide read.
SLIDE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".svs",  # Aperio
        ".tif",  # generic / Aperio / Philips / Ventana / OME TIFF
        ".tiff",
        ".btf",  # BigTIFF
        ".ndpi",  # Hamamatsu
        ".vms",  # Hamamatsu VMS
        ".vmu",  # Hamamatsu VMU
        ".scn",  # Leica
        ".mrxs",  # 3DHISTECH MIRAX (plus a data folder of the same name)
        ".bif",  # Ventana
        ".svslide",  # Sakura
        ".dcm",  # DICOM WSI (one file of the series)
        ".qptiff",  # Akoya / PerkinElmer
    }
)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Pixels read at once when downscaling a whole level for a thumbnail (~48 MB of RGB).
_THUMBNAIL_BLOCK_PIXELS = 1 << 24
_RESOLUTION_UNITS: dict[int, tuple[str, float]] = {
    # TIFF ResolutionUnit -> (label, micrometres per unit). 4/5 are tifffile extensions.
    2: ("inch", 25400.0),
    3: ("cm", 10000.0),
    4: ("mm", 1000.0),
    5: ("um", 1.0),
}
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([-+0-9.eE]+)")
_APERIO_APPMAG = re.compile(r"\|\s*AppMag\s*=\s*([-+0-9.eE]+)")


@runtime_checkable
class SlideReader(Protocol):
    """What the pipeline needs from an open slide (see :class:`BaseSlideReader` for semantics)."""

    path: Path
    backend: str
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    level_tile_sizes: tuple[tuple[int, int] | None, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str | None
    vendor: str | None
    objective_power: float | None
    associated_images: tuple[str, ...]
    properties: Mapping[str, str]

    @property
    def dimensions(self) -> tuple[int, int]: ...

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def get_best_level_for_downsample(self, downsample: float) -> int: ...

    def level0_location(self, level: int, location: tuple[int, int]) -> tuple[int, int]: ...

    def thumbnail(self, max_size: int) -> np.ndarray: ...

    def read_associated(self, name: str) -> np.ndarray: ...

    def close(self) -> None: ...

    def __enter__(self) -> SlideReader: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@dataclass
class SlideMetadata:
    """What a backend's :meth:`BaseSlideReader._open` reports; the base class derives the rest.

    Attributes:
        level_dimensions: ``(width, height)`` per level, level 0 first.
        level_downsamples: Downsample of each level relative to level 0.
        properties: Backend properties as strings (``openslide.mpp-x``, ``aperio.MPP``, ...).
        vendor: Format vendor, if known.
        objective_power: Scanner objective magnification, if known.
        associated_images: Names readable with :meth:`BaseSlideReader.read_associated`.
        level_tile_sizes: Native tile ``(width, height)`` per level (``None``: not tiled).
    """

    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    vendor: str | None = None
    objective_power: float | None = None
    associated_images: tuple[str, ...] = ()
    level_tile_sizes: tuple[tuple[int, int] | None, ...] = ()
    # Page-0 TIFF tags, read with tifffile (None for non-TIFF formats such as DICOM or MRXS).
    tiff_tags: _TiffTags | None = None


@dataclass(frozen=True)
class _TiffTags:
    description: str | None = None
    x_resolution: float | None = None
    y_resolution: float | None = None
    resolution_unit: int | None = None


class BaseSlideReader(ABC):
    """Base class of the slide backends; implements everything that is backend-independent.

    Subclasses set :attr:`backend` and implement :meth:`_open`, :meth:`_read_raw`,
    :meth:`_read_associated_raw` and :meth:`_close`. Constructing one opens the file or raises
    :class:`~wsi_convnext.errors.SlideOpenError` (naming the file, chained to the backend error).

    Attributes:
        path: The slide file.
        backend: Registry name of the backend (``"openslide"``, ``"tiffslide"``).
        level_count: Number of pyramid levels.
        level_dimensions: ``(width, height)`` in pixels of each level.
        level_downsamples: Downsample factor of each level relative to level 0.
        level_tile_sizes: Native tile ``(width, height)`` of each level, ``None`` if not tiled.
        mpp_x, mpp_y: Level-0 µm/px from the metadata, ``None`` if absent.
        mpp_source: Where ``mpp_x``/``mpp_y`` came from, e.g. ``"openslide.mpp-x"``,
            ``"aperio.MPP"``, ``"tiff.XResolution(cm)"``.
        vendor: Format vendor (``"aperio"``, ``"hamamatsu"``, ``"generic-tiff"``, ...).
        objective_power: Scanner objective magnification (e.g. 20.0, 40.0), ``None`` if absent.
        associated_images: Names of the associated images (``"label"``, ``"macro"``, ...).
        properties: Backend properties as strings (read-only).
    """

    backend: ClassVar[str] = ""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._closed = False
        try:
            meta = self._open()
        except SlideOpenError:
            raise
        except Exception as exc:  # any backend failure means "cannot open"
            raise _open_error(self.path, self.backend, _short_reason(exc)) from exc
        try:
            self._init_from(meta)
        except BaseException:
            self._safe_close()
            raise

    def _init_from(self, meta: SlideMetadata) -> None:
        self.level_dimensions = tuple((int(w), int(h)) for w, h in meta.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in meta.level_downsamples)
        self.level_count = len(self.level_dimensions)
        if self.level_count == 0 or min(min(d) for d in self.level_dimensions) < 1:
            raise _open_error(self.path, self.backend, f"no image data (levels {self.level_dimensions})")
        tiles = tuple(meta.level_tile_sizes) or (None,) * self.level_count
        self.level_tile_sizes = tiles + (None,) * (self.level_count - len(tiles))
        self.properties: Mapping[str, str] = MappingProxyType(dict(meta.properties))
        self.vendor = meta.vendor
        self.associated_images = tuple(meta.associated_images)
        self.objective_power = meta.objective_power
        if self.objective_power is None:
            self.objective_power = _aperio_value(meta, _APERIO_APPMAG, "aperio.AppMag")
        self.mpp_x, self.mpp_y, self.mpp_source = _metadata_mpp(self.backend, meta)

    # ----------------------------------------------------------------- backend hooks
    @abstractmethod
    def _open(self) -> SlideMetadata:
        """Open the file and return its metadata; raise anything on failure."""

    @abstractmethod
    def _read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Return ``(h, w, 3|4)`` uint8 pixels (RGBA not premultiplied); out-of-slide: alpha 0 or white."""

    @abstractmethod
    def _read_associated_raw(self, name: str) -> np.ndarray:
        """Return the associated image as an ``(h, w, c)`` array."""

    @abstractmethod
    def _close(self) -> None:
        """Release the backend handle."""

    # ----------------------------------------------------------------- public API
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self.level_dimensions[0]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region as RGB.

        Thread-safe: may be called concurrently from a thread pool on one reader.

        Args:
            location: Top-left ``(x, y)`` in level-0 pixels; may lie outside the slide.
            level: Pyramid level to read from.
            size: ``(width, height)`` in pixels of ``level``.

        Returns:
            ``(height, width, 3)`` uint8 RGB; pixels outside the slide or transparent are white.

        Raises:
            ValueError: Bad level or size, or the reader is closed.
            SlideReadError: The backend failed to decode the pixels (corrupt tile data, I/O error).
        """
        self._check_open()
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        if not 0 <= int(level) < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}")
        try:
            raw = self._read_raw((x, y), int(level), (w, h))
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot read region (x={x}, y={y}, level={level}, size={w}x{h}) "
                f"with {self.backend}: {_short_reason(exc)}; the file may be corrupt or truncated"
            ) from exc
        return _to_rgb(raw, self.path)

    def get_best_level_for_downsample(self, downsample: float, *, tolerance: float = 1e-3) -> int:
        """Return the coarsest level whose downsample does not exceed ``downsample``.

        Args:
            downsample: Wanted downsample relative to level 0 (e.g. 4.0).
            tolerance: Relative slack so that a level with downsample 4.0003 (odd level-0 size)
                still counts as 4.
        """
        limit = float(downsample) * (1.0 + tolerance)
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= limit:
                best = i
        return best

    def level0_location(self, level: int, location: tuple[int, int]) -> tuple[int, int]:
        """Level-0 ``(x, y)`` at which :meth:`read_region` at ``level`` starts at level pixel ``location``.

        Exact for integral downsamples. For a non-integral one (odd level sizes, e.g. 4.016) the
        smallest level-0 coordinate at or after the level pixel is returned: tiffslide then starts
        exactly on it, OpenSlide interpolates a sub-pixel shift (< 1/downsample px).
        """
        ds = self.level_downsamples[level]
        return _to_level0(int(location[0]), ds), _to_level0(int(location[1]), ds)

    def thumbnail(self, max_size: int, *, block_pixels: int = _THUMBNAIL_BLOCK_PIXELS) -> np.ndarray:
        """Whole slide as RGB with its longest side at most ``max_size`` pixels.

        Reads the coarsest level that is at least as large as the thumbnail, never a finer one.
        A level larger than ``block_pixels`` is read in blocks, each box-reduced by an integer
        factor as it arrives, so memory stays bounded even for a single-level gigapixel slide;
        the small intermediate is then resized with Lanczos antialiasing (PIL). Slides smaller
        than ``max_size`` are not upsampled.

        Args:
            max_size: Maximum width and height of the result, in pixels.
            block_pixels: Most pixels read with one ``read_region`` call.

        Returns:
            ``(h, w, 3)`` uint8 RGB with ``max(h, w) <= max_size``.
        """
        if int(max_size) < 1:
            raise ValueError(f"{self.path}: thumbnail max_size must be >= 1, got {max_size}")
        self._check_open()
        w0, h0 = self.dimensions
        scale = min(1.0, int(max_size) / max(w0, h0))
        out_w = min(int(max_size), max(1, round(w0 * scale)))
        out_h = min(int(max_size), max(1, round(h0 * scale)))
        adequate = [i for i, (lw, lh) in enumerate(self.level_dimensions) if lw >= out_w and lh >= out_h]
        level = max(adequate or [0], key=lambda i: self.level_downsamples[i])
        return self._downscale_level(level, (out_w, out_h), max(1, int(block_pixels)))

    def read_associated(self, name: str) -> np.ndarray:
        """Return an associated image (``"label"``, ``"macro"``, ``"thumbnail"``...) as RGB uint8.

        Raises:
            KeyError: The slide has no associated image of that name.
            SlideReadError: Decoding failed.
        """
        self._check_open()
        if name not in self.associated_images:
            raise KeyError(f"{self.path}: no associated image {name!r}; available: {list(self.associated_images)}")
        try:
            raw = self._read_associated_raw(name)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot read associated image {name!r} with {self.backend}: {_short_reason(exc)}"
            ) from exc
        return _to_rgb(raw, self.path)

    def close(self) -> None:
        """Release the backend handle (call only once no read is in flight). Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> BaseSlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, levels={self.level_dimensions}, mpp={self.mpp_x})"

    # ----------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: slide reader is closed")

    def _safe_close(self) -> None:
        try:
            self._close()
        except Exception:  # pragma: no cover - best effort while already failing
            logger.debug("closing %s after a failed open raised", self.path, exc_info=True)
        self._closed = True

    def _downscale_level(self, level: int, out_size: tuple[int, int], block_pixels: int) -> np.ndarray:
        from PIL import Image

        lw, lh = self.level_dimensions[level]
        out_w, out_h = out_size
        scale = min(lw / out_w, lh / out_h)
        # Integer box pre-reduction (exact block-wise, hence seamless); leaves a final Lanczos
        # step with factor < ~2-4, which needs the whole (small) intermediate image.
        k = max(1, int(scale // 2)) if scale >= 4 else max(1, int(scale))
        if lw * lh <= block_pixels:
            inter = self.read_region((0, 0), level, (lw, lh))
            if k > 1:
                inter = np.asarray(Image.fromarray(inter).reduce(k))
        else:
            if lw * k <= block_pixels:  # full-width strips: efficient for stripped TIFFs too
                bw = lw
                bh = max(k, (block_pixels // lw) // k * k)
            else:
                side = max(k, int(math.isqrt(block_pixels)) // k * k)
                bw = bh = side
            inter = np.empty((-(-lh // k), -(-lw // k), 3), dtype=np.uint8)
            for by in range(0, lh, bh):
                for bx in range(0, lw, bw):
                    w, h = min(bw, lw - bx), min(bh, lh - by)
                    block = self.read_region(self.level0_location(level, (bx, by)), level, (w, h))
                    if k > 1:
                        block = np.asarray(Image.fromarray(block).reduce(k))
                    inter[by // k : by // k + block.shape[0], bx // k : bx // k + block.shape[1]] = block
        if inter.shape[1] == out_w and inter.shape[0] == out_h:
            return np.ascontiguousarray(inter)
        img = Image.fromarray(inter).resize((out_w, out_h), Image.Resampling.LANCZOS)
        return np.asarray(img)


# --------------------------------------------------------------------------- OpenSlide
class OpenSlideReader(BaseSlideReader):
    """OpenSlide backend (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, DICOM, tiled TIFF).

    Thread safety: OpenSlide handles are thread-safe and openslide-python releases the GIL
    while decoding, so concurrent :meth:`read_region` calls need no lock.
    """

    backend = "openslide"

    def _open(self) -> SlideMetadata:
        import openslide

        self._osr = openslide.OpenSlide(str(self.path))
        props = {str(k): str(v) for k, v in self._osr.properties.items()}
        n = self._osr.level_count
        return SlideMetadata(
            level_dimensions=tuple(self._osr.level_dimensions),
            level_downsamples=tuple(self._osr.level_downsamples),
            properties=props,
            vendor=props.get("openslide.vendor") or None,
            objective_power=_float_or_none(props.get("openslide.objective-power")),
            associated_images=tuple(self._osr.associated_images.keys()),
            level_tile_sizes=tuple(_tile_size(props, "openslide", i) for i in range(n)),
            tiff_tags=_read_tiff_tags_from_file(self.path),
        )

    def _read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return _pil_to_rgb(self._osr.read_region(location, level, size))

    def _read_associated_raw(self, name: str) -> np.ndarray:
        return _pil_to_rgb(self._osr.associated_images[name])

    def _close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()


# --------------------------------------------------------------------------- tiffslide
class TiffSlideReader(BaseSlideReader):
    """tiffslide backend (tifffile + imagecodecs): any TIFF, including plain stripped ones.

    Thread safety: tiffslide keeps one zarr view per thread and tifffile serialises the file
    seeks/reads behind a re-entrant lock, so concurrent :meth:`read_region` calls are safe
    without a lock of ours (decoding runs in parallel). Everything tiffslide computes lazily
    (properties, series, level info) is computed once here at open time, before any thread
    can race on it.

    At open, every pyramid level's compression is checked against the codecs tifffile can
    decode, so an exotic file that tiffslide would "open" but could only turn into garbage or
    errors (e.g. compression 52479) is refused with :class:`SlideOpenError`.
    """

    backend = "tiffslide"

    def _open(self) -> SlideMetadata:
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(self.path))
        try:
            if len(self._ts.ts_tifffile.pages) == 0:
                raise _open_error(self.path, self.backend, "no readable TIFF directory (truncated or corrupt)")
            raw_props = dict(self._ts.properties)
            self._check_decodable(raw_props)
            props = {str(k): str(v) for k, v in raw_props.items() if v is not None}
            n = self._ts.level_count
            tiff_tags = self._page0_tags(raw_props)
            return SlideMetadata(
                level_dimensions=tuple(self._ts.level_dimensions),
                level_downsamples=tuple(self._ts.level_downsamples),
                properties=props,
                vendor=raw_props.get("tiffslide.vendor") or "generic-tiff",
                objective_power=_float_or_none(raw_props.get("tiffslide.objective-power")),
                associated_images=tuple(self._ts.associated_images.keys()),
                level_tile_sizes=tuple(_tile_size(props, "tiffslide", i) for i in range(n)),
                tiff_tags=tiff_tags,
            )
        except BaseException:
            self._ts.close()
            raise

    def _level_pages(self, raw_props: Mapping[str, Any]) -> list[Any]:
        tf = self._ts.ts_tifffile
        if raw_props.get("tiffslide.series-composition"):
            series_list = [tf.series[int(i)] for i in raw_props["tiffslide.series-composition"]["located_series"]]
        else:
            series_list = [tf.series[int(raw_props.get("tiffslide.series-index") or 0)]]
        return [lvl.keyframe for s in series_list for lvl in s.levels]

    def _check_decodable(self, raw_props: Mapping[str, Any]) -> None:
        from tifffile import TIFF

        problem = _tiff_truncation(self._ts.ts_tifffile, self._level_pages(raw_props))
        if problem:
            raise _open_error(self.path, self.backend, problem)
        for page in self._level_pages(raw_props):
            comp = int(page.compression)
            if comp != 1 and comp not in TIFF.DECOMPRESSORS:
                raise _open_error(
                    self.path,
                    self.backend,
                    f"TIFF compression {comp} has no decoder in tifffile/imagecodecs",
                )
            if np.dtype(page.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(bool)):
                raise _open_error(self.path, self.backend, f"unsupported sample type {page.dtype}")

    def _page0_tags(self, raw_props: Mapping[str, Any]) -> _TiffTags | None:
        try:
            return _tiff_tags_from_page(self._level_pages(raw_props)[0])
        except Exception:
            logger.debug("%s: cannot read TIFF tags of the base level", self.path, exc_info=True)
            return None

    def _read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        # Same level-coordinate transform as tiffslide; we pad with white instead of black.
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        ix0, iy0 = min(max(x0, 0), lw), min(max(y0, 0), lh)
        ix1, iy1 = min(max(x0 + w, 0), lw), min(max(y0 + h, 0), lh)
        if ix0 == x0 and iy0 == y0 and ix1 == x0 + w and iy1 == y0 + h:
            return self._ts.read_region(location, level, size, as_array=True, padding=False)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            arr = self._ts.read_region(location, level, size, as_array=True, padding=False)
            out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = _to_rgb(arr, self.path)
        return out

    def _read_associated_raw(self, name: str) -> np.ndarray:
        img = self._ts.associated_images[name]
        return np.asarray(img.convert("RGBA") if img.mode not in ("RGB", "RGBA", "L") else img)

    def _close(self) -> None:
        ts = getattr(self, "_ts", None)
        if ts is not None:
            ts.close()


# --------------------------------------------------------------------------- registry
_BACKENDS: dict[str, Callable[[Path], BaseSlideReader]] = {
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,
}
_AUTO_ORDER: list[str] = ["openslide", "tiffslide"]


def register_backend(name: str, cls: Callable[[Path], BaseSlideReader], *, auto: bool = True) -> None:
    """Register a slide backend under ``name`` (replacing one of the same name).

    Args:
        name: Backend name used by ``open_slide(path, backend=name)``.
        cls: Callable (normally a :class:`BaseSlideReader` subclass) that opens a path or raises.
        auto: Also try it, after the already registered ones, when ``backend="auto"``.
    """
    if not name or name == "auto":
        raise ConfigError(f"invalid slide backend name {name!r}")
    _BACKENDS[name] = cls
    if auto and name not in _AUTO_ORDER:
        _AUTO_ORDER.append(name)
    if not auto and name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends, in ``"auto"`` order first."""
    return tuple(_AUTO_ORDER) + tuple(n for n in _BACKENDS if n not in _AUTO_ORDER)


def open_slide(path: str | os.PathLike[str], backend: str = "auto") -> BaseSlideReader:
    """Open a whole-slide image.

    Args:
        path: Slide file (for DICOM: any file of the series; for MIRAX: the ``.mrxs``).
        backend: A registered backend name, or ``"auto"`` to try ``openslide`` then ``tiffslide``
            (so plain, non-pyramidal TIFFs also open).

    Raises:
        InputNotFoundError: ``path`` does not exist.
        ConfigError: Unknown backend name.
        SlideOpenError: No backend can open the file; the message lists each backend's reason.
            The exception's ``backend_errors`` attribute maps backend name to reason.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: slide file not found")
    if p.is_dir():
        raise SlideOpenError(f"{p}: is a folder, not a slide file (for DICOM pass one .dcm file of the series)")
    if backend == "auto":
        names = list(_AUTO_ORDER)
    elif backend in _BACKENDS:
        names = [backend]
    else:
        raise ConfigError(f"unknown slide backend {backend!r}; choose one of: auto, {', '.join(available_backends())}")
    reasons: dict[str, str] = {}
    last: BaseException | None = None
    for name in names:
        try:
            reader = _BACKENDS[name](p)
        except Exception as exc:
            reasons[name] = getattr(exc, "reason", None) or _short_reason(exc)
            last = exc
            logger.debug("%s: backend %s cannot open it: %s", p, name, reasons[name])
            continue
        if name != names[0]:
            logger.debug("%s: opened with %s (%s)", p, name, "; ".join(f"{k}: {v}" for k, v in reasons.items()))
        return reader
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    err = SlideOpenError(
        f"{p}: cannot open as a slide ({detail}); the format may be unsupported or the file corrupt or truncated"
    )
    err.backend_errors = reasons  # type: ignore[attr-defined]
    raise err from last


# --------------------------------------------------------------------------- mpp
def resolve_mpp(
    reader: SlideReader,
    override: float | None = None,
    *,
    max_mpp: float = 100.0,
    min_mpp: float = 0.05,
    anisotropy_tolerance: float = 0.02,
) -> tuple[float, str]:
    """Return the slide's isotropic level-0 resolution in µm/px and where it came from.

    An explicit ``override`` wins (source ``"override"``) and is the way to accept a slide whose
    metadata is missing or absurd. Otherwise the metadata value is used. Nothing is ever guessed.

    Args:
        reader: An open slide.
        override: User-supplied level-0 µm/px (``--slide-mpp`` or the manifest's ``mpp`` column).
        max_mpp, min_mpp: Plausible range for microscopy, µm/px.
        anisotropy_tolerance: Largest accepted relative difference between x and y µm/px; within
            it the mean is used.

    Raises:
        MppError: Override outside the range; metadata missing, outside the range, or anisotropic.
    """
    name = reader.path
    if override is not None:
        value = float(override)
        if not (math.isfinite(value) and min_mpp <= value <= max_mpp):
            raise MppError(
                f"{name}: mpp override {override} µm/px is outside the plausible range "
                f"[{min_mpp:g}, {max_mpp:g}]; give the level-0 resolution in micrometres per pixel "
                f"(about 0.25 for 40x, 0.5 for 20x scans)"
            )
        if reader.mpp_x is not None and not math.isclose(value, reader.mpp_x, rel_tol=anisotropy_tolerance):
            logger.info(
                "%s: using mpp override %g instead of metadata %g (%s)", name, value, reader.mpp_x, reader.mpp_source
            )
        return value, "override"
    mx, my, source = reader.mpp_x, reader.mpp_y, reader.mpp_source
    if mx is None or my is None:
        raise MppError(
            f"{name}: no microns-per-pixel in the slide metadata; "
            "pass --slide-mpp X or add an `mpp` column to the CSV manifest"
        )
    for v in (mx, my):
        if not (math.isfinite(v) and min_mpp <= v <= max_mpp):
            raise MppError(
                f"{name}: metadata mpp {v:.6g} µm/px (from {source}) is implausible for microscopy "
                f"(expected {min_mpp:g} to {max_mpp:g}); if you know the true resolution pass --slide-mpp X "
                "or add an `mpp` column to the CSV manifest"
            )
    if abs(mx - my) > anisotropy_tolerance * min(mx, my):
        raise MppError(
            f"{name}: non-square pixels (mpp x {mx:.6g}, y {my:.6g} µm/px from {source}) are not supported; "
            "resample the slide to square pixels or pass --slide-mpp X to override"
        )
    return (mx + my) / 2.0, str(source)


def _metadata_mpp(backend: str, meta: SlideMetadata) -> tuple[float | None, float | None, str | None]:
    """Level-0 (mpp_x, mpp_y, source): backend property, then Aperio MPP, then TIFF resolution tags."""
    props = meta.properties
    tag_mpp = _mpp_from_resolution_tags(meta.tiff_tags)
    mx = _positive_or_none(props.get(f"{backend}.mpp-x"))
    my = _positive_or_none(props.get(f"{backend}.mpp-y"))
    if mx is not None or my is not None:
        mx, my = (mx if mx is not None else my), (my if my is not None else mx)
        source = f"{backend}.mpp-x"
        # OpenSlide 4 and tiffslide derive their mpp from the resolution tags for generic TIFFs;
        # name the tag so that a user seeing "352.78 µm/px" knows where it comes from.
        if tag_mpp is not None and math.isclose(tag_mpp[0], mx, rel_tol=1e-6):
            source = tag_mpp[2]
        return mx, my, source
    aperio = _aperio_value(meta, _APERIO_MPP, "aperio.MPP")
    if aperio is not None and aperio > 0:
        return aperio, aperio, "aperio.MPP"
    if tag_mpp is not None:
        return tag_mpp
    return None, None, None


def _mpp_from_resolution_tags(tags: _TiffTags | None) -> tuple[float, float, str] | None:
    if tags is None or tags.resolution_unit not in _RESOLUTION_UNITS:
        return None
    if not tags.x_resolution or not tags.y_resolution:
        return None
    label, um_per_unit = _RESOLUTION_UNITS[int(tags.resolution_unit)]
    mx, my = um_per_unit / tags.x_resolution, um_per_unit / tags.y_resolution
    if not (math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0):
        return None
    return mx, my, f"tiff.XResolution({label})"


def _aperio_value(meta: SlideMetadata, pattern: re.Pattern[str], prop: str) -> float | None:
    value = _positive_or_none(meta.properties.get(prop))
    if value is not None:
        return value
    for desc in (meta.properties.get("tiff.ImageDescription"), meta.tiff_tags.description if meta.tiff_tags else None):
        if desc and desc.lstrip().startswith("Aperio"):
            m = pattern.search(desc)
            if m:
                return _positive_or_none(m.group(1))
    return None


# --------------------------------------------------------------------------- info / fingerprint
def slide_info(path: str | os.PathLike[str], backend: str = "auto") -> dict[str, Any]:
    """JSON-ready summary of a slide (for ``wsi-convnext info``).

    Keys: ``path``, ``backend``, ``vendor``, ``dimensions`` ([w, h] level 0), ``levels`` (list of
    ``{level, width, height, downsample, tile_width, tile_height}``), ``mpp_x``, ``mpp_y``
    (level-0 µm/px or None), ``mpp_source``, ``objective_power``, ``associated_images``,
    ``file_size_bytes``.
    """
    with open_slide(path, backend=backend) as reader:
        levels = []
        for i, ((w, h), ds, tile) in enumerate(
            zip(reader.level_dimensions, reader.level_downsamples, reader.level_tile_sizes, strict=True)
        ):
            levels.append(
                {
                    "level": i,
                    "width": w,
                    "height": h,
                    "downsample": ds,
                    "tile_width": tile[0] if tile else None,
                    "tile_height": tile[1] if tile else None,
                }
            )
        return {
            "path": str(reader.path),
            "backend": reader.backend,
            "vendor": reader.vendor,
            "dimensions": list(reader.dimensions),
            "levels": levels,
            "mpp_x": reader.mpp_x,
            "mpp_y": reader.mpp_y,
            "mpp_source": reader.mpp_source,
            "objective_power": reader.objective_power,
            "associated_images": list(reader.associated_images),
            "file_size_bytes": reader.path.stat().st_size,
        }


def fingerprint(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Cheap content fingerprint of a slide for change detection (hex sha256).

    Hashes the file size, the first and the last ``chunk_bytes`` (1 MiB) of the file and, for
    multi-file formats, the names and sizes of the companion files (the MIRAX data folder of a
    ``.mrxs``; the sibling ``.dcm`` files of a DICOM series). It is deliberately *not* a
    full-file hash: hashing a multi-gigabyte slide takes tens of seconds, while headers,
    directories and tile tables sit at the start or the end of the file and any rewrite
    (re-scan, conversion, truncation) changes the size or those regions. A change that only
    touches tile bytes in the middle of the file, keeping the size, goes unnoticed.

    Raises:
        InputNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: slide file not found")
    h = hashlib.sha256(b"wsi-convnext-fingerprint-v1\0")
    size = p.stat().st_size
    h.update(str(size).encode() + b"\0")
    with p.open("rb") as fh:
        h.update(fh.read(chunk_bytes))
        if size > chunk_bytes:
            fh.seek(max(chunk_bytes, size - chunk_bytes))
            h.update(fh.read(chunk_bytes))
    for name, fsize in _companion_files(p):
        h.update(f"\0{name}\0{fsize}".encode())
    return h.hexdigest()


def _companion_files(p: Path) -> Iterator[tuple[str, int]]:
    suffix = p.suffix.lower()
    if suffix == ".mrxs":
        data_dir = p.with_suffix("")
        if data_dir.is_dir():
            for f in sorted(data_dir.iterdir()):
                if f.is_file():
                    yield f"{data_dir.name}/{f.name}", f.stat().st_size
    elif suffix == ".dcm":
        for f in sorted(p.parent.glob("*")):
            if f != p and f.suffix.lower() == ".dcm" and f.is_file():
                yield f.name, f.stat().st_size


# --------------------------------------------------------------------------- small helpers
def _open_error(path: Path, backend: str, reason: str) -> SlideOpenError:
    err = SlideOpenError(f"{path}: {backend} cannot open it: {reason}")
    err.reason = reason  # type: ignore[attr-defined]
    return err


def _short_reason(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ImportError):
        text = f"not installed ({text})"
    elif not text or len(text) < 12:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """Any backend pixel array -> (h, w, 3) uint8 RGB, alpha composited on white."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise SlideReadError(f"{path}: unsupported pixel type {a.dtype}; convert the slide to 8-bit RGB")
    c = a.shape[2]
    if c == 3:
        return np.ascontiguousarray(a)
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:  # grey + alpha
        a = np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:]], axis=2)
    elif c > 4:
        raise SlideReadError(f"{path}: {c}-channel images are not supported; convert the slide to RGB")
    rgb, alpha = a[..., :3], a[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    alpha16 = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * alpha16 + 255 * (255 - alpha16) + 127) // 255
    return out.astype(np.uint8)


def _to_level0(v: int, downsample: float) -> int:
    """Smallest level-0 coordinate that maps to level coordinate ``v`` (backends floor ``X / ds``)."""
    x = math.ceil(v * downsample)
    while int(x / downsample) < v:
        x += 1
    return x


def _pil_to_rgb(img: Any) -> np.ndarray:
    """PIL image -> RGB array, compositing alpha on white; all in C (fast for big blocks)."""
    from PIL import Image

    if img.mode in ("LA", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        if img.getchannel("A").getextrema()[0] < 255:
            canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
            canvas.alpha_composite(img)
            img = canvas
    return np.asarray(img.convert("RGB"))


def _tile_size(props: Mapping[str, str], prefix: str, level: int) -> tuple[int, int] | None:
    tw = _float_or_none(props.get(f"{prefix}.level[{level}].tile-width"))
    th = _float_or_none(props.get(f"{prefix}.level[{level}].tile-height"))
    if tw and th and tw > 0 and th > 0:
        return int(tw), int(th)
    return None


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _positive_or_none(value: Any) -> float | None:
    f = _float_or_none(value)
    return f if f is not None and f > 0 else None


def _tiff_truncation(tf: Any, level_pages: list[Any]) -> str | None:
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


def _read_tiff_tags_from_file(path: Path) -> _TiffTags | None:
    """Page-0 description and resolution tags via tifffile, or None if not a (readable) TIFF."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) not in _TIFF_MAGIC:
                return None
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return _tiff_tags_from_page(tf.pages.first)
    except Exception:
        logger.debug("%s: cannot read TIFF tags", path, exc_info=True)
        return None


def _tiff_tags_from_page(page: Any) -> _TiffTags:
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
    return _TiffTags(
        description=desc if isinstance(desc, str) else None,
        x_resolution=rational("XResolution"),
        y_resolution=rational("YResolution"),
        resolution_unit=int(unit_tag.value) if unit_tag is not None else None,
    )
