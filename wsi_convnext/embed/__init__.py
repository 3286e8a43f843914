"""Tile embeddings: tile stores → encoder → ``features/<key>`` in the same stores.

:func:`embed_store` embeds one slide's store with a prebuilt :class:`~wsi_convnext.encoders.Encoder`;
:func:`embed_stores` builds the encoder once and embeds many stores (on one device, or split
over several devices with one process each), recording a failing store and going on with
the rest.

The pipeline keeps the device busy: one :class:`~wsi_convnext.data.StoreTileStream` reads the
encoded tiles of all stores and decodes them (libjpeg-turbo), batch after batch across store
boundaries, so there is no drain between slides; the main thread runs the model; each slide's
(N, D) embeddings are written by a writer thread, atomically
(:meth:`~wsi_convnext.store.TileStore.write_features`): an interrupted run leaves nothing
half-written. The decoding threads and torch's intra-op threads share one CPU budget: on a
CPU the split is measured on the first batches (:class:`_ThreadBudget`).

Precision policy (:data:`PRECISIONS`): on CUDA the model runs under autocast (bfloat16 where
supported, else float16) on channels-last tensors fed from pinned memory with non-blocking
copies; on CPU and MPS it runs in float32 with torch's own thread settings. The stored dtype
(``dtype``, :data:`OUTPUT_DTYPES`) is float16 by default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import cpu_count
from ..encoders import DEFAULT_MODEL
from ..errors import ConfigError, EncoderError, StoreError, StoreExistsError, WsiConvnextError, one_line
from ..outcome import Outcome, failure_fields
from ..params import at_least, check_params, non_negative, one_of, param
from ..store import STORE_SUFFIX, TileStore, find_stores, open_store

if TYPE_CHECKING:
    import torch

    from ..data import StoreTileStream
    from ..encoders import Encoder
    from ..transforms import TileTransform

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DTYPE",
    "OUTPUT_DTYPES",
    "PRECISIONS",
    "EmbedOptions",
    "EmbedResult",
    "DECODE_ON",
    "Precision",
    "default_num_workers",
    "embed_store",
    "embed_stores",
    "feature_key",
    "min_tile_size",
    "prepare_forward",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
DEFAULT_DTYPE = "float16"

#: Stored embedding dtypes by name.
OUTPUT_DTYPES: dict[str, np.dtype] = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EmbedResult(Outcome):
    """Outcome of embedding one store (``status``, ``error_type``, ``error``, ``seconds``: :class:`~.outcome.Outcome`).

    Attributes:
        slide_id: The slide identifier.
        store_path: The store folder.
        key: Feature key written (``features/<key>``), None if the encoder was never reached.
        n_tiles: Number of tiles (embedding rows).
        skipped: True when ``features/<key>`` already existed and ``overwrite`` was False.
        device: Device the model ran on.
        precision: Compute precision (``float32``, ``bfloat16`` autocast, ``float16`` autocast).
    """

    slide_id: str
    store_path: Path
    key: str | None = None
    n_tiles: int = 0
    skipped: bool = False
    device: str | None = None
    precision: str | None = None


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
        device: See :func:`~wsi_convnext.encoders.resolve_device`.
        amp: Autocast (CUDA only; default on there).
        channels_last: Override the policy's memory layout (default: channels-last on CUDA).
        compile: Use ``torch.compile`` (compiled once per model, device and layout).

    Raises:
        DeviceError: The device is not available.
        EncoderError: ``torch.compile`` failed.
    """
    import torch

    from ..encoders import resolve_device

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


# ------------------------------------------------------------------------------- thread budget

#: Where tiles are decoded: ``host`` (CPU threads, libjpeg-turbo) or ``device`` (CUDA, nvJPEG
#: through torchvision; JPEG stores only).
DECODE_ON = ("host", "device")


