"""QC pictures: tissue outline and tile grid, score overlays, montages, atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_convnext.errors import ConfigError
from wsi_convnext.outputs.qc import montage, overlay_scores, render_qc, save_png

GREY = 200
GREEN = (0, 220, 0)
BLUE = (0, 0, 255)


def _thumb(h: int = 100, w: int = 120) -> np.ndarray:
    return np.full((h, w, 3), GREY, np.uint8)


def _is(px: np.ndarray, color) -> bool:
    return bool(np.array_equal(px, np.asarray(color, np.uint8)))


def _viridis(t: float) -> np.ndarray:
    import matplotlib

    return np.asarray(matplotlib.colormaps["viridis"](t)[:3]) * 255.0


# --------------------------------------------------------------------------- render_qc


def test_render_qc_outline_follows_resized_mask() -> None:
    # Mask at half the thumbnail's resolution: square [10, 30) mask px -> [20, 60) thumbnail px.
    mask = np.zeros((50, 60), bool)
    mask[10:30, 10:30] = True
    out = render_qc(_thumb(), 4.0, mask, np.zeros((0, 2), np.int64), 16.0, outline_width=1)
    assert out.shape == (100, 120, 3) and out.dtype == np.uint8
    green = np.all(out == GREEN, axis=-1)
    assert green[20, 20:60].all() and green[59, 20:60].all()  # top and bottom edge
    assert green[20:60, 20].all() and green[20:60, 59].all()  # left and right edge
    assert not green[22:58, 22:58].any()  # interior untouched
    assert not green[:19].any() and not green[61:].any()
    assert (out[~green] == GREY).all()


def test_render_qc_grid_at_tile_positions() -> None:
    # thumb_downsample 4: level-0 tile (40, 80) of extent 64 -> thumbnail box x [10, 26), y [20, 36).
    coords = np.array([[40, 80], [200, 160]], np.int64)
    out = render_qc(_thumb(), 4.0, None, coords, 64.0)
    blue = np.all(out == BLUE, axis=-1)
    assert blue[20, 10:26].all() and blue[35, 10:26].all()
    assert blue[20:36, 10].all() and blue[20:36, 25].all()
    assert blue[40, 50:66].all() and blue[40:56, 65].all()
    assert not blue[22:34, 12:24].any()  # no fill without tissue_fraction
    assert blue.sum() == 2 * (4 * 16 - 4)
    assert (out[~blue] == GREY).all()


def test_render_qc_tint_follows_tissue_fraction() -> None:
    coords = np.array([[40, 80], [200, 160]], np.int64)
    out = render_qc(_thumb(), 4.0, None, coords, 64.0, tissue_fraction=np.array([1.0, 0.0]))
    full, empty = out[28, 18].astype(int), out[48, 58].astype(int)
    assert full[2] > full[0] + 30  # tinted blue
    assert (empty == GREY).all()


def test_render_qc_title_band_and_real_data_shapes() -> None:
    thumb = _thumb()
    out = render_qc(thumb, 4.0, np.ones((10, 12), bool), np.array([[0, 0]]), 64.0, title="slide-1  120 tiles  0.5 mpp")
    assert out.shape[1] == 120 and out.shape[0] > 100
    band = out[: out.shape[0] - 100]
    assert (band.min(axis=-1) < 100).any()  # dark text pixels
    assert np.array_equal(out[-100:, :, :][50, 50], thumb[50, 50])


def test_render_qc_accepts_rgba_and_float() -> None:
    rgba = np.dstack([_thumb(), np.full((100, 120), 255, np.uint8)])
    a = render_qc(rgba, 4.0, None, np.array([[40, 80]]), 64.0)
    b = render_qc(_thumb().astype(np.float32) / 255.0, 4.0, None, np.array([[40, 80]]), 64.0)
    assert np.array_equal(a, b)


def test_render_qc_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        render_qc(np.zeros((10, 10)), 0.0, None, np.zeros((0, 2)), 4.0)
    with pytest.raises(ConfigError):
        render_qc(_thumb(), 4.0, None, np.zeros((3, 3)), 4.0)
    with pytest.raises(ConfigError):
        render_qc(_thumb(), 4.0, None, np.zeros((2, 2)), 4.0, tissue_fraction=np.ones(3))
    with pytest.raises(ConfigError):
        render_qc(np.zeros((10, 10, 5), np.uint8), 4.0, None, np.zeros((0, 2)), 4.0)


def test_tiling_qc_fits_the_qc_size_and_is_written_atomically(tmp_path: Path) -> None:
    from wsi_convnext.outputs.qc import QC_MAX_SIZE, render_tiling_qc, write_tiling_qc
    from wsi_convnext.tiling.grid import plan_grid

    grid = plan_grid((8000, 6000), [1.0], slide_mpp=0.5, target_mpp=0.5, tile_size=256)
    thumb, mask = _thumb(3000, 4000), np.ones((3000, 4000), bool)  # 2 level-0 px per thumbnail px
    img = render_tiling_qc(thumb, 2.0, mask, grid, "s1", np.ones(len(grid)))
    assert img.shape[1] == QC_MAX_SIZE and img.shape[0] > 3000 * QC_MAX_SIZE // 4000  # plus the title band
    failed = render_tiling_qc(thumb, 2.0, mask, grid, "s1", np.ones(len(grid)), failed="no tissue")
    assert failed.shape[1] == QC_MAX_SIZE and not np.array_equal(failed, img)
    path = write_tiling_qc(tmp_path / "s1.png", thumb, 2.0, mask, grid, "s1", np.ones(len(grid)))
    assert np.array_equal(np.asarray(Image.open(path)), img) and [p.name for p in tmp_path.iterdir()] == ["s1.png"]


# --------------------------------------------------------------------------- overlay_scores


def test_overlay_scores_colours_positions_and_nan() -> None:
    thumb = _thumb()
    coords = np.array([[0, 0], [160, 0], [0, 160], [320, 160]], np.int64)  # 10×10-px boxes at ds 4
    scores = np.array([0.0, 1.0, np.nan, 0.25])
    out = overlay_scores(thumb, 4.0, coords, 40.0, scores, alpha=1.0, colorbar=False)
    assert out.shape == thumb.shape
    np.testing.assert_allclose(out[5, 5], _viridis(0.0), atol=2)
    np.testing.assert_allclose(out[5, 45], _viridis(1.0), atol=2)
    np.testing.assert_allclose(out[45, 85], _viridis(0.25), atol=2)
    assert (out[40:50, 0:10] == GREY).all()  # NaN tile left unpainted
    assert (out[20:40, 20:40] == GREY).all()  # no tile there


def test_overlay_scores_alpha_blend_and_overlap_mean() -> None:
    thumb = _thumb()
    coords = np.array([[0, 0], [20, 0]], np.int64)  # overlap on level-0 x [20, 40) -> thumb x [5, 10)
    out = overlay_scores(thumb, 4.0, coords, 40.0, [0.0, 1.0], vmin=0.0, vmax=1.0, alpha=0.5, colorbar=False)
    np.testing.assert_allclose(out[5, 7], 0.5 * GREY + 0.5 * _viridis(0.5), atol=2)
    np.testing.assert_allclose(out[5, 2], 0.5 * GREY + 0.5 * _viridis(0.0), atol=2)
    np.testing.assert_allclose(out[5, 12], 0.5 * GREY + 0.5 * _viridis(1.0), atol=2)


def test_overlay_scores_colorbar() -> None:
    thumb = _thumb(200, 150)
    args = (thumb, 1.0, np.array([[0, 0]]), 20.0, [3.0])
    out = overlay_scores(*args, vmin=0.0, vmax=10.0, label="attention")
    assert out.shape[0] == 200 and out.shape[1] > 150
    assert np.array_equal(out[:, :150], overlay_scores(*args, vmin=0.0, vmax=10.0, colorbar=False))
    panel = out[:, 150:].astype(float)
    near_top = np.linalg.norm(panel - _viridis(1.0), axis=-1) < 12
    near_bottom = np.linalg.norm(panel - _viridis(0.0), axis=-1) < 12
    assert near_top[:40].any() and not near_top[160:].any()  # vmax colour on top
    assert near_bottom[160:].any() and not near_bottom[:40].any()
    bar_right = int(np.flatnonzero(near_top.any(axis=0)).max())
    text = (panel.max(axis=-1) < 120) & (np.ptp(panel, axis=-1) < 30)  # black/grey glyph pixels
    assert text[:30, bar_right + 2 :].any() and text[-30:, bar_right + 2 :].any()  # max and min ticks
    unlabelled = overlay_scores(*args, vmin=0.0, vmax=10.0)
    assert unlabelled.shape[1] < out.shape[1]


def test_overlay_scores_other_cmap_and_errors() -> None:
    out = overlay_scores(_thumb(), 4.0, np.array([[0, 0]]), 40.0, [1.0], cmap="jet", alpha=1.0, colorbar=False)
    assert not (out[5, 5] == GREY).all()
    with pytest.raises(ConfigError, match="colormap"):
        overlay_scores(_thumb(), 4.0, np.array([[0, 0]]), 40.0, [1.0], cmap="no-such-map")
    with pytest.raises(ConfigError):
        overlay_scores(_thumb(), 4.0, np.array([[0, 0]]), 40.0, [1.0, 2.0])
    with pytest.raises(ConfigError):
        overlay_scores(_thumb(), 4.0, np.array([[0, 0]]), 40.0, [1.0], alpha=2.0)


def test_overlay_all_nan_is_plain_thumbnail() -> None:
    out = overlay_scores(_thumb(), 4.0, np.array([[0, 0]]), 40.0, [np.nan], colorbar=False)
    assert (out == GREY).all()


# --------------------------------------------------------------------------- montage


def test_montage_layout_and_labels() -> None:
    tiles = np.stack([np.full((16, 16, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    out = montage(tiles, ncols=3, pad=2)
    assert out.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 2 + r * 18, 2 + c * 18
        assert (out[y : y + 16, x : x + 16] == 10 * (i + 1)).all()
    assert (out[0] == 255).all() and (out[2 + 18 : 2 + 36, 2 + 36 : 2 + 52] == 255).all()  # gaps, empty slot
    labelled = montage(tiles, ncols=3, pad=2, labels=[f"#{i}" for i in range(5)])
    assert not np.array_equal(labelled, out)
    assert (labelled[2:18, 2:18] != 10).any()


def test_montage_default_columns_and_errors() -> None:
    assert montage(np.zeros((4, 8, 8, 3), np.uint8), pad=0).shape == (16, 16, 3)
    with pytest.raises(ConfigError):
        montage(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="channel-last"):
        montage(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ConfigError):
        montage(np.zeros((2, 8, 8, 3), np.uint8), labels=["a"])


# --------------------------------------------------------------------------- save_png


def test_save_png_round_trip_and_atomic(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    dest = tmp_path / "sub" / "qc.png"
    assert save_png(dest, img) == dest
    with Image.open(dest) as im:
        assert im.format == "PNG"
        assert np.array_equal(np.asarray(im.convert("RGB")), img)
    save_png(dest, img[::-1])  # overwrite in place
    with Image.open(dest) as im:
        assert np.array_equal(np.asarray(im), img[::-1])
    assert sorted(p.name for p in dest.parent.iterdir()) == ["qc.png"]  # no temp files left


def test_save_png_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        save_png(tmp_path / "bad.png", np.zeros((4, 4, 7), np.uint8))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- real slide


def test_qc_on_real_slide(cmu_slide: Path, tmp_path: Path) -> None:
    import openslide

    from wsi_convnext.tiling.tissue import detect_tissue, tile_tissue_fraction

    with openslide.OpenSlide(str(cmu_slide)) as slide:
        w, h = slide.dimensions
        small = np.asarray(slide.get_thumbnail((w // 16, h // 16)).convert("RGB"))
        thumb = np.asarray(slide.get_thumbnail((w // 4, h // 4)).convert("RGB"))
    mask_ds, thumb_ds = w / small.shape[1], w / thumb.shape[1]
    mask = detect_tissue(small, 0.499 * mask_ds)
    xs, ys = np.meshgrid(np.arange(0, w - 223, 224), np.arange(0, h - 223, 224))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    frac = tile_tissue_fraction(mask, mask_ds, coords, 224.0)
    keep = frac >= 0.25
    assert 0 < keep.sum() < len(coords)
    pic = render_qc(thumb, thumb_ds, mask, coords[keep], 224.0, tissue_fraction=frac[keep], title="CMU-1-Small-Region")
    assert pic.shape[1] == thumb.shape[1] and pic.shape[0] > thumb.shape[0]
    assert np.all(pic == GREEN, axis=-1).sum() > 100 and np.all(pic == BLUE, axis=-1).sum() > 100
    heat = overlay_scores(thumb, thumb_ds, coords, 224.0, np.where(keep, frac, np.nan), label="tissue")
    path = save_png(tmp_path / "qc.png", np.concatenate([pic[-thumb.shape[0] :], heat[:, : thumb.shape[1]]], axis=1))
    with Image.open(path) as im:
        assert im.size == (2 * thumb.shape[1], thumb.shape[0])


# --------------------------------------------------------------------------- fonts, removed objects, heatmap titles


def _text_ink(text: str, size: int = 24) -> np.ndarray:
    from PIL import ImageDraw

    from wsi_convnext.outputs import qc

    img = Image.new("L", (8 * size, 2 * size), 0)
    ImageDraw.Draw(img).text((4, 4), text, fill=255, font=qc._font(size))
    return np.asarray(img)


def test_title_font_has_the_micro_sign() -> None:
    """Issue 11: "µm/px" was drawn with a missing-glyph box."""
    from fontTools.ttLib import TTFont

    from wsi_convnext.outputs.qc import font_path

    path = font_path()
    assert path is not None and path.name == "DejaVuSans.ttf"
    assert 0x00B5 in TTFont(path).getBestCmap()  # MICRO SIGN
    box = _text_ink("\ue000")  # a private-use code point: rendered as the notdef box
    micro = _text_ink("µ")
    assert micro.any() and not np.array_equal(micro, box)
    # The whole title: "µm/px" differs from the same title with a box in place of µ.
    titled = render_qc(_thumb(), 4.0, None, np.zeros((0, 2)), 16.0, title="s: 3 tiles @ 0.5 µm/px")
    boxed = render_qc(_thumb(), 4.0, None, np.zeros((0, 2)), 16.0, title="s: 3 tiles @ 0.5 \ue000m/px")
    assert titled.shape == boxed.shape and not np.array_equal(titled, boxed)


def test_render_qc_draws_removed_objects_in_their_colour() -> None:
    mask = np.zeros((50, 60), bool)
    mask[5:15, 5:15] = True
    removed = np.zeros((50, 60), bool)
    removed[30:40, 30:40] = True
    out = render_qc(_thumb(), 4.0, mask, np.zeros((0, 2), np.int64), 16.0, removed=removed, outline_width=1)
    orange = np.all(out == (255, 140, 0), axis=-1)
    assert orange[60, 60:80].all() and orange[60:80, 60].all()  # outline of the removed piece
    inside = out[64:76, 64:76].reshape(-1, 3)
    assert (inside == np.round((np.array([GREY] * 3) + (255, 140, 0)) / 2)).all()  # tinted
    assert np.all(out == GREEN, axis=-1)[10, 10:30].all() and not orange[:30].any()


def test_overlay_scores_title_and_tissue_outline() -> None:
    coords = np.array([[0, 0], [200, 160]], np.int64)
    mask = np.zeros((25, 30), bool)
    mask[5:20, 5:25] = True
    plain = overlay_scores(_thumb(), 4.0, coords, 64.0, [0.0, 1.0], colorbar=True)
    drawn = overlay_scores(_thumb(), 4.0, coords, 64.0, [0.0, 1.0], colorbar=True, mask=mask, title="s1: predicted tumor")
    assert drawn.shape[1] == plain.shape[1] and drawn.shape[0] > plain.shape[0]  # colour bar kept, title band added
    body = drawn[drawn.shape[0] - plain.shape[0]:]
    green = np.all(body == (0, 200, 0), axis=-1)
    assert green[20, 20:100].all() and not green[:19].any()


def test_heatmap_title_names_slide_class_and_probability() -> None:
    from wsi_convnext.outputs.heatmap import heatmap_title

    attrs = {"score": "attention", "predicted_class": "tumor", "probabilities": {"normal": 0.07, "tumor": 0.93}}
    assert heatmap_title("s1", attrs) == "s1: predicted tumor (p = 0.93); attention per tile"
    assert heatmap_title("s1", {"score": "attention"}) == "s1: attention per tile"
