"""Pure tiling geometry: level choice, grid layout, aligned region grouping."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_convnext.errors import MppError
from wsi_convnext.tiling.grid import group_regions, plan_grid, read_window, select_level, tile_box


@pytest.mark.parametrize(
    ("downsamples", "slide_mpp", "target", "expected"),
    [
        ((1, 4, 16), 0.25, 0.5, 0),  # 40× scan to 0.5: level 0, halved (the example)
        ((1, 4, 16), 0.25, 1.0, 1),  # exactly level 1
        ((1, 4, 16), 0.25, 2.0, 1),  # level 1 then halved
        ((1, 4, 16), 0.25, 4.0, 2),
        ((1, 2, 4), 0.5, 0.5, 0),
        ((1, 4.000152, 16.0008), 0.25, 1.0, 1),  # float noise in vendor downsamples
        ((1,), 0.499, 0.5, 0),
    ],
)
def test_select_level_is_coarsest_level_at_least_as_fine(downsamples, slide_mpp, target, expected):
    assert select_level(downsamples, slide_mpp=slide_mpp, target_mpp=target) == expected


def test_select_level_refuses_upsampling_unless_allowed():
    with pytest.raises(MppError, match="finer than the scan .*allow_upsample"):
        select_level((1, 4), slide_mpp=0.5, target_mpp=0.25)
    assert select_level((1, 4), slide_mpp=0.5, target_mpp=0.25, allow_upsample=True) == 0


def test_plan_grid_extent_and_coords_in_level0_pixels():
    grid = plan_grid((10_000, 5_000), (1, 4, 16), slide_mpp=0.25, target_mpp=0.5, tile_size=224)
    assert grid.extent0 == pytest.approx(448.0)
    assert grid.read_level == 0 and grid.read_downsample == 1
    assert grid.coords.dtype == np.int64
    # Whole tiles only: 22 across (22*448 = 9856 <= 10000), 11 down.
    assert len(grid) == 22 * 11
    assert grid.coords[:, 0].max() + grid.extent0 <= 10_000
    assert grid.coords[:, 1].max() + grid.extent0 <= 5_000
    np.testing.assert_array_equal(np.unique(grid.coords[:, 0]), np.arange(22) * 448)


def test_plan_grid_overlap_and_fractional_extent():
    grid = plan_grid((3000, 3000), (1,), slide_mpp=0.499, target_mpp=0.5, tile_size=224, overlap=24)
    assert grid.extent0 == pytest.approx(224 * 0.5 / 0.499)
    assert grid.stride0 == pytest.approx(200 * 0.5 / 0.499)
    xs = np.unique(grid.coords[:, 0])
    np.testing.assert_array_equal(xs, np.round(np.arange(len(xs)) * grid.stride0).astype(np.int64))
    assert xs[-1] + grid.extent0 <= 3000


def test_plan_grid_empty_for_tiny_slide():
    assert len(plan_grid((16, 16), (1,), slide_mpp=0.5, target_mpp=0.5, tile_size=224)) == 0


@pytest.mark.parametrize("source_tile", [None, (256, 256), (240, 240)])
def test_group_regions_partition_and_cover(source_tile):
    grid = plan_grid((20_000, 9_000), (1, 4, 16), slide_mpp=0.25, target_mpp=0.5, tile_size=224)
    rng = np.random.default_rng(0)
    grid = grid.select(rng.random(len(grid)) < 0.6)
    regions = group_regions(grid, (20_000, 9_000), region_size=2048, source_tile=source_tile)
    all_idx = np.concatenate([r.tiles for r in regions])
    np.testing.assert_array_equal(np.sort(all_idx), np.arange(len(grid)))
    for r in regions:
        if source_tile:
            # reads start on the source tile grid (up to the kernel margin)
            assert r.width <= 2048 + 2 * 448 + 16 or r.width <= 2 * 2048
        for i in r.tiles:
            left, top, right, bottom = tile_box(grid, int(i), r)
            assert left >= 0 and top >= 0
            assert right <= r.width and bottom <= r.height


def test_read_window_clipped_and_with_margin():
    grid = plan_grid((1000, 1000), (1,), slide_mpp=0.5, target_mpp=1.0, tile_size=100)
    x0, y0, w, h = read_window(grid, np.array([0]), (1000, 1000))
    assert (x0, y0) == (0, 0)  # clipped at the slide edge
    assert w > 200 and h > 200  # tile extent 200 plus a margin for the resampling kernel


def test_absurd_upsampling_and_huge_grids_are_refused_before_allocating():
    from wsi_convnext._io import physical_memory
    from wsi_convnext.tiling.grid import PLAN_BYTES_PER_TILE

    with pytest.raises(MppError, match=r"upsamples the scan .* less than one"):
        plan_grid((2220, 2967), (1.0,), slide_mpp=0.499, target_mpp=1e-9, tile_size=224, allow_upsample=True)
    # A grid that needs more than half the memory: a side with that many tiles squared.
    side = int((physical_memory() / PLAN_BYTES_PER_TILE) ** 0.5) * 224 * 2
    with pytest.raises(MppError, match=r"plans [\d,]+ tiles, about [\d.]+ GiB .* larger tile size"):
        plan_grid((side, side), (1.0,), slide_mpp=0.25, target_mpp=0.25, tile_size=224)
    assert len(plan_grid((2240, 2240), (1.0,), slide_mpp=0.25, target_mpp=0.125, tile_size=224, allow_upsample=True)) == 400  # 2× is fine: 20 × 20 tiles