@dataclass(frozen=True)
class EmbedOptions:
    """How tiles are embedded, apart from the encoder, the device and the stores.

    Validated on construction (:class:`~wsi_convnext.params.ParameterError`); the run
    config's ``[embed]`` section takes these fields as keys.

    Attributes:
        batch_size: Tiles per forward pass.
        dtype: Stored feature dtype, a key of :data:`OUTPUT_DTYPES`.
        num_workers: Tile-decoding threads; 0 decodes inline; None: measured on a CPU, every
            core but one on CUDA/MPS (:func:`default_num_workers`).
        amp: Autocast on CUDA (None: on; bfloat16 where supported, else float16). Ignored on CPU.
        channels_last: Override the device's default memory layout (channels-last on CUDA).
        compile: Run the model through ``torch.compile`` (batches padded to ``batch_size``).
        decode_on: ``host`` or ``device`` (JPEG decoding on the CUDA device, :data:`DECODE_ON`).
    """

    batch_size: int = param(DEFAULT_BATCH_SIZE, check=at_least(1), doc="tiles per forward pass")
    dtype: str = param(DEFAULT_DTYPE, check=one_of(OUTPUT_DTYPES), doc="feature dtype: float16 or float32")
    num_workers: int | None = param(None, check=non_negative, doc="tile decoding threads per embedding task")
    amp: bool | None = param(None, doc="autocast on CUDA")
    channels_last: bool | None = param(None, doc="channels-last memory layout")
    compile: bool = param(False, doc="torch.compile the encoder")
    decode_on: str = param("host", check=one_of(DECODE_ON), doc="decode JPEG tiles on the host or the CUDA device")

    def __post_init__(self) -> None:
        check_params(self)


def default_num_workers(device_type: str = "cpu") -> int:
    """Decoding threads before any measurement, by device type.

    On CUDA and MPS the model runs on the device, so every core but the consumer's decodes.
    On a CPU the model and decoding share the cores: decoding starts inline (0 threads) and
    :func:`embed_store` then picks the split from measured costs
    (:func:`~wsi_convnext.data.plan_decode_threads`).
    """
    if device_type == "cpu":
        return 0
    return max(1, cpu_count() - 1)


#: Measured CPU thread splits, by (feature key, batch size, thread budget): a cohort that
#: embeds slide after slide measures once.
_THREAD_PLANS: dict[tuple[str, int, int], tuple[int, int]] = {}

#: Full batches timed before choosing a CPU thread split (after one warm-up batch).
_CALIBRATION_BATCHES = 2


class _ThreadBudget:
    """Measures the first full batches on a CPU and then splits the cores (auto ``num_workers``).

    Until decided, tiles are decoded inline and torch keeps its threads (the budget). The
    decision sets torch's intra-op threads and the stream's decoding threads so that their
    sum never exceeds the budget; torch's setting is restored by :meth:`restore`.
    """

    def __init__(self, stream: StoreTileStream, key: tuple[str, int, int] | None) -> None:
        import torch

        self.stream = stream
        self.key = key
        self.saved_threads = torch.get_num_threads()
        self.forward_seconds = 0.0
        self.forward_tiles = 0
        self.batches = 0
        self.decided = key is None
        if key is not None and key in _THREAD_PLANS:
            self._apply(_THREAD_PLANS[key])

    def _apply(self, plan: tuple[int, int]) -> None:
        import torch

        workers, threads = plan
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.stream.set_num_workers(workers)
        self.decided = True

    def observe(self, n: int, full: bool, seconds: float) -> None:
        """Record one computed batch of ``n`` tiles that took ``seconds`` of wall time."""
        if self.decided or not full:
            return
        self.batches += 1
        if self.batches == 1:
            return  # warm-up: allocator, oneDNN primitive creation
        self.forward_seconds += seconds
        self.forward_tiles += n
        if self.batches <= _CALIBRATION_BATCHES:
            return
        from ..data import plan_decode_threads

        decode = self.stream.decode_seconds_per_tile or 0.0
        forward = self.forward_seconds / max(1, self.forward_tiles)
        plan = plan_decode_threads(decode, forward, self.saved_threads)
        logger.info(
            "thread budget %d: decoding %.2f ms/tile, model %.2f ms/tile -> %d decode thread(s), %d torch thread(s)",
            self.saved_threads, decode * 1e3, forward * 1e3, *plan,
        )  # fmt: skip
        assert self.key is not None
        _THREAD_PLANS[self.key] = plan
        self._apply(plan)

    def restore(self) -> None:
        import torch

        if torch.get_num_threads() != self.saved_threads:
            torch.set_num_threads(self.saved_threads)


