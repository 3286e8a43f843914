"""Slide reading: one small, thread-safe interface over OpenSlide and tiffslide.

:func:`open_slide` returns a :class:`BaseSlideReader` from the first backend in the registry
that can open the file. Everything downstream (tissue detection, tiling, embedding) reads
pixels only through this interface. A backend is one module: a :class:`BaseSlideReader`
subclass plus a :func:`register_backend` call (see :mod:`.openslide`, :mod:`.tiffslide`).

Coordinate frames and units:

* ``location`` arguments are level-0 pixel coordinates ``(x, y)``;
* ``size`` arguments are ``(width, height)`` in pixels *of the requested level*;
* pixel arrays are ``(height, width, 3)`` ``uint8`` RGB; transparent or out-of-slide pixels are
  white (RGBA is composited on white);
* microns per pixel (``mpp``, µm/px) always refer to level 0.

The resolution comes from slide metadata only (see :mod:`.mpp`).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar

import numpy as np

from .._image import rgb_uint8
from .._registry import Registry
from ..errors import ConfigError, InputNotFoundError, MppError, SlideOpenError, SlideReadError
from .mpp import APERIO_APPMAG, aperio_value, check_slide_mpp, float_or_none, metadata_mpp, resolve_mpp
from .tiff import TiffTags

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

# Pixels read at once when downscaling a whole level for a thumbnail (~48 MB of RGB).
_THUMBNAIL_BLOCK_PIXELS = 1 << 24


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
    tiff_tags: TiffTags | None = None


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
        slide_mpp: Level-0 µm/px the pipeline uses (see :func:`~.mpp.resolve_mpp`).
    """

    backend: ClassVar[str] = ""
    #: The level-0 µm/px given to :func:`open_slide` (``slide_mpp``, checked there), or None.
    slide_mpp_override: float | None = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._closed = False
        try:
            meta = self._open()
        except SlideOpenError:
            raise
        except Exception as exc:  # any backend failure means "cannot open"
            raise open_error(self.path, self.backend, short_reason(exc)) from exc
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
            raise open_error(self.path, self.backend, f"no image data (levels {self.level_dimensions})")
        tiles = tuple(meta.level_tile_sizes) or (None,) * self.level_count
        self.level_tile_sizes = tiles + (None,) * (self.level_count - len(tiles))
        self.properties: Mapping[str, str] = MappingProxyType(dict(meta.properties))
        self.vendor = meta.vendor
        self.associated_images = tuple(meta.associated_images)
        self.objective_power = meta.objective_power
        if self.objective_power is None:
            self.objective_power = aperio_value(meta, APERIO_APPMAG, "aperio.AppMag")
        self.mpp_x, self.mpp_y, self.mpp_source = metadata_mpp(self.backend, meta)

    @property
    def slide_mpp(self) -> float:
        """Level-0 µm/px: the ``slide_mpp`` this slide was opened with, else its metadata's.

        Raises:
            MppError: No ``slide_mpp`` and no usable metadata value (see :func:`~.mpp.resolve_mpp`).
        """
        return resolve_mpp(self)[0]

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
                f"with {self.backend}: {short_reason(exc)}; the file may be corrupt or truncated"
            ) from exc
        return to_rgb(raw, self.path)

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
                f"{self.path}: cannot read associated image {name!r} with {self.backend}: {short_reason(exc)}"
            ) from exc
        return to_rgb(raw, self.path)

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


# --------------------------------------------------------------------------- registry
# Filled by the backend modules (openslide, then tiffslide) when the package is imported.
_BACKENDS: Registry[Callable[[Path], BaseSlideReader]] = Registry("slide backend")
_AUTO_ORDER: list[str] = []


