"""Writing synthetic slides as real pyramidal TIFF files (Aperio SVS or generic tiled TIFF).

Tiles are rendered and compressed in a bounded thread window and streamed to tifffile; the
file is written under a temporary name and moved into place atomically.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._io import atomic_path
from ..errors import ConfigError, InputNotFoundError
from .render import _grid_um, _make_renderer, _Renderer, _render_small, _thumbnail_downsample
from .shapes import SyntheticSlide, SyntheticSlideSpec, _build_geometry, _rng

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Codecs and TIFF flavours (registries)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Codec:
    tag: int  # TIFF Compression tag value
    aperio_name: str  # as in Aperio descriptions
    lossless: bool
    encode: Callable[[np.ndarray, int], bytes]


def _enc_jpeg(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                    subsampling=(2, 2))


def _enc_j2k(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    level = None if quality >= 100 else 30 + quality // 5  # PSNR target in dB
    return imagecodecs.jpeg2k_encode(tile, level=level, codecformat="J2K", reversible=level is None)


def _enc_zlib(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return imagecodecs.zlib_encode(tile, level=6)


def _enc_none(tile: np.ndarray, quality: int) -> bytes:
    return np.ascontiguousarray(tile).tobytes()


_CODECS: dict[str, _Codec] = {
    "jpeg": _Codec(7, "JPEG/RGB", False, _enc_jpeg),
    "jpeg2000": _Codec(33005, "J2K/KDU", False, _enc_j2k),
    "zlib": _Codec(8, "ZLIB/RGB", True, _enc_zlib),
    "none": _Codec(1, "RAW/RGB", True, _enc_none),
}


def _fmt_mpp(mpp: float) -> str:
    s = f"{mpp:.4f}"
    return s if abs(float(s) - mpp) < 1e-9 else f"{mpp:.8f}".rstrip("0")


def _fmt_mag(m: float) -> str:
    return str(int(m)) if float(m).is_integer() else f"{m:g}"


class _Flavour(Protocol):
    def level_kwargs(self, spec: SyntheticSlideSpec, level: int) -> dict[str, Any]: ...

    has_thumbnail: bool


class _AperioFlavour:
    """Aperio SVS: level 0, thumbnail (stripped), other levels, then label and macro."""

    has_thumbnail = True

    @staticmethod
    def header(spec: SyntheticSlideSpec) -> str:
        c = _CODECS[spec.compression]
        W, H, T = spec.width, spec.height, spec.tile
        return f"Aperio Image Library v12.0.0\r\n{W}x{H} [0,0 {W}x{H}] ({T}x{T}) {c.aperio_name} Q={spec.quality}"

    def level_kwargs(self, spec: SyntheticSlideSpec, level: int) -> dict[str, Any]:
        if level == 0:
            parts = [self.header(spec)]
            mag = spec.magnification
            if mag is not None:
                parts.append(f"AppMag = {_fmt_mag(mag)}")
            parts.append("StripeWidth = 2048")
            parts.append("ScanScope ID = SYNTHETIC")
            parts.append(f"Filename = synthetic-{spec.seed}")
            parts.append("Date = 01/02/25")
            parts.append("Time = 12:00:00")
            if spec.mpp is not None:
                parts.append(f"MPP = {_fmt_mpp(spec.mpp)}")
            parts.append(f"Synthetic = wsi_convnext pattern {spec.pattern} seed {spec.seed}")
            desc = "|".join(parts)
        else:
            w, h = spec.level_dimensions()[level]
            c = _CODECS[spec.compression]
            desc = (f"Aperio Image Library v12.0.0\r\n{spec.width}x{spec.height} [0,0 {spec.width}x{spec.height}] "
                    f"({spec.tile}x{spec.tile}) -> {w}x{h} {c.aperio_name} Q={spec.quality}")
        return {"description": desc, "resolution": None, "resolutionunit": "inch" if spec.mpp is not None else None}


class _GenericFlavour:
    """Generic pyramidal tiled TIFF; levels are reduced-resolution IFDs in the main chain."""

    has_thumbnail = False

    def level_kwargs(self, spec: SyntheticSlideSpec, level: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"description": None, "subfiletype": 1 if level else 0}
        if spec.mpp is not None:
            w, _ = spec.level_dimensions()[level]
            level_mpp = spec.mpp * spec.width / w
            kw["resolution"] = (1e4 / level_mpp, 1e4 / level_mpp)
            kw["resolutionunit"] = "centimeter"
        return kw


_FLAVOURS: dict[str, _Flavour] = {"aperio": _AperioFlavour(), "generic": _GenericFlavour()}


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _encoded_tiles(renderer: _Renderer, codec: _Codec, quality: int, d: int, w: int, h: int, T: int,
                   pool: concurrent.futures.Executor | None, window: int,
                   tick: Callable[[], None]) -> Iterator[bytes]:
    """Encoded tiles of one level in TIFF order, rendered+encoded in a bounded thread window."""

    def job(ty: int, tx: int) -> bytes:
        return codec.encode(renderer.render(d, ty * T, tx * T), quality)

    coords = ((ty, tx) for ty in range(-(-h // T)) for tx in range(-(-w // T)))
    # tick() before each yield: tifffile stops pulling after the last tile.
    if pool is None:
        for ty, tx in coords:
            data = job(ty, tx)
            tick()
            yield data
        return
    pending: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
    for ty, tx in coords:
        pending.append(pool.submit(job, ty, tx))
        if len(pending) >= window:
            data = pending.popleft().result()
            tick()
            yield data
    while pending:
        data = pending.popleft().result()
        tick()
        yield data



def _label_image(spec: SyntheticSlideSpec) -> np.ndarray:
    rng = _rng(spec.seed, "label")
    img = np.full((400, 380, 3), 250, np.uint8)
    bars = rng.integers(0, 2, 60).astype(bool)
    for i, b in enumerate(bars):
        if b:
            img[40:140, 40 + i * 5:43 + i * 5] = 10
    for r in range(4):  # "handwriting" strokes
        y = 190 + r * 45
        xs = np.arange(40, 40 + int(rng.integers(150, 300)))
        ys = (y + 6 * np.sin(xs / rng.uniform(4, 9))).astype(int)
        for dy in range(3):
            img[ys + dy, xs] = 30
    return img


def _macro_image(spec: SyntheticSlideSpec, thumb: np.ndarray) -> np.ndarray:
    from PIL import Image

    macro = np.full((430, 1280, 3), 205, np.uint8)
    macro[:, :360] = np.asarray(Image.fromarray(_label_image(spec)).resize((360, 430)))
    th, tw = thumb.shape[:2]
    f = min(880 / tw, 400 / th)
    small = np.asarray(Image.fromarray(thumb).resize((max(1, int(tw * f)), max(1, int(th * f)))))
    y, x = (430 - small.shape[0]) // 2, 380 + (880 - small.shape[1]) // 2
    macro[y:y + small.shape[0], x:x + small.shape[1]] = small
    return macro


def _strip_resolution_tags(path: Path) -> None:
    """Remove XResolution, YResolution and ResolutionUnit from every IFD, in place.

    tifffile always writes them (1/1, unit NONE); a slide "without mpp" must carry none.
    The IFD entries are compacted; the orphaned rational values stay as unused bytes.
    """
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tf:
        bo = tf.byteorder
        big = tf.is_bigtiff
        offsets = [page.offset for page in tf.pages]
    cfmt, esize, ofmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    csize, osize = struct.calcsize(cfmt), struct.calcsize(ofmt)
    with path.open("r+b") as fh:
        for off in offsets:
            fh.seek(off)
            (n,) = struct.unpack(bo + cfmt, fh.read(csize))
            raw = fh.read(n * esize + osize)
            entries = [raw[i * esize:(i + 1) * esize] for i in range(n)]
            keep = [e for e in entries if struct.unpack(bo + "H", e[:2])[0] not in (282, 283, 296)]
            fh.seek(off)
            fh.write(struct.pack(bo + cfmt, len(keep)) + b"".join(keep) + raw[n * esize:])
            fh.write(b"\0" * ((n - len(keep)) * esize))


def write_synthetic_slide(
    path: str | os.PathLike[str],
    spec: SyntheticSlideSpec,
    *,
    workers: int | None = None,
    bigtiff: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSlide:
    """Write a synthetic pyramidal slide and return it with its ground truth.

    Memory stays bounded whatever the size: tiles are rendered from level-0 physical
    coordinates and streamed to tifffile. The file is written under a temporary name in
    the same folder and moved into place atomically.

    Args:
        path: Output file (``.svs`` for Aperio, ``.tif``/``.tiff`` otherwise; any name works).
        spec: What to draw and how to store it.
        workers: Threads rendering and compressing tiles (default: CPU count).
        bigtiff: Force BigTIFF on/off; default: BigTIFF when the raw pixels exceed 2 GiB.
        progress: Called as ``progress(tiles_done, tiles_total)`` while writing.

    Returns:
        The :class:`SyntheticSlide` (path, spec, geometry, ground-truth masks).

    Raises:
        ConfigError: The spec is invalid.
    """
    import tifffile

    spec.validate()
    path = Path(path)
    if not path.parent.is_dir():
        raise InputNotFoundError(f"output folder {path.parent} does not exist; create it first")
    geometry, tissue_sdf = _build_geometry(spec, _grid_um(spec))
    renderer = _make_renderer(spec, geometry, tissue_sdf)
    codec = _CODECS[spec.compression]
    flavour = _FLAVOURS[spec.flavour]
    dims = spec.level_dimensions()
    T = spec.tile
    raw = sum(w * h * 3 for w, h in dims)
    if bigtiff is None:
        bigtiff = raw > 2**31
    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    total = sum(-(-w // T) * -(-h // T) for w, h in dims)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None and (done[0] % 64 == 0 or done[0] == total):
            progress(done[0], total)

    for d in spec.downsamples:
        renderer.prepare(d)
    thumb = None
    if flavour.has_thumbnail:
        dt = _thumbnail_downsample(spec, renderer)
        thumb = _render_small(renderer, dt, -(-spec.width // dt), -(-spec.height // dt), T)
    renderer.release_sources()
    thumb_comp = "jpeg" if spec.compression in ("jpeg", "jpeg2000") else codec.tag

    pool = concurrent.futures.ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    try:
        with atomic_path(path, fsync=False) as tmp:
            with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
                for i, (d, (w, h)) in enumerate(zip(spec.downsamples, dims, strict=True)):
                    kw = flavour.level_kwargs(spec, i)
                    tiles = _encoded_tiles(renderer, codec, spec.quality, d, w, h, T, pool, 4 * n_workers, tick)
                    tw.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(T, T), photometric="rgb",
                             compression=codec.tag, metadata=None, software="wsi_convnext.synthetic", **kw)
                    if i == 0 and thumb is not None:
                        desc = (f"Aperio Image Library v12.0.0\r\n{spec.width}x{spec.height} -> "
                                f"{thumb.shape[1]}x{thumb.shape[0]} - ")
                        tw.write(thumb, photometric="rgb", compression=thumb_comp,
                                 compressionargs={"level": 90} if thumb_comp == "jpeg" else None,
                                 metadata=None, software=False, description=desc)
                if thumb is not None and spec.associated:
                    label = _label_image(spec)
                    tw.write(label, photometric="rgb", compression="lzw", metadata=None, software=False, subfiletype=1,
                             description=f"Aperio Image Library v12.0.0\r\nlabel {label.shape[1]}x{label.shape[0]}")
                    macro = _macro_image(spec, thumb)
                    tw.write(macro, photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                             metadata=None, software=False, subfiletype=9,
                             description=f"Aperio Image Library v12.0.0\r\nmacro {macro.shape[1]}x{macro.shape[0]}")
            if spec.mpp is None:
                _strip_resolution_tags(tmp)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    logger.debug("wrote synthetic slide %s (%dx%d px, %d levels)", path, spec.width, spec.height, len(dims))
    return SyntheticSlide(path=path, spec=replace(spec), geometry=geometry)



def truncate_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], keep_fraction: float) -> Path:
    """Copy the first ``keep_fraction`` (0–1) of ``src``'s bytes to ``dst`` (a truncated file).

    Returns:
        ``dst`` as a Path.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputNotFoundError(f"truncate_copy source {src} does not exist")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ConfigError(f"truncate_copy keep_fraction={keep_fraction} must be in 0–1")
    keep = int(src.stat().st_size * keep_fraction)
    with src.open("rb") as fi, dst.open("wb") as fo:
        remaining = keep
        while remaining > 0:
            buf = fi.read(min(remaining, 1 << 22))
            if not buf:
                break
            fo.write(buf)
            remaining -= len(buf)
    return dst

