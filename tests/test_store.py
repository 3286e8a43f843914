"""The zarr tile store: round trip, layout, validation, atomic feature writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_convnext.errors import InputNotFoundError, StoreError, StoreExistsError
from wsi_convnext.store import (
    SCHEMA_VERSION,
    TILES_PER_CHUNK,
    TileStoreWriter,
    encode_tile,
    find_stores,
    open_store,
)


def _tiles(n: int, t: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth tiles so that JPEG is close to the original.
    base = rng.integers(0, 255, (n, 1, 1, 3)).astype(np.uint8)
    return np.broadcast_to(base, (n, t, t, 3)).copy()


def make_store(root: Path, n: int = 300, t: int = 32, encoding: str = "jpeg", name: str = "s1") -> tuple[Path, np.ndarray]:
    tiles = _tiles(n, t)
    w = TileStoreWriter(root / f"{name}.zarr", n, t, encoding)
    for start in range(0, n, TILES_PER_CHUNK):
        w.write_tiles([encode_tile(x, encoding) for x in tiles[start : start + TILES_PER_CHUNK]])
    coords = np.stack([np.arange(n) * 64, np.arange(n) * 2], axis=1)
    path = w.commit(
        coords=coords,
        tissue_fraction=np.linspace(0, 1, n),
        thumbnail=np.zeros((20, 30, 3), np.uint8),
        tissue_mask=np.ones((10, 15), bool),
        attrs={"slide_id": name, "target_mpp": 0.5, "slide_mpp": 0.25, "extent0": 2.0 * t},
    )
    return path, tiles


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_round_trip(tmp_path, encoding):
    path, tiles = make_store(tmp_path, encoding=encoding)
    s = open_store(path)
    assert len(s) == 300 and s.tile_size == 32 and s.mpp == 0.5 and s.slide_mpp == 0.25
    assert s.coords.shape == (300, 2) and s.coords.dtype == np.int64
    assert s.tile(7).shape == (32, 32, 3) and s.tile(7).dtype == np.uint8
    tol = 0 if encoding == "png" else 3
    assert np.abs(s.tile(7).astype(int) - tiles[7]).max() <= tol
    batch = s.read_tiles([299, 0, 7])
    assert np.abs(batch.astype(int) - tiles[[299, 0, 7]]).max() <= tol
    np.testing.assert_array_equal(s.read_tiles(slice(10, 20)), np.stack([s.tile(i) for i in range(10, 20)]))
    assert s.attrs["schema_version"] == SCHEMA_VERSION
    assert s.tile(-1).shape == (32, 32, 3)
    with pytest.raises(IndexError):
        s.tile(300)


def test_tiles_are_chunked_256_per_file(tmp_path):
    path, _ = make_store(tmp_path, n=600)
    files = list((path / "tiles").rglob("c/*"))
    assert len(files) == 3  # ceil(600 / 256), never one file per tile


def test_partial_write_is_not_a_store(tmp_path):
    w = TileStoreWriter(tmp_path / "x.zarr", 10, 16)
    w.write_tiles([encode_tile(t) for t in _tiles(5, 16)])
    # Killed here: nothing exists under the final name, only a hidden partial.
    assert not (tmp_path / "x.zarr").exists()
    assert find_stores_safe(tmp_path) == []
    with pytest.raises(StoreError, match="only 5 of 10"):
        w.commit(coords=np.zeros((10, 2)), tissue_fraction=np.zeros(10), thumbnail=np.zeros((2, 2, 3)),
                 tissue_mask=np.zeros((2, 2), bool), attrs={"target_mpp": 1, "slide_mpp": 1, "extent0": 1})  # fmt: skip
    w.abort()
    assert list(tmp_path.iterdir()) == []


def find_stores_safe(root: Path) -> list[Path]:
    try:
        return find_stores([root])
    except InputNotFoundError:
        return []


def test_validation_errors(tmp_path):
    with pytest.raises(InputNotFoundError):
        open_store(tmp_path / "missing.zarr")
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    foreign.create_array("x", shape=(2,), dtype="i4")
    with pytest.raises(StoreError, match="not a wsi-convnext tile store"):
        open_store(tmp_path / "foreign.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="no zarr.json"):
        open_store(tmp_path / "plain")
    path, _ = make_store(tmp_path)
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["complete"] = False
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="incomplete"):
        open_store(path)
    meta["attributes"]["complete"] = True
    meta["attributes"]["schema_version"] = 999
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 999"):
        open_store(path)


def test_features_atomic_and_coexisting(tmp_path):
    path, _ = make_store(tmp_path)
    s = open_store(path)
    assert s.feature_keys == []
    with pytest.raises(StoreError, match="holds no embeddings"):
        s.features()
    a = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float16)
    s.write_features("enc-a", a, {"model": "convnext_atto"})
    s.write_features("enc-b", a[:, :4].astype(np.float32), {"model": "convnext_tiny"})
    assert s.feature_keys == ["enc-a", "enc-b"]
    np.testing.assert_array_equal(s.features("enc-a"), a)
    assert s.feature_attrs("enc-b")["model"] == "convnext_tiny"
    with pytest.raises(StoreError, match="several embeddings"):
        s.resolve_feature_key(None)
    with pytest.raises(StoreExistsError):
        s.write_features("enc-a", a, {})
    s.write_features("enc-a", a * 0, {}, overwrite=True)
    assert not s.features("enc-a").any()
    with pytest.raises(StoreError, match=r"\(N=300, D\)"):
        s.write_features("bad", a[:10], {})
    with pytest.raises(StoreError, match="invalid array name"):
        s.write_features("../evil", a, {})
    # A feature array left without `complete` (killed mid-write) is invisible.
    zarr.create_array(str(path / "features" / "half"), shape=(300, 2), dtype="f4")
    assert "half" not in s.feature_keys
    s.write_scores("attn", np.ones(300), {"model": "m"})
    assert s.score_keys == ["attn"] and s.scores("attn").dtype == np.float32


def test_find_stores(tmp_path):
    a, _ = make_store(tmp_path, name="a")
    b, _ = make_store(tmp_path, name="b")
    assert find_stores([tmp_path]) == [a, b]
    assert find_stores([b, a, b]) == [b, a]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="holds no"):
        find_stores([tmp_path / "empty"])
