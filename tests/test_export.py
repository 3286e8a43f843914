"""Exporting store embeddings to CLAM/TRIDENT-style HDF5 (and CLAM .pt) files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cmu_stores import CMU_MPP, read_cmu_tiles, write_store
from wsi_convnext.errors import ConfigError, InputNotFoundError, StoreError, StoreExistsError
from wsi_convnext.outputs.export import FORMATS, export_features, read_h5
from wsi_convnext.store import open_store

N = 12


@pytest.fixture(scope="module")
def cmu_tiles(cmu_slide: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_cmu_tiles(cmu_slide, N)


def _store(root: Path, name: str, cmu_tiles, keys: dict[str, np.ndarray] | None = None, **kw) -> Path:
    tiles, coords = cmu_tiles
    path = write_store(root / f"{name}.zarr", tiles, coords, **kw)
    store = open_store(path)
    for key, feats in (keys or {}).items():
        store.write_features(key, feats, {"model": "convnext_atto", "stem": "patch", "weights_sha256": "random",
                                          "preprocessing": {"mean": [0.485, 0.456, 0.406]}})  # fmt: skip
    return path


def _feats(seed: int, d: int = 8, dtype=np.float16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, d)).astype(dtype)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_h5_matches_the_store(tmp_path: Path, cmu_tiles) -> None:
    # A 40x-like store: tiles at 0.5 µm/px from a 0.25 µm/px slide cover 448 level-0 px.
    a = _store(tmp_path / "stores", "slide_a", cmu_tiles, {"enc": _feats(0)}, slide_mpp=0.2495, target_mpp=CMU_MPP)
    b = _store(tmp_path / "stores", "slide_b", cmu_tiles, {"enc": _feats(1)})
    done: list[tuple[int, int]] = []
    out = tmp_path / "h5"
    written = export_features([tmp_path / "stores"], out, progress=lambda i, n: done.append((i, n)))
    assert written == [out / "slide_a.h5", out / "slide_b.h5"] and done == [(1, 2), (2, 2)]
    assert _leftovers(out) == []

    for path, h5 in zip([a, b], written):
        store = open_store(path)
        with h5py.File(h5, "r") as f:
            assert set(f.keys()) == {"features", "coords"}
            feats, coords = f["features"][...], f["coords"][...]
            assert feats.dtype == np.float32 and coords.dtype == np.int64
            np.testing.assert_array_equal(feats, store.features("enc").astype(np.float32))
            np.testing.assert_array_equal(coords, store.coords)
            ca = dict(f["coords"].attrs)
            assert ca["patch_size"] == 224 and ca["name"] == store.slide_id
            assert ca["patch_size_level0"] == round(store.extent0)
            assert ca["level0_mpp"] == store.slide_mpp and ca["target_mpp"] == store.mpp
            assert f["features"].attrs["feature_key"] == "enc" and f.attrs["model"] == "convnext_atto"
            assert f.attrs["weights_sha256"] == "random"
    assert read_h5(written[0])[2]["patch_size_level0"] == 448  # 224 * 0.499 / 0.2495
    assert read_h5(written[1])[2]["patch_size_level0"] == 224


def test_float16_and_pt_formats(tmp_path: Path, cmu_tiles) -> None:
    path = _store(tmp_path, "s", cmu_tiles, {"enc": _feats(2)})
    (h5,) = export_features([path], tmp_path / "o16", dtype="float16")
    feats, coords, _ = read_h5(h5)
    assert feats.dtype == np.float16
    np.testing.assert_array_equal(feats, open_store(path).features("enc"))
    assert "pt" in FORMATS
    (pt,) = export_features([path], tmp_path / "pt", fmt="pt")
    assert pt.name == "s.pt"
    t = torch.load(pt, weights_only=True)
    assert t.dtype == torch.float32 and t.shape == (N, 8)
    np.testing.assert_array_equal(t.numpy(), open_store(path).features("enc").astype(np.float32))


def test_existing_files_need_overwrite(tmp_path: Path, cmu_tiles) -> None:
    path = _store(tmp_path, "s", cmu_tiles, {"enc": _feats(3)})
    out = tmp_path / "out"
    (h5,) = export_features([path], out)
    open_store(path).write_features("enc", _feats(4), {}, overwrite=True)
    with pytest.raises(StoreExistsError, match=r"s\.h5.*--overwrite"):
        export_features([path], out)
    np.testing.assert_array_equal(read_h5(h5)[0], _feats(3).astype(np.float32))  # untouched
    export_features([path], out, overwrite=True)
    np.testing.assert_array_equal(read_h5(h5)[0], _feats(4).astype(np.float32))
    assert _leftovers(out) == []


def test_feature_key_choice(tmp_path: Path, cmu_tiles) -> None:
    path = _store(tmp_path, "s", cmu_tiles, {"enc-a": _feats(5), "enc-b": _feats(6, d=4)})
    with pytest.raises(StoreError, match="several embeddings.*--features"):
        export_features([path], tmp_path / "out")
    with pytest.raises(StoreError, match="no embeddings 'enc-c'.*enc-a, enc-b"):
        export_features([path], tmp_path / "out", feature_key="enc-c")
    (h5,) = export_features([path], tmp_path / "out", feature_key="enc-b")
    assert read_h5(h5)[0].shape == (N, 4)


def test_bad_input_writes_nothing(tmp_path: Path, cmu_tiles) -> None:
    stores = tmp_path / "stores"
    _store(stores, "a_ok", cmu_tiles, {"enc": _feats(7)})
    _store(stores, "b_not_embedded", cmu_tiles)
    out = tmp_path / "out"
    with pytest.raises(StoreError, match="b_not_embedded.zarr: holds no embeddings.*embed"):
        export_features([stores], out)
    assert not out.exists()  # checked before anything was written
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="holds no"):
        export_features([tmp_path / "empty"], out)
    with pytest.raises(ConfigError, match="--format"):
        export_features([stores / "a_ok.zarr"], out, fmt="csv")
    with pytest.raises(ConfigError, match="--dtype"):
        export_features([stores / "a_ok.zarr"], out, dtype="int8")
    twin = _store(tmp_path / "elsewhere", "a_ok", cmu_tiles, {"enc": _feats(8)})
    with pytest.raises(ConfigError, match="share the slide id 'a_ok'"):
        export_features([stores / "a_ok.zarr", twin], out)
    assert not out.exists()
