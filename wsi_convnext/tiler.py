"""Cutting one slide into tissue tiles at an exact resolution and writing its store.

The pipeline for one slide: open → resolve mpp → thumbnail → tissue mask → grid of
tiles with their tissue fraction → large reads aligned to the source tiles → antialiased
resampling of each tile to the exact target size → JPEG encoding → chunked writes into a
partial store → QC picture → atomic rename. Reading, resampling and encoding run in a
thread pool (OpenSlide, Pillow and imagecodecs release the GIL); memory is bounded by the
number of regions in flight, not by the slide size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import cpu_count
from .errors import NoTissueError, StoreError, StoreExistsError, WsiConvnextError, one_line
from .inputs import SlideSpec, slide_stem
from .store import (
    STORE_SUFFIX,
    TILES_PER_CHUNK,
    TileStoreWriter,
    encode_tile,
    open_store,
    remove_partials,
)
from .tiling import Region, TileGrid, group_regions, plan_grid, tile_box
from .tissue import TissueParams

logger = logging.getLogger(__name__)

#: Longest side of the stored thumbnail / QC picture, in pixels: at most MAX, and at least
#: MIN where the slide is that large (see :func:`_thumbnail_size`).
THUMBNAIL_MAX_SIZE = 2048
THUMBNAIL_MIN_SIZE = 1024
#: Longest side of the QC picture, in pixels.
QC_MAX_SIZE = 1280

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TileParams:
    """How to tile a slide.

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
    """

    mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.25
    encoding: str = "jpeg"
    quality: int = 90
    allow_upsample: bool = False
    backend: str = "auto"
    tissue: TissueParams = field(default_factory=TissueParams)
    workers: int | None = None
    region_size: int = 2048

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TileParams:
        """Build from keyword arguments, ignoring those that are None (library defaults win)."""
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def validate(self) -> None:
        """Raise :class:`ValueError` subclasses for out-of-range values."""
        from .errors import ConfigError

        if not self.mpp > 0:
            raise ConfigError(f"--mpp must be positive, got {self.mpp}")
        if self.tile_size < 8:
            raise ConfigError(f"--tile-size must be at least 8, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(f"--overlap must be in [0, tile size), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality must be in [1, 100], got {self.quality}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1 (leave it out for all cores), got {self.workers}")
        from .slide import available_backends
        from .store import TILE_CODECS

        if self.backend != "auto" and self.backend not in available_backends():
            raise ConfigError(
                f"unknown slide backend {self.backend!r} (--backend); choose one of: auto, {', '.join(available_backends())}"
            )

        if self.encoding not in TILE_CODECS:
            raise ConfigError(f"unknown tile encoding {self.encoding!r}; choose one of {sorted(TILE_CODECS)}")

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


@dataclass
class TileResult:
    """Outcome of tiling one slide.

    Attributes:
        slide_id: The slide identifier.
        store_path: The store folder.
        n_tiles: Number of tiles in the store.
        seconds: Wall time.
        skipped: True when an identical finished store already existed.
        slide_mpp: Level-0 resolution used, µm/px.
        qc_path: The QC picture, if written.
        status: ``"done"``, ``"skipped"`` or ``"failed"`` (only from :func:`tile_slides`).
        error_type: Exception class name when failed.
        error: One-line error message when failed.
        path: The slide file.
    """

    slide_id: str
    store_path: Path
    n_tiles: int = 0
    seconds: float = 0.0
    skipped: bool = False
    slide_mpp: float | None = None
    qc_path: Path | None = None
    status: str = "done"
    error_type: str | None = None
    error: str | None = None
    path: Path | None = None


def _params_hash(signature: dict[str, Any], fingerprint: str) -> str:
    blob = json.dumps({"params": signature, "fingerprint": fingerprint}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _existing_store(final: Path, signature: dict[str, Any], fingerprint: str, overwrite: bool) -> Any | None:
    """The finished store to reuse, None to (re)build, or raise when a rerun conflicts."""
    if not final.exists():
        return None
    try:
        store = open_store(final)
    except StoreError as exc:
        if overwrite:
            return None
        raise StoreExistsError(f"{final}: exists but is not a usable store ({exc}); pass --overwrite to replace it") from exc
    if overwrite:
        return None
    old_sig = store.attrs.get("tiling_params", {})
    if old_sig == signature and store.attrs.get("source", {}).get("fingerprint") == fingerprint:
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
    from .errors import SlideOpenError
    from .slide import open_slide

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


def _thumbnail_and_mask(reader: Any, slide_mpp: float, tissue: TissueParams) -> tuple[np.ndarray, float, np.ndarray, float]:
    from PIL import Image

    from .tissue import detect_tissue

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
    mask = detect_tissue(small, mask_ds * slide_mpp, tissue)
    return thumb, thumb_ds, mask, mask_ds


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

    image = Image.fromarray(reader.read_region(job.location, job.level, job.size))
    return [encode_tile(resample_tile(image, box, job.tile_size), job.encoding, job.quality) for box in job.boxes]


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
) -> TileResult:
    """Tile one slide into ``out_dir/<slide_id>.zarr`` and write ``out_dir/qc/<slide_id>.png``.

    Args:
        path: The slide file.
        out_dir: Output folder.
        params: Tiling parameters (defaults: 224 px at 0.5 µm/px).
        slide_id: Store name; defaults to the file stem.
        slide_mpp: Level-0 resolution override, µm/px (wins over the metadata).
        overwrite: Replace an existing store built with other parameters.
        progress: Called as ``progress(tiles_done, tiles_total)``.

    Returns:
        The result; ``skipped`` is True when an identical store already existed.

    Raises:
        WsiConvnextError: Any failure (missing/corrupt slide, no mpp, no tissue, read errors).
            Nothing is left at the final store path in that case.
    """
    from .slide import fingerprint, open_slide, resolve_mpp

    t0 = time.perf_counter()
    params = params or TileParams()
    params.validate()
    path = Path(path)
    out_dir = Path(out_dir)
    slide_id = slide_id or slide_stem(path)
    final = out_dir / f"{slide_id}{STORE_SUFFIX}"
    qc_path = out_dir / "qc" / f"{slide_id}.png"

    with ExitStack() as stack:
        reader = stack.enter_context(open_slide(path, backend=params.backend))
        pixels = stack.enter_context(_pixel_reader(reader, params))
        mpp, mpp_source = resolve_mpp(reader, slide_mpp)
        fp = fingerprint(path)
        signature = params.signature(mpp)
        existing = _existing_store(final, signature, fp, overwrite)
        if existing is not None:
            logger.info("%s: already tiled with the same parameters, skipping", slide_id)
            return TileResult(
                slide_id=slide_id, store_path=final, n_tiles=len(existing), seconds=time.perf_counter() - t0,
                skipped=True, slide_mpp=mpp, qc_path=qc_path if qc_path.exists() else None, status="skipped", path=path,
            )  # fmt: skip
        remove_partials(final)

        grid = plan_grid(
            reader.dimensions, reader.level_downsamples, mpp, params.mpp, params.tile_size,
            overlap=params.overlap, allow_upsample=params.allow_upsample,
        )  # fmt: skip
        workers = params.workers or cpu_count()
        pool, cut = stack.enter_context(_tile_pool(pixels, len(grid), workers))
        thumb, thumb_ds, mask, mask_ds = _thumbnail_and_mask(pixels, mpp, params.tissue)
        if len(grid) == 0:
            w, h = reader.dimensions
            raise NoTissueError(
                f"{path}: slide ({w}×{h} px) is smaller than one {params.tile_size}-px tile at {params.mpp:g} µm/px"
            )
        from .tissue import tile_tissue_fraction

        frac = tile_tissue_fraction(mask, mask_ds, grid.coords, grid.extent0)
        keep = frac >= params.min_tissue
        if not keep.any():
            raise NoTissueError(
                f"{path}: no tissue found (0 of {len(grid)} tiles reach {params.min_tissue:g} tissue); "
                "check the QC thumbnail or lower --min-tissue"
            )
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

        writer = TileStoreWriter(final, len(grid), params.tile_size, params.encoding)
        try:
            _write_tiles(pool, cut, jobs, workers, writer, progress)
            qc_path = _write_qc(qc_path, thumb, thumb_ds, mask, grid, slide_id, frac)
            attrs = {
                "slide_id": slide_id,
                "source": {
                    "path": str(path.resolve()),
                    "size_bytes": path.stat().st_size if path.is_file() else None,
                    "fingerprint": fp,
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
                "params_hash": _params_hash(signature, fp),
            }
            writer.commit(
                coords=grid.coords, tissue_fraction=frac, thumbnail=thumb, tissue_mask=mask,
                attrs=attrs, overwrite=overwrite,
            )  # fmt: skip
        except BaseException:
            writer.abort()
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


def _init_worker(path: str, backend: str) -> None:
    global _WORKER_READER
    from .slide import open_slide

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

    from ._proc import child_initializer

    if workers > 1 and n_tiles >= PROCESS_MIN_TILES and not multiprocessing.current_process().daemon:
        pool: Any = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            # Workers die with this process (a killed `tile` leaves no orphans, nor resource_tracker).
            initializer=child_initializer,
            initargs=(os.getpid(), f"{__name__}:_init_worker", (str(reader.path), reader.backend)),
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


def _write_qc(
    qc_path: Path, thumb: np.ndarray, thumb_ds: float, mask: np.ndarray, grid: TileGrid, slide_id: str,
    frac: np.ndarray,
) -> Path:  # fmt: skip
    from PIL import Image

    from .outputs.qc import render_qc, save_png

    scale = QC_MAX_SIZE / max(thumb.shape[:2])
    if scale < 1:
        size = (max(1, round(thumb.shape[1] * scale)), max(1, round(thumb.shape[0] * scale)))
        thumb_ds *= thumb.shape[1] / size[0]
        thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BILINEAR))
    title = f"{slide_id}: {len(grid)} tiles, {grid.tile_size}px @ {grid.target_mpp:g} µm/px"
    image = render_qc(thumb, thumb_ds, mask, grid.coords, grid.extent0, tissue_fraction=frac, title=title)
    qc_path.parent.mkdir(parents=True, exist_ok=True)
    save_png(qc_path, image)
    return qc_path


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
    params.validate()
    results: list[TileResult] = []
    for spec in slides:
        t0 = time.perf_counter()
        try:
            result = tile_slide(
                spec.path, out_dir, params, slide_id=spec.slide_id, slide_mpp=spec.mpp,
                overwrite=overwrite, progress=progress,
            )  # fmt: skip
        except Exception as exc:  # one bad slide must never stop the others
            if isinstance(exc, WsiConvnextError):
                logger.debug("%s failed", spec.path, exc_info=True)
            else:
                logger.warning("%s failed unexpectedly", spec.path, exc_info=True)
            result = TileResult(
                slide_id=spec.slide_id, store_path=Path(out_dir) / f"{spec.slide_id}{STORE_SUFFIX}",
                seconds=time.perf_counter() - t0, status="failed", error_type=type(exc).__name__,
                error=one_line(exc), path=spec.path,
            )  # fmt: skip
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def tile_manifest_row(result: TileResult) -> dict[str, Any]:
    """The ``tile`` stage row of :class:`~wsi_convnext.outputs.manifest.RunManifest` for a result."""
    return {
        "slide_id": result.slide_id,
        "path": str(result.path or ""),
        "stage": "tile",
        "status": result.status,
        "error_type": result.error_type or "",
        "error": result.error or "",
        "tiles": result.n_tiles if result.status != "failed" else None,
        "mpp": result.slide_mpp,
        "seconds": result.seconds,
    }
