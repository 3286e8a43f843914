"""Tile embeddings: tile store → ConvNeXt → ``features/<encoder.key>`` in the same store.

:func:`embed_store` embeds one slide's store with a prebuilt :class:`~wsi_convnext.encoder.Encoder`;
:func:`embed_stores` builds the encoder once and embeds many stores, recording a failing store
and going on with the rest.

The pipeline keeps the device busy: a :class:`TileBatchLoader` reads encoded tiles from zarr
and decodes them (imagecodecs releases the GIL) in background threads, a bounded number of
batches ahead and in store order, while the main thread runs the model. The embeddings are
accumulated in a preallocated (N, D) array and written once, atomically
(:meth:`~wsi_convnext.store.TileStore.write_features`): an interrupted run leaves nothing.

Precision policy (:data:`PRECISIONS`): on CUDA the model runs under autocast (bfloat16 where
supported, else float16) on channels-last tensors fed from pinned memory with non-blocking
copies; on CPU and MPS it runs in float32 with torch's own thread settings. The stored dtype
(``dtype``, :data:`OUTPUT_DTYPES`) is float16 by default.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import cpu_count
from .encoder import DEFAULT_MODEL
from .errors import ConfigError, EncoderError, StoreError, WsiConvnextError, one_line
from .store import STORE_SUFFIX, TILE_CODECS, TileStore, find_stores, open_store

if TYPE_CHECKING:
    import torch

    from .encoder import Encoder
    from .transforms import TileTransform

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DTYPE",
    "OUTPUT_DTYPES",
    "PRECISIONS",
    "EmbedResult",
    "Precision",
    "TileBatchLoader",
    "default_num_workers",
    "embed_store",
    "embed_stores",
    "prepare_forward",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
DEFAULT_DTYPE = "float16"

#: Stored embedding dtypes by name.
OUTPUT_DTYPES: dict[str, np.dtype] = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}

#: Upper bound on decoded tiles held ahead of the model by :class:`TileBatchLoader`, bytes.
PREFETCH_BYTES = 512 << 20

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------- results


@dataclass
class EmbedResult:
    """Outcome of embedding one store.

    Attributes:
        slide_id: The slide identifier.
        store_path: The store folder.
        key: Feature key written (``features/<key>``), None if the encoder was never reached.
        n_tiles: Number of tiles (embedding rows).
        seconds: Wall time.
        skipped: True when ``features/<key>`` already existed and ``overwrite`` was False.
        status: ``"done"``, ``"skipped"`` or ``"failed"`` (``"failed"`` only from :func:`embed_stores`).
        error_type: Exception class name when failed.
        error: One-line error message when failed.
        device: Device the model ran on.
        precision: Compute precision (``float32``, ``bfloat16`` autocast, ``float16`` autocast).
    """

    slide_id: str
    store_path: Path
    key: str | None = None
    n_tiles: int = 0
    seconds: float = 0.0
    skipped: bool = False
    status: str = "done"
    error_type: str | None = None
    error: str | None = None
    device: str | None = None
    precision: str | None = None

    @property
    def tiles_per_second(self) -> float:
        """Throughput of this slide (0 when skipped or failed)."""
        if self.status != "done" or self.seconds <= 0:
            return 0.0
        return self.n_tiles / self.seconds


# --------------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """How the model runs on one device type.

    Attributes:
        name: Compute precision recorded in the feature attrs.
        autocast_dtype: ``torch`` dtype name for autocast, or None for plain float32.
        channels_last: Feed channels-last tensors to a channels-last model.
        pin_memory: Decode tiles into pinned host memory and copy without blocking.
    """

    name: str
    autocast_dtype: str | None
    channels_last: bool
    pin_memory: bool


def _cuda_precision(dev: torch.device, amp: bool) -> Precision:
    import torch

    if not amp:
        return Precision("float32", None, True, True)
    if torch.cuda.is_bf16_supported():
        return Precision("bfloat16", "bfloat16", True, True)
    return Precision("float16", "float16", True, True)


def _fp32_precision(dev: torch.device, amp: bool) -> Precision:
    if amp:
        logger.info("AMP is only used on CUDA; running in float32 on %s", dev)
    return Precision("float32", None, False, False)


#: Precision policy by ``torch.device.type``: ``f(device, amp) -> Precision``.
PRECISIONS: dict[str, Callable[[Any, bool], Precision]] = {
    "cuda": _cuda_precision,
    "cpu": _fp32_precision,
    "mps": _fp32_precision,
}

#: Whether AMP is on when ``amp=None``, by device type.
_AMP_DEFAULT: dict[str, bool] = {"cuda": True}


def _precision(dev: torch.device, amp: bool | None, channels_last: bool | None) -> Precision:
    policy = PRECISIONS.get(dev.type, _fp32_precision)
    p = policy(dev, _AMP_DEFAULT.get(dev.type, False) if amp is None else bool(amp))
    if channels_last is not None and channels_last != p.channels_last:
        p = Precision(p.name, p.autocast_dtype, bool(channels_last), p.pin_memory)
    return p


#: Most decoding threads used by default, by device type. On a GPU, decoding must keep up with
#: thousands of tiles/s; on a CPU the model needs ~10-100x more CPU per tile than decoding, so
#: two threads keep up without competing with torch's own threads.
_MAX_DEFAULT_WORKERS: dict[str, int] = {"cuda": 8, "cpu": 2, "mps": 4}


def default_num_workers(device_type: str = "cpu") -> int:
    """Default number of tile-decoding threads for a device type, bounded by the usable CPU cores."""
    return max(1, min(_MAX_DEFAULT_WORKERS.get(device_type, 2), cpu_count()))


# ------------------------------------------------------------------------------------ loader


class TileBatchLoader:
    """Reads and decodes a store's tiles in batches, in store order, ahead of the consumer.

    Each batch is read from zarr and decoded into one (B, T, T, 3) uint8 tensor by a pool
    thread; at most ``prefetch`` batches are in flight, so memory stays bounded. Use as a
    context manager so that the threads stop when the consumer stops (also on error)::

        with TileBatchLoader(store, 64) as loader:
            for start, stop, tiles in loader:
                ...  # tiles[: stop - start] are tiles start..stop-1

    Args:
        store: The open store.
        batch_size: Tiles per batch.
        num_workers: Decoding threads; 0 decodes in the consumer's thread (no overlap).
        prefetch: Batches in flight; default ``num_workers + 2``, fewer when batches are huge
            (at most about :data:`PREFETCH_BYTES` of decoded tiles, but always 2).
        pin_memory: Allocate batches in pinned (page-locked) memory for fast, non-blocking
            copies to a CUDA device.
        pad: Always yield ``batch_size`` rows (the last batch zero-padded), e.g. so a compiled
            model sees one shape only.
    """

    def __init__(
        self,
        store: TileStore,
        batch_size: int,
        *,
        num_workers: int = 1,
        prefetch: int | None = None,
        pin_memory: bool = False,
        pad: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size} (--batch-size)")
        if num_workers < 0:
            raise ConfigError(f"number of workers must be >= 0, got {num_workers} (--num-workers)")
        self.store = store
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        if prefetch is None:
            batch_bytes = self.batch_size * store.tile_size**2 * 3
            prefetch = max(2, min(self.num_workers + 2, PREFETCH_BYTES // max(1, batch_bytes)))
        self.prefetch = max(1, int(prefetch))
        self.pin_memory = bool(pin_memory)
        self.pad = bool(pad)
        self._decode = TILE_CODECS[store.attrs["tile_encoding"]][1]
        self._executor: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return -(-len(self.store) // self.batch_size)

    def __enter__(self) -> TileBatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads; batches not yet started are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def load(self, start: int, stop: int) -> torch.Tensor:
        """Read and decode tiles ``start..stop-1`` into a new (rows, T, T, 3) uint8 tensor.

        Raises:
            StoreError: A tile cannot be decoded or has the wrong shape.
        """
        import torch

        t = self.store.tile_size
        raw = self.store.tile_bytes(slice(start, stop))
        rows = self.batch_size if self.pad else stop - start
        out = torch.empty((rows, t, t, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        arr = out.numpy()
        for i in range(len(raw)):
            try:
                tile = self._decode(bytes(raw[i]))
            except Exception as exc:  # codec errors have no common base class
                raise StoreError(
                    f"{self.store.path}: tile {start + i} cannot be decoded ({one_line(exc)}); re-tile the slide"
                ) from exc
            if tile.shape != (t, t, 3):
                raise StoreError(
                    f"{self.store.path}: tile {start + i} decodes to shape {tile.shape}, expected {(t, t, 3)}; "
                    "re-tile the slide"
                )
            arr[i] = tile
        if rows > len(raw):
            arr[len(raw) :] = 0
        return out

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        n, bs = len(self.store), self.batch_size
        spans = ((s, min(s + bs, n)) for s in range(0, n, bs))
        if self.num_workers == 0:
            for start, stop in spans:
                yield start, stop, self.load(start, stop)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="wsi-convnext-decode")
        pending: deque[tuple[int, int, Future[torch.Tensor]]] = deque()

        def submit() -> None:
            span = next(spans, None)
            if span is not None:
                pending.append((*span, self._executor.submit(self.load, *span)))  # type: ignore[union-attr]

        try:
            for _ in range(self.prefetch):
                submit()
            while pending:
                start, stop, fut = pending.popleft()
                batch = fut.result()
                submit()  # keep `prefetch` batches in flight while the consumer computes
                yield start, stop, batch
        finally:
            for *_, fut in pending:
                fut.cancel()


# ----------------------------------------------------------------------------------- embedding

# Compiled models per encoder, device and layout: torch.compile is expensive, so a cohort run
# compiles once and reuses it for every slide. Keyed by the encoder (not its model, which the
# compiled module references) so that an unused encoder and its compiled model can be freed.
_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[str, bool], Callable[..., Any]]] = weakref.WeakKeyDictionary()


def _forward_fn(encoder: Encoder, dev: torch.device, compile: bool) -> Callable[..., Any]:
    if not compile:
        return encoder.model
    import torch

    cache = _COMPILED.setdefault(encoder, {})
    key = (str(dev), bool(encoder.channels_last))
    fn = cache.get(key)
    if fn is None:
        try:
            fn = torch.compile(encoder.model, dynamic=False)
        except Exception as exc:  # backend missing (e.g. no C compiler)
            msg = f"torch.compile failed for {encoder.key} ({one_line(exc)}); run without --compile"
            raise EncoderError(msg) from exc
        cache[key] = fn
    return fn


def prepare_forward(
    encoder: Encoder,
    device: str | torch.device | None = "auto",
    *,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Precision]:
    """Move ``encoder`` to ``device`` and return its forward pass under the device's precision policy.

    The returned function maps a preprocessed (B, 3, H, W) float batch on the device to
    (B, D) embeddings (autocast on CUDA by default). Call it under ``torch.inference_mode``.

    Args:
        encoder: Moved to ``device`` and switched to the policy's memory layout in place.
        device: See :func:`~wsi_convnext.encoder.resolve_device`.
        amp: Autocast (CUDA only; default on there).
        channels_last: Override the policy's memory layout (default: channels-last on CUDA).
        compile: Use ``torch.compile`` (compiled once per model, device and layout).

    Raises:
        DeviceError: The device is not available.
        EncoderError: ``torch.compile`` failed.
    """
    import torch

    from .encoder import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prec = _precision(dev, amp, channels_last)
    encoder.to(dev, channels_last=prec.channels_last)
    model = _forward_fn(encoder, dev, compile)
    if prec.autocast_dtype is None:
        return model, prec
    autocast_dtype = getattr(torch, prec.autocast_dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=autocast_dtype):
            return model(x)

    return forward, prec


def _preprocess(encoder: Encoder, tiles: torch.Tensor, dev: torch.device, transform: TileTransform | None) -> torch.Tensor:
    """``encoder.preprocess`` with ``transform`` applied to the [0, 1] float batch on ``dev`` first.

    Stands in for the agreed ``Encoder.preprocess(tiles, device=, transform=)`` (the transformed
    batch is re-quantised to uint8, well below any stain difference, before the encoder's own
    preprocessing).
    """
    if transform is None:
        return encoder.preprocess(tiles, device=dev)
    import torch

    x = transform(tiles.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0))
    return encoder.preprocess(x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1), device=dev)


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"unknown feature dtype {dtype!r} (--dtype): choose one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[dtype]


def embed_store(
    store_path: str | os.PathLike[str] | TileStore,
    encoder: Encoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = "auto",
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    num_workers: int | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    transform: TileTransform | None = None,
    progress: ProgressFn | None = None,
) -> EmbedResult:
    """Embed every tile of one store and write ``features/<encoder.key>`` into it.

    The encoder is moved to ``device`` (and switched to channels-last on CUDA) in place, so
    a cohort runner can build it once and call this per slide.

    Args:
        store_path: The store folder (or an open :class:`~wsi_convnext.store.TileStore`).
        encoder: From :func:`~wsi_convnext.encoder.build_encoder`.
        batch_size: Tiles per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a ``torch.device``.
        dtype: Stored dtype, a key of :data:`OUTPUT_DTYPES`.
        overwrite: Recompute when ``features/<key>`` exists (else the slide is skipped).
        num_workers: Tile-decoding threads; default :func:`default_num_workers`; 0 decodes inline.
        amp: Autocast on CUDA (default on; bfloat16 where supported, else float16). Ignored on CPU.
        channels_last: Override the device's default memory layout (channels-last on CUDA).
        compile: Run the model through ``torch.compile`` (compiled once per model and device;
            batches are padded to ``batch_size`` so only one shape is compiled).
        transform: A tile transform (:func:`wsi_convnext.transforms.build_transform`, e.g. stain
            normalisation) applied to the [0, 1] tiles before the encoder's normalisation; the
            feature key becomes ``<encoder key>-<transform key>`` and the array attrs get
            ``transform`` (its attrs plus this store's ``stats``).
        progress: Called as ``progress(tiles_done, tiles_total)`` after each batch.

    Returns:
        The result; ``skipped`` is True when the embeddings already existed.

    Raises:
        InputNotFoundError: The store does not exist.
        StoreError: The store is foreign, incomplete, or a tile cannot be decoded.
        DeviceError: The device is not available.
        ConfigError: Bad ``batch_size``, ``dtype`` or ``num_workers``.
        EncoderError: Non-finite embeddings, or ``torch.compile`` failed.
        Exception: Whatever ``progress`` raises. Nothing is written to the store in any error case.
    """
    import torch

    from .encoder import resolve_device

    t0 = time.perf_counter()
    out_dtype = _check_dtype(dtype)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size} (--batch-size)")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    store = store_path if isinstance(store_path, TileStore) else open_store(store_path)
    key = encoder.key if transform is None else f"{encoder.key}-{transform.key}"
    n = len(store)
    if key in store.feature_keys and not overwrite:
        logger.info("%s: features/%s already exist, skipping", store.slide_id, key)
        return EmbedResult(
            slide_id=store.slide_id, store_path=store.path, key=key, n_tiles=n, seconds=time.perf_counter() - t0,
            skipped=True, status="skipped", device=str(dev),
        )  # fmt: skip

    forward, prec = prepare_forward(encoder, dev, amp=amp, channels_last=channels_last, compile=compile)
    stats_before = transform.stats() if transform is not None else {}
    workers = default_num_workers(dev.type) if num_workers is None else int(num_workers)
    d = encoder.num_features

    # Host (N, D) result. On CUDA it is pinned so every batch's copy back is asynchronous and
    # the host never waits for the device inside the loop.
    host = torch.empty((n, d), dtype=getattr(torch, out_dtype.name), pin_memory=prec.pin_memory)
    non_blocking = prec.pin_memory

    with torch.inference_mode(), TileBatchLoader(
        store, batch_size, num_workers=workers, pin_memory=prec.pin_memory, pad=compile
    ) as loader:
        for start, stop, tiles in loader:
            y = forward(_preprocess(encoder, tiles, dev, transform))
            host[start:stop].copy_(y[: stop - start].to(host.dtype), non_blocking=non_blocking)
            if progress is not None:
                progress(stop, n)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elif dev.type == "mps":
            torch.mps.synchronize()

    features = host.numpy()
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise EncoderError(
            f"{store.path}: {int(bad.sum())} of {n} tiles got non-finite embeddings from {key} "
            f"(precision {prec.name}, dtype {out_dtype.name}); try --dtype float32 or check the weights"
        )
    attrs = dict(encoder.attrs())
    if transform is not None:
        after = transform.stats()
        attrs["transform"] = {**transform.attrs, "stats": {k: v - stats_before.get(k, 0) for k, v in after.items()}}
    attrs.update(
        compute_precision=prec.name,
        device_type=dev.type,
        n_tiles=n,
        tile_size=store.tile_size,
        target_mpp=store.mpp,
    )
    store.write_features(key, features, attrs, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    logger.info("%s: embedded %d tiles with %s in %.1f s (%.0f tiles/s)", store.slide_id, n, key, seconds,
                n / seconds if seconds > 0 else 0.0)  # fmt: skip
    return EmbedResult(
        slide_id=store.slide_id, store_path=store.path, key=key, n_tiles=n, seconds=seconds, device=str(dev),
        precision=prec.name,
    )  # fmt: skip


def embed_stores(
    stores: Sequence[str | os.PathLike[str]],
    *,
    model: str = DEFAULT_MODEL,
    stem: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = "auto",
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    num_workers: int | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    transform: TileTransform | None = None,
    progress: ProgressFn | None = None,
    on_result: Callable[[EmbedResult], None] | None = None,
) -> list[EmbedResult]:
    """Embed several stores with one encoder; a failing store is recorded and the rest continue.

    Input, option and device problems are raised before any slide is processed; problems of
    one store (foreign or half-written store, undecodable tile, ...) become a ``"failed"``
    result with a one-line ``error``.

    Args:
        stores: Store folders and/or folders of stores (see :func:`~wsi_convnext.store.find_stores`).
        model, stem, weights, pretrained: See :func:`~wsi_convnext.encoder.build_encoder`.
        batch_size, device, dtype, overwrite, num_workers, amp, channels_last, compile, transform:
            See :func:`embed_store`.
        progress: Per-slide tile progress, ``progress(tiles_done, tiles_total)``.
        on_result: Called with each slide's result as soon as it is known.

    Raises:
        InputNotFoundError: A path does not exist or a folder holds no stores.
        DeviceError: The device is not available.
        ConfigError, EncoderError, WeightsError: Bad options, model or weights.
    """
    from .encoder import build_encoder, resolve_device

    _check_dtype(dtype)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size} (--batch-size)")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"number of workers must be >= 0, got {num_workers} (--num-workers)")
    paths = find_stores(stores)
    dev = resolve_device(device)
    encoder = build_encoder(model, stem=stem, weights=weights, pretrained=pretrained)
    results: list[EmbedResult] = []
    for path in paths:
        t0 = time.perf_counter()
        try:
            result = embed_store(
                path, encoder, batch_size=batch_size, device=dev, dtype=dtype, overwrite=overwrite,
                num_workers=num_workers, amp=amp, channels_last=channels_last, compile=compile, transform=transform,
                progress=progress,
            )  # fmt: skip
        except Exception as exc:  # one bad store must never stop the others
            if isinstance(exc, WsiConvnextError):
                logger.debug("%s failed", path, exc_info=True)
            else:
                logger.warning("%s failed unexpectedly", path, exc_info=True)
            result = EmbedResult(
                slide_id=path.name.removesuffix(STORE_SUFFIX), store_path=path,
                key=encoder.key if transform is None else f"{encoder.key}-{transform.key}",
                seconds=time.perf_counter() - t0, status="failed", error_type=type(exc).__name__,
                error=one_line(exc), device=str(dev),
            )  # fmt: skip
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
