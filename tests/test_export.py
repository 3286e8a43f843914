"""Exporting store embeddings to CLAM/TRIDENT-style HDF5 (and CLAM .pt) files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cmu_stores import CMU_MPP, edit_store_attrs, read_cmu_tiles, write_store
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


# --- geojson (QuPath) and anndata (scverse) -----------------------------------------------------


@pytest.fixture(scope="module")
def cmu_tiled(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real store tiled from CMU-1-Small-Region (real tissue mask and tissue fractions) with scores."""
    from wsi_convnext.tiling.tiler import TileParams, tile_slide

    res = tile_slide(cmu_slide, tmp_path_factory.mktemp("tiled"), TileParams(mpp=1.0, tile_size=112, workers=1))
    store = open_store(res.store_path)
    n = len(store)
    rng = np.random.default_rng(0)
    store.write_scores("abmil", rng.random(n).astype(np.float32), {"score": "attention", "columns": ["tumor"]})
    store.write_scores("clam", rng.random((n, 2)).astype(np.float32),
                       {"score": "attention", "columns": ["normal", "tumor"]})  # fmt: skip
    return res.store_path


def _ring_area(ring: list[list[float]]) -> float:
    x, y = np.asarray(ring, dtype=float).T
    return 0.5 * float((x[:-1] * y[1:] - x[1:] * y[:-1]).sum())


def _check_geojson_structure(obj: dict) -> None:
    """RFC 7946 structure: FeatureCollection of Features with valid, closed, oriented rings."""
    assert obj["type"] == "FeatureCollection" and isinstance(obj["features"], list)
    for feat in obj["features"]:
        assert feat["type"] == "Feature" and isinstance(feat["properties"], dict)
        geom = feat["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        for poly in polys:
            assert len(poly) >= 1
            for j, ring in enumerate(poly):
                assert len(ring) >= 4 and ring[0] == ring[-1]
                assert all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in ring)
                assert (_ring_area(ring) > 0) == (j == 0)  # exterior counterclockwise, holes clockwise


def test_mask_polygons_trace_regions_and_holes() -> None:
    from wsi_convnext.outputs.exports.geojson import mask_polygons

    mask = np.zeros((40, 40), bool)
    mask[2:22, 2:22] = True  # a 20×20 square ...
    mask[6:16, 6:16] = False  # ... with a 10×10 hole ...
    mask[9:12, 9:12] = True  # ... holding a 3×3 island
    mask[30:34, 25:37] = True  # and a separate 4×12 strip
    polys = mask_polygons(mask, 4.0)
    assert sorted(len(p) for p in polys) == [1, 1, 2]  # the square has one hole
    _check_geojson_structure({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "MultiPolygon", "coordinates": polys}}]})
    square = next(p for p in polys if len(p) == 2)
    xs, ys = np.asarray(square[0]).T
    # Pixel edges scaled by the downsample: columns 2..21 cover level-0 x 8..88.
    assert xs.min() == pytest.approx(8, abs=2.1) and xs.max() == pytest.approx(88, abs=2.1)
    assert ys.min() == pytest.approx(8, abs=2.1) and ys.max() == pytest.approx(88, abs=2.1)
    net = sum(_ring_area(r) for r in square)  # hole rings are negative
    assert net == pytest.approx((400 - 100) * 16, rel=0.03)
    total = sum(_ring_area(r) for p in polys for r in p)
    assert total == pytest.approx(mask.sum() * 16, rel=0.05)


def test_geojson_for_qupath(tmp_path: Path, cmu_tiled: Path) -> None:
    store = open_store(cmu_tiled)
    assert store.feature_keys == []  # geojson needs no embeddings
    (path,) = export_features([cmu_tiled], tmp_path / "qupath", fmt="geojson")
    assert path.name == f"{store.slide_id}.geojson" and _leftovers(path.parent) == []
    text = path.read_text(encoding="utf-8")
    obj = json.loads(text)
    _check_geojson_structure(obj)
    try:
        import geojson
    except ImportError:
        pass
    else:
        assert geojson.loads(text).is_valid

    tissue = [f for f in obj["features"] if f["properties"]["objectType"] == "annotation"]
    tiles = [f for f in obj["features"] if f["properties"]["objectType"] == "detection"]
    assert len(tissue) == 1 and tissue[0]["properties"]["classification"]["name"] == "Tissue"
    ds = store.attrs["mask_downsample"]
    area = sum(_ring_area(r) for p in tissue[0]["geometry"]["coordinates"] for r in p)
    assert area == pytest.approx(store.tissue_mask.sum() * ds * ds, rel=0.05)

    assert len(tiles) == len(store)
    corners = np.array([f["geometry"]["coordinates"][0][0] for f in tiles])
    np.testing.assert_array_equal(corners, store.coords)
    for f, (x, y) in zip(tiles, store.coords):
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert ring[:, 0].min() == x and ring[:, 1].min() == y
        np.testing.assert_allclose(ring.max(axis=0) - ring.min(axis=0), store.extent0, atol=0.01)
    m = [f["properties"]["measurements"] for f in tiles]
    assert [f["properties"]["tile_index"] for f in tiles] == list(range(len(store)))
    np.testing.assert_allclose([v["tissue_fraction"] for v in m], store.tissue_fraction, rtol=1e-6)
    np.testing.assert_allclose([v["abmil"] for v in m], store.scores("abmil"), rtol=1e-6)
    np.testing.assert_allclose([v["clam_tumor"] for v in m], store.scores("clam")[:, 1], rtol=1e-6)
    assert obj["wsi_convnext"]["extent0"] == pytest.approx(store.extent0)


