"""Tile datasets over real stores (CMU-1 tiles read with OpenSlide, written as real zarr stores)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmu_stores import read_cmu_tiles, write_store
from wsi_convnext.data import (
    DECODE_THREAD_PREFIX,
    StoreTileDataset,
    StoreTileStream,
    TileBatch,
    plan_decode_threads,
)
from wsi_convnext.errors import ConfigError, StoreError
from wsi_convnext.store import encode_tile, open_store

SIZES = {"a": 40, "b": 7, "c": 25}  # 72 tiles: batches of 16 cross both store boundaries


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(DECODE_THREAD_PREFIX)]


@pytest.fixture(scope="module")
def cmu_tiles(cmu_slide: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_cmu_tiles(cmu_slide, 72)


@pytest.fixture(scope="module")
def stores(cmu_tiles, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real JPEG stores of 40, 7 and 25 different CMU tiles (b is PNG-encoded)."""
    tiles, coords = cmu_tiles
    root = tmp_path_factory.mktemp("data")
    out, start = [], 0
    for name, n in SIZES.items():
        enc = "png" if name == "b" else "jpeg"
        out.append(write_store(root / f"{name}.zarr", tiles[start : start + n], coords[start : start + n], encoding=enc))
        start += n
    return out


def _expected(paths: list[Path]) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Per-store reading: tiles, slide ids, tile indices and coords of all stores, concatenated."""
    opened = [open_store(p) for p in paths]
    tiles = np.concatenate([s.read_tiles(slice(0, len(s))) for s in opened])
    ids = [s.slide_id for s in opened for _ in range(len(s))]
    idx = np.concatenate([np.arange(len(s)) for s in opened])
    coords = np.concatenate([s.coords for s in opened])
    return tiles, ids, idx, coords


@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_stream_crosses_stores_in_order(stores: list[Path], num_workers: int) -> None:
    tiles, ids, idx, coords = _expected(stores)
    got, got_ids, got_idx, got_coords, shapes, spans = [], [], [], [], [], []
    with StoreTileStream(stores, 16, num_workers=num_workers) as stream:
        for batch in stream:
            assert isinstance(batch, TileBatch) and batch.tiles.dtype == torch.uint8 and not batch.failed
            shapes.append(batch.tiles.shape[0])
            got.append(batch.tiles.numpy())
            got_ids += batch.slide_ids
            got_idx.append(batch.tile_indices)
            got_coords.append(batch.coords)
            spans.append([(sp.store.slide_id, sp.start, sp.stop, sp.offset, sp.last) for sp in batch.spans])
    assert shapes == [16, 16, 16, 16, 8]  # no partial batch at store boundaries
    assert spans[2] == [("a", 32, 40, 0, True), ("b", 0, 7, 8, True), ("c", 0, 1, 15, False)]
    np.testing.assert_array_equal(np.concatenate(got), tiles)
    assert got_ids == ids
    np.testing.assert_array_equal(np.concatenate(got_idx), idx)
    np.testing.assert_array_equal(np.concatenate(got_coords), coords)
    assert stream.stores_seen == 3 and stream.decode_seconds_per_tile > 0
    assert not _decode_threads()


@pytest.mark.parametrize("num_workers", [0, 3])
def test_padded_batches_of_one_store(stores: list[Path], num_workers: int) -> None:
    """The single-store loader of the embedding pipeline before the move: spans, padding, order."""
    store = open_store(stores[0])
    spans = []
    with StoreTileStream([store], 12, num_workers=num_workers, prefetch=2, pad=True) as stream:
        for batch in stream:
            (sp,) = batch.spans
            assert batch.tiles.shape == (12, 224, 224, 3) and batch.n == len(sp)
            np.testing.assert_array_equal(batch.tiles[sp.rows].numpy(), store.read_tiles(slice(sp.start, sp.stop)))
            assert not batch.tiles[batch.n :].any()  # padding rows are zero
            spans.append((sp.start, sp.stop))
    assert spans == [(0, 12), (12, 24), (24, 36), (36, 40)]
    assert not _decode_threads()


def test_workers_switch_mid_stream_and_generator_source(stores: list[Path]) -> None:
    tiles, *_ = _expected(stores)
    opened: list[str] = []

    def lazily():
        for p in stores:
            opened.append(p.name)
            yield p

    got = []
    with StoreTileStream(lazily(), 16, num_workers=0) as stream:
        for i, batch in enumerate(stream):
            if i == 0:
                assert opened == ["a.zarr"]  # stores are opened only when their tiles are needed
                stream.set_num_workers(2)
            got.append(batch.tiles.numpy())
    np.testing.assert_array_equal(np.concatenate(got), tiles)
    assert not _decode_threads()


def test_a_new_tile_size_starts_a_new_batch(stores: list[Path], cmu_tiles, tmp_path: Path) -> None:
    tiles, coords = cmu_tiles
    small = np.stack([np.asarray(Image.fromarray(t).resize((112, 112))) for t in tiles[:10]])
    other = write_store(tmp_path / "small.zarr", small, coords[:10])
    with StoreTileStream([stores[1], other], 16, num_workers=2) as stream:
        batches = list(stream)
    assert [(b.tiles.shape[1], b.n) for b in batches] == [(224, 7), (112, 10)]
    np.testing.assert_array_equal(batches[1].tiles.numpy(), open_store(other).read_tiles(slice(0, 10)))


def test_a_corrupt_tile_fails_only_its_store(stores: list[Path], cmu_tiles, tmp_path: Path) -> None:
    tiles, coords = cmu_tiles
    encoded = [b"\xff\xd8 not a jpeg" if i == 3 else encode_tile(t, quality=95) for i, t in enumerate(tiles[:20])]
    bad = write_store(tmp_path / "bad.zarr", tiles[:20], coords[:20], encoded=encoded)
    seen: dict[str, int] = {}
    failures = {}
    with StoreTileStream([bad, stores[2]], 8, num_workers=2, prefetch=1) as stream:
        for batch in stream:
            failures.update(batch.failed)
            for sp in batch.spans:
                if sp.index not in failures:
                    seen[sp.store.slide_id] = seen.get(sp.store.slide_id, 0) + len(sp)
                    np.testing.assert_array_equal(
                        batch.tiles[sp.rows].numpy(), sp.store.read_tiles(slice(sp.start, sp.stop))
                    )
    assert list(failures) == [0] and isinstance(failures[0], StoreError)
    assert "tile 3 cannot be decoded" in str(failures[0]) and str(bad) in str(failures[0])
    assert seen == {"c": 25}  # the bad store's later tiles are skipped, the next store is whole
    assert not _decode_threads()


def test_bad_stream_options(stores: list[Path]) -> None:
    with pytest.raises(ConfigError, match="--batch-size"):
        StoreTileStream(stores, 0)
    with pytest.raises(ConfigError, match="--num-workers"):
        StoreTileStream(stores, 4, num_workers=-1)


def test_map_dataset_items_equal_read_tiles(stores: list[Path]) -> None:
    tiles, ids, idx, coords = _expected(stores)
    ds = StoreTileDataset(stores)
    assert len(ds) == sum(SIZES.values())
    for i in (0, 39, 40, 46, 47, 71):
        tile, sid, t = ds[i]
        assert tile.dtype == np.uint8 and tile.shape == (224, 224, 3)
        np.testing.assert_array_equal(tile, tiles[i])
        assert (sid, t) == (ids[i], idx[i])
    np.testing.assert_array_equal(ds.coords(), coords)

    sub = StoreTileDataset(stores, indices=[46, 3, 50])
    assert [sub[i][1:] for i in range(3)] == [("b", 6), ("a", 3), ("c", 3)]
    np.testing.assert_array_equal(sub.coords(), coords[[46, 3, 50]])
    with pytest.raises(IndexError):
        StoreTileDataset(stores, indices=[72])


def test_map_dataset_in_dataloader_workers(stores: list[Path]) -> None:
    """Real DataLoader worker processes reopen the stores and give the same items."""
    tiles, ids, idx, _ = _expected(stores)
    ds = StoreTileDataset(stores, indices=np.arange(36, 52))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    got_tiles, got_ids, got_idx = [], [], []
    for batch_tiles, batch_ids, batch_idx in loader:
        got_tiles.append(batch_tiles.numpy())
        got_ids += list(batch_ids)
        got_idx += batch_idx.tolist()
    np.testing.assert_array_equal(np.concatenate(got_tiles), tiles[36:52])
    assert got_ids == ids[36:52] and got_idx == idx[36:52].tolist()


@pytest.mark.parametrize(
    ("decode_ms", "forward_ms", "cores", "expected"),
    [
        (0.34, 11.0, 2, (0, 2)),  # small model on 2 cores: decoding inline costs ~3 %, a thread 50 %
        (0.34, 80.0, 2, (0, 2)),
        (0.34, 1.4, 16, (1, 15)),  # 16 cores: one decoding thread keeps up, the model loses 1/16
        (1.0, 0.2, 8, (3, 5)),  # decoding dominates: several threads decode
        (0.3, 5.0, 1, (0, 1)),
    ],
)
def test_thread_split(decode_ms: float, forward_ms: float, cores: int, expected: tuple[int, int]) -> None:
    workers, threads = plan_decode_threads(decode_ms / 1e3, forward_ms / 1e3, cores)
    assert (workers, threads) == expected
    assert workers + threads <= cores
