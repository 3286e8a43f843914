"""Cutting one slide into tissue tiles at an exact resolution and writing its store.

The pipeline for one slide: open → resolve mpp → thumbnail → tissue mask → grid of
tiles with their tissue fraction → large reads aligned to the source tiles → antialiased
resampling of each tile to the exact target size → JPEG encoding → chunked writes into a
partial store → QC picture → atomic rename. Reading, resampling and encoding run in a
thread pool (OpenSlide, Pillow and imagecodecs release the GIL); memory is bounded by the
number of regions in flight, not by the slide size.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, cpu_count, ensure_dir, inside, json_sha256, path_lock, remove_dead_partials, write_error
from ..errors import MppError, NoTissueError, StoreError, StoreExistsError, WsiConvnextError
from ..inputs import SlideSpec, check_slide_id, slide_stem
from ..outcome import Outcome, attempt
from ..params import (
    ParameterError, at_least, between, check_params, fraction, non_negative, one_of, param, positive, positive_finite,
)  # fmt: skip
from ..store import (
    STORE_SUFFIX,
    TILE_CODECS,
    TILES_PER_CHUNK,
    TileStoreWriter,
    encode_tile,
    is_store_dir,
    open_store,
)
from ..slide.fingerprint import FINGERPRINT_MODES, slide_fingerprint
from .grid import Region, TileGrid, group_regions, plan_grid, tile_box
from .tissue import TissueParams

logger = logging.getLogger(__name__)

#: Longest side of the stored thumbnail / QC picture, in pixels: at most MAX, and at least
#: MIN where the slide is that large (see :func:`_thumbnail_size`).
THUMBNAIL_MAX_SIZE = 2048
THUMBNAIL_MIN_SIZE = 1024

ProgressFn = Callable[[int, int], None]

#: OS errors that mean "the output cannot be written" (reported as one line naming the path).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)


def _backends() -> list[str]:
    from ..slide import available_backends

    return ["auto", *available_backends()]


@dataclass(frozen=True)
class TileParams:
    """How to tile a slide; validated on construction (:class:`~wsi_convnext.params.ParameterError`).

    Attributes:
        mpp: Target resolution of the tiles, µm/px.
        tile_size: Tile side in output pixels.
        overlap: Overlap of neighbouring tiles, in output pixels.
        min_tissue: Keep tiles whose tissue fraction is at least this (0–1).
        encoding: Tile codec, ``"jpeg"`` (lossy, default) or ``"png"`` (lossless).
        quality: JPEG quality (1–100).
        allow_upsample: Allow a target finer than the scan (tiles are then upsampled).
        backend: Slide reader backend (``"auto"``, ``"openslide"``, ``"tiffslide"``).
        tissue: Tissue-detection parameters.
        workers: Parallel readers (threads, or processes for large slides); None means all cores.
        region_size: Side of one aligned read, in read-level pixels.
        fingerprint: How the slide file is fingerprinted for change detection, one of
            :data:`~wsi_convnext.slide.FINGERPRINT_MODES` (``quick`` by default).
    """

    mpp: float = param(0.5, check=positive_finite, doc="target resolution of the tiles in µm/px")
    tile_size: int = param(224, check=at_least(8), doc="tile edge in pixels at the target mpp")
    overlap: int = param(0, check=non_negative, doc="overlap of neighbouring tiles in target pixels")
    min_tissue: float = param(0.25, check=fraction, doc="minimum tissue fraction of a kept tile")
    encoding: str = param("jpeg", check=one_of(sorted(TILE_CODECS)), doc="tile codec: jpeg (lossy) or png (lossless)")
    quality: int = param(90, check=between(1, 100), doc="JPEG quality of stored tiles")
    allow_upsample: bool = param(False, doc="allow a target mpp finer than the slide's")
    backend: str = param("auto", check=one_of(_backends), doc="slide reader: auto or a registered backend")
    tissue: TissueParams = param(default_factory=TissueParams, doc="TissueParams keyword arguments")
    workers: int | None = param(
        None, check=at_least(1, " (leave it out for all cores)"), doc="read/resample/encode threads per slide"
    )
    region_size: int = param(2048, check=positive, doc="side of one aligned read in read-level pixels")
    fingerprint: str = param(
        "quick", check=one_of(FINGERPRINT_MODES),
        doc="slide change detection: quick (size + first/last MiB) or full (every byte)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_params(self)
        if self.overlap >= self.tile_size:
            raise ParameterError("overlap", f"must be in [0, tile size {self.tile_size})", self.overlap)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TileParams:
        """Build from keyword arguments, ignoring those that are None (library defaults win).

        Raises:
            ParameterError: A value out of range (see each field's check).
        """
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def signature(self, slide_mpp: float) -> dict[str, Any]:
        """The parameters that determine a store's content (compared on re-runs)."""
        return {
            "target_mpp": float(self.mpp),
            "tile_size": int(self.tile_size),
            "overlap": int(self.overlap),
            "min_tissue": float(self.min_tissue),
            "encoding": self.encoding,
            "quality": int(self.quality) if self.encoding == "jpeg" else None,
            "allow_upsample": bool(self.allow_upsample),
            "slide_mpp": round(float(slide_mpp), 6),
            "tissue": self.tissue.to_dict(),
        }


@dataclass(frozen=True)
class TileResult(Outcome):
    """Outcome of tiling one slide (``status``, ``error_type``, ``error``, ``seconds``: :class:`~.outcome.Outcome`).

    Attributes:
        slide_id: The slide identifier.
        store_path: The store folder.
        n_tiles: Number of tiles in the store.
        skipped: True when an identical finished store already existed.
        slide_mpp: Level-0 resolution used, µm/px.
        qc_path: The QC picture, if written.
        path: The slide file.
    """

    slide_id: str
    store_path: Path
    n_tiles: int = 0
    skipped: bool = False
    slide_mpp: float | None = None
    qc_path: Path | None = None
    path: Path | None = None


def _existing_store(
    final: Path, signature: dict[str, Any], path: Path, fingerprints: dict[str, str], mode: str, overwrite: bool
) -> Any | None:
    """The finished store to reuse, None to (re)build, or raise when a rerun conflicts.

    ``fingerprints`` caches the slide's fingerprint by mode (filled on demand): a store is
    compared in the mode it was written with.
    """
    if not (final.exists() or final.is_symlink()):
        return None
    if not is_store_dir(final):
        raise StoreExistsError(
            f"{final}: exists and is not a wsi-convnext store; --overwrite only replaces stores, "
            "so move it away or choose another --out"
        )
    try:
        store = open_store(final)
    except StoreError as exc:
        if overwrite:
            return None
        raise StoreExistsError(f"{final}: exists but is not a usable store ({exc}); pass --overwrite to replace it") from exc
    source = store.attrs.get("source", {}) or {}
    stored_mode = source.get("fingerprint_mode", "quick")
    old_path = source.get("path")
    moved = bool(old_path) and Path(old_path) != path.resolve()
    if moved or not overwrite:
        if stored_mode not in fingerprints:
            fingerprints[stored_mode] = slide_fingerprint(path, stored_mode)
    same_file = source.get("fingerprint") == fingerprints.get(stored_mode)
    if moved and not same_file:
        # Even --overwrite never gives a store (and its id, which labels name) to another file.
        raise StoreExistsError(
            f"{final}: slide id {store.slide_id!r} already names a store tiled from {old_path}, not from {path}: "
            "a slide id collision (--overwrite never gives an id to another file); give one of them another "
            "slide_id in a manifest, or use another --out"
        )
    if overwrite:
        return None
    old_sig = store.attrs.get("tiling_params", {})
    if old_sig == signature and same_file:
        if mode == "full" and stored_mode != "full":
            logger.warning("%s: store was fingerprinted %s; pass --overwrite to re-tile with --fingerprint full", final, stored_mode)
        return store
    diff = sorted(k for k in set(old_sig) | set(signature) if old_sig.get(k) != signature.get(k))
    what = f"parameters differ ({', '.join(diff)})" if diff else "the slide file changed"
    raise StoreExistsError(f"{final}: already tiled but {what}; pass --overwrite to re-tile")


#: Extensions of TIFF-based formats whose pixels tiffslide decodes like OpenSlide does.
_TIFF_FAMILY = (".svs", ".tif", ".tiff")


@contextmanager
def _pixel_reader(reader: Any, params: TileParams) -> Iterator[Any]:
    """The reader to decode pixels with: ``reader`` itself, or tiffslide for TIFF-family files.

    With ``backend="auto"`` OpenSlide opens the slide and supplies the metadata, but for
    SVS/TIFF files whose pyramid tiffslide sees identically, region reads go through
    tiffslide (tifffile + libjpeg-turbo via imagecodecs), which decoded large regions about
    4× faster than OpenSlide here (see BENCHMARKS.md). An explicit backend is always honoured.
    """
    from ..errors import SlideOpenError
    from ..slide import open_slide

    fast = None
    if params.backend == "auto" and reader.backend != "tiffslide" and reader.path.suffix.lower() in _TIFF_FAMILY:
        try:
            fast = open_slide(reader.path, backend="tiffslide")
        except SlideOpenError:
            fast = None
        if fast is not None and (
            tuple(fast.level_dimensions) != tuple(reader.level_dimensions)
            or not np.allclose(fast.level_downsamples, reader.level_downsamples, rtol=1e-3)
        ):
            fast.close()
            fast = None
    try:
        yield fast or reader
    finally:
        if fast is not None:
            fast.close()


def _thumbnail_size(level_dimensions: Sequence[tuple[int, int]]) -> int:
    """Long side of the thumbnail: from the coarsest level of at least THUMBNAIL_MIN_SIZE px.

    Readers never upsample, so asking for more pixels than that level has would decode a
    much finer level (on a gigapixel slide, level 0) for little gain.
    """
    sides = sorted(max(w, h) for w, h in level_dimensions)
    usable = [s for s in sides if s >= THUMBNAIL_MIN_SIZE]
    return min(THUMBNAIL_MAX_SIZE, usable[0] if usable else sides[-1])


def _thumbnail_and_mask(reader: Any, slide_mpp: float, tissue: TissueParams) -> tuple[np.ndarray, float, Any, float]:
    """Thumbnail, its downsample, the :class:`~wsi_convnext.tiling.tissue.TissueReport` and the mask's downsample."""
    from PIL import Image

    from .tissue import explain_tissue

    width, height = reader.dimensions
    thumb = reader.thumbnail(_thumbnail_size(reader.level_dimensions))
    thumb_ds = width / thumb.shape[1]
    mask_ds = max(thumb_ds, tissue.mask_mpp / slide_mpp)
    if mask_ds > thumb_ds * 1.01:
        mw = max(1, round(width / mask_ds))
        mh = max(1, round(height / mask_ds))
        small = np.asarray(Image.fromarray(thumb).resize((mw, mh), Image.Resampling.BILINEAR))
        mask_ds = width / mw
    else:
        small, mask_ds = thumb, thumb_ds
    report = explain_tissue(small, mask_ds * slide_mpp, tissue)
    return thumb, thumb_ds, report, mask_ds


def _no_tissue(
    path: Path, n_grid: int, frac: np.ndarray, params: TileParams, report: Any, qc_path: Path
) -> NoTissueError:  # fmt: skip
    """A NoTissueError saying what the mask saw and which option would change the outcome."""
    best = float(frac.max()) if frac.size else 0.0
    change = report.suggestion()
    if change:
        hint = "pass " + " ".join(f"--tissue {k}={_option_value(v)}" for k, v in change.items()) + " to keep it"
    elif best > 0:
        hint = f"lower --min-tissue to {best:.2g} or below"
    else:
        hint = "if the slide has faint tissue, lower the thresholds named above with --tissue key=value"
    err = NoTissueError(
        f"{path}: no tissue found: 0 of {n_grid} tiles reach --min-tissue {params.min_tissue:g} "
        f"(largest tile fraction {best:.3f}); the tissue mask {report.describe()}; {hint}; QC picture: {qc_path}"
    )
    err.qc_path = qc_path  # type: ignore[attr-defined]
    return err


def _option_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class _RegionJob:
    """One aligned read and the tiles to cut from it (picklable, for worker processes).

    Attributes:
        location: Level-0 (x, y) of the read.
        level: Pyramid level read.
        size: (width, height) of the read in level pixels.
        boxes: Float (left, top, right, bottom) of each tile within the read, level pixels.
        tile_size, encoding, quality: Output tile side and codec.
    """

    location: tuple[int, int]
    level: int
    size: tuple[int, int]
    boxes: tuple[tuple[float, float, float, float], ...]
    tile_size: int
    encoding: str
    quality: int

    @classmethod
    def of(cls, grid: TileGrid, region: Region, params: TileParams) -> _RegionJob:
        return cls(
            location=(region.x0, region.y0), level=grid.read_level, size=(region.width, region.height),
            boxes=tuple(tile_box(grid, int(i), region) for i in region.tiles), tile_size=grid.tile_size,
            encoding=params.encoding, quality=params.quality,
        )  # fmt: skip


def _cut_region(reader: Any, job: _RegionJob) -> list[bytes]:
    from PIL import Image

    from .jpeg_scaled import read_region_scaled

    # JPEG levels shrunk by >= 2 decode at 1/2-1/8 in the DCT domain; the resampler finishes.
    scaled = read_region_scaled(reader, job.location, job.level, job.size, job.boxes, job.tile_size)
    if scaled is not None:
        image, boxes = scaled
    else:
        image, boxes = Image.fromarray(reader.read_region(job.location, job.level, job.size)), job.boxes
    return [encode_tile(resample_tile(image, box, job.tile_size), job.encoding, job.quality) for box in boxes]


def resample_tile(image: Any, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Resample the float ``box`` (read-level pixels) of a PIL image to a ``size``-px RGB tile.

    When the box lies on whole pixels and shrinks by a whole factor k (e.g. a 0.25 µm/px
    scan tiled at 0.5), the tile is the exact k×k area average. Otherwise Pillow's bilinear
    resize is used, which is antialiased when downscaling (its kernel support grows with the
    scale factor) and honours the fractional box, so the tile covers exactly the requested area.
    """
    from PIL import Image

    left, top, right, bottom = box
    k = (right - left) / size
    ik = round(k)
    whole = all(abs(v - round(v)) < 1e-6 for v in box)
    if whole and ik >= 1 and abs(k - ik) < 1e-9 and abs((bottom - top) / size - ik) < 1e-9:
        crop = image.crop((round(left), round(top), round(right), round(bottom)))
        return np.asarray(crop.reduce(ik) if ik > 1 else crop)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None))


def _ordered_map(executor: Any, fn: Callable[[_RegionJob], list[bytes]], items: Sequence[_RegionJob], ahead: int) -> Iterator[list[bytes]]:
    """Like ``executor.map`` but with at most ``ahead`` items in flight (bounded memory)."""
    pending: deque[Future[list[bytes]]] = deque()
    it = iter(items)
    for item in it:
        pending.append(executor.submit(fn, item))
        if len(pending) >= ahead:
            break
    try:
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(executor.submit(fn, nxt))
            yield result
    finally:
        for f in pending:
            f.cancel()


def tile_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: TileParams | None = None,
    *,
    slide_id: str | None = None,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    wait: bool = True,
) -> TileResult:
    """Tile one slide into ``out_dir/<slide_id>.zarr`` and write ``out_dir/qc/<slide_id>.png``.

    The store is written under a per-slide lock (:func:`~wsi_convnext._io.path_lock`): a
    second run on the same slide and ``out_dir`` waits for the first (logging that it
    waits) and then finds the finished store.

    Args:
        path: The slide file.
        out_dir: Output folder.
        params: Tiling parameters (defaults: 224 px at 0.5 µm/px).
        slide_id: Store name; defaults to the file stem. Must follow the slide-id policy
            (:func:`~wsi_convnext.inputs.check_slide_id`).
        slide_mpp: Level-0 resolution override, µm/px (wins over the metadata).
        overwrite: Replace an existing store built with other parameters (only ever a
            wsi-convnext store inside ``out_dir``).
        progress: Called as ``progress(tiles_done, tiles_total)``.
        wait: Wait for another process tiling the same slide; False fails at once with
            :class:`~wsi_convnext.errors.BusyError`.

    Returns:
        The result; ``skipped`` is True when an identical store already existed.

    Raises:
        WsiConvnextError: Any failure (missing/corrupt slide, no mpp, no tissue, read errors,
            full disk). Nothing is left at the final store path in that case.
    """
    from ..outputs.qc import render_tiling_qc, save_png, write_failed_qc, write_tiling_qc
    from ..slide import open_slide, resolve_mpp

    t0 = time.perf_counter()
    params = params or TileParams()
    path = Path(path)
    out_dir = Path(out_dir)
    slide_id = check_slide_id(slide_id, "slide_id") if slide_id is not None else slide_stem(path)
    final = inside(out_dir, f"{slide_id}{STORE_SUFFIX}")
    qc_path = inside(out_dir, "qc", f"{slide_id}.png")
    ensure_dir(out_dir)

    with ExitStack() as stack:
        stack.enter_context(path_lock(final, wait=wait))
        reader = stack.enter_context(open_slide(path, backend=params.backend, slide_mpp=slide_mpp))
        pixels = stack.enter_context(_pixel_reader(reader, params))
        try:
            mpp, mpp_source = resolve_mpp(reader)
        except MppError as exc:  # the slide opened: still show what it looks like
            qc = write_failed_qc(qc_path, pixels, slide_id, "no usable µm/px")
            if qc is None:
                raise
            err = MppError(f"{exc}; QC picture: {qc}")
            err.qc_path = qc  # type: ignore[attr-defined]
            raise err from exc
        fingerprints: dict[str, str] = {}
        signature = params.signature(mpp)
        existing = _existing_store(final, signature, path, fingerprints, params.fingerprint, overwrite)
        if existing is not None:
            logger.info("%s: already tiled with the same parameters, skipping", slide_id)
            return TileResult(
                slide_id=slide_id, store_path=final, n_tiles=len(existing), seconds=time.perf_counter() - t0,
                skipped=True, slide_mpp=mpp, qc_path=qc_path if qc_path.exists() else None, status="skipped", path=path,
            )  # fmt: skip
        if params.fingerprint not in fingerprints:
            fingerprints[params.fingerprint] = slide_fingerprint(path, params.fingerprint)
        fp = fingerprints[params.fingerprint]
        remove_dead_partials(final)

        try:
            grid = plan_grid(
                reader.dimensions, reader.level_downsamples, slide_mpp=mpp, target_mpp=params.mpp,
                tile_size=params.tile_size, overlap=params.overlap, allow_upsample=params.allow_upsample,
            )  # fmt: skip
        except MppError as exc:
            hint = "" if params.allow_upsample else "; choose a coarser --mpp or pass --allow-upsample"
            raise MppError(f"{path}: {exc}{hint}") from exc
        workers = params.workers or cpu_count()
        pool, cut = stack.enter_context(_tile_pool(pixels, len(grid), workers))
        thumb, thumb_ds, report, mask_ds = _thumbnail_and_mask(pixels, mpp, params.tissue)
        mask = report.mask
        if len(grid) == 0:
            w, h = reader.dimensions
            qc = write_tiling_qc(qc_path, thumb, thumb_ds, mask, grid, slide_id, np.zeros(0), report.removed,
                           failed="smaller than one tile")  # fmt: skip
            err = NoTissueError(
                f"{path}: slide ({w}×{h} px) is smaller than one {params.tile_size}-px tile at {params.mpp:g} µm/px; "
                f"QC picture: {qc}"
            )
            err.qc_path = qc  # type: ignore[attr-defined]
            raise err
        from .tissue import tile_tissue_fraction

        frac = tile_tissue_fraction(mask, mask_ds, grid.coords, grid.extent0)
        keep = frac >= params.min_tissue
        if not keep.any():
            qc = write_tiling_qc(qc_path, thumb, thumb_ds, mask, grid.select(keep), slide_id, frac[keep], report.removed,
                           failed="no tissue found")  # fmt: skip
            raise _no_tissue(path, len(grid), frac, params, report, qc)
        grid = grid.select(keep)
        frac = frac[keep]
        level_size = reader.level_dimensions[grid.read_level]
        tile_sizes = getattr(reader, "level_tile_sizes", None)
        source_tile = tile_sizes[grid.read_level] if tile_sizes else None
        regions = group_regions(grid, level_size, region_size=params.region_size, source_tile=source_tile)
        # Store order = region order, so tiles stream into whole chunks as regions complete.
        order = np.concatenate([r.tiles for r in regions])
        remap = np.empty(len(grid), dtype=np.int64)
        remap[order] = np.arange(len(grid))
        grid = grid.select(order)
        frac = frac[order]
        jobs = [
            _RegionJob.of(grid, Region(x0=r.x0, y0=r.y0, width=r.width, height=r.height, tiles=remap[r.tiles]), params)
            for r in regions
        ]

        writer: TileStoreWriter | None = None
        try:
            writer = TileStoreWriter(final, len(grid), params.tile_size, params.encoding)
            _write_tiles(pool, cut, jobs, workers, writer, progress)
            qc_image = render_tiling_qc(thumb, thumb_ds, mask, grid, slide_id, frac, report.removed)
            attrs = {
                "slide_id": slide_id,
                "source": {
                    "path": str(path.resolve()),
                    "size_bytes": path.stat().st_size if path.is_file() else None,
                    "fingerprint": fp,
                    "fingerprint_mode": params.fingerprint,
                    "backend": reader.backend,
                    "pixel_backend": pixels.backend,
                    "vendor": reader.vendor,
                    "dimensions": list(reader.dimensions),
                    "level_downsamples": list(reader.level_downsamples),
                    "objective_power": reader.objective_power,
                },
                "slide_mpp": mpp,
                "slide_mpp_source": mpp_source,
                "target_mpp": params.mpp,
                "overlap": params.overlap,
                "extent0": grid.extent0,
                "stride0": grid.stride0,
                "read_level": grid.read_level,
                "read_downsample": grid.read_downsample,
                "min_tissue": params.min_tissue,
                "jpeg_quality": params.quality if params.encoding == "jpeg" else None,
                "tissue": params.tissue.to_dict(),
                "thumbnail_downsample": thumb_ds,
                "mask_downsample": mask_ds,
                "grid_tiles": int(keep.size),
                "tiling_params": signature,
                "params_hash": json_sha256({"params": signature, "fingerprint": fp}, 16),
            }
            # The QC picture and the store appear together: a failed commit leaves neither.
            with atomic_path(qc_path) as qc_tmp:

                save_png(qc_tmp, qc_image)
                writer.commit(
                    coords=grid.coords, tissue_fraction=frac, thumbnail=thumb, tissue_mask=mask,
                    attrs=attrs, overwrite=overwrite,
                )  # fmt: skip
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            if isinstance(exc, OSError) and not isinstance(exc, WsiConvnextError) and exc.errno in _WRITE_ERRNOS:
                raise write_error(final, exc) from exc
            raise
    seconds = time.perf_counter() - t0
    logger.info("%s: %d tiles in %.1f s", slide_id, len(grid), seconds)
    return TileResult(
        slide_id=slide_id, store_path=final, n_tiles=len(grid), seconds=seconds, slide_mpp=mpp,
        qc_path=qc_path, path=path,
    )  # fmt: skip


#: Slides whose grid has at least this many tiles are cut in worker processes rather than threads.
PROCESS_MIN_TILES = 400

# The slide reader of a tiling worker process.
_WORKER_READER: Any = None


def _init_worker(path: str, backend: str, backend_ref: str) -> None:
    global _WORKER_READER
    from ..slide import ensure_backend, open_slide

    # A spawned worker starts from a fresh interpreter: re-register a user's backend there.
    ensure_backend(backend, backend_ref)
    _WORKER_READER = open_slide(path, backend=backend)


def _cut_region_in_worker(job: _RegionJob) -> list[bytes]:
    return _cut_region(_WORKER_READER, job)


def _ready() -> None:
    """No-op task that makes a worker process start (and open its slide) ahead of the first read."""


@contextmanager
def _tile_pool(reader: Any, n_tiles: int, workers: int) -> Iterator[tuple[Any, Callable[[_RegionJob], list[bytes]]]]:
    """A pool and the function it maps over region jobs.

    Decoding through tiffslide runs its zarr reads on one event-loop thread and Python code
    holds the GIL in between, so threads barely scale. Large slides are therefore cut in
    worker processes, each with its own reader, started early so that their start-up overlaps
    tissue detection. Threads remain for small slides (start-up would dominate), one worker,
    and daemonic processes (e.g. Dask workers), which may not start children.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from .._proc import child_initializer
    from ..slide import backend_reference

    if workers > 1 and n_tiles >= PROCESS_MIN_TILES and not multiprocessing.current_process().daemon:
        pool: Any = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            # Workers die with this process (a killed `tile` leaves no orphans, nor resource_tracker).
            initializer=child_initializer,
            initargs=(
                os.getpid(), f"{__name__}:_init_worker",
                (str(reader.path), reader.backend, backend_reference(reader.backend)),
            ),
        )  # fmt: skip
        for _ in range(workers):
            pool.submit(_ready)
        fn: Callable[[_RegionJob], list[bytes]] = _cut_region_in_worker
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile")
        fn = lambda job: _cut_region(reader, job)  # noqa: E731
    try:
        yield pool, fn
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_tiles(
    pool: Any, fn: Callable[[_RegionJob], list[bytes]], jobs: list[_RegionJob], workers: int,
    writer: TileStoreWriter, progress: ProgressFn | None,
) -> None:  # fmt: skip
    buffer: list[bytes] = []
    done = 0
    total = sum(len(j.boxes) for j in jobs)
    for encoded in _ordered_map(pool, fn, jobs, ahead=2 * workers):
        buffer.extend(encoded)
        done += len(encoded)
        while len(buffer) >= TILES_PER_CHUNK:
            writer.write_tiles(buffer[:TILES_PER_CHUNK])
            del buffer[:TILES_PER_CHUNK]
        if progress is not None:
            progress(done, total)
    writer.write_tiles(buffer)


def tile_slides(
    slides: Sequence[SlideSpec],
    out_dir: str | os.PathLike[str],
    params: TileParams | None = None,
    *,
    overwrite: bool = False,
    on_result: Callable[[TileResult], None] | None = None,
    progress: ProgressFn | None = None,
) -> list[TileResult]:
    """Tile several slides one after the other; a failing slide is recorded and the rest continue.

    Each slide uses ``params.workers`` parallel readers. ``on_result`` is called after each slide
    (e.g. to update a manifest); ``progress`` receives per-slide tile progress.
    """
    params = params or TileParams()
    ensure_dir(out_dir)
    results: list[TileResult] = []
    for spec in slides:
        # One bad slide must never stop the others.
        run = attempt(
            tile_slide, spec.path, out_dir, params, slide_id=spec.slide_id, slide_mpp=spec.slide_mpp,
            overwrite=overwrite, progress=progress, what=str(spec.path),
        )  # fmt: skip
        result = run.value if run.value is not None else TileResult(
            slide_id=spec.slide_id, store_path=Path(out_dir) / f"{spec.slide_id}{STORE_SUFFIX}",
            path=spec.path, qc_path=getattr(run.exception, "qc_path", None), **(run.failure or {}),
        )  # fmt: skip
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