def _embedded_copy(cmu_tiled: Path, root: Path, name: str, seed: int) -> Path:
    import shutil

    dst = root / f"{name}.zarr"
    shutil.copytree(cmu_tiled, dst)
    edit_store_attrs(dst, slide_id=name)
    store = open_store(dst)
    store.write_features("enc", np.random.default_rng(seed).normal(size=(len(store), 8)).astype(np.float16),
                         {"model": "convnext_atto", "stem": "patch", "weights_sha256": "random",
                          "preprocessing": {"mean": [0.485, 0.456, 0.406], "resize": "never"}, "weights_path": None,
                          "transform": {"name": "macenko", "stain_matrix": [[0.56, 0.22], [0.72, 0.8], [0.41, 0.56]],
                                        "stats": {"tiles": len(store), "identity_fallbacks": 0}}})  # fmt: skip
    return dst


def test_anndata_round_trip(tmp_path: Path, cmu_tiled: Path) -> None:
    anndata = pytest.importorskip("anndata", reason='anndata not installed (pip install "wsi-convnext[scverse]")')
    a = _embedded_copy(cmu_tiled, tmp_path / "stores", "slide_a", 0)
    b = _embedded_copy(cmu_tiled, tmp_path / "stores", "slide_b", 1)
    paths = export_features([tmp_path / "stores"], tmp_path / "ad", fmt="anndata")
    assert [p.name for p in paths] == ["slide_a.h5ad", "slide_b.h5ad"]
    for path, h5ad in zip([a, b], paths):
        store, ad = open_store(path), anndata.read_h5ad(h5ad)
        assert ad.shape == (len(store), 8) and ad.X.dtype == np.float32
        np.testing.assert_array_equal(ad.X, store.features("enc").astype(np.float32))
        np.testing.assert_array_equal(ad.obsm["spatial"], store.coords)
        np.testing.assert_array_equal(ad.obs["tile"], np.arange(len(store)))
        np.testing.assert_allclose(ad.obs["tissue_fraction"], store.tissue_fraction)
        np.testing.assert_allclose(ad.obs["abmil"], store.scores("abmil"))
        np.testing.assert_allclose(ad.obs[["clam_normal", "clam_tumor"]].to_numpy(), store.scores("clam"))
        meta = ad.uns["wsi_convnext"]
        assert meta["feature_key"] == "enc" and meta["encoder"]["model"] == "convnext_atto"
        assert meta["mpp"] == store.mpp and meta["slides"][store.slide_id]["level0_mpp"] == store.slide_mpp
        assert list(meta["encoder"]["preprocessing"]["mean"]) == [0.485, 0.456, 0.406]
        assert np.asarray(meta["encoder"]["transform"]["stain_matrix"]).shape == (3, 2)  # nested provenance kept

    (cohort,) = export_features([a, b], tmp_path / "cohort", fmt="anndata", cohort=True)
    assert cohort.name == "cohort.h5ad"
    ad = anndata.read_h5ad(cohort)
    n = len(open_store(a))
    assert ad.n_obs == 2 * n and list(ad.obs["slide_id"].cat.categories) == ["slide_a", "slide_b"]
    assert ad.obs_names.is_unique and ad.obs_names[n] == "slide_b:0"
    np.testing.assert_array_equal(ad[ad.obs["slide_id"] == "slide_b"].X, open_store(b).features("enc").astype(np.float32))
    assert set(ad.uns["wsi_convnext"]["slides"]) == {"slide_a", "slide_b"}
    with pytest.raises(ConfigError, match="one file per slide.*--cohort"):
        export_features([a], tmp_path / "x", fmt="h5", cohort=True)


def test_anndata_missing_says_how_to_install(tmp_path: Path, cmu_tiled: Path) -> None:
    # A fresh interpreter where `import anndata` fails, as on an install without the extra.
    code = ("import sys; sys.modules['anndata'] = None; from wsi_convnext.cli import app; "
            f"app(['export', {str(cmu_tiled)!r}, '--format', 'anndata', '--out', {str(tmp_path / 'o')!r}])")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "wsi-convnext[scverse]"' in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_export_lists_formats_and_writes(tmp_path: Path, cmu_tiled: Path) -> None:
    from typer.testing import CliRunner

    from wsi_convnext.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["export", "--help"], terminal_width=400)
    assert res.exit_code == 0 and all(name in res.output for name in FORMATS)
    res = runner.invoke(app, ["export", str(cmu_tiled), "--format", "geojson", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g" / f"{open_store(cmu_tiled).slide_id}.geojson").is_file()
    res = runner.invoke(app, ["export", str(cmu_tiled), "--format", "h5", "--cohort", "--out", str(tmp_path / "h")])
    assert res.exit_code == 2 and "--cohort" in res.output
