"""Tiling slides into stores: exact geometry, pixels, re-runs, atomicity, both backends."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_pyramid_tiff
from wsi_convnext.errors import MppError, NoTissueError, StoreExistsError
from wsi_convnext.slide import open_slide
from wsi_convnext.store import open_store
from wsi_convnext.tiling.tiler import TileParams, tile_slide

BACKENDS = ["openslide", "tiffslide"]


def _lines_image(w: int, h: int, spacing: int, width: int) -> np.ndarray:
    img = np.full((h, w, 3), 250, np.uint8)
    for x in range(0, w, spacing):
        img[:, x : x + width] = 20
    for y in range(0, h, spacing):
        img[y : y + width, :] = 20
    return img


@pytest.fixture(scope="module")
def lines_slide(tmp_path_factory) -> Path:
    """0.25 µm/px (a 40× scan), levels 1/4, dark 2-µm lines every 100 µm (400 px)."""
    path = tmp_path_factory.mktemp("lines") / "lines.svs"
    return write_pyramid_tiff(path, _lines_image(3200, 2400, 400, 8), mpp=0.25, downsamples=(1, 4))


def _dark_columns(tile: np.ndarray) -> np.ndarray:
    profile = tile.mean(axis=(0, 2))
    return np.flatnonzero(profile < 128)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("target", "level"), [(0.5, 0), (1.0, 1)])
def test_lines_100um_apart_land_at_exact_pixels(tmp_path, lines_slide, backend, target, level):
    params = TileParams(mpp=target, tile_size=224, min_tissue=0.0, encoding="png", backend=backend)
    res = tile_slide(lines_slide, tmp_path, params)
    store = open_store(res.store_path)
    assert store.attrs["read_level"] == level
    assert store.extent0 == pytest.approx(224 * target / 0.25)
    spacing = 100 / target  # output pixels between lines
    for i in range(0, len(store), max(1, len(store) // 7)):
        x0 = store.coords[i, 0]
        cols = _dark_columns(store.tile(i))
        assert cols.size, "every tile spans at least one line"
        # expected line centres in tile pixels: level-0 line k*400 (+4 px half width)
        k = np.arange(math.ceil((x0 - 8) / 400), (x0 + store.extent0) // 400 + 1)
        expected = (k * 400 + 4 - x0) * 0.25 / target
        expected = expected[(expected > 1) & (expected < 223)]
        groups = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
        centres = np.array([g.mean() for g in groups if g.size])
        centres = centres[(centres > 1) & (centres < 223)]
        np.testing.assert_allclose(np.sort(centres), np.sort(expected), atol=1.0)
        if len(centres) >= 2:
            assert np.diff(np.sort(centres)) == pytest.approx(spacing, abs=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiles_equal_reference_resampling(tmp_path, backend):
    rng = np.random.default_rng(3)
    # Smooth random texture, 0.499 µm/px so the tile extent is fractional (224.45 level-0 px).
    small = rng.integers(0, 255, (60, 80, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC))
    slide = write_pyramid_tiff(tmp_path / "tex.svs", image, mpp=0.499, downsamples=(1, 4))
    res = tile_slide(slide, tmp_path / "out", TileParams(min_tissue=0.0, encoding="png", backend=backend))
    store = open_store(res.store_path)
    extent = store.extent0
    assert extent == pytest.approx(224 * 0.5 / 0.499)
    with open_slide(slide, backend=backend) as reader:
        for i in [0, len(store) // 2, len(store) - 1]:
            x, y = (int(v) for v in store.coords[i])
            m = 6
            lx, ly = max(0, x - m), max(0, y - m)
            rx, ry = min(1600, math.ceil(x + extent) + m), min(1200, math.ceil(y + extent) + m)
            region = reader.read_region((lx, ly), 0, (rx - lx, ry - ly))
            box = (x - lx, y - ly, x - lx + extent, y - ly + extent)
            ref = np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
            diff = np.abs(store.tile(i).astype(int) - ref.astype(int))
            assert diff.max() <= 1, f"tile {i} differs from the reference resampling by {diff.max()}"


def test_rerun_skips_conflicts_and_overwrites(tmp_path, lines_slide):
    params = TileParams(min_tissue=0.0)
    first = tile_slide(lines_slide, tmp_path, params)
    assert not first.skipped and first.n_tiles > 0
    mtime = (first.store_path / "zarr.json").stat().st_mtime_ns
    again = tile_slide(lines_slide, tmp_path, params)
    assert again.skipped and again.n_tiles == first.n_tiles
    assert (first.store_path / "zarr.json").stat().st_mtime_ns == mtime
    with pytest.raises(StoreExistsError, match="tile_size"):
        tile_slide(lines_slide, tmp_path, TileParams(min_tissue=0.0, tile_size=256))
    redone = tile_slide(lines_slide, tmp_path, TileParams(min_tissue=0.0, tile_size=256), overwrite=True)
    assert not redone.skipped and open_store(redone.store_path).tile_size == 256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.zarr", "qc"]


def test_interrupted_run_leaves_nothing_that_looks_finished(tmp_path, lines_slide):
    def boom(done: int, total: int) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-slide

    with pytest.raises(KeyboardInterrupt):
        tile_slide(lines_slide, tmp_path, TileParams(min_tissue=0.0, region_size=256), progress=boom)
    assert not (tmp_path / "lines.zarr").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # and the next run completes normally
    assert tile_slide(lines_slide, tmp_path, TileParams(min_tissue=0.0)).n_tiles > 0


def test_upsampling_is_refused_unless_allowed(tmp_path, lines_slide):
    with pytest.raises(MppError, match="allow-upsample"):
        tile_slide(lines_slide, tmp_path, TileParams(mpp=0.2, min_tissue=0.0))
    res = tile_slide(lines_slide, tmp_path, TileParams(mpp=0.2, min_tissue=0.0, allow_upsample=True))
    assert res.n_tiles > 0


def test_blank_slide_has_no_tissue(tmp_path):
    rng = np.random.default_rng(0)
    blank = (245 + rng.integers(-3, 4, (1200, 1600, 3))).astype(np.uint8)
    slide = write_pyramid_tiff(tmp_path / "blank.svs", blank, mpp=0.5, downsamples=(1, 4))
    with pytest.raises(NoTissueError, match="no tissue found") as info:
        tile_slide(slide, tmp_path / "out", TileParams())
    assert not (tmp_path / "out" / "blank.zarr").exists()
    # The message says what the mask saw and where the picture is; the picture exists.
    qc = tmp_path / "out" / "qc" / "blank.png"
    assert "largest tile fraction 0.000" in str(info.value) and "no candidate pixel" in str(info.value)
    assert f"QC picture: {qc}" in str(info.value) and info.value.qc_path == qc
    assert Image.open(qc).size[0] > 0


def test_small_fragment_no_tissue_names_the_knob(tmp_path, fragment_slide):
    """Issue 12 item 8: --min-tissue 0.05 cannot help; the message names --tissue min_object_um2."""
    import re

    from conftest import FRAGMENT_UM2
    from wsi_convnext.tiling.tissue import TissueParams

    params = TileParams(min_tissue=0.05)
    with pytest.raises(NoTissueError) as info:
        tile_slide(fragment_slide, tmp_path / "out", params, slide_mpp=0.5)
    msg = str(info.value)
    assert "\n" not in msg and "largest tile fraction 0.000" in msg
    assert "removed 1 piece" in msg and "smaller than min_object_um2=2500" in msg
    area = float(re.search(r"removed 1 piece \(([\d,]+) µm²\)", msg).group(1).replace(",", ""))
    assert 0.8 * FRAGMENT_UM2 < area < TissueParams().min_object_um2
    value = float(re.search(r"--tissue min_object_um2=([\d.]+)", msg).group(1))
    assert value < area
    qc = tmp_path / "out" / "qc" / "ihc-fragment.png"
    picture = np.asarray(Image.open(qc).convert("RGB"))
    assert (np.abs(picture.astype(int) - (255, 140, 0)).sum(axis=-1) < 10).sum() > 20  # removed piece in orange

    fixed = TileParams(min_tissue=0.05, tissue=TissueParams(min_object_um2=value))
    res = tile_slide(fragment_slide, tmp_path / "out", fixed, slide_mpp=0.5)
    store = open_store(res.store_path)
    assert res.n_tiles >= 1 and store.tissue_fraction.max() >= 0.05
    assert store.attrs["tissue"]["min_object_um2"] == value  # recorded in the store


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_slide_both_backends(tmp_path, cmu_slide, backend):
    res = tile_slide(cmu_slide, tmp_path, TileParams(backend=backend))
    store = open_store(res.store_path)
    assert store.attrs["source"]["backend"] == backend
    assert store.slide_mpp == pytest.approx(0.499)
    # 2220×2967 px at 0.499 µm/px → 9 × 13 grid of 224-px tiles at 0.5 µm/px
    assert store.attrs["grid_tiles"] == 9 * 13
    assert 20 <= len(store) <= 90  # roughly a third of the area is tissue
    assert res.qc_path is not None and res.qc_path.is_file()
    tile = store.tile(0)
    assert tile.shape == (224, 224, 3) and tile.std() > 5
    tf = store.tissue_fraction
    assert tf.min() >= 0.25


def test_integer_factor_tiles_are_exact_area_averages(tmp_path, lines_slide):
    res = tile_slide(lines_slide, tmp_path, TileParams(mpp=0.5, min_tissue=0.0, encoding="png", backend="openslide"))
    store = open_store(res.store_path)
    with open_slide(lines_slide, backend="openslide") as reader:
        for i in (0, len(store) - 1):
            x, y = (int(v) for v in store.coords[i])
            ref = reader.read_region((x, y), 0, (448, 448)).astype(np.uint16)
            ref = np.asarray(Image.fromarray(ref.astype(np.uint8)).reduce(2))
            np.testing.assert_array_equal(store.tile(i), ref)


def test_auto_reads_metadata_with_openslide_and_pixels_fast(tmp_path, cmu_slide):
    auto = open_store(tile_slide(cmu_slide, tmp_path / "a", TileParams()).store_path)
    slow = open_store(tile_slide(cmu_slide, tmp_path / "o", TileParams(backend="openslide")).store_path)
    assert auto.attrs["source"]["backend"] == "openslide"
    assert auto.attrs["source"]["pixel_backend"] == "tiffslide"
    np.testing.assert_array_equal(auto.coords, slow.coords)
    diff = np.abs(auto.read_tiles(slice(0, 8)).astype(int) - slow.read_tiles(slice(0, 8)).astype(int))
    assert diff.mean() < 1.0  # same JPEG source decoded by two libraries


@pytest.mark.slow
@pytest.mark.parametrize("pens", [(), ("blue", "green")])
def test_tissue_recovery_against_ground_truth(tmp_path, pens):
    from wsi_convnext.synthetic import SyntheticSlideSpec, TissueSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(
        width=12000, height=10000, mpp=0.5, seed=7, tissue=TissueSpec(n_blobs=2, coverage=0.35, n_fragments=2),
        pen_marks=pens,
    )  # fmt: skip
    synth = write_synthetic_slide(tmp_path / "tissue.svs", spec)
    res = tile_slide(synth.path, tmp_path / "out", TileParams())
    store = open_store(res.store_path)
    tissue = synth.tissue_mask(2.0)  # 4 level-0 px per mask px
    # Tissue under pen ink is deliberately dropped (ink corrupts the tile), so coverage is
    # measured on ink-free tissue; ink over tissue is still not "background".
    truth = tissue & ~synth.pen_mask(2.0)
    s = 2.0 / 0.5
    covered = np.zeros_like(truth)
    true_frac = []
    for x, y in store.coords:
        r0, c0 = int(y / s), int(x / s)
        r1, c1 = int(np.ceil((y + store.extent0) / s)), int(np.ceil((x + store.extent0) / s))
        covered[r0:r1, c0:c1] = True
        true_frac.append(tissue[r0:r1, c0:c1].mean())
    coverage = (covered & truth).sum() / truth.sum()
    mostly_background = np.mean(np.array(true_frac) < 0.5)
    assert coverage >= 0.95, f"kept tiles cover only {coverage:.1%} of the true tissue"
    assert mostly_background <= 0.05, f"{mostly_background:.1%} of kept tiles are mostly background"


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg2000_40x_scan(tmp_path, backend):
    from wsi_convnext.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(width=3000, height=2400, mpp=0.25, compression="jpeg2000", seed=2, downsamples=(1, 4))
    synth = write_synthetic_slide(tmp_path / "j2k.svs", spec)
    res = tile_slide(synth.path, tmp_path / "out", TileParams(backend=backend))
    store = open_store(res.store_path)
    assert res.n_tiles > 0 and store.attrs["read_level"] == 0 and store.extent0 == pytest.approx(448)
    assert store.tile(0).std() > 5


def test_process_and_thread_paths_write_identical_stores(tmp_path, cmu_slide, monkeypatch):
    import wsi_convnext.tiling.tiler as tiler

    threads = open_store(tile_slide(cmu_slide, tmp_path / "t", TileParams(workers=2)).store_path)
    monkeypatch.setattr(tiler, "PROCESS_MIN_TILES", 1)
    procs = open_store(tile_slide(cmu_slide, tmp_path / "p", TileParams(workers=2)).store_path)
    np.testing.assert_array_equal(threads.coords, procs.coords)
    for i in (0, len(threads) // 2, len(threads) - 1):
        assert threads.tile_bytes(slice(i, i + 1))[0] == procs.tile_bytes(slice(i, i + 1))[0]