def register_backend(name: str, cls: Callable[[Path], BaseSlideReader], *, auto: bool = True,
                     replace: bool = False) -> None:  # fmt: skip
    """Register a slide backend under ``name`` (the rule of :class:`~wsi_convnext._registry.Registry`).

    Args:
        name: Backend name used by ``open_slide(path, backend=name)``.
        cls: Callable (normally a :class:`BaseSlideReader` subclass) that opens a path or raises.
        auto: Also try it, after the already registered ones, when ``backend="auto"``.
        replace: Replace another backend of that name.
    """
    if name == "auto":
        raise ConfigError(f"invalid slide backend name {name!r}")
    _BACKENDS.register(name, cls, replace=replace)
    if auto and name not in _AUTO_ORDER:
        _AUTO_ORDER.append(name)
    if not auto and name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends, in ``"auto"`` order first."""
    return tuple(_AUTO_ORDER) + tuple(n for n in _BACKENDS.names() if n not in _AUTO_ORDER)


def backend_reference(name: str) -> str:
    """Import path ``"module:qualname"`` of the registered backend ``name``.

    Handed to worker processes (which start from a fresh interpreter) so that they can
    re-register a backend that user code registered at run time; see :func:`ensure_backend`.

    Raises:
        ConfigError: Unknown backend name.
    """
    obj = _BACKENDS.lookup(name)
    return f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"


def ensure_backend(name: str, reference: str) -> None:
    """Register backend ``name`` from its :func:`backend_reference` unless it is registered already.

    Importing the module usually registers it (the module calls :func:`register_backend`);
    otherwise the named object is registered here, outside the ``"auto"`` order.

    Raises:
        ConfigError: The reference cannot be imported.
    """
    if name in _BACKENDS:
        return
    module_name, _, qualname = reference.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        if name in _BACKENDS:
            return
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"slide backend {name!r} ({reference}) cannot be imported in a worker process: {short_reason(exc)}; "
            "define it in an importable module, not interactively"
        ) from exc
    register_backend(name, obj, auto=False)


def open_slide(path: str | os.PathLike[str], backend: str = "auto", *, slide_mpp: float | None = None) -> BaseSlideReader:
    """Open a whole-slide image.

    Args:
        path: Slide file (for DICOM: any file of the series; for MIRAX: the ``.mrxs``).
        slide_mpp: Level-0 µm/px that overrides the metadata (``--slide-mpp``, a manifest's
            ``slide_mpp`` column); checked here, once, and carried by the reader.
        backend: A registered backend name, or ``"auto"`` to try ``openslide`` then ``tiffslide``
            (so plain, non-pyramidal TIFFs also open).

    Raises:
        InputNotFoundError: ``path`` does not exist.
        MppError: ``slide_mpp`` is not a plausible level-0 µm/px.
        ConfigError: Unknown backend name.
        SlideOpenError: No backend can open the file; the message lists each backend's reason.
            The exception's ``backend_errors`` attribute maps backend name to reason.
    """
    p = Path(path)
    problem = None if slide_mpp is None else check_slide_mpp(slide_mpp)
    if problem:
        raise MppError(f"{p}: slide_mpp {problem}, got {slide_mpp!r}")
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
            reader.slide_mpp_override = None if slide_mpp is None else float(slide_mpp)
        except Exception as exc:
            reasons[name] = getattr(exc, "reason", None) or short_reason(exc)
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


# --------------------------------------------------------------------------------------- info
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


# --------------------------------------------------------------------------- small helpers
def open_error(path: Path, backend: str, reason: str) -> SlideOpenError:
    err = SlideOpenError(f"{path}: {backend} cannot open it: {reason}")
    err.reason = reason  # type: ignore[attr-defined]
    return err


def short_reason(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ImportError):
        text = f"not installed ({text})"
    elif not text or len(text) < 12:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """Any backend pixel array -> (h, w, 3) uint8 RGB, alpha composited on white (:func:`~wsi_convnext._image.rgb_uint8`)."""
    try:
        return rgb_uint8(arr, f"{path}: the pixels")[0]
    except ConfigError as exc:
        raise SlideReadError(f"{exc}; convert the slide to 8-bit RGB") from exc


def _to_level0(v: int, downsample: float) -> int:
    """Smallest level-0 coordinate that maps to level coordinate ``v`` (backends floor ``X / ds``)."""
    x = math.ceil(v * downsample)
    while int(x / downsample) < v:
        x += 1
    return x


def pil_to_rgb(img: Any) -> np.ndarray:
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



def level_tile_size(props: Mapping[str, str], prefix: str, level: int) -> tuple[int, int] | None:
    tw = float_or_none(props.get(f"{prefix}.level[{level}].tile-width"))
    th = float_or_none(props.get(f"{prefix}.level[{level}].tile-height"))
    if tw and th and tw > 0 and th > 0:
        return int(tw), int(th)
    return None

