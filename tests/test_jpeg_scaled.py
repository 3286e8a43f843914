"""DCT-domain scaled JPEG decoding: quality against the exact resampler, geometry, fallbacks."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_convnext.tiling.jpeg_scaled import jpeg_level, pick_scale, read_region_scaled, read_window_scaled
from wsi_convnext.slide import open_slide, resolve_mpp
from wsi_convnext.store import open_store
from wsi_convnext.synthetic import SyntheticSlideSpec, TissueSpec, write_synthetic_slide
from wsi_convnext.tiling.tiler import TileParams, _RegionJob, resample_tile, tile_slide
from wsi_convnext.tiling.grid import group_regions, plan_grid


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255**2 / max(mse, 1e-12))


def _compare(path: Path, target_mpp: float, backend: str = "tiffslide", max_regions: int = 6) -> tuple[list[float], list[int]]:
    """PSNR of fast-path tiles against the exact path (full decode + tiler.resample_tile), and the scales used."""
    psnrs: list[float] = []
    scales: list[int] = []
    with open_slide(path, backend=backend) as reader:
        mpp, _ = resolve_mpp(reader)
        grid = plan_grid(reader.dimensions, reader.level_downsamples, slide_mpp=mpp, target_mpp=target_mpp, tile_size=224)
        regions = group_regions(grid, reader.level_dimensions[grid.read_level],
                                source_tile=reader.level_tile_sizes[grid.read_level])  # fmt: skip
        params = TileParams(mpp=target_mpp)
        for region in regions[:max_regions]:
            job = _RegionJob.of(grid, region, params)
            fast = read_region_scaled(reader, job.location, job.level, job.size, job.boxes, 224)
            if fast is None:
                scales.append(1)
                continue
            image, boxes = fast
            scales.append(round(job.size[0] / image.size[0]))
            full = Image.fromarray(reader.read_region(job.location, job.level, job.size))
            for box_full, box_fast in zip(job.boxes, boxes, strict=True):
                ref = resample_tile(full, box_full, 224)
                if ref.std() < 8:  # background: trivially equal
                    continue
                psnrs.append(_psnr(resample_tile(image, box_fast, 224), ref))
    return psnrs, scales


@pytest.mark.parametrize(("factor", "scale"), [(2, 2), (4, 4), (8, 8)])
def test_real_slide_whole_factors_match_the_exact_area_average(cmu_slide, factor, scale):
    # CMU-1 (real H&E, Aperio RGB-JPEG tiles) at exactly 2×, 4×, 8× its 0.499 µm/px.
    with open_slide(cmu_slide, backend="tiffslide") as r:
        slide_mpp = resolve_mpp(r)[0]
    psnrs, scales = _compare(cmu_slide, factor * slide_mpp)
    assert set(scales) == {scale}, "the fast path must serve every region"
    assert psnrs and min(psnrs) >= 40.0, f"min PSNR {min(psnrs):.1f} dB over {len(psnrs)} tissue tiles"


def test_real_slide_fractional_factors(cmu_slide):
    # 2.0 µm/px: factor 4.008, decoded at 1/2 so the resampler's kernel spans >= 2 pixels.
    psnrs, scales = _compare(cmu_slide, 2.0)
    assert set(scales) == {2}
    assert min(psnrs) >= 40.0, f"min PSNR {min(psnrs):.1f} dB"
    # 1.0 µm/px: factor 2.004 would straddle decoded pixels; read at full resolution instead.
    _, scales = _compare(cmu_slide, 1.0)
    assert set(scales) == {1}


@pytest.fixture(scope="module")
def he40x(tmp_path_factory) -> Path:
    """A generated 40× (0.25 µm/px) H&E-like slide with a JPEG pyramid 1/4."""
    spec = SyntheticSlideSpec(width=4096, height=3072, mpp=0.25, downsamples=(1, 4), compression="jpeg", quality=90,
                              seed=5, tissue=TissueSpec(n_blobs=2, coverage=0.5))  # fmt: skip
    return write_synthetic_slide(tmp_path_factory.mktemp("he40x") / "he40x.svs", spec, workers=2).path


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_generated_40x_pyramid_at_20x(he40x, backend):
    psnrs, scales = _compare(he40x, 0.5, backend=backend)
    assert set(scales) == {2} and len(psnrs) > 20
    assert min(psnrs) >= 40.0, f"min PSNR {min(psnrs):.1f} dB"


def test_lines_100um_apart_land_200px_apart_through_the_fast_path(tmp_path):
    spec = SyntheticSlideSpec(width=3200, height=2400, mpp=0.25, downsamples=(1, 4), compression="jpeg", quality=95,
                              pattern="lines", line_spacing_um=100.0, line_width_um=2.0)  # fmt: skip
    slide = write_synthetic_slide(tmp_path / "lines.svs", spec, workers=2).path
    with open_slide(slide) as reader:
        assert jpeg_level(slide, reader.level_dimensions[0]) is not None  # eligible: JPEG level 0, factor 2
    store = open_store(tile_slide(slide, tmp_path / "out", TileParams(mpp=0.5, min_tissue=0.0, encoding="png")).store_path)
    assert store.attrs["read_level"] == 0
    for i in range(0, len(store), max(1, len(store) // 7)):
        profile = store.tile(i).mean(axis=(0, 2))
        cols = np.flatnonzero(profile < 128)
        groups = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
        centres = np.array([g.mean() for g in groups if g.size])
        centres = centres[(centres > 1) & (centres < 223)]
        assert len(centres) >= 1
        # Line k sits at level-0 x = k * 400 px (+ its half width): tile px (k*400 + 4 - x0) / 2.
        x0 = store.coords[i, 0]
        expected = (np.arange(math.ceil((x0 - 8) / 400), (x0 + 448) // 400 + 1) * 400 + 4 - x0) / 2
        expected = expected[(expected > 1) & (expected < 223)]
        np.testing.assert_allclose(np.sort(centres), np.sort(expected), atol=1.0)
        if len(centres) >= 2:
            assert np.diff(np.sort(centres)) == pytest.approx(200, abs=1.0)


def test_pick_scale():
    whole = [(0.0, 448.0, 448.0, 896.0)]
    assert pick_scale(2.0, whole, (256, 256)) == 2
    assert pick_scale(4.0, [(0.0, 0.0, 896.0, 896.0)], (256, 256)) == 4
    assert pick_scale(2.0, [(1.0, 0.0, 449.0, 448.0)], (256, 256)) == 1  # odd offset: straddles
    assert pick_scale(2.004, [(0.0, 0.0, 448.9, 448.9)], (240, 240)) == 1
    assert pick_scale(4.008, [(3.0, 0.0, 900.8, 897.8)], (240, 240)) == 2
    assert pick_scale(16.0, [(0.0, 0.0, 3584.0, 3584.0)], (256, 256)) == 8  # remaining 2× by the resampler
    assert pick_scale(1.5, whole, (256, 256)) == 1


def test_not_jpeg_or_broken_tiles_fall_back(tmp_path, he40x):
    zlib = write_synthetic_slide(tmp_path / "zlib.svs", SyntheticSlideSpec(
        width=2048, height=2048, mpp=0.25, downsamples=(1, 4), compression="zlib", seed=1), workers=2).path  # fmt: skip
    box = [(0.0, 0.0, 448.0, 448.0)]
    with open_slide(zlib) as reader:
        assert jpeg_level(zlib, reader.level_dimensions[0]) is None
        assert read_region_scaled(reader, (0, 0), 0, (512, 512), box, 224) is None
    # Garbage in the bytes of one level-0 tile: the fast path steps aside (the normal read reports it).
    broken = tmp_path / "broken.svs"
    shutil.copy(he40x, broken)
    with open_slide(broken) as reader:
        level = jpeg_level(broken, reader.level_dimensions[0])
        assert level is not None
        image, _ = read_window_scaled(level, (0, 0, 512, 512), 2)
        assert image.shape == (256, 256, 3)
        i = 1  # tile (1, 0)
        with broken.open("r+b") as fh:
            fh.seek(level.offsets[i] + 2)
            fh.write(b"\xff\x00" * (level.counts[i] // 2 - 2))
        jl = jpeg_level(broken, reader.level_dimensions[0])  # same size/mtime-ns keyed cache may reuse: fine
        with pytest.raises((OSError, ValueError)):
            read_window_scaled(jl, (0, 0, 512, 512), 2)
        assert read_region_scaled(reader, (0, 0), 0, (512, 512), box, 224) is None