# ------------------------------------------------------------------------------ preprocessing


def feature_key(encoder: Encoder, transform: TileTransform | None = None) -> str:
    """The ``features/<key>`` an encoder (and tile transform) writes: ``<encoder.key>[-<transform.key>]``."""
    return encoder.key if transform is None else f"{encoder.key}-{transform.key}"


def min_tile_size(encoder: Encoder) -> int:
    """Smallest tile side (px) the encoder can embed: its total stride, unless tiles are resized."""
    if encoder.preprocessing.get("resize", "none") != "none":
        return 1
    info = getattr(encoder.model, "feature_info", None) or []
    reductions = [int(i["reduction"]) for i in info if isinstance(i, dict) and "reduction" in i]
    return max(reductions, default=1)


# ------------------------------------------------------------------------- results and writing


class _OrderedResults:
    """Collects results by input position and hands them to ``on_result`` in input order."""

    def __init__(self, n: int, on_result: Callable[[EmbedResult], None] | None) -> None:
        self.results: list[EmbedResult | None] = [None] * n
        self.errors: dict[int, BaseException] = {}
        self._on_result = on_result
        self._next = 0
        self._lock = threading.Lock()

    def put(self, seq: int, result: EmbedResult, error: BaseException | None = None) -> None:
        with self._lock:
            if self.results[seq] is not None:
                return
            self.results[seq] = result
            if error is not None:
                self.errors[seq] = error
            while self._next < len(self.results) and self.results[self._next] is not None:
                r = self.results[self._next]
                self._next += 1
                if self._on_result is not None:
                    self._on_result(r)  # type: ignore[arg-type]


