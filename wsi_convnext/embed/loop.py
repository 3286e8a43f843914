"""The streaming loop: stores → one tile stream → the model → a writer thread → ``features/<key>``."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, EncoderError, StoreError, StoreExistsError, WsiConvnextError
from ..outcome import failure_fields
from ..store import STORE_SUFFIX, TileStore, open_store
from .forward import prepare_forward
from .options import EmbedOptions, EmbedResult, ProgressFn, feature_key, min_tile_size
from .threads import ThreadBudget, default_num_workers

if TYPE_CHECKING:
    import torch

    from ..encoders import Encoder
    from ..transforms import TileTransform

__all__ = ["OrderedResults", "embed_many", "failed_result"]

logger = logging.getLogger(__name__)


class OrderedResults:
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


def failed_result(path: Path, key: str | None, t0: float, exc: BaseException, dev: Any) -> EmbedResult:
    if isinstance(exc, WsiConvnextError):
        logger.debug("%s failed", path, exc_info=exc)
    else:
        logger.warning("%s failed unexpectedly", path, exc_info=exc)
    return EmbedResult(
        slide_id=path.name.removesuffix(STORE_SUFFIX), store_path=path, key=key, device=str(dev),
        **failure_fields(exc, time.perf_counter() - t0),
    )  # fmt: skip


def embed_many(
    items: Sequence[str | os.PathLike[str] | TileStore],
    encoder: Encoder,
    dev: torch.device,
    o: EmbedOptions,
    *,
    overwrite: bool,
    progress: ProgressFn | None,
    transform: TileTransform | None,
    on_result: Callable[[EmbedResult], None] | None,
) -> OrderedResults:
    """Embed stores through one :class:`~wsi_convnext.data.StoreTileStream`; per-store failures are recorded."""
    import torch

    from ..data import StoreTileStream, decode_on_device

    forward, prec = prepare_forward(encoder, dev, amp=o.amp, channels_last=o.channels_last, compile=o.compile)
    key = feature_key(encoder, transform)
    min_size = min_tile_size(encoder)
    d = encoder.num_features
    torch_dtype = getattr(torch, o.dtype)
    out = OrderedResults(len(items), on_result)
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
            out.put(slide.seq, failed_result(store.path, key, slide.t0, exc, dev), exc)
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
            out.put(slide.seq, failed_result(slide.store.path, key, slide.t0, exc, dev), exc)

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
                if (why := encoder.tile_size_error(store.tile_size)) is not None:
                    raise StoreError(f"{store.path}: {why}")
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
                out.put(seq, failed_result(path, key, t0, exc, dev), exc)
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
    budget = ThreadBudget(stream, budget_key)
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
