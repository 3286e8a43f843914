"""Tile datasets over zarr tile stores: a streaming batch loader and a map-style dataset.

:class:`StoreTileStream` streams the tiles of one or many stores in store order as
(B, T, T, 3) uint8 batches, for inference. It runs across store boundaries: a batch may end
one slide and start the next, so the tiles of the next slide are decoded while the last batch
of the current one computes, and every batch but the very last is full. Batches are read and
decoded (libjpeg-turbo through imagecodecs, straight into the batch; the codecs release the
GIL) by background threads a bounded number of batches ahead, or inline in the consumer's
thread (``num_workers=0``), switchable while streaming.

:class:`StoreTileDataset` is a map-style :class:`torch.utils.data.Dataset` over the tiles of
several stores (item = ``(tile HWC uint8, slide_id, tile_index)``), for training with a
:class:`torch.utils.data.DataLoader` and its samplers.

:func:`plan_decode_threads` splits a CPU budget between decoding threads and torch's
intra-op threads from measured per-tile costs.

Store reading goes through :class:`~wsi_convnext.store.TileStore` only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, StoreError, one_line
from ..store import TileStore, open_store

__all__ = [
    "DECODE_THREAD_PREFIX",
    "PREFETCH_BYTES",
    "StoreTileDataset",
    "StoreTileStream",
    "TileBatch",
    "TileSpan",
    "decode_on_device",
    "plan_decode_threads",
]

logger = logging.getLogger(__name__)

#: Upper bound on decoded tiles held ahead of the consumer by :class:`StoreTileStream`, bytes.
PREFETCH_BYTES = 512 << 20

#: Name prefix of the decoding threads (tests check that none outlive a stream).
DECODE_THREAD_PREFIX = "wsi-convnext-decode"

StoreLike = TileStore | str | os.PathLike[str]


def _as_store(item: StoreLike) -> TileStore:
    return item if isinstance(item, TileStore) else open_store(item)


# ------------------------------------------------------------------------------- map-style


class StoreTileDataset(torch.utils.data.Dataset):
    """Map-style dataset over the tiles of several stores, in store order.

    Position ``i`` runs over the concatenation of the stores' tiles (store 0's tiles first).
    Stores are opened lazily and reopened in each process, so the dataset can be handed to a
    :class:`torch.utils.data.DataLoader` with worker processes (fork or spawn).

    Args:
        stores: Store folders or open :class:`~wsi_convnext.store.TileStore` objects.
        indices: Positions (into the concatenation) to expose, in this order; default all.

    Item:
        ``(tile, slide_id, tile_index)``: (T, T, 3) uint8 RGB, the store's slide id and the
        tile's index in its store (its row in ``coords`` and ``features``).

    Raises:
        InputNotFoundError, StoreError: A store is missing or invalid (at construction).
        IndexError: ``indices`` points outside the tiles.
    """

    def __init__(self, stores: Sequence[StoreLike], indices: Sequence[int] | np.ndarray | None = None) -> None:
        opened = [_as_store(s) for s in stores]
        self.paths: list[Path] = [s.path for s in opened]
        self.slide_ids: list[str] = [s.slide_id for s in opened]
        self.tile_sizes: list[int] = [s.tile_size for s in opened]
        counts = np.asarray([len(s) for s in opened], dtype=np.int64)
        #: ``offsets[k]`` is the position of store k's first tile; ``offsets[-1]`` the total.
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self.offsets[-1])
        if indices is None:
            self.indices = np.arange(total, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= total):
                raise IndexError(f"indices must lie in [0, {total}) (the tiles of {len(opened)} store(s))")
        self._stores: list[TileStore] | None = opened
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stores"] = None  # zarr handles are reopened in the receiving process
        return state

    def _open(self) -> list[TileStore]:
        if self._stores is None or self._pid != os.getpid():
            self._stores = [open_store(p) for p in self.paths]
            self._pid = os.getpid()
        return self._stores

    def locate(self, i: int) -> tuple[int, int]:
        """``(store position, tile index)`` of item ``i``."""
        pos = int(self.indices[i])
        k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        return k, pos - int(self.offsets[k])

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, int]:
        k, t = self.locate(i)
        return self._open()[k].tile(t), self.slide_ids[k], t

    def coords(self) -> np.ndarray:
        """(len, 2) int64 level-0 (x, y) top-left corner of every item, in item order."""
        stores = self._open()
        out = np.empty((len(self), 2), dtype=np.int64)
        ks = np.searchsorted(self.offsets, self.indices, side="right") - 1
        for k in np.unique(ks):
            sel = ks == k
            out[sel] = stores[k].coords[self.indices[sel] - self.offsets[k]]
        return out


# ------------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class TileSpan:
    """Consecutive tiles of one store inside a batch.

    Attributes:
        store: The store.
        index: Position of the store in the stream (0, 1, ... in arrival order).
        start, stop: Tile range ``start..stop-1`` in the store.
        offset: Row of tile ``start`` in the batch.
    """

    store: TileStore
    index: int
    start: int
    stop: int
    offset: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> slice:
        """The batch rows holding this span."""
        return slice(self.offset, self.offset + len(self))

    @property
    def last(self) -> bool:
        """True when this span ends its store."""
        return self.stop == len(self.store)


@dataclass
class TileBatch:
    """One batch of a :class:`StoreTileStream`.

    Attributes:
        spans: The tile ranges in row order (several stores when the batch crosses a boundary).
        n: Valid rows; rows ``n..`` are zero padding.
        tiles: (B, T, T, 3) uint8 (B = n, or the batch size when padded); None when the stream
            leaves decoding to the consumer (``decode=False``, see :func:`decode_on_device`).
        raw: Encoded tiles per row (None for padding or failed rows) when ``decode=False``.
        failed: Stores (by stream position) whose tiles could not be read, with the error;
            their rows are zeros and the stream skips their remaining tiles.
    """

    spans: tuple[TileSpan, ...]
    n: int
    tiles: torch.Tensor | None = None
    raw: list[bytes | None] | None = None
    failed: dict[int, Exception] = field(default_factory=dict)

    @property
    def slide_ids(self) -> list[str]:
        """Slide id of each valid row."""
        return [sp.store.slide_id for sp in self.spans for _ in range(len(sp))]

    @property
    def tile_indices(self) -> np.ndarray:
        """(n,) int64 index of each valid row's tile in its store."""
        return np.concatenate([np.arange(sp.start, sp.stop) for sp in self.spans]).astype(np.int64)

    @property
    def coords(self) -> np.ndarray:
        """(n, 2) int64 level-0 (x, y) top-left corner of each valid row's tile."""
        return np.concatenate([sp.store.coords[sp.start : sp.stop] for sp in self.spans]).reshape(-1, 2)