class _Writer:
    """Writes finished slides' features in one background thread, in submission order."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, name="wsi-convnext-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job()  # jobs catch their own errors

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def close(self) -> None:
        """Finish the queued writes and stop."""
        self._queue.put(None)
        self._thread.join()


@dataclass
class _Slide:
    """One store being embedded."""

    seq: int
    store: TileStore
    host: Any  # (N, D) torch tensor, pinned on CUDA
    t0: float
    done: int = 0


def _failed(path: Path, key: str | None, t0: float, exc: BaseException, dev: Any) -> EmbedResult:
    if isinstance(exc, WsiConvnextError):
        logger.debug("%s failed", path, exc_info=exc)
    else:
        logger.warning("%s failed unexpectedly", path, exc_info=exc)
    return EmbedResult(
        slide_id=path.name.removesuffix(STORE_SUFFIX), store_path=path, key=key, device=str(dev),
        **failure_fields(exc, time.perf_counter() - t0),
    )  # fmt: skip


def _embed_many(
    items: Sequence[str | os.PathLike[str] | TileStore],
    encoder: Encoder,
    dev: torch.device,
    o: EmbedOptions,
    *,
    overwrite: bool,
    progress: ProgressFn | None,
    transform: TileTransform | None,
    on_result: Callable[[EmbedResult], None] | None,
) -> _OrderedResults:
    """Embed stores through one :class:`~wsi_convnext.data.StoreTileStream`; per-store failures are recorded."""
    import torch

    from ..data import StoreTileStream, decode_on_device

    forward, prec = prepare_forward(encoder, dev, amp=o.amp, channels_last=o.channels_last, compile=o.compile)
    key = feature_key(encoder, transform)
    min_size = min_tile_size(encoder)
    d = encoder.num_features
    torch_dtype = getattr(torch, o.dtype)
    out = _OrderedResults(len(items), on_result)
    slides: dict[int, _Slide] = {}  # by stream position
    dead: set[int] = set()
    writer = _Writer()
    base_attrs = dict(encoder.attrs())
    base_attrs.update(compute_precision=prec.name, device_type=dev.type)
    if transform is not None:
        base_attrs["key"] = key

    def write(slide: _Slide, event: Any) -> None:
        store = slide.store
        try:
            if event is not None:
                event.synchronize()  # the slide's non-blocking copies to the host are done
            features = slide.host.numpy()
            bad = ~np.isfinite(features).all(axis=1)
            if bad.any():
                raise EncoderError(
                    f"{store.path}: {int(bad.sum())} of {len(store)} tiles got non-finite embeddings from {key} "
                    f"(precision {prec.name}, dtype {o.dtype}); try --dtype float32 or check the weights"
                )
            attrs = dict(base_attrs)
            attrs.update(n_tiles=len(store), tile_size=store.tile_size, target_mpp=store.mpp)
            if transform is not None:
                attrs["transform"] = {"key": transform.key, "attrs": dict(transform.attrs), "stats": transform.stats()}
            store.write_features(key, features, attrs, overwrite=overwrite)
        except StoreExistsError:
            # Another run wrote this key while we computed it (its lock made us wait): keep theirs.
            logger.warning("%s: features/%s were written by another run meanwhile; keeping them", store.path, key)
            out.put(slide.seq, EmbedResult(
                slide_id=store.slide_id, store_path=store.path, key=key, n_tiles=len(store),
                seconds=time.perf_counter() - slide.t0, skipped=True, status="skipped", device=str(dev),
            ))  # fmt: skip
            return
        except Exception as exc:
            out.put(slide.seq, _failed(store.path, key, slide.t0, exc, dev), exc)
            return
        seconds = time.perf_counter() - slide.t0
        logger.info("%s: embedded %d tiles with %s in %.1f s", store.slide_id, len(store), key, seconds)
        out.put(slide.seq, EmbedResult(
            slide_id=store.slide_id, store_path=store.path, key=key, n_tiles=len(store), seconds=seconds,
            device=str(dev), precision=prec.name,
        ))  # fmt: skip

    def finish(slide: _Slide) -> None:
        event = None
        if dev.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))  # the stream the copies ran on
        elif dev.type == "mps":
            torch.mps.synchronize()
        writer.submit(lambda: write(slide, event))

    def fail(index: int, exc: BaseException) -> None:
        dead.add(index)
        stream.skip(index)
        slide = slides.pop(index, None)
        if slide is not None:
            out.put(slide.seq, _failed(slide.store.path, key, slide.t0, exc, dev), exc)

    def source() -> Iterator[TileStore]:
        """Opens stores in order, reporting unusable ones and skipping done ones (consumer thread)."""
        for seq, item in enumerate(items):
            t0 = time.perf_counter()
            path = item.path if isinstance(item, TileStore) else Path(item)
            try:
                store = item if isinstance(item, TileStore) else open_store(item)
                if store.tile_size < min_size:
                    raise StoreError(
                        f"{store.path}: tiles of {store.tile_size} px are too small for {encoder.config.model} "
                        f"(at least {min_size} px); re-tile with --tile-size {min_size} or larger"
                    )
                if key in store.feature_keys and not overwrite:
                    logger.info("%s: features/%s already exist, skipping", store.slide_id, key)
                    out.put(seq, EmbedResult(
                        slide_id=store.slide_id, store_path=store.path, key=key, n_tiles=len(store),
                        seconds=time.perf_counter() - t0, skipped=True, status="skipped", device=str(dev),
                    ))  # fmt: skip
                    continue
                store.check_writable("features")  # a read-only store fails now, not after embedding
                host = torch.empty((len(store), d), dtype=torch_dtype, pin_memory=prec.pin_memory)
            except Exception as exc:
                out.put(seq, _failed(path, key, t0, exc, dev), exc)
                continue
            slide = _Slide(seq, store, host, t0)
            if len(store) == 0:
                finish(slide)
                continue
            slides[stream.stores_seen] = slide  # the position the stream gives it
            yield store

    workers = default_num_workers(dev.type) if o.num_workers is None else o.num_workers
    device_decode = o.decode_on == "device"
    if device_decode and dev.type != "cuda":
        raise ConfigError(f"decoding on the device needs a CUDA device, not {dev} (use decode_on='host')")
    non_blocking = prec.pin_memory
    stream = StoreTileStream(
        source(), o.batch_size, num_workers=workers, pin_memory=prec.pin_memory, pad=o.compile,
        decode=not device_decode,
    )  # fmt: skip
    budget_key = (key, o.batch_size, torch.get_num_threads()) if dev.type == "cpu" and o.num_workers is None else None
    budget = _ThreadBudget(stream, budget_key)
    try:
        with torch.inference_mode(), stream:
            for batch in stream:
                for index, exc in batch.failed.items():
                    fail(index, exc)
                live = [sp for sp in batch.spans if sp.index not in dead]
                if not live:
                    continue
                t0 = time.perf_counter()
                try:
                    tiles = decode_on_device(batch, dev) if device_decode else batch.tiles
                    for index, exc in batch.failed.items():
                        if index not in dead:
                            fail(index, exc)
                    y = forward(encoder.preprocess(tiles, device=dev, transform=transform))
                except Exception as exc:  # the model failed on this batch: fail its stores
                    for sp in live:
                        fail(sp.index, exc)
                    continue
                for sp in live:
                    slide = slides.get(sp.index)
                    if slide is None:
                        continue
                    slide.host[sp.start : sp.stop].copy_(y[sp.rows].to(torch_dtype), non_blocking=non_blocking)
                    slide.done += len(sp)
                    if progress is not None:
                        try:
                            progress(slide.done, len(slide.store))
                        except Exception as exc:
                            fail(sp.index, exc)
                            continue
                    if sp.last:
                        finish(slides.pop(sp.index))
                if budget_key is not None and not budget.decided:
                    budget.observe(batch.n, batch.n == o.batch_size, time.perf_counter() - t0)
    finally:
        budget.restore()
        writer.close()
    return out


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
    decode_on: str = "host",
    progress: ProgressFn | None = None,
) -> EmbedResult:
    """Embed every tile of one store and write ``features/<key>`` into it.

    The key is ``<encoder.key>`` or, with a tile transform, ``<encoder.key>-<transform.key>``
    (:func:`feature_key`). The encoder is moved to ``device`` (and switched to channels-last
    on CUDA) in place, so a cohort runner can build it once and call this per slide.

    Args:
        store_path: The store folder (or an open :class:`~wsi_convnext.store.TileStore`).
        encoder: From :func:`~wsi_convnext.encoders.build_encoder`.
        batch_size: Tiles per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a ``torch.device``.
        dtype: Stored dtype, a key of :data:`OUTPUT_DTYPES`.
        overwrite: Recompute when ``features/<key>`` exists (else the slide is skipped).
        num_workers: Tile-decoding threads; 0 decodes inline. Default: on a CPU, measured
            (decoding plus torch threads never exceed torch's thread count); on CUDA/MPS every
            core but one (:func:`default_num_workers`).
        amp: Autocast on CUDA (default on; bfloat16 where supported, else float16). Ignored on CPU.
        channels_last: Override the device's default memory layout (channels-last on CUDA).
        compile: Run the model through ``torch.compile`` (compiled once per model and device;
            batches are padded to ``batch_size`` so only one shape is compiled).
        transform: A tile transform on float RGB in [0, 1] applied before normalisation
            (recorded in the feature attrs under ``transform``).
        decode_on: ``host`` or ``device`` (JPEG decoding on the CUDA device, :data:`DECODE_ON`).
        progress: Called as ``progress(tiles_done, tiles_total)`` after each batch.

    Returns:
        The result; ``skipped`` is True when the embeddings already existed.

    Raises:
        InputNotFoundError: The store does not exist.
        StoreError: The store is foreign, incomplete, its tiles are too small for the model,
            or a tile cannot be decoded.
        DeviceError: The device is not available.
        ConfigError: Bad ``batch_size``, ``dtype``, ``num_workers`` or ``decode_on`` (see :class:`EmbedOptions`).
        EncoderError: Non-finite embeddings, or ``torch.compile`` failed.
        Exception: Whatever ``progress`` raises. Nothing is written to the store in any error case.
    """
    import torch

    from ..encoders import resolve_device

    options = EmbedOptions(batch_size=batch_size, dtype=dtype, num_workers=num_workers, amp=amp,
                           channels_last=channels_last, compile=compile, decode_on=decode_on)  # fmt: skip
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    out = _embed_many(
        [store_path], encoder, dev, options, overwrite=overwrite, progress=progress, transform=transform, on_result=None
    )
    if 0 in out.errors:
        raise out.errors[0]
    result = out.results[0]
    assert result is not None
    return result


def embed_stores(
    stores: Sequence[str | os.PathLike[str]],
    *,
    model: str = DEFAULT_MODEL,
    stem: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    encoder: Encoder | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = "auto",
    devices: Sequence[str] | None = None,
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    num_workers: int | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    transform: TileTransform | None = None,
    decode_on: str = "host",
    progress: ProgressFn | None = None,
    on_result: Callable[[EmbedResult], None] | None = None,
) -> list[EmbedResult]:
    """Embed several stores with one encoder; a failing store is recorded and the rest continue.

    The stores stream through one loader: the next slide's tiles are decoded while the current
    slide's last batch computes, and each slide's features are written (atomically) by a
    background thread. Input, option and device problems are raised before any slide is
    processed; problems of one store (foreign or half-written store, tiles too small,
    undecodable tile, ...) become a ``"failed"`` result with a one-line ``error``.

    Args:
        stores: Store folders and/or folders of stores (see :func:`~wsi_convnext.store.find_stores`).
        model, stem, weights, pretrained: See :func:`~wsi_convnext.encoders.build_encoder`.
        encoder: A prebuilt encoder to use instead (then ``model`` ... ``pretrained`` are
            ignored), e.g. to reuse a compiled model; one device only.
        device: One device for everything (ignored when ``devices`` is given).
        devices: Several devices (e.g. ``["cuda:0", "cuda:1"]``): the stores are split among
            them, one process per device, each building its own encoder. CPU devices share
            the cores evenly.
        batch_size, dtype, overwrite, num_workers, amp, channels_last, compile, transform, decode_on:
            See :func:`embed_store`.
        progress: Per-slide tile progress, ``progress(tiles_done, tiles_total)``.
        on_result: Called with each slide's result as soon as it is known (in store order
            with one device; in completion order with several).

    Returns:
        One result per store, in store order.

    Raises:
        InputNotFoundError: A path does not exist or a folder holds no stores.
        DeviceError: A device is not available.
        ConfigError, EncoderError, WeightsError: Bad options, model or weights.
    """
    from ..encoders import build_encoder, resolve_device

    options = EmbedOptions(batch_size=batch_size, dtype=dtype, num_workers=num_workers, amp=amp,
                           channels_last=channels_last, compile=compile, decode_on=decode_on)  # fmt: skip
    paths = find_stores(stores)
    if devices is not None and len(devices) > 1:
        if encoder is not None:
            raise ConfigError("a prebuilt encoder runs on one device; pass model/stem/weights to use several devices")
        kwargs = dict(model=model, stem=stem, weights=weights, pretrained=pretrained, overwrite=overwrite,
                      transform=transform, **dataclasses.asdict(options))  # fmt: skip
        return _embed_on_devices(paths, list(devices), kwargs, progress=progress, on_result=on_result)
    if devices:
        device = devices[0]
    import torch

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if encoder is None:
        encoder = build_encoder(model, stem=stem, weights=weights, pretrained=pretrained)
    out = _embed_many(
        paths, encoder, dev, options, overwrite=overwrite, progress=progress, transform=transform, on_result=on_result
    )
    return [r for r in out.results if r is not None]


# ------------------------------------------------------------------------------ several devices


def split_stores(n_tiles: Sequence[int], n_devices: int) -> list[list[int]]:
    """Split stores among devices with balanced tile counts.

    Greedy: the largest store goes to the device with the fewest tiles so far. Each device's
    positions stay in input order.

    Args:
        n_tiles: Tiles per store, in input order.
        n_devices: Number of devices (>= 1).

    Returns:
        For each device, the input positions of its stores (possibly empty).
    """
    loads = [0] * max(1, n_devices)
    shards: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(n_tiles)), key=lambda i: (-int(n_tiles[i]), i)):
        k = min(range(len(loads)), key=lambda k: (loads[k], k))
        shards[k].append(i)
        loads[k] += int(n_tiles[i])
    return [sorted(s) for s in shards]


def _n_tiles_hint(path: Path) -> int:
    """A store's tile count from its metadata, for balancing only (0 when unreadable)."""
    import json

    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["n_tiles"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _watch_parent() -> None:
    """Exit this process when its parent dies (no orphaned device processes)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="wsi-convnext-parent-watch", daemon=True).start()


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return WsiConvnextError(f"{type(exc).__name__}: {one_line(exc)}")


def _device_worker(
    rank: int, paths: list[Path], device: str, options: dict[str, Any], threads: int | None, messages: Any
) -> None:
    """Body of one device process: embed its share of the stores, reporting through ``messages``."""
    _watch_parent()
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        embed_stores(
            paths, device=device, **options,
            progress=lambda done, total: messages.put(("progress", rank, done, total)),
            on_result=lambda r: messages.put(("result", rank, r)),
        )  # fmt: skip
        messages.put(("end", rank, None))
    except BaseException as exc:  # reported to the parent, which raises it
        messages.put(("end", rank, _picklable(exc)))


def _embed_on_devices(
    paths: list[Path],
    devices: list[str],
    options: dict[str, Any],
    *,
    progress: ProgressFn | None,
    on_result: Callable[[EmbedResult], None] | None,
) -> list[EmbedResult]:
    """Split ``paths`` among ``devices`` and embed each share in its own (spawned) process."""
    import multiprocessing as mp

    from ..encoders import resolve_device

    resolved = [resolve_device(d) for d in devices]  # DeviceError before anything starts
    shards = split_stores([_n_tiles_hint(p) for p in paths], len(devices))
    n_cpu = sum(1 for d in resolved if d.type == "cpu")
    cpu_threads = max(1, cpu_count() // n_cpu) if n_cpu else None
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    messages = ctx.Queue()
    procs: dict[int, Any] = {}
    results: dict[int, EmbedResult] = {}
    reported = {rank: 0 for rank in range(len(devices))}
    error: BaseException | None = None
    completed = False

    def record(rank: int, result: EmbedResult) -> None:
        results[shards[rank][reported[rank]]] = result
        reported[rank] += 1
        if on_result is not None:
            on_result(result)

    try:
        for rank, (dev, shard) in enumerate(zip(resolved, shards)):
            if not shard:
                continue
            proc = ctx.Process(
                target=_device_worker, name=f"wsi-convnext-embed-{rank}-{dev}", daemon=True,
                args=(rank, [paths[i] for i in shard], str(dev), options, cpu_threads if dev.type == "cpu" else None,
                      messages),
            )  # fmt: skip
            try:
                proc.start()
            except Exception as exc:  # e.g. an unpicklable transform
                raise ConfigError(f"cannot start the embedding process for {dev} ({one_line(exc)})") from exc
            procs[rank] = proc
        running = set(procs)
        while running:
            try:
                msg = messages.get(timeout=0.5)
            except queue.Empty:
                gone = [r for r in running if not procs[r].is_alive()]
                if not gone:
                    continue
                try:
                    msg = messages.get(timeout=0.5)  # anything it sent before exiting
                except queue.Empty:
                    for rank in gone:
                        running.discard(rank)
                        exc = WsiConvnextError(
                            f"the embedding process for {resolved[rank]} died (exit code {procs[rank].exitcode})"
                        )
                        for i in shards[rank][reported[rank] :]:
                            record(rank, _failed(paths[i], None, time.perf_counter(), exc, resolved[rank]))
                    continue
            kind, rank = msg[0], msg[1]
            if kind == "progress":
                if progress is not None:
                    progress(msg[2], msg[3])
            elif kind == "result":
                record(rank, msg[2])
            else:  # "end"
                running.discard(rank)
                if msg[2] is not None and error is None:
                    error = msg[2]
                    break
        completed = error is None
    finally:
        for proc in procs.values():
            if proc.is_alive() and not completed:
                proc.terminate()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if error is not None:
        raise error
    return [results[i] for i in range(len(paths))]