class StoreTileStream:
    """Streams the tiles of one or many stores in batches, in store order, across store boundaries.

    Batches are planned lazily in the consumer's thread (so ``stores`` may be a generator that
    opens stores as they are needed) and decoded by ``num_workers`` threads, at most
    ``prefetch`` batches ahead, or inline when ``num_workers`` is 0. A batch holds tiles of one
    tile size: a store of another size starts a new batch. A tile that cannot be read or
    decoded fails its store (``TileBatch.failed``), never the stream. Use as a context manager
    so that the threads stop when the consumer stops (also on error)::

        with StoreTileStream(paths, 64, num_workers=2) as stream:
            for batch in stream:
                for span in batch.spans:
                    ...  # batch.tiles[span.rows] are tiles span.start..span.stop-1 of span.store

    Args:
        stores: Stores or store folders, consumed lazily.
        batch_size: Tiles per batch.
        num_workers: Decoding threads; 0 decodes in the consumer's thread. See :meth:`set_num_workers`.
        prefetch: Batches in flight; default ``num_workers + 2``, fewer when batches are huge
            (about :data:`PREFETCH_BYTES` of decoded tiles, but always 2).
        pin_memory: Allocate batches in pinned (page-locked) memory for fast, non-blocking
            copies to a CUDA device (torch's caching host allocator reuses a block only once
            the copies reading it have finished).
        pad: Always yield ``batch_size`` rows (zero padding), e.g. so a compiled model sees one shape.
        decode: Decode on the host (default); False yields encoded bytes (``TileBatch.raw``) for
            :func:`decode_on_device`.
    """

    def __init__(
        self,
        stores: Iterable[StoreLike],
        batch_size: int,
        *,
        num_workers: int = 1,
        prefetch: int | None = None,
        pin_memory: bool = False,
        pad: bool = False,
        decode: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size} (--batch-size)")
        if num_workers < 0:
            raise ConfigError(f"number of workers must be >= 0, got {num_workers} (--num-workers)")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self._prefetch = None if prefetch is None else max(1, int(prefetch))
        self.pin_memory = bool(pin_memory)
        self.pad = bool(pad)
        self.decode = bool(decode)
        self._source = iter(stores)
        self._current: list[Any] | None = None  # [store, stream position, next tile]
        self._count = 0
        self._failed: set[int] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_workers = 0
        self._lock = threading.Lock()
        self._decode_seconds = 0.0
        self._decoded_tiles = 0
        self._tile_size: int | None = None

    # context management

    def __enter__(self) -> StoreTileStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads; batches not yet started are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # control and statistics

    @property
    def prefetch(self) -> int:
        """Batches kept in flight while decoding in threads."""
        if self._prefetch is not None:
            return self._prefetch
        t = self._tile_size or 224
        batch_bytes = self.batch_size * t * t * 3
        return max(2, min(self.num_workers + 2, PREFETCH_BYTES // max(1, batch_bytes)))

    def set_num_workers(self, n: int) -> None:
        """Change the number of decoding threads from the next planned batch on (0: inline)."""
        if n < 0:
            raise ConfigError(f"number of workers must be >= 0, got {n} (--num-workers)")
        self.num_workers = int(n)

    def skip(self, index: int) -> None:
        """Read no more tiles of the store at stream position ``index`` (e.g. after it failed)."""
        self._failed.add(int(index))

    @property
    def decode_seconds_per_tile(self) -> float | None:
        """Mean thread CPU time spent reading and decoding one tile so far (None before any)."""
        with self._lock:
            return self._decode_seconds / self._decoded_tiles if self._decoded_tiles else None

    @property
    def stores_seen(self) -> int:
        """Stores taken from ``stores`` so far."""
        return self._count

    # planning and loading

    def _plan(self) -> list[TileSpan] | None:
        """The next batch's spans (consumer thread), or None when every store is exhausted."""
        spans: list[TileSpan] = []
        rows = 0
        size: int | None = None
        while rows < self.batch_size:
            if self._current is None:
                item = next(self._source, None)
                if item is None:
                    break
                self._current = [_as_store(item), self._count, 0]
                self._count += 1
            store, index, pos = self._current
            n = len(store)
            if index in self._failed or pos >= n:
                self._current = None
                continue
            if size is not None and store.tile_size != size:
                break  # one tile size per batch
            size = store.tile_size
            take = min(self.batch_size - rows, n - pos)
            spans.append(TileSpan(store, index, pos, pos + take, rows))
            rows += take
            self._current[2] = pos + take
            if pos + take >= n:
                self._current = None
        if size is not None:
            self._tile_size = size
        return spans or None

    def _load(self, spans: list[TileSpan]) -> TileBatch:
        """Read (and decode) one planned batch; runs in a pool thread or inline."""
        t0 = time.thread_time()
        n = sum(len(sp) for sp in spans)
        rows = self.batch_size if self.pad else n
        t = spans[0].store.tile_size
        batch = TileBatch(spans=tuple(spans), n=n)
        arr: np.ndarray | None = None
        if self.decode:
            batch.tiles = torch.empty((rows, t, t, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
            arr = batch.tiles.numpy()
        else:
            batch.raw = [None] * rows
        for sp in spans:
            if sp.index in self._failed:
                if arr is not None:
                    arr[sp.rows] = 0
                continue
            try:
                try:
                    raw = sp.store.tile_bytes(slice(sp.start, sp.stop))
                except StoreError:
                    raise  # damaged, or replaced by another run: already one line
                except Exception as exc:  # zarr/codec errors on damaged chunks
                    raise StoreError(
                        f"{sp.store.path}: tiles {sp.start}..{sp.stop - 1} cannot be read ({one_line(exc)}); "
                        "re-tile the slide"
                    ) from exc
                if arr is not None:
                    sp.store.decode_into(raw, arr[sp.rows], first=sp.start)
                else:
                    if sp.store.attrs.get("tile_encoding") != "jpeg":
                        raise StoreError(
                            f"{sp.store.path}: device decoding needs JPEG tiles, the store holds "
                            f"{sp.store.attrs.get('tile_encoding')!r} tiles; decode on the host"
                        )
                    batch.raw[sp.offset : sp.offset + len(sp)] = [bytes(b) for b in raw]  # type: ignore[index]
            except Exception as exc:
                batch.failed[sp.index] = exc
                self._failed.add(sp.index)
                if arr is not None:
                    arr[sp.rows] = 0
        if arr is not None and rows > n:
            arr[n:] = 0
        with self._lock:
            self._decode_seconds += time.thread_time() - t0
            self._decoded_tiles += n
        return batch

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None or self._executor_workers != self.num_workers:
            if self._executor is not None:
                self._executor.shutdown(wait=False)  # its queued batches still complete
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix=DECODE_THREAD_PREFIX)
            self._executor_workers = self.num_workers
        return self._executor

    def __iter__(self) -> Iterator[TileBatch]:
        pending: deque[list[TileSpan] | Future[TileBatch]] = deque()

        def fill() -> None:
            # Inline mode plans one batch at a time; thread mode keeps `prefetch` in flight.
            target = self.prefetch if self.num_workers > 0 else 1
            while len(pending) < target:
                spans = self._plan()
                if spans is None:
                    return
                pending.append(self._pool().submit(self._load, spans) if self.num_workers > 0 else spans)

        try:
            fill()
            while pending:
                item = pending.popleft()
                batch = self._load(item) if isinstance(item, list) else item.result()
                if self.num_workers > 0:
                    fill()  # decode ahead while the consumer computes this batch
                yield batch
                if self.num_workers == 0 or not pending:
                    fill()
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()


# ------------------------------------------------------------------------------ GPU decode


def decode_on_device(batch: TileBatch, device: torch.device | str) -> torch.Tensor:
    """Decode a ``decode=False`` batch's JPEG tiles on a CUDA device (torchvision / nvJPEG).

    Returns:
        (B, T, T, 3) uint8 on ``device``; padding and failed rows are zeros. A store whose
        tiles fail to decode is added to ``batch.failed``.

    Raises:
        ConfigError: torchvision's device decoder is unavailable.
    """
    from torchvision.io import decode_jpeg

    if batch.raw is None:
        raise ConfigError("decode_on_device needs a stream built with decode=False")
    dev = torch.device(device)
    t = batch.spans[0].store.tile_size
    out = torch.zeros((len(batch.raw), t, t, 3), dtype=torch.uint8, device=dev)
    for sp in batch.spans:
        if sp.index in batch.failed:
            continue
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch.raw[sp.offset : sp.offset + len(sp)] if b]
        if not data:
            continue
        try:
            images = decode_jpeg(data, device=dev)
            chw = torch.stack(images)
            if tuple(chw.shape[1:]) != (3, t, t):
                raise StoreError(f"{sp.store.path}: tiles decode to shape {tuple(chw.shape[1:])}, expected (3, {t}, {t})")
        except Exception as exc:
            err = exc if isinstance(exc, StoreError) else StoreError(
                f"{sp.store.path}: tiles {sp.start}..{sp.stop - 1} cannot be decoded on {dev} ({one_line(exc)}); "
                "re-tile the slide"
            )
            batch.failed[sp.index] = err
            continue
        out[sp.rows] = chw.permute(0, 2, 3, 1)
    return out


# ---------------------------------------------------------------------------- thread budget


def plan_decode_threads(decode_seconds: float, forward_seconds: float, cores: int) -> tuple[int, int]:
    """Split ``cores`` between decoding threads and torch's intra-op threads for a CPU model.

    Predicted throughputs (tiles/s), assuming the model scales linearly with its threads:
    decoding inline (0 threads; the model keeps all cores, decoding adds to each batch)
    gives ``1 / (decode + forward)``; ``w`` decoding threads beside ``cores - w`` model threads
    give ``min(w / decode, (cores - w) / (cores * forward))``. The best one is returned.

    Args:
        decode_seconds: CPU seconds to read and decode one tile on one thread.
        forward_seconds: Wall seconds of the model per tile with ``cores`` threads.
        cores: The CPU budget (decoding threads + model threads never exceed it).

    Returns:
        ``(decode threads, torch threads)``.
    """
    cores = max(1, int(cores))
    best, plan = 1.0 / max(1e-12, decode_seconds + forward_seconds), (0, cores)
    for w in range(1, cores):
        rate = min(w / max(1e-12, decode_seconds), (cores - w) / (cores * max(1e-12, forward_seconds)))
        if rate > best * 1.02:  # prefer the simpler inline plan on a near tie
            best, plan = rate, (w, cores - w)
    return plan
